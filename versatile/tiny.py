"""Tiny random Versatile Diffusion stacks with the real architectures, for tests and the digits demo.

Built from ``configs/versatile/tiny.yaml``: a multi-flow diffuser on 8x8x4 latents and a 16-d text latent, the
project's tiny VAE (32x32 RGB -> 8x8x4) and tiny CLIP text tower with its real BPE tokenizer
(``common.tiny``), a tiny CLIP vision tower (32 px, 8 px patches: 17 tokens) in the same 32-d projection space,
and a tiny Optimus over an offline WordPiece vocabulary. Every builder seeds its own forked RNG.
"""

from __future__ import annotations

from typing import Any, Optional

from common.tiny import TINY_TEXT_DIM, clip_tokenizer, seeded, tiny_clip_text, tiny_vae
from versatile.config import VersatileConfig
from versatile.context import ClipImageContext, ClipTextContext, ContextEncoders
from versatile.multiflow import MultiFlowDiffuser
from versatile.pipeline import VersatilePipeline
from versatile.text_vae import OptimusVAE, build_text_vae


def tiny_clip_vision_config(**overrides: Any):
    """A ``CLIPVisionConfig``: 32 px images, 8 px patches (16 patches + CLS), 32-d hidden, 2 layers, 32-d projection."""
    from transformers import CLIPVisionConfig

    config: dict[str, Any] = dict(
        image_size=32, patch_size=8, hidden_size=TINY_TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, projection_dim=TINY_TEXT_DIM, hidden_act="quick_gelu",
    )
    config.update(overrides)
    return CLIPVisionConfig(**config)


def tiny_clip_vision(seed: int = 0, **overrides: Any):
    """A tiny ``CLIPVisionModelWithProjection``: pixels ``[B, 3, 32, 32]`` -> hidden ``[B, 17, 32]``."""
    from transformers import CLIPVisionModelWithProjection

    with seeded(seed):
        return CLIPVisionModelWithProjection(tiny_clip_vision_config(**overrides)).eval()


def tiny_config() -> VersatileConfig:
    return VersatileConfig.load("tiny")


def tiny_diffuser(seed: int = 0, config: Optional[VersatileConfig] = None, **overrides: Any) -> MultiFlowDiffuser:
    """The tiny multi-flow diffuser; ``zero_init=False`` gives every layer random weights (outputs are not 0)."""
    import dataclasses

    cfg = dataclasses.replace((config or tiny_config()).diffuser, **overrides)
    with seeded(seed):
        return MultiFlowDiffuser(cfg).eval()


def tiny_contexts(seed: int = 0, config: Optional[VersatileConfig] = None) -> ContextEncoders:
    cfg = (config or tiny_config()).context
    text = ClipTextContext(tiny_clip_text(seed, with_projection=True), clip_tokenizer(), cfg.clip_text_max_length)
    image = ClipImageContext(tiny_clip_vision(seed + 1), cfg.clip_image_size, cfg.image_pre_resize)
    return ContextEncoders(text, image)


def tiny_text_vae(seed: int = 0, config: Optional[VersatileConfig] = None) -> OptimusVAE:
    cfg = config or tiny_config()
    return build_text_vae(cfg.text_vae, cfg.diffuser.text_latent_dim, seed=seed)


def tiny_pipeline(seed: int = 0, config: Optional[VersatileConfig] = None, **diffuser_overrides: Any):
    """A complete tiny :class:`VersatilePipeline` (diffuser seed ``seed``, others ``seed + 1 ..``)."""
    cfg = config or tiny_config()
    return VersatilePipeline(
        tiny_diffuser(seed, cfg, **diffuser_overrides),
        tiny_vae(seed + 1),
        tiny_text_vae(seed + 2, cfg),
        tiny_contexts(seed + 3, cfg),
        cfg.sampling,
        cfg.context.uncond_image,
    )



# --------------------------------------------------------------------------------------------------------------
# tiny random folders in the layouts the scripts read (tests and smoke runs; the shipped ones are trained)
# --------------------------------------------------------------------------------------------------------------


def write_tiny_open_clip_folder(folder, seed: int = 0):
    """A random tiny open_clip CLIP in open_clip's local-dir layout (``common.models.load_open_clip(folder)``)."""
    import json
    from dataclasses import asdict
    from pathlib import Path

    from open_clip.transform import PreprocessCfg

    from common.io import atomic_write_dir, save_safetensors
    from common.tiny import tiny_open_clip, tiny_open_clip_config

    model = tiny_open_clip(seed)
    with atomic_write_dir(folder) as tmp:
        save_safetensors({k: v.contiguous() for k, v in model.state_dict().items() if v.is_floating_point()},
                         tmp / "open_clip_model.safetensors")
        cfg = {"model_cfg": tiny_open_clip_config(), "preprocess_cfg": asdict(PreprocessCfg(size=32))}
        (tmp / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    return Path(folder)


def write_tiny_towers(root, seed: int = 0, config: Optional[VersatileConfig] = None) -> dict:
    """Random ``vae/``, ``clip/`` (open_clip, 64-d projection) and ``text_vae/`` under ``root``: their paths."""
    from pathlib import Path

    from common.io import atomic_write_dir
    from versatile.text_vae import save_text_vae

    cfg = config or VersatileConfig.load("digits")
    root = Path(root)
    with atomic_write_dir(root / "vae") as tmp:
        tiny_vae(seed).save_pretrained(tmp, safe_serialization=True)
    write_tiny_open_clip_folder(root / "clip", seed + 1)
    save_text_vae(build_text_vae(cfg.text_vae, cfg.diffuser.text_latent_dim, seed=seed + 2), root / "text_vae")
    return {"vae": root / "vae", "clip": root / "clip", "text_vae": root / "text_vae"}


def write_tiny_digits(folder, per_split: int = 8, seed: int = 0):
    """A few real digits-world samples in the dataset's layout (``folder/{train,test}``), for smoke runs."""
    from pathlib import Path

    from common.digits import make_samples, real_digit_split, write_split

    x_tr, y_tr, x_te, y_te = real_digit_split(seed)
    folder = Path(folder)
    write_split(make_samples(x_tr[:per_split], y_tr[:per_split], seed), folder / "train")
    write_split(make_samples(x_te[:per_split], y_te[:per_split], seed + 1), folder / "test")
    return folder
