"""Configs (``configs/codiff/{tiny,paper}.yaml``) and the models they describe.

:func:`build_models` makes every network of a config with random weights (zero-initialised diffuser outputs), on
any device; on ``"meta"`` the full-size paper models cost no memory, which is how their sizes are checked::

    python -m codiff.config configs/codiff/paper.yaml     # prints the parameter count of every model
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from torch import nn

from codiff.collaborate import CollaborativeDiffusion
from codiff.conditions import MaskEncoder, MaskFormat
from codiff.dynamic import build_dynamic_diffuser
from codiff.text_encoder import LDMTextEncoder
from common.errors import UserError, cli_entry
from common.io import PathLike, require_file
from common.modules import count_parameters
from common.schedule import NoiseSchedule


MODALITY_KINDS = ("mask", "text")


def load_config(path: PathLike) -> dict[str, Any]:
    """Read a YAML config; a missing file, bad YAML or a config without ``modalities`` is a :class:`UserError`."""
    path = require_file(path, "config")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"config {path} is not valid YAML ({' '.join(str(err).split())[:200]})") from None
    if not isinstance(config, dict) or not isinstance(config.get("modalities"), dict) or not config["modalities"]:
        raise UserError(f"config {path} has no 'modalities' section: start from configs/codiff/tiny.yaml")
    for name, section in config["modalities"].items():
        if section.get("kind") not in MODALITY_KINDS:
            raise UserError(f"config {path}: modality {name!r} needs kind: one of {', '.join(MODALITY_KINDS)}")
        if "unet" not in section:
            raise UserError(f"config {path}: modality {name!r} has no unet section")
    return config


def schedule_from_config(config: Mapping[str, Any]) -> NoiseSchedule:
    return NoiseSchedule.from_config(config.get("schedule", {}))


def _seeded(seed: Optional[int]):
    if seed is None:
        import contextlib

        return contextlib.nullcontext()
    from common.tiny import seeded

    return seeded(seed)


def build_unet(config: Mapping[str, Any], seed: Optional[int] = None, zero_init: str = "ldm") -> nn.Module:
    """A uni-modal eps model: ``UNet2DConditionModel(**config)``, started as ``zero_init`` says
    (:data:`codiff.dynamic.ZERO_INITS`; ``ldm``, the release: every LDM ``zero_module`` layer at zero)."""
    from diffusers import UNet2DConditionModel

    from codiff.dynamic import apply_zero_init

    with _seeded(seed):
        return apply_zero_init(UNet2DConditionModel(**dict(config)), zero_init)


def build_vae(config: Mapping[str, Any], seed: Optional[int] = None) -> nn.Module:
    from diffusers import AutoencoderKL

    builder = config.get("builder", "config")
    if builder == "tiny":
        from common.tiny import tiny_vae

        return tiny_vae(seed or 0)
    if builder == "config":
        with _seeded(seed):
            return AutoencoderKL(**dict(config["config"]))
    raise UserError(f"unknown vae builder {builder!r}: use tiny or config")


def build_text_encoder(config: Mapping[str, Any], seed: Optional[int] = None) -> nn.Module:
    builder = config.get("builder")
    if builder == "tiny_clip":
        from common.tiny import tiny_clip_text

        return tiny_clip_text(seed or 0)
    if builder == "ldm_bert":
        with _seeded(seed):
            return LDMTextEncoder(**dict(config.get("args", {})))
    raise UserError(f"unknown text encoder builder {builder!r}: use tiny_clip or ldm_bert")


def build_mask_encoder(section: Mapping[str, Any], seed: Optional[int] = None) -> MaskEncoder:
    with _seeded(seed):
        return MaskEncoder(MaskFormat.from_config(section["mask_format"]), int(section["encoder_dim"]))


@dataclass
class CodiffModels:
    """Everything a config describes. ``encoders``: modality -> mask encoder or text encoder module."""

    collaboration: CollaborativeDiffusion
    encoders: dict[str, nn.Module] = field(default_factory=dict)
    vae: Optional[nn.Module] = None

    def parameter_counts(self) -> dict[str, int]:
        counts = {}
        for name in self.collaboration.modalities:
            counts[f"unet[{name}]"] = count_parameters(self.collaboration.unets[name])
            counts[f"dynamic_diffuser[{name}]"] = count_parameters(self.collaboration.diffusers[name])
            if name in self.encoders:
                counts[f"encoder[{name}]"] = count_parameters(self.encoders[name])
        if self.vae is not None:
            counts["vae"] = count_parameters(self.vae)
        counts["trainable (dynamic diffusers)"] = sum(p.numel() for p in self.collaboration.trainable_parameters())
        return counts




def build_models(
    config: Mapping[str, Any], device: str | torch.device = "cpu", seed: int = 0, with_encoders: bool = True
) -> CodiffModels:
    """Random-weight models of ``config`` on ``device`` (``"meta"``: shapes only). Seeds ``seed + k`` per network;
    the diffusers' output convolutions are zero (the collaboration starts as the plain average), and by default every
other LDM ``zero_module`` layer of every UNet too (``zero_init`` of a modality / of ``dynamic_diffuser``)."""
    modalities = config["modalities"]
    with torch.device(device):
        unets = {name: build_unet(section["unet"], seed + 2 * i, section.get("zero_init", "ldm"))
                 for i, (name, section) in enumerate(modalities.items())}
        diffusers = {
            name: build_dynamic_diffuser(config["dynamic_diffuser"]["unet"], seed=seed + 2 * i + 1,
                                         zero_init=config["dynamic_diffuser"].get("zero_init", "ldm"))
            for i, name in enumerate(modalities)
        }
        collaboration = CollaborativeDiffusion(
            unets, diffusers, confidence_input=config["dynamic_diffuser"].get("confidence_input", "x_t")
        )
        encoders: dict[str, nn.Module] = {}
        vae = None
        if with_encoders:
            for name, section in modalities.items():
                if section["kind"] == "mask":
                    encoders[name] = build_mask_encoder(section, seed + 100)
                else:
                    encoders[name] = build_text_encoder(section["text_encoder"], seed + 101)
            if "vae" in config:
                vae = build_vae(config["vae"], seed + 102)
    return CodiffModels(collaboration, encoders, vae)


def parameter_report(models: CodiffModels) -> str:
    return "\n".join(f"{name:<34}{count / 1e6:>10.3f}M" for name, count in models.parameter_counts().items())


@cli_entry
def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Build a codiff config's models on the meta device and print sizes.")
    parser.add_argument("config", type=Path, help="configs/codiff/tiny.yaml or configs/codiff/paper.yaml")
    args = parser.parse_args(argv)
    models = build_models(load_config(args.config), device="meta")
    print(f"{args.config}:")
    print(parameter_report(models))


if __name__ == "__main__":
    main()
