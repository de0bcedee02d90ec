"""The released Optimus text VAE of Versatile Diffusion (``optimus-vae.pth``) <-> :class:`OptimusVAE`.

The released file is the ``state_dict()`` of the official ``optimus_vae_next`` module: a BERT encoder with a
bias-free ``linear`` head (``encoder.*``) and a GPT-2 decoder whose transformer carries the two latent-injection
layers (``decoder.transformer.*``, ``decoder.lm_head.weight`` tied to ``wte``). Our :class:`OptimusVAE` is the
same network built from ``transformers``' ``BertModel`` / ``GPT2LMHeadModel``; every tensor keeps its name except

==================================  ======================================
ours                                released
==================================  ======================================
``encoder_head.weight``             ``encoder.linear.weight``
``latent_to_memory.weight``         ``decoder.transformer.linear.weight``
``latent_to_embedding.weight``      ``decoder.transformer.linear_emb.weight``
==================================  ======================================

and the released file additionally holds one causal-mask buffer per decoder layer
(``decoder.transformer.h.N.attn.bias``, lower-triangular ones ``[1, 1, P, P]``), which ``transformers`` builds on
the fly: it is checked (shape and value) and dropped on import, and written back on export. Loading is strict: a
missing, unexpected or mis-shaped tensor is one :class:`UserError` line naming it, and nothing is returned.

Tokenizers come from local files (nothing is downloaded): BERT-base-cased's WordPiece vocabulary (``vocab.txt`` or
the official ``bert-base-cased-vocab.txt``), used without lower-casing (the VAE lower-cases the text itself), and
GPT-2's byte-level BPE (``vocab.json`` + ``merges.txt`` or the official ``gpt2-vocab.json`` + ``gpt2-merges.txt``)
with ``<PAD> <BOS> <EOS>`` added in that order, as the official wrapper does (ids 50257-50259 for GPT-2's vocab).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Union

import torch

from common.errors import UserError
from versatile.config import TextVAEConfig
from versatile.text_vae import OptimusVAE, build_text_vae


RENAMES = {
    "encoder_head.weight": "encoder.linear.weight",
    "latent_to_memory.weight": "decoder.transformer.linear.weight",
    "latent_to_embedding.weight": "decoder.transformer.linear_emb.weight",
}
TIED = ("decoder.lm_head.weight", "decoder.transformer.wte.weight")
GPT2_SPECIAL_TOKENS = {"pad_token": "<PAD>", "bos_token": "<BOS>", "eos_token": "<EOS>"}  # official order
BERT_VOCAB_NAMES = ("vocab.txt", "bert-base-cased-vocab.txt")
GPT2_FILE_NAMES = (("vocab.json", "merges.txt"), ("gpt2-vocab.json", "gpt2-merges.txt"))


def causal_mask_keys(num_layers: int) -> list[str]:
    """The decoder's causal-mask buffers of the released layout, one per layer."""
    return [f"decoder.transformer.h.{i}.attn.bias" for i in range(num_layers)]


def optimus_key_map(vae: OptimusVAE) -> dict[str, str]:
    """Our parameter name -> its name in the released file, for every tensor of ``vae.state_dict()``."""
    return {name: RENAMES.get(name, name) for name in vae.state_dict()}


def _causal_mask(positions: int, device) -> torch.Tensor:
    return torch.tril(torch.ones(positions, positions, device=device)).view(1, 1, positions, positions)


def export_optimus_state_dict(vae: OptimusVAE) -> dict[str, torch.Tensor]:
    """Our weights in the released layout (the inverse of :func:`import_optimus_state_dict`)."""
    ours = vae.state_dict()
    out = {theirs: ours[name] for name, theirs in optimus_key_map(vae).items()}
    positions = vae.decoder.config.n_positions
    for key in causal_mask_keys(vae.decoder.config.n_layer):
        out[key] = _causal_mask(positions, vae.device)
    return out


def import_optimus_state_dict(state: Mapping[str, torch.Tensor], vae: OptimusVAE,
                              source: str = "the Optimus checkpoint") -> dict[str, torch.Tensor]:
    """A released-layout state dict -> ours, strictly (module docstring); ``vae`` gives the expected shapes."""
    expected = {name: tuple(t.shape) for name, t in vae.state_dict().items()}
    key_map = optimus_key_map(vae)
    masks = causal_mask_keys(vae.decoder.config.n_layer)
    wanted = set(key_map.values()) | set(masks)
    missing = [theirs for theirs in (*key_map.values(), *masks) if theirs not in state]
    if missing:
        raise UserError(f"{source} lacks {len(missing)} of the {len(wanted)} Optimus tensors (e.g. {missing[0]}): "
                        "pass the complete optimus-vae.pth of Versatile Diffusion (nothing was converted)")
    unexpected = [k for k in state if k not in wanted]
    if unexpected:
        raise UserError(f"{source} holds {len(unexpected)} tensors that are not part of the Optimus VAE (e.g. "
                        f"{unexpected[0]}): pass optimus-vae.pth itself, not a checkpoint of another model")
    out: dict[str, torch.Tensor] = {}
    for name, theirs in key_map.items():
        tensor = state[theirs]
        if not isinstance(tensor, torch.Tensor):
            raise UserError(f"{source}: {theirs} is a {type(tensor).__name__}, not a tensor")
        if tuple(tensor.shape) != expected[name]:
            raise UserError(f"{source}: {theirs} has shape {list(tensor.shape)} but the text VAE expects "
                            f"{list(expected[name])}{_shape_hint(theirs)}")
        out[name] = tensor
    positions = vae.decoder.config.n_positions
    for key in masks:
        mask = state[key]
        if tuple(mask.shape) != (1, 1, positions, positions):
            raise UserError(f"{source}: {key} has shape {list(mask.shape)} but a decoder with {positions} positions "
                            f"has a [1, 1, {positions}, {positions}] causal mask: set optimus_decoder_positions")
        if mask.device.type != "meta" and not torch.equal(mask.float(), _causal_mask(positions, mask.device)):
            raise UserError(f"{source}: {key} is not GPT-2's lower-triangular causal mask, so this decoder is not "
                            "the Optimus one: pass the released optimus-vae.pth")
    lm_head, wte = (out[k] for k in TIED)
    if lm_head.device.type != "meta" and not torch.equal(lm_head, wte):
        raise UserError(f"{source}: decoder.lm_head.weight differs from decoder.transformer.wte.weight, but Optimus "
                        "ties them: the file is not an Optimus VAE state dict")
    return out


def _shape_hint(key: str) -> str:
    if key == "encoder.embeddings.word_embeddings.weight":
        return ": the BERT tokenizer's vocabulary size must equal the first dimension (BERT-base-cased: 28996)"
    if key in TIED:
        return (": the GPT-2 tokenizer with <PAD> <BOS> <EOS> added must have as many tokens as the first dimension "
                "(Optimus: 50260)")
    return ": the checkpoint was made with other sizes than --model_config's optimus_* fields"


def read_optimus_checkpoint(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """The flat state dict of ``optimus-vae.pth`` (read with ``weights_only=True``; a ``state_dict`` wrapper opened)."""
    from common.io import safe_torch_load

    loaded = safe_torch_load(path)
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise UserError(f"{path} does not hold a flat name -> tensor state dict: pass optimus-vae.pth")
    return dict(loaded)


# --------------------------------------------------------------------------------------------------------------
# tokenizers from local files
# --------------------------------------------------------------------------------------------------------------


def _find(path: Path, names: tuple[str, ...]) -> Optional[Path]:
    return next((path / n for n in names if (path / n).is_file()), None)


def load_bert_tokenizer(path: Union[str, Path]):
    """BERT's WordPiece tokenizer from a vocabulary file or a folder holding one, cased (as Optimus uses it)."""
    from transformers import BertTokenizer

    path = Path(path)
    vocab_file = path if path.is_file() else (_find(path, BERT_VOCAB_NAMES) if path.is_dir() else None)
    if vocab_file is None:
        raise UserError(f"--bert_tokenizer {path}: pass a WordPiece vocabulary file or a folder holding "
                        f"{' or '.join(BERT_VOCAB_NAMES)} (bert-base-cased's; nothing is downloaded)")
    tokens = vocab_file.read_text(encoding="utf-8").split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    if len(vocab) != len(tokens) or "[PAD]" not in vocab or "[CLS]" not in vocab or "[SEP]" not in vocab:
        raise UserError(f"{vocab_file} is not a BERT vocabulary (one distinct token per line with [PAD], [CLS], "
                        "[SEP]): pass bert-base-cased's vocab.txt")
    # Optimus' BERT tokenizer runs with do_lower_case=False; the VAE lower-cases the sentence before it.
    return BertTokenizer(vocab=vocab, do_lower_case=False, model_max_length=512)


def load_gpt2_tokenizer(path: Union[str, Path]):
    """GPT-2's byte-level BPE from a folder with vocab.json + merges.txt, plus Optimus' ``<PAD> <BOS> <EOS>``."""
    from transformers import GPT2Tokenizer

    path = Path(path)
    files = next(((path / v, path / m) for v, m in GPT2_FILE_NAMES if (path / v).is_file() and (path / m).is_file()),
                 None) if path.is_dir() else None
    if files is None:
        names = " or ".join(f"{v} + {m}" for v, m in GPT2_FILE_NAMES)
        raise UserError(f"--gpt2_tokenizer {path}: pass a folder holding {names} (GPT-2's; nothing is downloaded)")
    vocab_file, merges_file = files
    try:
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{vocab_file} is not valid JSON ({err.msg}): pass GPT-2's vocab.json") from None
    merges = []
    for line in merges_file.read_text(encoding="utf-8").split("\n"):
        if line.startswith("#version") or not line.strip():
            continue
        pair = line.split()
        if len(pair) != 2:
            raise UserError(f"{merges_file}: the line {line!r} is not a BPE merge (two symbols): pass merges.txt")
        merges.append((pair[0], pair[1]))
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, model_max_length=1024)
    tokenizer.add_special_tokens(dict(GPT2_SPECIAL_TOKENS))
    return tokenizer


# --------------------------------------------------------------------------------------------------------------
# the whole conversion
# --------------------------------------------------------------------------------------------------------------


def convert_optimus_vae(
    checkpoint: Union[str, Path, Mapping[str, torch.Tensor]],
    bert_tokenizer: Union[str, Path],
    gpt2_tokenizer: Union[str, Path],
    config: TextVAEConfig,
    latent_dim: int,
) -> OptimusVAE:
    """:class:`OptimusVAE` holding the released weights, with tokenizers read from local files.

    ``config`` gives the sizes (``configs/versatile/paper.yaml`` holds the released ones); the vocabulary sizes
    are the tokenizers' and must match the checkpoint's embeddings. Save it with
    :func:`versatile.text_vae.save_text_vae`.
    """
    state = read_optimus_checkpoint(checkpoint) if not isinstance(checkpoint, Mapping) else dict(checkpoint)
    source = str(checkpoint) if not isinstance(checkpoint, Mapping) else "the Optimus state dict"
    tokenizers = (load_bert_tokenizer(bert_tokenizer), load_gpt2_tokenizer(gpt2_tokenizer))
    head = state.get(RENAMES["encoder_head.weight"])
    if head is not None and head.ndim == 2 and head.shape[0] != 2 * latent_dim:
        raise UserError(f"{source}: encoder.linear.weight gives a {head.shape[0] // 2}-d latent but the diffuser's "
                        f"text_latent_dim is {latent_dim}: pick the --model_config the text VAE was released with")
    config = dataclasses.replace(config, optimus_encoder_vocab_size=None, optimus_decoder_vocab_size=None,
                                 optimus_tokenizer=".", optimus_scaling_factor=1.0)  # VD feeds mu unscaled
    vae = build_text_vae(config, latent_dim, tokenizers=tokenizers)
    vae.load_state_dict(import_optimus_state_dict(state, vae, source), strict=True)
    return vae.eval()
