"""Tiny random models with the real architectures, for tests and the demo: no download, built in milliseconds.

Every builder seeds its own forked RNG (``torch.random.fork_rng``), so it is deterministic for a given ``seed``
and leaves the caller's global RNG state untouched. Models are returned in ``eval()`` mode, as
``from_pretrained`` returns them, so a saved-and-reloaded model compares equal to the original.

Tokenizers are real too, and built offline:

- CLIP: open_clip ships OpenAI's BPE merges (``bpe_simple_vocab_16e6.txt.gz``); :func:`clip_bpe_vocab` rebuilds
  the 49,408-entry vocabulary in the order open_clip's ``SimpleTokenizer`` builds it (256 byte symbols, the same
  with ``</w>``, 48,894 merges, then ``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407), which is also
  the vocabulary of ``openai/clip-vit-*`` on the Hub. Ids equal open_clip's (``tests/test_models.py``).
- T5: a genuine ``T5Tokenizer`` (SentencePiece-style Unigram) whose pieces are the most frequent ASCII CLIP
  BPE pieces, ``x</w>`` re-spelled as ``\u2581x``. Real T5 ids differ, but the class, special tokens
  (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, 100 sentinels) and the save/load path are those of a real T5 folder.

Sizes keep the test suite fast on CPU: the conditional UNet is ~0.8M parameters on 8x8x4 latents and the VAE
maps 32x32 RGB to 8x8x4 latents, the same structure as Stable Diffusion at a cost a CPU can carry.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_OPEN_CLIP_CONFIG_PATH = REPO_ROOT / "configs" / "tiny" / "tiny-open-clip.json"

CLIP_VOCAB_SIZE = 49408
CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407
CLIP_CONTEXT_LENGTH = 77
TINY_TEXT_DIM = 32  # hidden size of the tiny CLIP / T5 text encoders = the tiny UNet's cross_attention_dim


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the body with ``torch.manual_seed(seed)`` on a forked CPU RNG; the caller's RNG state is restored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------------------------------
# diffusers models
# --------------------------------------------------------------------------------------------------------------


def tiny_unet2d_condition_config(**overrides: Any) -> dict[str, Any]:
    """Config of the tiny latent-space text-conditional UNet: 8x8x4 latents, 32-d text tokens, ~0.8M params."""
    config: dict[str, Any] = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    config.update(overrides)
    return config


def tiny_unet2d_condition(seed: int = 0, **overrides: Any):
    """A tiny ``UNet2DConditionModel``: ``(sample [B, 4, 8, 8], t [B], text [B, L, 32]) -> [B, 4, 8, 8]``."""
    from diffusers import UNet2DConditionModel

    with seeded(seed):
        return UNet2DConditionModel(**tiny_unet2d_condition_config(**overrides)).eval()


def tiny_unet2d_config(**overrides: Any) -> dict[str, Any]:
    """Config of the tiny pixel-space UNet (ADM-like): 32x32 RGB; pass ``out_channels=6`` for a learned variance."""
    config: dict[str, Any] = dict(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
    )
    config.update(overrides)
    return config


def tiny_unet2d(seed: int = 0, **overrides: Any):
    """A tiny unconditional ``UNet2DModel``: ``(sample [B, 3, 32, 32], t [B]) -> [B, out_channels, 32, 32]``."""
    from diffusers import UNet2DModel

    with seeded(seed):
        return UNet2DModel(**tiny_unet2d_config(**overrides)).eval()


def tiny_vae_config(**overrides: Any) -> dict[str, Any]:
    """Config of the tiny ``AutoencoderKL``: three blocks = two downsamples, 32x32x3 -> 8x8x4, ~0.95M params."""
    config: dict[str, Any] = dict(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
    )
    config.update(overrides)
    return config


def tiny_vae(seed: int = 0, **overrides: Any):
    """A tiny ``AutoencoderKL``: ``encode([B, 3, 32, 32]) -> latents [B, 4, 8, 8]``, ``decode`` the reverse."""
    from diffusers import AutoencoderKL

    with seeded(seed):
        return AutoencoderKL(**tiny_vae_config(**overrides)).eval()


def sd_ddim_scheduler():
    """Stable Diffusion's DDIM scheduler: scaled_linear 0.00085..0.012, 1000 steps, steps_offset 1, no clipping."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


# --------------------------------------------------------------------------------------------------------------
# CLIP tokenizer + text encoder (transformers)
# --------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def clip_bpe_vocab() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """OpenAI CLIP's vocabulary (49,408 tokens, in id order) and its 48,894 BPE merges, from open_clip's file.

    Mirrors ``open_clip.tokenizer.SimpleTokenizer.__init__``: line 0 of the merges file is a header, merges are
    lines ``1 .. 49152 - 256 - 2``; the vocabulary is the 256 byte symbols, the same with ``</w>``, one token per
    merge, then the two special tokens, which open_clip spells ``<start_of_text>`` / ``<end_of_text>`` and
    OpenAI and transformers spell ``<|startoftext|>`` / ``<|endoftext|>`` (same ids, 49406 / 49407).
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe()) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1])
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [symbol + "</w>" for symbol in symbols] + ["".join(merge) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != CLIP_VOCAB_SIZE or len(set(vocab)) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"open_clip's BPE file gave {len(vocab)} tokens, expected {CLIP_VOCAB_SIZE} distinct")
    return tuple(vocab), merges  # type: ignore[return-value]


def write_clip_vocab_files(folder: str | Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` (the files a slow/older ``CLIPTokenizer`` reads) into ``folder``."""
    from common.io import atomic_write_file

    vocab, merges = clip_bpe_vocab()
    folder = Path(folder)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    with atomic_write_file(vocab_path) as tmp:
        tmp.write_text(json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False), "utf-8")
    with atomic_write_file(merges_path) as tmp:
        tmp.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), "utf-8")
    return vocab_path, merges_path


def clip_tokenizer(model_max_length: int = CLIP_CONTEXT_LENGTH):
    """The real CLIP ``CLIPTokenizer`` (transformers, tokenizers backend), built offline from open_clip's merges.

    Pads with ``<|endoftext|>`` like Stable Diffusion's tokenizer (open_clip pads with 0 instead; the ids
    before padding are identical).
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe_vocab()
    return CLIPTokenizer(
        vocab={token: i for i, token in enumerate(vocab)},
        merges=list(merges),
        model_max_length=model_max_length,
    )


def tiny_clip_text_config(**overrides: Any):
    """A ``CLIPTextConfig`` with the real vocabulary and 77 positions, 32-d hidden, 2 layers, 4 heads."""
    from transformers import CLIPTextConfig

    config: dict[str, Any] = dict(
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=CLIP_CONTEXT_LENGTH,
        hidden_size=TINY_TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=TINY_TEXT_DIM,
        hidden_act="quick_gelu",
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=CLIP_EOS_ID,
    )
    config.update(overrides)
    return CLIPTextConfig(**config)


def tiny_clip_text(seed: int = 0, with_projection: bool = False, **overrides: Any):
    """A tiny ``CLIPTextModel`` (or ``CLIPTextModelWithProjection``): ids ``[B, 77]`` -> hidden ``[B, 77, 32]``."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with seeded(seed):
        return model_class(tiny_clip_text_config(**overrides)).eval()


# --------------------------------------------------------------------------------------------------------------
# T5 tokenizer + encoder (transformers)
# --------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def t5_unigram_vocab(num_pieces: int = 8000) -> tuple[tuple[str, float], ...]:
    """A T5-layout Unigram vocabulary: ``<pad>``, ``</s>``, ``<unk>``, ``\u2581``, pieces, then 100 sentinels.

    Pieces are the first ``num_pieces`` printable-ASCII CLIP BPE tokens in merge order (frequent first); a
    word-final token ``x</w>`` becomes the word-initial SentencePiece ``\u2581x``. Scores ``-log(rank + 2)``
    stand in for log-probabilities, so the Viterbi split prefers frequent, long pieces. Every ASCII word can be
    split (all single characters are present); other characters map to ``<unk>``, as in T5 without byte fallback.
    """
    vocab, _ = clip_bpe_vocab()
    pieces: list[str] = []
    seen: set[str] = set()
    for token in vocab[:-2]:
        piece = "\u2581" + token[: -len("</w>")] if token.endswith("</w>") else token
        if piece in seen or not all("!" <= char <= "~" for char in piece.lstrip("\u2581")):
            continue
        seen.add(piece)
        pieces.append(piece)
        if len(pieces) == num_pieces:
            break
    scored = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    scored += [(piece, -math.log(rank + 2)) for rank, piece in enumerate(pieces)]
    scored += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(100))]
    return tuple(scored)


def t5_tokenizer(num_pieces: int = 8000, model_max_length: int = 512):
    """A genuine ``T5Tokenizer`` over :func:`t5_unigram_vocab`; round-trips through save/from_pretrained."""
    from transformers import T5Tokenizer

    return T5Tokenizer(
        vocab=list(t5_unigram_vocab(num_pieces)), extra_ids=100, model_max_length=model_max_length
    )


def tiny_t5_config(**overrides: Any):
    """A ``T5Config`` in the T5 v1.1 style (gated-GELU) with 32-d tokens, 2 layers, 4 heads."""
    from transformers import T5Config

    config: dict[str, Any] = dict(
        vocab_size=len(t5_unigram_vocab()),
        d_model=TINY_TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        is_encoder_decoder=False,
        use_cache=False,
    )
    config.update(overrides)
    return T5Config(**config)


def tiny_t5_encoder(seed: int = 0, **overrides: Any):
    """A tiny ``T5EncoderModel``: ids ``[B, L]`` (from :func:`t5_tokenizer`) -> hidden ``[B, L, 32]``."""
    from transformers import T5EncoderModel

    with seeded(seed):
        return T5EncoderModel(tiny_t5_config(**overrides)).eval()


# --------------------------------------------------------------------------------------------------------------
# open_clip
# --------------------------------------------------------------------------------------------------------------


def tiny_open_clip_config() -> dict[str, Any]:
    """open_clip model config of a tiny OpenAI-layout CLIP (ViT-8/32px image tower, 77-token text tower).

    Widths are 64 and ``head_width`` 64 (one head) because OpenAI's layout, which open_clip's
    ``build_model_from_openai_state_dict`` reads back from JIT archives, fixes ``heads = width // 64``; and
    ``quick_gelu`` is what OpenAI trained with. The vocabulary is the real 49,408 so the real tokenizer fits.
    Saved as ``configs/tiny/tiny-open-clip.json`` (a test keeps the two equal).
    """
    return {
        "embed_dim": 64,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 64, "patch_size": 8},
        "text_cfg": {"context_length": CLIP_CONTEXT_LENGTH, "vocab_size": CLIP_VOCAB_SIZE, "width": 64,
                     "heads": 1, "layers": 2},
    }


def tiny_open_clip(seed: int = 0):
    """A tiny ``open_clip.CLIP``: ``encode_image([B, 3, 32, 32]) -> [B, 64]``, ``encode_text([B, 77]) -> [B, 64]``.

    Built the way ``open_clip.create_model`` builds a registered config (``CLIP(**cfg)`` plus its preprocess
    config), without touching open_clip's global config registry.
    """
    from dataclasses import asdict

    from open_clip.model import CLIP, set_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg

    config = tiny_open_clip_config()
    with seeded(seed):
        model = CLIP(**config)
    set_model_preprocess_cfg(model, asdict(PreprocessCfg(size=model.visual.image_size)))
    return model.eval()


# --------------------------------------------------------------------------------------------------------------
# A whole tiny Stable Diffusion
# --------------------------------------------------------------------------------------------------------------


def tiny_sd_components(seed: int = 0) -> dict[str, Any]:
    """Keyword arguments for ``StableDiffusionPipeline``: tiny unet/vae/text encoder, real tokenizer, SD's DDIM.

    The UNet, VAE and text encoder get seeds ``seed``, ``seed + 1``, ``seed + 2`` so they are independent.
    """
    return dict(
        unet=tiny_unet2d_condition(seed),
        vae=tiny_vae(seed + 1),
        text_encoder=tiny_clip_text(seed + 2),
        tokenizer=clip_tokenizer(),
        scheduler=sd_ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def make_tiny_sd_folder(path: str | Path, seed: int = 0) -> Path:
    """Write a complete tiny Stable Diffusion folder that plain ``StableDiffusionPipeline.from_pretrained`` loads.

    Layout as on the Hub (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
    ``scheduler/``), weights in safetensors, written atomically by :func:`common.io.atomic_write_dir` (a new
    or empty folder, or this builder's own earlier output; never a folder of the user's). The tokenizer folder also gets ``vocab.json`` / ``merges.txt``. Default
    generation is 32x32 RGB (UNet sample size 8 times the VAE's factor 4).
    """
    from diffusers import StableDiffusionPipeline

    from common.io import atomic_write_dir

    pipeline = StableDiffusionPipeline(**tiny_sd_components(seed))
    with atomic_write_dir(path) as tmp:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        write_clip_vocab_files(tmp / "tokenizer")
    return Path(path)
