"""The paper's text encoder: LDM's ``BERTEmbedder``, a pre-LN transformer trained from scratch.

Only the tokenizer is BERT's (``bert-base-uncased`` ids, 77 positions, pads attended: no attention mask). The
encoder is x-transformers' ``TransformerWrapper(Encoder)``: token + learned absolute position embeddings, then
``depth`` blocks ``x + Attn(LN(x))``, ``x + FF(LN(x))`` and a final LayerNorm. Its attention projects 640 -> 8
heads x 64 = 512 (no q/k/v bias) and back 512 -> 640, which ``nn.MultiheadAttention`` cannot express, hence the
small explicit block below. 512 setting: 32 layers, 640 wide, 166.6M parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, -1).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v, as x-transformers
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, ff_mult: int):
        super().__init__()
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads, head_dim)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim * ff_mult), nn.GELU(), nn.Linear(dim * ff_mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_attn(x))
        return x + self.ff(self.norm_ff(x))


class LDMTextEncoder(nn.Module):
    """Token ids ``[B, L]`` -> token states ``[B, L, dim]`` (returned as a 1-tuple, like transformers' encoders
    with ``return_dict=False``, so :class:`~codiff.conditions.TextConditioner` can call either)."""

    def __init__(
        self,
        vocab_size: int = 30522,
        max_length: int = 77,
        dim: int = 640,
        depth: int = 32,
        heads: int = 8,
        head_dim: int = 64,
        ff_mult: int = 4,
    ):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, max_length=max_length, dim=dim, depth=depth, heads=heads,
                           head_dim=head_dim, ff_mult=ff_mult)
        self.token_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Embedding(max_length, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, head_dim, ff_mult) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)  # x-transformers' init of both embeddings
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        if input_ids.shape[1] > self.pos_emb.num_embeddings:
            raise ValueError(f"{input_ids.shape[1]} tokens exceed the {self.pos_emb.num_embeddings} positions")
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.token_emb(input_ids) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        return (self.norm(x),)

    @property
    def hidden_size(self) -> int:
        """Width of the token states (what a UNet cross-attends to)."""
        return int(self.config["dim"])

    def save_pretrained(self, folder) -> Path:
        """``config.json`` (``architecture: ldm_bert`` + the constructor arguments) + ``model.safetensors``, atomic."""
        from common.io import atomic_write_dir, save_safetensors

        with atomic_write_dir(folder) as tmp:
            (tmp / "config.json").write_text(json.dumps({"architecture": ARCHITECTURE, **self.config}, indent=2))
            save_safetensors(self.state_dict(), tmp / "model.safetensors")
        return Path(folder)

    @classmethod
    def from_pretrained(cls, folder) -> LDMTextEncoder:
        """Load what :meth:`save_pretrained` wrote (strict about keys and shapes)."""
        from common.errors import UserError
        from common.io import load_safetensors, require_file

        config = json.loads(require_file(Path(folder) / "config.json", "text encoder config").read_text())
        if config.pop("architecture", None) != ARCHITECTURE:
            raise UserError(f"{folder} is not an LDM text encoder folder (config.json has no architecture: "
                            f"{ARCHITECTURE})")
        with torch.device("meta"):
            encoder = cls(**config)
        try:
            encoder.load_state_dict(load_safetensors(Path(folder) / "model.safetensors"), strict=True, assign=True)
        except RuntimeError as err:
            first = " ".join(str(err).split())[:300]
            raise UserError(f"{folder}/model.safetensors does not fit its config.json ({first}): re-export it") from None
        return encoder.eval()


ARCHITECTURE = "ldm_bert"
