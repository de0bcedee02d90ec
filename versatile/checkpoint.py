"""Our Versatile Diffusion folder: the trained diffuser plus references to the towers it was trained with.

Layout written by ``scripts/versatile/train.py`` (``ckpt/tiny/versatile/pipeline`` is one)::

    versatile.json      components (paths relative to this folder), trained flows, null image, sampling settings
    diffuser/           diffuser_config.json + diffuser-<group>.safetensors (versatile.convert.save_diffuser)

``versatile.json``::

    {"format": "diffusion-lab/versatile/v1",
     "image_vae": "../../vae",            # diffusers AutoencoderKL folder (its config.scaling_factor is used)
     "clip": "../../clip",                # open_clip local folder (open_clip_config.json + weights)
     "text_vae": "../text_vae",           # versatile.text_vae.save_text_vae folder, or null (no text flows);
                                          # "text_vae" when stored inside (a converted release)
     "trained_flows": ["iv", "t2i", ...], # flows whose three layer groups were all trained
     "uncond_image": null,                # the null image the run trained with (null: per-flow default)
     "context_scale": 1.0,                # factor on every context token the diffuser was trained with (VD: 1)
     "sampling": {...},                   # SamplingConfig fields (steps, scale, ...)
     "stages": [{...}, ...]}              # one record per training run that led here

The image VAE and CLIP are referenced, not copied (the project ships them once in ``ckpt/tiny``). A flow is
usable only if every layer group it runs through was trained (:func:`check_flow`): a four-flow folder serves every
flow, a stage-1 (image-variation only) folder refuses text-to-image instead of sampling from untrained layers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from common.errors import UserError
from common.io import read_json_object
from versatile.config import REPO_ROOT, SamplingConfig, VersatileConfig
from versatile.multiflow import FLOWS, MultiFlowDiffuser, resolve_flow


FORMAT = "diffusion-lab/versatile/v1"
MANIFEST = "versatile.json"
DIFFUSER_DIR = "diffuser"
TEXT_VAE_DIR = "text_vae"  # a text VAE stored inside the folder (converted from a release)
TRAINABLE_FLOWS = ("t2i", "iv", "i2t", "tv")


@dataclass
class Manifest:
    """The contents of ``versatile.json`` with paths resolved against the folder."""

    folder: Path
    image_vae: Path
    clip: Path
    text_vae: Optional[Path]
    trained_flows: tuple[str, ...]
    uncond_image: Optional[str] = None
    context_scale: float = 1.0
    sampling: dict[str, Any] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)

    def trained_groups(self) -> set[str]:
        return {g for name in self.trained_flows for g in FLOWS[name].groups}

    def usable_flows(self) -> tuple[str, ...]:
        groups = self.trained_groups()
        return tuple(name for name, flow in FLOWS.items() if set(flow.groups) <= groups)


def check_flow(manifest: Manifest, flow) -> None:
    """A :class:`UserError` if the folder's training never reached one of the flow's layer groups."""
    flow = resolve_flow(flow)
    missing = [g for g in flow.groups if g not in manifest.trained_groups()]
    if missing:
        usable = ", ".join(manifest.usable_flows()) or "none"
        raise UserError(f"{manifest.folder} was trained for flows {', '.join(manifest.trained_flows) or 'none'}; "
                        f"flow {flow.name} needs the untrained layers {', '.join(missing)}: pick one of {usable}, "
                        "or train further (scripts/versatile/train.py --stage four --init_from this folder)")


def _relative(path: Union[str, Path, None], folder: Path) -> Optional[str]:
    if path is None:
        return None
    return os.path.relpath(Path(path).resolve(), folder.resolve())


def _resolve(value: Optional[str], folder: Path, what: str) -> Optional[Path]:
    if value is None:
        return None
    path = Path(value)
    path = path if path.is_absolute() else (folder / path)
    return Path(os.path.normpath(path))


def read_manifest(folder: Union[str, Path]) -> Manifest:
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise UserError(f"checkpoint folder {folder} does not exist: pass a folder written by "
                        "scripts/versatile/train.py (e.g. ckpt/tiny/versatile/pipeline)")
    if not path.is_file():
        raise UserError(f"{folder} has no {MANIFEST}: pass a folder written by scripts/versatile/train.py")
    data = read_json_object(path, "manifest", "pass a folder written by scripts/versatile/train.py")
    if data.get("format") != FORMAT:
        raise UserError(f"{path} is not a {FORMAT} manifest")
    flows = tuple(data.get("trained_flows") or ())
    for name in flows:
        if name not in TRAINABLE_FLOWS:
            raise UserError(f"{path}: unknown trained flow {name!r}")
    for key in ("image_vae", "clip"):
        if not data.get(key):
            raise UserError(f"{path} names no {key} folder")
    return Manifest(
        folder=folder,
        image_vae=_resolve(data["image_vae"], folder, "image VAE"),
        clip=_resolve(data["clip"], folder, "CLIP"),
        text_vae=_resolve(data.get("text_vae"), folder, "text VAE"),
        trained_flows=flows,
        uncond_image=data.get("uncond_image"),
        context_scale=float(data.get("context_scale", 1.0)),
        sampling=dict(data.get("sampling") or {}),
        stages=list(data.get("stages") or []),
    )


def save_pipeline_folder(
    folder: Union[str, Path],
    diffuser: MultiFlowDiffuser,
    *,
    image_vae: Union[str, Path],
    clip: Union[str, Path],
    text_vae: Union[str, Path, None],
    trained_flows: Iterable[str],
    sampling: Optional[SamplingConfig] = None,
    uncond_image: Optional[str] = None,
    stages: Optional[list[dict[str, Any]]] = None,
    dtype: Optional[torch.dtype] = None,
    context_scale: float = 1.0,
    text_vae_model=None,
    beside_existing: bool = False,
) -> Path:
    """Write ``versatile.json`` + ``diffuser/`` (per-group shards, ``dtype`` storage) atomically
    (``beside_existing``: into a training run's output folder, next to its checkpoints and logs).

    ``text_vae_model``: an :class:`~versatile.text_vae.OptimusVAE` saved inside the folder (``text_vae/``, e.g.
    converted from a release) instead of referencing a ``text_vae`` folder elsewhere.
    """
    from common.io import save_model_folder
    from versatile.convert import save_diffuser
    from versatile.text_vae import save_text_vae

    if text_vae_model is not None and text_vae is not None:
        raise UserError("give the text VAE as a folder (text_vae) or as a model to store inside (text_vae_model), "
                        "not both")

    folder = Path(folder)
    flows = tuple(sorted({resolve_flow(f).name for f in trained_flows}, key=TRAINABLE_FLOWS.index))
    sampling_fields = dataclasses.asdict(sampling or SamplingConfig())

    def write(tmp: Path) -> None:
        save_diffuser(diffuser, tmp / DIFFUSER_DIR, dtype=dtype, shard_by_group=True)
        if text_vae_model is not None:
            save_text_vae(text_vae_model, tmp / TEXT_VAE_DIR)
        manifest = {
            "format": FORMAT,
            # relative to the final folder (the paths are computed from it, not from tmp)
            "image_vae": _relative(image_vae, folder), "clip": _relative(clip, folder),
            "text_vae": TEXT_VAE_DIR if text_vae_model is not None else _relative(text_vae, folder),
            "trained_flows": list(flows), "uncond_image": uncond_image,
            "context_scale": float(context_scale), "sampling": sampling_fields, "stages": list(stages or []),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))

    save_model_folder(folder, write, beside_existing=beside_existing)
    return folder


def load_towers(image_vae: Path, clip: Path, text_vae: Optional[Path], device="cpu", pre_resize=None,
                context_scale: float = 1.0):
    """``(image VAE, ContextEncoders on the open_clip towers, text VAE or None)``, all frozen, float32, eval."""
    from common.models import load_open_clip, load_vae
    from versatile.context import open_clip_contexts
    from versatile.text_vae import load_text_vae

    for what, path in (("image VAE", image_vae), ("CLIP", clip), ("text VAE", text_vae)):
        if path is not None and not Path(path).is_dir():
            raise UserError(f"{what} folder {path} does not exist: train it first (ckpt/tiny/README) or pass its path")
    vae = load_vae(image_vae).float().to(device).eval().requires_grad_(False)
    model, _, tokenizer = load_open_clip(clip, device=device)
    contexts = open_clip_contexts(model.float(), tokenizer, pre_resize=pre_resize, scale=context_scale).to(device)
    tvae = load_text_vae(text_vae).float().to(device).eval().requires_grad_(False) if text_vae is not None else None
    return vae, contexts, tvae


def load_pipeline(
    folder: Union[str, Path],
    device="cpu",
    *,
    image_vae: Union[str, Path, None] = None,
    clip: Union[str, Path, None] = None,
    text_vae: Union[str, Path, None] = None,
    sampling_overrides: Optional[Mapping[str, Any]] = None,
):
    """``(VersatilePipeline, Manifest)`` from a :func:`save_pipeline_folder` folder; tower paths may be overridden."""
    from versatile.convert import load_diffuser
    from versatile.pipeline import VersatilePipeline

    manifest = read_manifest(folder)
    if image_vae is not None:
        manifest.image_vae = Path(image_vae)
    if clip is not None:
        manifest.clip = Path(clip)
    if text_vae is not None:
        manifest.text_vae = Path(text_vae)
    diffuser = load_diffuser(manifest.folder / DIFFUSER_DIR, device=device).float()
    vae, contexts, tvae = load_towers(manifest.image_vae, manifest.clip, manifest.text_vae, device,
                                      context_scale=manifest.context_scale)
    known = {f.name for f in dataclasses.fields(SamplingConfig)}
    fields = {k: v for k, v in manifest.sampling.items() if k in known}
    fields.update(sampling_overrides or {})
    fields["image_scaling_factor"] = float(getattr(vae.config, "scaling_factor", None) or
                                           fields.get("image_scaling_factor", 0.18215))
    sampling = SamplingConfig(**fields)
    pipe = VersatilePipeline(diffuser, vae, tvae, contexts, sampling, manifest.uncond_image)
    return pipe, manifest


def default_model_config(name: str = "digits") -> VersatileConfig:
    return VersatileConfig.load(name)


def repo_path(path: Union[str, Path]) -> Path:
    """A repo-relative path made absolute (used for the shipped defaults)."""
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path
