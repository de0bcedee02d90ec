"""Uni-modal members and collaboration checkpoints on disk: what the scripts write and ``--model_dir`` loads.

A **member** is one frozen uni-modal latent model ``eps_m(x_t, t, c_m)`` with what turns its raw condition into
tokens (METHOD.md, "Members"). Two layouts are read:

- a diffusers Stable-Diffusion pipeline folder (``model_index.json``: ``unet/``, ``text_encoder/``,
  ``tokenizer/``, ``vae/``, ``scheduler/``) is a **text** member as it stands: the shipped baseline
  ``ckpt/tiny/baseline`` is one;
- a folder written by ``scripts/codiff/train_unimodal.py`` (``codiff_member.json`` + ``unet/`` and, for a mask
  member, ``mask_encoder/``). Frozen towers it was trained with (VAE, CLIP text encoder) are referenced by path,
  not copied; relative paths are relative to the member folder.

A **collaboration checkpoint** (``codiff.json``, written by ``scripts/codiff/train_dynamic.py``) names its members
(by path), its dynamic diffusers (``dynamic_diffusers/``, :class:`~codiff.dynamic.DynamicDiffusers`), the VAE, the
common noise schedule (a diffusers scheduler config) and sampling defaults. :func:`load_collaboration` builds
everything for generation; the members must share one noise schedule and one latent shape (UserError otherwise).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from codiff.collaborate import CollaborativeDiffusion
from codiff.conditions import MaskEncoder, MaskFormat, TextConditioner
from codiff.dynamic import DynamicDiffusers
from common.errors import UserError
from common.io import PathLike, read_json_object
from common.latents import vae_scale_factor
from common.schedule import NoiseSchedule


MEMBER_FILE = "codiff_member.json"
CHECKPOINT_FILE = "codiff.json"
MEMBER_FORMAT = "diffusion-lab/codiff-member/v1"
CHECKPOINT_FORMAT = "diffusion-lab/codiff/v1"
KINDS = ("mask", "text")


# --------------------------------------------------------------------------------------------------- paths


def relative_to(target: PathLike, base: PathLike) -> str:
    """``target`` as a path relative to folder ``base`` (how members reference shared towers)."""
    return os.path.relpath(Path(target).resolve(), Path(base).resolve())


def resolve_from(path: str, base: PathLike) -> Path:
    """A path stored in a JSON file of folder ``base``: absolute as is, relative from ``base``."""
    p = Path(path)
    return p if p.is_absolute() else (Path(base) / p)


def _read_json(path: Path, what: str) -> dict:
    return read_json_object(path, what, "pass the folder written by the codiff training scripts")


def read_scheduler_json(path: PathLike) -> dict:
    """A diffusers scheduler config from a pipeline folder (``scheduler/scheduler_config.json``), a scheduler
    folder or the JSON file itself."""
    p = Path(path)
    for candidate in (p / "scheduler" / "scheduler_config.json", p / "scheduler_config.json", p):
        if candidate.is_file():
            return _read_json(candidate, "scheduler config")
    raise UserError(f"{p} holds no scheduler config: pass a pipeline folder (scheduler/scheduler_config.json) or the "
                    "JSON file")


def schedules_agree(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Two scheduler configs give the same ``alphas_cumprod`` (what matters for sharing x_t between models)."""
    sa, sb = NoiseSchedule.from_config(dict(a)), NoiseSchedule.from_config(dict(b))
    return sa.num_train_timesteps == sb.num_train_timesteps and torch.allclose(
        torch.as_tensor(sa.alphas_cumprod), torch.as_tensor(sb.alphas_cumprod), rtol=1e-6, atol=1e-9
    )


def refuse_released_file(path: Path, what: str) -> None:
    """A released Lightning ``.ckpt`` (or any file) where a folder is expected: say what it is and how to convert."""
    if not path.is_file():
        return
    if path.suffix == ".ckpt":
        raise UserError(f"{path} is a released LDM checkpoint file, not a {what}: convert it first with "
                        f"python scripts/codiff/convert.py --checkpoint {path} --config <its official configs/*.yaml> "
                        "--output <new folder> (add --tokenizer <bert-base-uncased folder> for text models)")
    raise UserError(f"{path} is a file, not a {what}: pass the folder scripts/codiff/convert.py or the codiff "
                    "training scripts wrote")


# ------------------------------------------------------------------------------------------------- members


@dataclass
class UniModalMember:
    """One frozen uni-modal model: ``unet`` with its condition ``encoder`` (a :class:`MaskEncoder` or a
    :class:`TextConditioner`), the ``scheduler_config`` it was trained with and the VAE folder of its latents."""

    kind: str
    unet: nn.Module
    encoder: Union[MaskEncoder, TextConditioner]
    scheduler_config: dict
    vae_path: Optional[Path]
    folder: Optional[Path] = None
    info: dict = field(default_factory=dict)
    mask_conditioning: str = "crossattn"

    @property
    def token_dim(self) -> int:
        """Width of the condition tokens this member (and its dynamic diffuser) receives."""
        return int(self.unet.config.cross_attention_dim)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        return (int(c.in_channels), int(c.sample_size), int(c.sample_size))

    @property
    def mask_format(self) -> Optional[MaskFormat]:
        return self.encoder.fmt if self.kind == "mask" else None

    @torch.no_grad()
    def encode(self, value: Any) -> torch.Tensor:
        """Raw condition -> tokens ``[B, L, D]``: class-id masks ``[H, W]`` / ``[B, H, W]``, or prompt(s)."""
        if self.kind == "mask":
            if not isinstance(value, torch.Tensor):
                value = torch.as_tensor(np.asarray(value))
            ids = value[None] if value.ndim == 2 else value
            # concat members take the one-hot tokens themselves (codiff.spatial); crossattn ones the encoded tokens
            return self.encoder.one_hot(ids) if self.mask_conditioning == "concat" else self.encoder.encode_ids(ids)
        return self.encoder(value)

    @torch.no_grad()
    def null_tokens(self, batch_size: int) -> torch.Tensor:
        """The 'no condition' tokens (all-zero mask / empty prompt), CFG's unconditional branch (non-paper)."""
        if self.kind == "mask" and self.mask_conditioning == "concat":
            return self.encoder.null_one_hot(batch_size)
        return self.encoder.null_tokens(batch_size)

    def to(self, device: Union[str, torch.device]) -> UniModalMember:
        self.unet.to(device)
        module = self.encoder if self.kind == "mask" else self.encoder.text_encoder
        module.to(device)
        return self


def load_text_encoder(path: Path, tokenizer_path: Optional[Path], max_length: Optional[int],
                      encoder_type: str = "clip") -> TextConditioner:
    """A member's frozen float32 text conditioner from local folders. ``clip``: a transformers CLIP text tower (its
    tokenizer beside it unless named); ``ldm_bert``: the released model's :class:`~codiff.text_encoder.LDMTextEncoder`
    with a BERT tokenizer folder."""
    if encoder_type == "ldm_bert":
        from transformers import AutoTokenizer

        from codiff.text_encoder import LDMTextEncoder

        if tokenizer_path is None or not Path(tokenizer_path).is_dir():
            raise UserError(f"the text member's tokenizer folder {tokenizer_path} does not exist: re-run "
                            "scripts/codiff/convert.py with --tokenizer")
        encoder = LDMTextEncoder.from_pretrained(path).float().eval().requires_grad_(False)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
        return TextConditioner(tokenizer, encoder, max_length or encoder.config["max_length"])
    if encoder_type != "clip":
        raise UserError(f"unknown text_encoder_type {encoder_type!r} in the member index: use clip or ldm_bert")
    from common.models import load_clip_text

    encoder, tokenizer = load_clip_text(path, tokenizer_path=tokenizer_path, with_projection=False)
    encoder = encoder.float().eval().requires_grad_(False)  # tiny checkpoints store frozen towers in float16
    return TextConditioner(tokenizer, encoder, max_length)


def load_member(folder: PathLike, device: Union[str, torch.device] = "cpu") -> UniModalMember:
    """A member from a ``codiff_member.json`` folder or a Stable-Diffusion pipeline folder (a text member)."""
    from common.models import load_unet

    folder = Path(folder)
    refuse_released_file(folder, "member folder")
    if not folder.is_dir():
        raise UserError(f"member folder {folder} does not exist: train it with scripts/codiff/train_unimodal.py or "
                        "pass a Stable Diffusion pipeline folder as the text member")
    if (folder / MEMBER_FILE).is_file():
        meta = _read_json(folder / MEMBER_FILE, "codiff member")
        kind = meta.get("kind")
        if kind not in KINDS:
            raise UserError(f"{folder / MEMBER_FILE}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
        unet = load_unet(folder / meta.get("unet", "unet"))
        conditioning = meta.get("mask_conditioning", "crossattn")
        if kind == "mask":
            from codiff.spatial import MASK_CONDITIONINGS, SpatialMaskUNet

            if conditioning not in MASK_CONDITIONINGS:
                raise UserError(f"{folder / MEMBER_FILE}: unknown mask_conditioning {conditioning!r}")
            encoder: Any = MaskEncoder.from_pretrained(folder / meta.get("mask_encoder", "mask_encoder"))
            if conditioning == "concat":
                unet = SpatialMaskUNet(unet, encoder)
        else:
            tok = meta.get("tokenizer")
            encoder = load_text_encoder(resolve_from(meta["text_encoder"], folder),
                                        resolve_from(tok, folder) if tok else None, meta.get("max_length"),
                                        meta.get("text_encoder_type", "clip"))
        vae = resolve_from(meta["vae"], folder) if meta.get("vae") else None
        member = UniModalMember(kind, unet, encoder, dict(meta["scheduler"]), vae, folder, meta,
                                conditioning if kind == "mask" else "crossattn")
    elif (folder / "model_index.json").is_file():
        unet = load_unet(folder, subfolder="unet")
        encoder = load_text_encoder(folder / "text_encoder", folder / "tokenizer", None)
        member = UniModalMember("text", unet, encoder, read_scheduler_json(folder), folder / "vae", folder,
                                {"kind": "text", "pipeline": str(folder)})
    else:
        raise UserError(f"{folder} is neither a codiff member ({MEMBER_FILE}) nor a Stable Diffusion pipeline folder "
                        "(model_index.json): pass the folder scripts/codiff/train_unimodal.py exported")
    member.unet.float().eval().requires_grad_(False)
    if member.kind == "mask":
        member.encoder.float().eval().requires_grad_(False)
    if member.kind == "mask":
        expected = member.encoder.fmt.token_dim if member.mask_conditioning == "concat" else member.encoder.dim
    else:
        expected = member.encoder.text_encoder.hidden_size if hasattr(member.encoder.text_encoder, "hidden_size") \
            else member.encoder.text_encoder.config.hidden_size
    if member.token_dim != expected:
        raise UserError(f"member {folder}: the UNet attends to width {member.token_dim} but its condition encoder "
                        "gives another width: the folder mixes parts of different models")
    return member.to(device)


def save_member(
    folder: PathLike,
    kind: str,
    unet: nn.Module,
    *,
    scheduler_config: Mapping[str, Any],
    vae_path: Optional[PathLike],
    mask_encoder: Optional[MaskEncoder] = None,
    text_encoder_path: Optional[PathLike] = None,
    tokenizer_path: Optional[PathLike] = None,
    info: Optional[Mapping[str, Any]] = None,
    mask_conditioning: str = "crossattn",
    text_encoder: Optional[nn.Module] = None,
    tokenizer: Any = None,
    beside_existing: bool = False,
) -> Path:
    """Write a member folder atomically (``unet/`` safetensors, ``mask_encoder/`` for masks, the index);
    ``beside_existing``: into a training run's output folder, next to its checkpoints and logs.

    Frozen towers are referenced by a path relative to ``folder`` (never copied). A text member whose encoder is
    its own (the released model's :class:`~codiff.text_encoder.LDMTextEncoder`, trained with its UNet) passes the
    module as ``text_encoder`` and its BERT ``tokenizer``: both are written into the folder."""
    from codiff.spatial import SpatialMaskUNet
    from common.io import save_model_folder

    if isinstance(unet, SpatialMaskUNet):
        unet, mask_encoder, mask_conditioning = unet.unet, unet.encoder, "concat"
    if kind not in KINDS:
        raise UserError(f"unknown member kind {kind!r}: choose one of {', '.join(KINDS)}")
    if kind == "mask" and mask_encoder is None:
        raise UserError("a mask member needs its mask encoder")
    if kind == "text" and text_encoder_path is None and text_encoder is None:
        raise UserError("a text member needs the path of its (frozen) text encoder")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"format": MEMBER_FORMAT, "kind": kind, "unet": "unet",
                            "scheduler": dict(scheduler_config),
                            "vae": relative_to(vae_path, folder) if vae_path else None}
    def write(tmp: Path) -> None:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        if kind == "mask":
            mask_encoder.save_pretrained(tmp / "mask_encoder")
            meta["mask_encoder"] = "mask_encoder"
            meta["mask_conditioning"] = mask_conditioning
        elif text_encoder is not None:
            if tokenizer is None:
                raise UserError("a text member with its own text encoder needs its tokenizer")
            text_encoder.save_pretrained(tmp / "text_encoder")
            tokenizer.save_pretrained(tmp / "tokenizer")
            meta.update(text_encoder="text_encoder", tokenizer="tokenizer", text_encoder_type="ldm_bert")
        else:
            meta["text_encoder"] = relative_to(text_encoder_path, folder)
            if tokenizer_path is not None:
                meta["tokenizer"] = relative_to(tokenizer_path, folder)
        meta.update(dict(info or {}))
        (tmp / MEMBER_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    save_model_folder(folder, write, beside_existing=beside_existing)
    return folder


def check_members_compatible(members: Mapping[str, UniModalMember]) -> None:
    """Members of one collaboration must share the latent shape and the noise schedule (they see the same x_t)."""
    items = list(members.items())
    first_name, first = items[0]
    for name, member in items[1:]:
        if member.latent_shape != first.latent_shape:
            raise UserError(f"the {name!r} member works on latents {member.latent_shape} but the {first_name!r} member "
                            f"on {first.latent_shape}: collaborating models must share the VAE latent space")
        if not schedules_agree(member.scheduler_config, first.scheduler_config):
            raise UserError(f"the {name!r} and {first_name!r} members were trained on different noise schedules: "
                            "retrain one with --noise_schedule_from <the other's folder>")


# ------------------------------------------------------------------------------------------ the checkpoint


@dataclass
class Collaboration:
    """A loaded collaboration checkpoint: the model, its members (encoders, null tokens), VAE and schedule."""

    model: CollaborativeDiffusion
    members: dict[str, UniModalMember]
    vae: nn.Module
    scheduler_config: dict
    folder: Optional[Path] = None
    sampling: dict = field(default_factory=dict)

    @property
    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_config(self.scheduler_config)

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.model.modalities

    @property
    def mask_format(self) -> Optional[MaskFormat]:
        for member in self.members.values():
            if member.kind == "mask":
                return member.mask_format
        return None

    def modality_of_kind(self, kind: str) -> Optional[str]:
        return next((name for name, m in self.members.items() if m.kind == kind), None)

    @property
    def image_size(self) -> int:
        factor = vae_scale_factor(self.vae)
        return self.model.unets[self.modalities[0]].config.sample_size * factor

    def encoders(self) -> dict[str, Any]:
        return {name: m.encode for name, m in self.members.items()}

    def null_conditions(self, batch_size: int) -> dict[str, torch.Tensor]:
        return {name: m.null_tokens(batch_size) for name, m in self.members.items()}

    def pipeline(self):
        from codiff.pipeline import CollaborativePipeline

        return CollaborativePipeline(self.model, self.vae, self.schedule, self.encoders())

    def to(self, device: Union[str, torch.device]) -> Collaboration:
        self.model.to(device)
        self.vae.to(device)
        for member in self.members.values():
            member.to(device)
        return self


def build_collaboration(
    members: Mapping[str, UniModalMember],
    dynamic: DynamicDiffusers,
    vae: nn.Module,
    *,
    folder: Optional[Path] = None,
    sampling: Optional[Mapping[str, Any]] = None,
) -> Collaboration:
    check_members_compatible(members)
    missing = [n for n in members if n not in dynamic.nets]
    if missing:
        raise UserError(f"the checkpoint has a {missing[0]!r} member but no dynamic diffuser for it: retrain the "
                        "diffusers with that member")
    model = CollaborativeDiffusion({n: m.unet for n, m in members.items()}, {n: dynamic.nets[n] for n in members},
                                   confidence_input=dynamic.confidence_input)
    first = next(iter(members.values()))
    return Collaboration(model.eval(), dict(members), vae, dict(first.scheduler_config), folder, dict(sampling or {}))


def save_checkpoint(
    folder: PathLike,
    member_folders: Mapping[str, PathLike],
    dynamic: DynamicDiffusers,
    *,
    vae_path: PathLike,
    scheduler_config: Mapping[str, Any],
    sampling: Optional[Mapping[str, Any]] = None,
    info: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write ``dynamic_diffusers/`` (atomically replaced), then the index ``codiff.json`` (atomically, last: a
    folder is a checkpoint once it has one). Members and VAE are referenced by path, and other entries of
    ``folder`` are kept, so a member may live inside it (``ckpt/tiny/codiff/mask``)."""
    from common.io import atomic_write_file

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"checkpoint path {folder} is a file: pass a folder")
    folder.mkdir(parents=True, exist_ok=True)
    index = {
        "format": CHECKPOINT_FORMAT,
        "modalities": list(member_folders),
        "members": {name: relative_to(path, folder) for name, path in member_folders.items()},
        "dynamic_diffusers": "dynamic_diffusers",
        "vae": relative_to(vae_path, folder),
        "scheduler": dict(scheduler_config),
        "sampling": dict(sampling or {}),
        **dict(info or {}),
    }
    dynamic.save_pretrained(folder / "dynamic_diffusers")  # atomic itself
    with atomic_write_file(folder / CHECKPOINT_FILE) as tmp:
        tmp.write_text(json.dumps(index, indent=2) + "\n")
    return folder


def load_collaboration(
    folder: PathLike, device: Union[str, torch.device] = "cpu", modalities: Optional[Sequence[str]] = None
) -> Collaboration:
    """Everything a checkpoint folder names, on ``device``, frozen, in eval mode.

    ``modalities``: load only these members (with their diffusers), e.g. ``["text"]`` for a uni-modal run; the
    influence maps are then a softmax over the loaded ones."""
    from common.models import load_vae

    folder = Path(folder)
    refuse_released_file(folder, "checkpoint folder")
    if not folder.is_dir():
        raise UserError(f"checkpoint folder {folder} does not exist: train one with scripts/codiff/train_dynamic.py "
                        "(the shipped one is ckpt/tiny/codiff once `make tiny-checkpoints` ran)")
    index = _read_json(folder / CHECKPOINT_FILE, "codiff checkpoint")
    names = list(index.get("modalities", []))
    if modalities is not None:
        unknown = [m for m in modalities if m not in names]
        if unknown:
            raise UserError(f"the checkpoint {folder} has no {unknown[0]!r} modality (it has {', '.join(names)})")
        names = [n for n in names if n in modalities]
    members = {n: load_member(resolve_from(index["members"][n], folder), device) for n in names}
    dynamic = DynamicDiffusers.from_pretrained(folder / index.get("dynamic_diffusers", "dynamic_diffusers"))
    dynamic.nets = nn.ModuleDict({n: dynamic.nets[n] for n in names})
    vae = load_vae(resolve_from(index["vae"], folder)).float().eval().requires_grad_(False)
    collab = build_collaboration(members, dynamic.requires_grad_(False), vae, folder=folder,
                                 sampling=index.get("sampling"))
    if not schedules_agree(collab.scheduler_config, index.get("scheduler", collab.scheduler_config)):
        raise UserError(f"{folder / CHECKPOINT_FILE} names a noise schedule its members were not trained on: re-export")
    return collab.to(device)
