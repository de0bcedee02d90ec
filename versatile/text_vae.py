"""The Optimus text VAE of Versatile Diffusion (Li et al. 2020, "Optimus"; VD paper §3.4; METHOD.md, "Optimus").

- **Encoder**: BERT over the lower-cased sentence; pooled output ``tanh(dense([CLS]))`` -> bias-free Linear ->
  ``(mu, logvar)``. VD's text latent is ``mu`` (no sampling, no scale factor): ``encode(texts) -> [B, D]``.
- **Decoder**: GPT-2 with the latent injected twice (Optimus ``GPT2ForLatentConnector``, both switches on):

  * *memory*: ``W_mem z`` (bias-free, ``D -> H * n_layer``) split into one ``H``-vector per layer, each split into
    heads without the ``c_attn`` projection and prepended as one extra key AND value slot (a 1-token KV cache, so
    the real tokens take positions 1, 2, ...);
  * *embedding*: ``W_emb z`` (bias-free, ``D -> H``) added to every token embedding (``wpe`` is added inside).

- **Sampling** ([R] ``sample_single_sequence_conditional``): from ``<BOS>``, multinomial at temperature 1 with no
  top-k / top-p truncation, until ``<EOS>`` or ``max_length`` tokens (BOS included; the last one is then forced
  to EOS). Batched here (each row stops on its own), with an optional torch generator for reproducibility.

Built from transformers configs (``BertModel``, ``GPT2LMHeadModel``) and an offline tokenizer: a WordPiece
tokenizer built with the ``tokenizers`` library from a word list (:func:`word_tokenizer`, the tiny default), the
project's CLIP BPE (``common.tiny.clip_tokenizer``), or tokenizer folders on disk. Nothing is downloaded. The
released ``optimus-vae.pth`` loads through :mod:`versatile.optimus_convert`.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError
from versatile.config import TextVAEConfig


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<BOS>", "<EOS>")


# --------------------------------------------------------------------------------------------------------------
# tokenizers (offline)
# --------------------------------------------------------------------------------------------------------------


def word_tokenizer(words: Sequence[str] = (), lowercase: bool = True, model_max_length: int = 512):
    """A BERT-style WordPiece ``PreTrainedTokenizerFast`` built offline from a word list.

    Vocabulary: the special tokens (``[PAD]`` = 0 as BERT, ``[UNK] [CLS] [SEP] [MASK]`` and the Optimus decoder's
    ``<BOS> <EOS>``), the given words, then every printable ASCII character (lower-cased when ``lowercase``) as a
    word start and as a ``##`` continuation, so any ASCII text tokenizes without ``[UNK]`` (unknown words fall back
    to characters).
    Single sentences are wrapped as ``[CLS] ... [SEP]`` like BERT's.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    # Upper-case letters never survive a lower-casing normaliser, so they get no entries then.
    chars = sorted({c.lower() if lowercase else c for c in string.printable if not c.isspace()})
    for token in (*SPECIAL_TOKENS, *(w.lower() if lowercase else w for w in words), *chars,
                  *(f"##{c}" for c in chars)):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=model_max_length, unk_token="[UNK]", pad_token="[PAD]",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", bos_token="<BOS>", eos_token="<EOS>",
    )


def build_tokenizers(config: TextVAEConfig) -> tuple[Any, Any]:
    """``(encoder_tokenizer, decoder_tokenizer)`` for ``config.optimus_tokenizer``.

    ``words``: one :func:`word_tokenizer` over ``optimus_words`` for both sides; ``clip``: the project's CLIP BPE
    for both (``<|startoftext|>`` / ``<|endoftext|>`` serve as BOS / EOS); otherwise a local folder holding
    ``encoder_tokenizer/`` and ``decoder_tokenizer/`` (e.g. BERT-base-cased and Optimus' GPT-2 with ``<BOS>``,
    ``<EOS>``, ``<PAD>`` added), loaded with ``local_files_only``.
    """
    kind = config.optimus_tokenizer
    if kind == "words":
        tok = word_tokenizer(config.optimus_words, lowercase=config.optimus_lowercase)
        return tok, tok
    if kind == "clip":
        from common.tiny import clip_tokenizer

        tok = clip_tokenizer()
        return tok, tok
    folder = Path(kind)
    if not folder.is_dir():
        raise UserError(f"optimus_tokenizer {kind!r}: use 'words', 'clip' or a folder with encoder_tokenizer/ and "
                        "decoder_tokenizer/")
    from transformers import AutoTokenizer

    found = []
    for side in ("encoder_tokenizer", "decoder_tokenizer"):
        if not (folder / side).is_dir():
            raise UserError(f"{folder} has no {side}/ folder: save both tokenizers there with save_pretrained")
        found.append(AutoTokenizer.from_pretrained(folder / side, local_files_only=True))
    return found[0], found[1]


def clean_up_tokenization(text: str) -> str:
    """[R]'s ``decode(..., clean_up_tokenization_spaces=True)`` clean-up: no space before punctuation and clitics.

    Applied here for every tokenizer, since transformers 5 skips its own clean-up for byte-level BPE (GPT-2).
    """
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def merge_adjacent_duplicates(text: str) -> str:
    """Drop a word equal to the word before it ([R0] ``prompt_merge_same_adj_word``): "a a red red cat" -> "a red cat"."""
    out: list[str] = []
    for word in text.split():
        if not out or out[-1] != word:
            out.append(word)
    return " ".join(out)


# --------------------------------------------------------------------------------------------------------------
# the VAE
# --------------------------------------------------------------------------------------------------------------


class OptimusVAE(nn.Module):
    """BERT encoder -> latent mean ``[B, D]``; GPT-2 decoder with memory + embedding injection (module docstring).

    Module names vs [R] ``optimus_vae_next``: ``encoder_head`` = ``encoder.linear``, ``latent_to_memory`` =
    ``decoder.transformer.linear``, ``latent_to_embedding`` = ``decoder.transformer.linear_emb``.

    Do not enable transformers' gradient checkpointing on ``decoder`` while training: GPT-2 then drops
    ``past_key_values`` (transformers 5.x ``GPT2Model.forward``), which would silently remove the memory injection.
    """

    def __init__(self, config: TextVAEConfig, latent_dim: int, encoder_tokenizer=None, decoder_tokenizer=None):
        super().__init__()
        from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

        self.config = config.validate()
        self.latent_dim = int(latent_dim)
        self.encoder_tokenizer, self.decoder_tokenizer = encoder_tokenizer, decoder_tokenizer
        enc_vocab = config.optimus_encoder_vocab_size or _vocab_size(encoder_tokenizer, "encoder")
        dec_vocab = config.optimus_decoder_vocab_size or _vocab_size(decoder_tokenizer, "decoder")
        hidden, heads = config.optimus_hidden_size, config.optimus_heads
        self.bos_id, self.eos_id, self.pad_id = _decoder_special_ids(decoder_tokenizer)
        self.encoder = BertModel(BertConfig(
            vocab_size=enc_vocab, hidden_size=hidden, num_hidden_layers=config.optimus_encoder_layers,
            num_attention_heads=heads, intermediate_size=config.optimus_intermediate_size,
            max_position_embeddings=config.optimus_encoder_positions,
            pad_token_id=_pad_id(encoder_tokenizer),
        ), add_pooling_layer=True)
        self.encoder_head = nn.Linear(hidden, 2 * self.latent_dim, bias=False)
        self.decoder = GPT2LMHeadModel(GPT2Config(
            vocab_size=dec_vocab, n_embd=hidden, n_layer=config.optimus_decoder_layers, n_head=heads,
            n_positions=config.optimus_decoder_positions, bos_token_id=self.bos_id, eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
        ))
        self.latent_to_memory = nn.Linear(self.latent_dim, hidden * config.optimus_decoder_layers, bias=False)
        self.latent_to_embedding = nn.Linear(self.latent_dim, hidden, bias=False)

    def enable_gradient_checkpointing(self) -> None:
        """``--gradient_checkpointing``: the BERT encoder only. GPT-2's own switch turns the cache off in training and
        drops ``past_key_values`` (the memory injection: the step fails on the mask's extra slot), and checkpointing
        its blocks would replay their cache updates in the backward; the decoder keeps its activations."""
        self.encoder.gradient_checkpointing_enable()

    @property
    def device(self) -> torch.device:
        return self.encoder_head.weight.device

    # ---------------------------------------------------------------- encoder

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder ids and mask ``[B, L]``: lower-cased ([R]), at most ``optimus_max_length`` wordpieces + CLS/SEP."""
        texts = _check_texts(texts)
        if self.encoder_tokenizer is None:
            raise UserError("this text VAE was built without tokenizers: pass encoder_tokenizer / decoder_tokenizer")
        if self.config.optimus_lowercase:
            texts = [t.lower() for t in texts]
        batch = self.encoder_tokenizer(texts, padding=True, truncation=True,
                                       max_length=self.config.optimus_max_length + 2, return_tensors="pt")
        return batch.input_ids.to(self.device), batch.attention_mask.to(self.device)

    def posterior(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, logvar)``, each ``[B, D]``: Linear(pooled BERT output) split in two (Optimus eq. 8)."""
        ids, mask = self.tokenize(texts)
        pooled = self.encoder(input_ids=ids, attention_mask=mask).pooler_output  # tanh(dense(h_[CLS]))
        mu, logvar = self.encoder_head(pooled).chunk(2, dim=-1)
        return mu, logvar

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """The text latent of VD: the posterior mean ``[B, D]`` (no sampling, no scale factor)."""
        return self.posterior(texts)[0]

    # ---------------------------------------------------------------- decoder

    def memory(self, z: torch.Tensor):
        """A 1-slot KV cache holding ``W_mem z``: per layer ``k = v = [B, heads, 1, head_dim]``."""
        from transformers import DynamicCache

        cfg = self.decoder.config
        per_layer = self.latent_to_memory(z).view(z.shape[0], cfg.n_layer, cfg.n_head, 1, cfg.n_embd // cfg.n_head)
        cache = DynamicCache()
        for layer in range(cfg.n_layer):
            kv = per_layer[:, layer]
            cache.update(kv, kv, layer)
        return cache

    def logits(self, z: torch.Tensor, ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
               cache=None) -> torch.Tensor:
        """Next-token logits ``[B, L, V]`` for decoder ids ``[B, L]`` given latents ``z [B, D]``.

        ``cache``: continue from a cache returned through :meth:`memory` (incremental decoding); by default a
        fresh memory cache is built. The attention mask covers the memory slot too.
        """
        cache = self.memory(z) if cache is None else cache
        past = cache.get_seq_length()
        embeds = self.decoder.transformer.wte(ids) + self.latent_to_embedding(z)[:, None, :]
        mask = torch.ones(ids.shape[0], past + ids.shape[1], dtype=torch.long, device=ids.device)
        if attention_mask is not None:
            mask[:, past:] = attention_mask
        out = self.decoder(inputs_embeds=embeds, past_key_values=cache, attention_mask=mask, use_cache=True)
        return out.logits

    def decoder_inputs(self, texts: Sequence[str], max_length: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """``<BOS> tokens <EOS>`` ids and mask ``[B, L]``, right-padded with the pad id (mask 0)."""
        texts = _check_texts(texts)
        if self.decoder_tokenizer is None:
            raise UserError("this text VAE was built without tokenizers: pass encoder_tokenizer / decoder_tokenizer")
        if self.config.optimus_lowercase:
            texts = [t.lower() for t in texts]
        rows = [
            [self.bos_id, *self.decoder_tokenizer(t, add_special_tokens=False).input_ids[: max_length - 2], self.eos_id]
            for t in texts
        ]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids.to(self.device), mask.to(self.device)

    def reconstruction_loss(self, texts: Sequence[str], beta: float = 1.0, generator=None, free_bits: float = 0.0,
                            noise_scale: float = 1.0):
        """Optimus' beta-VAE objective: ``CE(decoder(z), text) + beta * KL(q(z|x) || N(0, I))`` per sentence.

        ``z = mu + sigma * eps`` (reparameterised). Returns ``(loss, {"recon": ..., "kl": ...})``; the loss is
        the batch mean of the per-sentence summed token cross-entropy plus the weighted KL. ``free_bits`` > 0 is
        Optimus' ``dim_target_kl`` thresholding against posterior collapse: a latent dimension whose KL is below
        it adds nothing to the loss (the logged ``kl`` is the full KL). ``noise_scale`` < 1 shrinks the
        reparameterisation noise (0: a plain autoencoder on ``mu``), for a warm-up in which the decoder learns to
        read the latent before the noise would teach it to ignore it.
        """
        mu, logvar = self.posterior(texts)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + noise_scale * torch.exp(0.5 * logvar) * eps
        ids, mask = self.decoder_inputs(texts)
        logits = self.logits(z, ids[:, :-1], mask[:, :-1])
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        recon = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none").sum(1)
        kl_dims = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)  # [B, D]
        kl = kl_dims.sum(-1)
        kl_term = (kl_dims * (kl_dims > free_bits)).sum(-1) if free_bits > 0 else kl
        loss = (recon + beta * kl_term).mean()
        return loss, {"recon": recon.mean().detach(), "kl": kl.mean().detach()}

    @torch.no_grad()
    def decode(
        self,
        z: torch.Tensor,
        temperature: float = 1.0,
        max_length: int = 30,
        generator: Optional[torch.Generator] = None,
        merge_duplicates: bool = False,
    ) -> list[str]:
        """Latents ``[B, D]`` -> B sentences ([R] ``optimus_vae_next.decode``, batched).

        ``temperature > 0``: multinomial sampling of ``softmax(logits / temperature)``; ``0``: greedy.
        ``max_length`` counts BOS and EOS (30 in [R]). ``merge_duplicates``: [R0]'s adjacent-word de-duplication.
        """
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise UserError(f"text latents must be [B, {self.latent_dim}], got {list(z.shape)}")
        if temperature < 0:
            raise UserError(f"temperature must be >= 0, got {temperature}")
        if max_length < 2:
            raise UserError("max_length must leave room for <BOS> and <EOS> (>= 2)")
        z = z.to(self.device, self.encoder_head.weight.dtype)
        batch = z.shape[0]
        cache = self.memory(z)
        token = torch.full((batch, 1), self.bos_id, dtype=torch.long, device=self.device)
        generated = [token]
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        for step in range(1, max_length):
            logits = self.logits(z, token, cache=cache)[:, -1].float()
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            if step == max_length - 1:
                nxt = torch.full_like(nxt, self.eos_id)  # [R]: a sequence that hits the limit ends in EOS
            nxt = torch.where(done, torch.full_like(nxt, self.eos_id), nxt)
            done = done | (nxt == self.eos_id)
            token = nxt[:, None]
            generated.append(token)
            if bool(done.all()):
                break
        ids = torch.cat(generated, dim=1).tolist()
        texts = []
        for row in ids:
            body = row[1 : row.index(self.eos_id, 1)] if self.eos_id in row[1:] else row[1:]
            text = self.decoder_tokenizer.decode(body, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            text = " ".join(clean_up_tokenization(text).split())
            texts.append(merge_adjacent_duplicates(text) if merge_duplicates else text)
        return texts


def build_text_vae(config: TextVAEConfig, latent_dim: int, tokenizers: Optional[tuple] = None, seed: Optional[int] = None,
                   device=None) -> OptimusVAE:
    """An :class:`OptimusVAE` with tokenizers from ``config`` (or given); ``device="meta"`` for counting."""
    import contextlib

    enc_tok, dec_tok = tokenizers if tokenizers is not None else build_tokenizers(config)
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with rng, (torch.device(device) if device is not None else contextlib.nullcontext()):
        if seed is not None:
            torch.manual_seed(seed)
        return OptimusVAE(config, latent_dim, enc_tok, dec_tok).eval()


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise UserError("texts must be a non-empty list of strings")
    return texts


def _vocab_size(tokenizer, side: str) -> int:
    if tokenizer is None:
        raise UserError(f"set optimus_{side}_vocab_size or pass the {side} tokenizer")
    return len(tokenizer)


def _pad_id(tokenizer) -> int:
    if tokenizer is None or tokenizer.pad_token_id is None:
        return 0
    return int(tokenizer.pad_token_id)


def _decoder_special_ids(tokenizer) -> tuple[int, int, int]:
    """``(bos, eos, pad)`` of the decoder tokenizer; Optimus' GPT-2 adds ``<BOS> <EOS> <PAD>`` (50257-50259)."""
    if tokenizer is None:  # a model sized for counting only; these ids are never used to decode
        return 50258, 50259, 50257
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise UserError("the decoder tokenizer needs bos and eos tokens (Optimus adds <BOS> and <EOS> to GPT-2)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return int(bos), int(eos), int(pad)


TEXT_VAE_CONFIG = "text_vae_config.json"
TEXT_VAE_WEIGHTS = "text_vae.safetensors"


def save_text_vae(vae: OptimusVAE, folder, beside_existing: bool = False) -> Path:
    """Write config, weights and both tokenizers (``encoder_tokenizer/``, ``decoder_tokenizer/``), atomically
    (``beside_existing``: into a training run's output folder, next to its checkpoints and logs)."""
    import dataclasses
    import json

    from common.io import save_model_folder, save_safetensors

    if vae.encoder_tokenizer is None or vae.decoder_tokenizer is None:
        raise UserError("a text VAE without tokenizers cannot be saved usefully: build it with its tokenizers")
    config = dataclasses.replace(
        vae.config, optimus_tokenizer=".", optimus_encoder_vocab_size=len(vae.encoder_tokenizer),
        optimus_decoder_vocab_size=len(vae.decoder_tokenizer),
    )

    def write(tmp: Path) -> None:
        fields = {**dataclasses.asdict(config), "latent_dim": vae.latent_dim}
        (tmp / TEXT_VAE_CONFIG).write_text(json.dumps(fields, indent=2))
        state = vae.state_dict()
        if state["decoder.lm_head.weight"].data_ptr() == state["decoder.transformer.wte.weight"].data_ptr():
            del state["decoder.lm_head.weight"]  # tied to wte: one copy (154 MB at GPT-2 size); the load re-ties
        save_safetensors(state, tmp / TEXT_VAE_WEIGHTS)
        vae.encoder_tokenizer.save_pretrained(tmp / "encoder_tokenizer")
        vae.decoder_tokenizer.save_pretrained(tmp / "decoder_tokenizer")

    save_model_folder(folder, write, beside_existing=beside_existing)
    return Path(folder)


def load_text_vae(folder, device=None) -> OptimusVAE:
    """An :class:`OptimusVAE` from a :func:`save_text_vae` folder; every weight must be present (strict)."""
    import json

    from common.io import load_safetensors

    folder = Path(folder)
    if not (folder / TEXT_VAE_CONFIG).is_file():
        raise UserError(f"{folder} has no {TEXT_VAE_CONFIG}: pass a folder written by versatile.text_vae.save_text_vae")
    fields = json.loads((folder / TEXT_VAE_CONFIG).read_text())
    latent_dim = int(fields.pop("latent_dim"))
    fields["optimus_tokenizer"] = str(folder)
    config = TextVAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    vae = build_text_vae(config, latent_dim, device=device)
    state = load_safetensors(folder / TEXT_VAE_WEIGHTS)
    result = vae.load_state_dict(state, strict=False)
    # GPT-2 ties lm_head to wte: safetensors keeps one copy, so lm_head.weight may be absent by design.
    missing = [k for k in result.missing_keys if k != "decoder.lm_head.weight"]
    if missing or result.unexpected_keys:
        raise UserError(f"{folder / TEXT_VAE_WEIGHTS} does not fit its config: {len(missing)} missing, "
                        f"{len(result.unexpected_keys)} unexpected weights (e.g. {(missing + result.unexpected_keys)[0]})")
    return vae.eval()
