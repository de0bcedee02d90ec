"""Shifted Diffusion configs (``configs/shifted/*.yaml``): read them, build the parts, count parameters.

Keys are the scripts' flag names (the reference's where it has one), grouped by script: ``prior`` (train_prior),
``bank`` (fit_bank), ``sample`` (sample_prior), ``sd`` (finetune_sd). ``build_parts(cfg, device="meta")`` builds the
full-size prior and SD-2 parts without allocating memory, which is how ``paper.yaml`` is checked on a CPU.

Run ``python -m shifted.config configs/shifted/paper.yaml`` to print the parameter counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import torch

from common.errors import UserError, cli_entry
from common.modules import count_parameters, parameter_count_command
from shifted.prior import ShiftedPrior
from shifted.projection import ImageEmbProjection


REQUIRED = ("clip_models", "clip_dims", "t5_model", "prior", "bank", "sample", "sd")


def load_config(path: Union[str, Path]) -> dict[str, Any]:
    """Parse a shifted config file; missing sections or a CLIP list that does not match its widths are errors."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"config {path} does not exist: pass configs/shifted/tiny.yaml or paper.yaml")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"config {path} is not valid YAML: {' '.join(str(err).split())}") from None
    missing = [key for key in REQUIRED if not isinstance(cfg, dict) or key not in cfg]
    if missing:
        raise UserError(f"config {path} lacks {', '.join(missing)}: start from configs/shifted/tiny.yaml")
    if len(cfg["clip_models"]) != len(cfg["clip_dims"]):
        raise UserError(f"config {path}: {len(cfg['clip_models'])} clip_models but {len(cfg['clip_dims'])} clip_dims")
    return cfg


def prior_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """:class:`ShiftedPrior` arguments from a config's ``prior`` section and CLIP / T5 description."""
    p = cfg["prior"]
    return dict(
        emb_dim=sum(cfg["clip_dims"]),
        text_dim=int(p["t5_dim"]),
        text_len=int(p["t5_max_length"]),
        width=int(p["model_width"]),
        layers=int(p["model_layers"]),
        heads=int(p["model_num_heads"]),
        dim_head=int(p.get("model_dim_head", 64)),
        use_bank_token=bool(p.get("use_vocab", True)),
        clip_models=list(cfg["clip_models"]),
        clip_dims=[int(d) for d in cfg["clip_dims"]],
        text_encoder=str(cfg["t5_model"]),
        num_train_timesteps=int(p.get("num_train_timesteps", 1000)),
        beta_schedule=str(p.get("noise_schedule", "linear")),
        beta_start=float(p["beta_min"]),
        beta_end=float(p["beta_max"]),
    )


def build_prior(cfg: dict[str, Any], device: Union[str, torch.device] = "cpu", **overrides) -> ShiftedPrior:
    with torch.device(device):
        return ShiftedPrior(**{**prior_kwargs(cfg), **overrides})


def build_projection(cfg: dict[str, Any], device: Union[str, torch.device] = "cpu") -> ImageEmbProjection:
    sd = cfg["sd"]
    with torch.device(device):
        return ImageEmbProjection(
            in_dim=sum(cfg["clip_dims"]),
            n_tokens=int(sd["n_tokens"]),
            cross_attention_dim=int(sd["unet"]["cross_attention_dim"]),
            learned_null=bool(sd.get("learned_null", False)),
        )


def build_sd_unet(cfg: dict[str, Any], device: Union[str, torch.device] = "cpu"):
    """The decoder's stock ``UNet2DConditionModel`` (random init; fine-tuning loads the pretrained one)."""
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(**cfg["sd"]["unet"])


def build_sd_vae(cfg: dict[str, Any], device: Union[str, torch.device] = "cpu"):
    from diffusers import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL(**cfg["sd"]["vae"])




def parameter_counts(cfg: dict[str, Any], device: Union[str, torch.device] = "meta") -> dict[str, int]:
    """Parameters of every part: prior, SD projection, SD UNet, SD VAE (built on ``device``, meta by default)."""
    return {
        "prior": count_parameters(build_prior(cfg, device)),
        "sd_projection": count_parameters(build_projection(cfg, device)),
        "sd_unet": count_parameters(build_sd_unet(cfg, device)),
        "sd_vae": count_parameters(build_sd_vae(cfg, device)),
    }


@cli_entry
def main(argv=None) -> None:
    parameter_count_command(argv, "Shifted", load_config, parameter_counts)


if __name__ == "__main__":
    main()
