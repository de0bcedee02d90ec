"""ContextDiff configs (``configs/contextdiff/*.yaml``): read them, build the parts, count parameters.

Sections: ``adapter`` (the :class:`RelationalNet`), ``unet`` / ``vae`` / ``text_encoder`` (the diffusers and
transformers configs of the backbone it adapts), ``scheduler`` (a diffusers scheduler config), ``stage1`` /
``stage2`` / ``sample`` (the flags of ``scripts/contextdiff/{train_adapter,finetune_diffusion,sample}.py``; each
section equals the flat ``configs/contextdiff/<script>_<size>.yaml`` that ``--config`` takes, kept equal by a test;
``train_adapter.py --adapter_config <this yaml>`` reads the ``adapter`` section).
``build_parts(cfg, device="meta")`` builds the full-size parts without allocating memory, which is how
``paper.yaml`` (SD-2.1-base scale) is checked on a CPU.

Run ``python -m contextdiff.config configs/contextdiff/paper.yaml`` to print the parameter counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import torch

from common.errors import UserError, cli_entry
from common.modules import count_parameters, parameter_count_command
from contextdiff.adapter import RelationalNet


REQUIRED = ("adapter", "unet", "vae", "text_encoder", "scheduler", "stage1", "stage2", "sample")
ADAPTER_KEYS = ("latent_channels", "patch_size", "dim", "depth", "heads", "text_sources", "text_dims", "r_bound", "time_aware")


def load_config(path: Union[str, Path]) -> dict[str, Any]:
    """Parse a ContextDiff config; a missing section or an adapter that does not fit the backbone is an error."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"config {path} does not exist: pass configs/contextdiff/tiny.yaml or paper.yaml")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"config {path} is not valid YAML: {' '.join(str(err).split())}") from None
    missing = [key for key in REQUIRED if not isinstance(cfg, dict) or key not in cfg]
    if missing:
        raise UserError(f"config {path} lacks {', '.join(missing)}: start from configs/contextdiff/tiny.yaml")
    unknown = sorted(set(cfg["adapter"]) - set(ADAPTER_KEYS))
    if unknown:
        raise UserError(f"config {path}: unknown adapter keys {unknown}; allowed: {', '.join(ADAPTER_KEYS)}")
    adapter = cfg["adapter"]
    if adapter["latent_channels"] != cfg["unet"]["in_channels"]:
        raise UserError(f"config {path}: adapter.latent_channels {adapter['latent_channels']} != unet.in_channels")
    sources = list(adapter["text_sources"])
    if "clip" in sources and adapter["text_dims"][sources.index("clip")] != cfg["text_encoder"]["hidden_size"]:
        raise UserError(f"config {path}: the adapter's clip text width differs from text_encoder.hidden_size")
    return cfg


def build_adapter(cfg: dict[str, Any], device: Union[str, torch.device] = "cpu") -> RelationalNet:
    with torch.device(device):
        return RelationalNet(**cfg["adapter"])


def build_unet(cfg: dict[str, Any], device: Union[str, torch.device] = "cpu"):
    """The backbone's stock ``UNet2DConditionModel`` (random init; the scripts load the pretrained one)."""
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(**cfg["unet"])


def build_vae(cfg: dict[str, Any], device: Union[str, torch.device] = "cpu"):
    from diffusers import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL(**cfg["vae"])


def build_text_encoder(cfg: dict[str, Any], device: Union[str, torch.device] = "cpu"):
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device):
        return CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))


def parameter_counts(cfg: dict[str, Any], device: Union[str, torch.device] = "meta") -> dict[str, int]:
    """Parameters of every part: adapter, UNet, VAE, CLIP text encoder (built on ``device``, meta by default)."""
    return {
        "adapter": count_parameters(build_adapter(cfg, device)),
        "unet": count_parameters(build_unet(cfg, device)),
        "vae": count_parameters(build_vae(cfg, device)),
        "text_encoder": count_parameters(build_text_encoder(cfg, device)),
    }


@cli_entry
def main(argv=None) -> None:
    counts = parameter_count_command(argv, "ContextDiff", load_config, parameter_counts)
    print(f"{'adapter/unet':14s} {counts['adapter'] / counts['unet']:>15.2%}")


if __name__ == "__main__":
    main()
