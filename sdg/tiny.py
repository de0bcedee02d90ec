"""Tiny SDG components with the real architectures, for tests and the digits demo (built in milliseconds, seeded).

- ``TINY_ADM_FLAGS``: a 32-px ADM (learn_sigma, scale-shift norm, res up/down, multi-head attention at 16 px),
  ~0.8M parameters, built through the same flags -> ``UNet2DModel`` path as the paper's models.
- ``tiny_resnet_clip`` / ``common.tiny.tiny_open_clip``: open_clip CLIPs with a ``ModifiedResNet`` or a ViT image
  tower (32 px) and the real 49,408-token text tower, so language guidance runs end to end.
"""

from __future__ import annotations

import copy
from typing import Any

from common.tiny import CLIP_CONTEXT_LENGTH, CLIP_VOCAB_SIZE, seeded
from sdg.adm import ADMFlags, build_unet
from sdg.noisy_clip import NoiseAwareCLIP


TINY_ADM_FLAGS: dict[str, Any] = dict(
    image_size=32,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="16",
    num_head_channels=16,
    resblock_updown=True,
    use_scale_shift_norm=True,
    learn_sigma=True,
    diffusion_steps=1000,
    noise_schedule="linear",
    timestep_respacing="10",
)


def tiny_adm_flags(**overrides: Any) -> ADMFlags:
    return ADMFlags.from_dict({**TINY_ADM_FLAGS, **overrides})


def tiny_adm_unet(seed: int = 0, **overrides: Any):
    """A tiny learn_sigma ``UNet2DModel``: ``([B, 3, 32, 32], t [B]) -> [B, 6, 32, 32]`` (eps, v)."""
    flags = tiny_adm_flags(**overrides)
    with seeded(seed):
        return build_unet(flags)


def tiny_resnet_clip_config() -> dict[str, Any]:
    """open_clip config of a tiny CLIP whose image tower is a ``ModifiedResNet`` (layers [1,1,1,1], width 16)."""
    return {
        "embed_dim": 16,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16},
        "text_cfg": {"context_length": CLIP_CONTEXT_LENGTH, "vocab_size": CLIP_VOCAB_SIZE, "width": 32,
                     "heads": 2, "layers": 1},
    }


def tiny_resnet_clip(seed: int = 0):
    """A tiny ``open_clip.CLIP`` with a ResNet tower: ``encode_image([B, 3, 32, 32]) -> [B, 16]``, real tokenizer."""
    from open_clip.model import CLIP

    with seeded(seed):
        return CLIP(**tiny_resnet_clip_config()).eval()


def tiny_noise_aware_clip(kind: str = "resnet", seed: int = 0, film_init: str = "zero", **kwargs: Any):
    """``(noise-aware CLIP, the open_clip model it wraps a copy of)``; the model's own tower stays the plain teacher."""
    from common.tiny import tiny_open_clip

    model = tiny_resnet_clip(seed) if kind == "resnet" else tiny_open_clip(seed)
    with seeded(seed + 1):
        clip = NoiseAwareCLIP(copy.deepcopy(model.visual), t_dim=32, hidden=32, film_init=film_init, **kwargs)
    return clip.eval(), model


def save_tiny_open_clip_folder(path, seed: int = 0):
    """Write a tiny random open_clip CLIP (``common.tiny.tiny_open_clip``, ViT 32 px, real tokenizer) in open_clip's
    local folder layout (``open_clip_config.json`` + ``open_clip_model.safetensors``), as ``ckpt/tiny/clip`` is."""
    import json
    from pathlib import Path

    from common.io import atomic_write_dir, save_safetensors
    from common.tiny import tiny_open_clip, tiny_open_clip_config

    model = tiny_open_clip(seed)
    with atomic_write_dir(path) as tmp:
        save_safetensors({k: v for k, v in model.state_dict().items() if v.is_floating_point()},
                         tmp / "open_clip_model.safetensors")
        (tmp / "open_clip_config.json").write_text(json.dumps(
            {"model_cfg": tiny_open_clip_config(), "preprocess_cfg": dict(model.visual.preprocess_cfg)}))
    return Path(path)


def make_tiny_sdg_folder(path, seed: int = 0, base_clip=None, film_init: str = "default", **adm_overrides: Any):
    """A complete random SDG folder for tests: ``unet/`` (tiny ADM + adm_flags.json) and ``clip/`` (noise-aware CLIP
    over ``base_clip``, written next to it as ``<path>/base_clip`` when not given). ``film_init="default"`` makes
    the time modulation non-trivial."""
    from pathlib import Path

    from common.tiny import seeded
    from sdg.checkpoint import (
        clip_settings,
        load_base_clip,
        noise_aware_from_base,
        save_noise_aware_clip,
        save_unet_folder,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flags = tiny_adm_flags(**adm_overrides)
    save_unet_folder(tiny_adm_unet(seed, **adm_overrides), flags, path / "unet")
    if base_clip is None:
        base_clip = save_tiny_open_clip_folder(path / "base_clip", seed)
    model, _ = load_base_clip(base_clip)
    settings = {"image_size": flags.image_size, "t_dim": 16, "hidden": 16, "film_init": film_init,
                "pos_init": "interp"}
    with seeded(seed + 1):
        clip = noise_aware_from_base(model, settings)
    save_noise_aware_clip(clip.eval(), path / "clip", base_clip=base_clip,
                          settings=clip_settings(clip, film_init, "interp"), base_model=model)
    return path
