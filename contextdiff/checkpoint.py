"""ContextDiff checkpoint folders: a diffusers Stable Diffusion folder plus the adapter and the process it defines.

Layout (written by ``scripts/contextdiff/finetune_diffusion.py``, and by ``train_adapter.py --no-freeze_unet``)::

    <folder>/model_index.json unet/ vae/ text_encoder/ tokenizer/ scheduler/   # plain StableDiffusionPipeline
    <folder>/adapter/{config.json, diffusion_pytorch_model.safetensors}       # RelationalNet.save_pretrained
    <folder>/t5/{config.json, model.safetensors, tokenizer files}           # only when the adapter reads T5
    <folder>/contextdiff.json   # format, parameterization, k_schedule, k_scale, [towers], [t5, t5_max_length], provenance

``towers`` (optional) lists the VAE / text encoder / tokenizer by path, relative to the folder, instead of copies
(``--reference_towers``): the shipped tiny checkpoint points at ``ckpt/tiny/baseline`` that way. Such a folder has
no ``model_index.json`` (plain diffusers could not load it) but loads here like a full one.

A stage-1 adapter folder also holds ``process.json`` (the k schedule and parameterisation it was trained for), so
stage 2 and sampling default to the process the adapter learned.

T5 text source: an adapter whose ``text_sources`` include ``t5`` needs a frozen T5 encoder next to the CLIP tower.
A checkpoint stores it in ``t5/`` (encoder safetensors + tokenizer) or, with ``reference_towers``, references it by
relative path; ``contextdiff.json`` records where (``t5``) and the token length (``t5_max_length``). A stage-1
adapter records the T5 it was trained with in its ``process.json`` provenance (``t5_model_name_or_path``), which
stage 2 and :func:`load_contextdiff` (plain SD folder + ``adapter_path``) fall back on.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from common.errors import UserError
from common.io import read_json_object
from contextdiff.adapter import CONFIG_NAME, TEXT_SOURCES, RelationalNet, load_adapter, read_adapter_config
from contextdiff.process import (
    SCHEDULER_PREDICTION_TYPE,
    check_parameterization,
    contextual_k,
    parameterization_from_prediction_type,
)


PathLike = Union[str, os.PathLike]
CHECKPOINT_FILE = "contextdiff.json"
PROCESS_FILE = "process.json"
FORMAT = "diffusion-lab/contextdiff/v1"
TOWERS = ("vae", "text_encoder", "tokenizer")
PROCESS_KEYS = ("parameterization", "k_schedule", "k_scale")
T5_FOLDER = "t5"
T5_MAX_LENGTH = 77
T5_FLAG = "--t5_model_name_or_path"


@dataclass
class ContextDiffModel:
    """Everything ``contextdiff.pipeline.generate`` needs, loaded from a folder. ``adapter`` is None without one."""

    unet: nn.Module
    adapter: Optional[RelationalNet]
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    scheduler_config: dict
    parameterization: str
    k_schedule: str
    k_scale: float
    tower_paths: dict[str, Path]  # where the VAE / text encoder / tokenizer (and T5) were read from (absolute)
    t5: Optional[tuple] = None  # (T5EncoderModel, tokenizer) when the adapter reads T5 states
    t5_max_length: int = T5_MAX_LENGTH

    def generate_kwargs(self) -> dict[str, Any]:
        """Model keyword arguments of :func:`contextdiff.pipeline.generate` / ``invert``."""
        return dict(unet=self.unet, adapter=self.adapter, vae=self.vae, text_encoder=self.text_encoder,
                    tokenizer=self.tokenizer, scheduler_config=self.scheduler_config,
                    parameterization=self.parameterization, k_schedule=self.k_schedule, k_scale=self.k_scale,
                    t5=self.t5, t5_max_length=self.t5_max_length)


def _read_json(path: Path, what: str) -> dict:
    return read_json_object(path, what, "re-save it")


def read_checkpoint_meta(folder: PathLike) -> dict:
    """``contextdiff.json`` of a checkpoint folder, or ``{}`` for a plain Stable Diffusion folder."""
    path = Path(folder) / CHECKPOINT_FILE
    if not path.is_file():
        return {}
    meta = _read_json(path, "ContextDiff checkpoint file")
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}: re-export the checkpoint")
    return meta


def resolve_adapter_folder(path: PathLike) -> Path:
    """The adapter folder behind ``path``: the folder itself, or its ``adapter/`` (a stage-1 output_dir or a
    checkpoint folder). One-line UserError when there is none."""
    path = Path(path)
    for candidate in (path, path / "adapter"):
        if (candidate / CONFIG_NAME).is_file():
            read_adapter_config(candidate)  # a config of another class -> one-line error
            return candidate
    raise UserError(
        f"no ContextDiff adapter at {path} (expected {CONFIG_NAME} there or in {path / 'adapter'}): train one with "
        "scripts/contextdiff/train_adapter.py and pass its output folder"
    )


def read_process(adapter_folder: PathLike) -> dict:
    """The process an adapter was trained for (``process.json``: parameterization, k_schedule, k_scale), or {}."""
    path = Path(adapter_folder) / PROCESS_FILE
    if not path.is_file():
        return {}
    data = _read_json(path, "adapter process file")
    return {k: data[k] for k in PROCESS_KEYS if k in data}


def read_t5_width(path: PathLike, what: str = f"T5 folder ({T5_FLAG})") -> int:
    """``d_model`` of a local T5 encoder folder, read from its ``config.json`` before any weight loads."""
    from common.models import read_model_config, resolve_model_folder

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{what} {path} does not exist: pass {T5_FLAG} <local T5 encoder folder> (config.json, "
                        "weights and tokenizer, as T5EncoderModel / tokenizer save_pretrained write them)")
    config = read_model_config(resolve_model_folder(path, None, "text_encoder"))
    if config.get("model_type") != "t5" or "d_model" not in config:
        raise UserError(f"{what} {path} holds model_type {config.get('model_type')!r}, not a T5 encoder: pass a "
                        "local T5 encoder folder")
    return int(config["d_model"])


def load_t5(path: PathLike, dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu"):
    """``(T5EncoderModel, tokenizer)`` of a local folder (tokenizer in the same folder), frozen, eval mode."""
    from common.models import load_t5_encoder

    encoder, tokenizer = load_t5_encoder(path)
    encoder.requires_grad_(False)
    return encoder.to(device=device, dtype=dtype).eval(), tokenizer


def adapter_t5(adapter_folder: PathLike) -> tuple[Optional[Path], Optional[int]]:
    """``(T5 folder, t5_max_length)`` an adapter was trained with: its ``process.json`` provenance, else (the
    ``adapter/`` of a checkpoint) the checkpoint's ``contextdiff.json``. ``(None, None)`` when neither says."""
    folder = Path(adapter_folder)
    path = folder / PROCESS_FILE
    if path.is_file():
        provenance = _read_json(path, "adapter process file").get("provenance") or {}
        if provenance.get("t5_model_name_or_path"):
            return Path(provenance["t5_model_name_or_path"]), provenance.get("t5_max_length")
    if (folder.parent / CHECKPOINT_FILE).is_file():
        meta = read_checkpoint_meta(folder.parent)
        if meta.get("t5"):
            return folder.parent / meta["t5"], meta.get("t5_max_length")
    return None, None


def check_t5_max_length(value) -> int:
    if value is None:
        return T5_MAX_LENGTH
    if int(value) < 1:
        raise UserError(f"--t5_max_length must be >= 1, got {value}")
    return int(value)


def check_adapter_fits(
    adapter_config: dict, latent_channels: int, latent_size: Optional[tuple[int, int]],
    text_dims: Union[Mapping[str, Optional[int]], Sequence[int]], where: str = "the adapter",
) -> None:
    """One-line UserError unless an adapter config fits latents ``[C, H, W]`` and the text encoders' widths.

    ``text_dims``: ``{"clip": width, "t5": width or None}`` (None: no T5 given), or a one-element list (the CLIP
    width; a CLIP-only model). Checked from the config alone (before any weight is read or anything is written)."""
    channels = int(adapter_config.get("latent_channels", -1))
    if channels != int(latent_channels):
        raise UserError(f"{where} expects {channels}-channel latents but the diffusion model has {latent_channels}: "
                        "use an adapter trained for this model's latent space (or retrain stage 1)")
    widths = dict(text_dims) if isinstance(text_dims, Mapping) else {"clip": int(list(text_dims)[0])}
    dims = [int(d) for d in adapter_config.get("text_dims", [])]
    sources = list(adapter_config.get("text_sources", []))
    if (not sources or len(sources) != len(dims) or len(set(sources)) != len(sources)
            or any(s not in TEXT_SOURCES for s in sources)):
        raise UserError(f"{where} has text_sources {sources} and text_dims {dims}: use one or both of clip, t5, "
                        "once each, with one width per source")
    for source, dim in zip(sources, dims):
        have = widths.get(source)
        if have is None:
            raise UserError(f"{where} reads T5 text states (text_sources {sources}) but no T5 encoder was given: "
                            f"pass {T5_FLAG} <local T5 encoder folder>")
        if dim != int(have):
            encoder = "the text encoder" if source == "clip" else "the T5 encoder"
            fix = ("use an adapter trained with this text encoder (or retrain stage 1)" if source == "clip" else
                   f"pass the T5 the adapter was trained with ({T5_FLAG}), or retrain stage 1")
            raise UserError(f"{where} expects {source} text width {dim} but {encoder} gives {have}: {fix}")
    patch = int(adapter_config.get("patch_size", 1))
    if latent_size is not None and (latent_size[0] % patch or latent_size[1] % patch):
        raise UserError(f"{where} has patch size {patch}, which does not divide the {latent_size[0]}x{latent_size[1]} "
                        "latents: pick a patch size that divides the latent side (or change --resolution)")


# ----------------------------------------------------------------------------------------------------- loading


def _tower_paths(folder: Path, meta: dict) -> dict[str, Path]:
    towers = meta.get("towers") or {}
    paths = {}
    for name in TOWERS:
        path = (folder / towers[name]) if name in towers else folder / name
        if not path.is_dir():
            how = f"referenced in {folder / CHECKPOINT_FILE} as {towers[name]!r}" if name in towers else "expected"
            raise UserError(f"{folder}: the {name} folder ({how}) is missing at {path}: pass a Stable Diffusion folder "
                            "with vae/ text_encoder/ tokenizer/, or keep the referenced folders next to the checkpoint")
        paths[name] = path.resolve()
    return paths


def read_sd_configs(folder: PathLike) -> dict[str, Any]:
    """The configs of a Stable Diffusion folder or ContextDiff checkpoint, read WITHOUT loading any weight:
    ``{"unet", "vae", "scheduler": dicts, "text_width": int, "towers": paths}`` (for checks before anything runs)."""
    from common.models import read_model_config
    from common.pipeline import read_scheduler_config

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"model folder {folder} does not exist: pass a Stable Diffusion folder (e.g. "
                        "ckpt/tiny/baseline) or a ContextDiff checkpoint folder")
    meta = read_checkpoint_meta(folder)
    scheduler = read_scheduler_config(str(folder))
    if not (folder / "unet").is_dir():
        raise UserError(f"{folder} has no unet/ folder: pass a Stable Diffusion folder or a ContextDiff checkpoint")
    towers = _tower_paths(folder, meta)
    text = read_model_config(towers["text_encoder"])
    width = text.get("hidden_size") or (text.get("text_config") or {}).get("hidden_size")
    return {"unet": read_model_config(folder / "unet"), "vae": read_model_config(towers["vae"]),
            "scheduler": scheduler, "text_width": int(width), "towers": towers}


def load_sd_parts(folder: PathLike, dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu"):
    """``(unet, vae, text_encoder, tokenizer, scheduler_config, tower_paths)`` of a Stable Diffusion folder or a
    ContextDiff checkpoint (its referenced towers resolved), in ``dtype`` on ``device``, eval mode."""
    from common.models import load_clip_text, load_unet, load_vae

    folder = Path(folder)
    configs = read_sd_configs(folder)
    scheduler_config, towers = configs["scheduler"], configs["towers"]
    unet = load_unet(folder / "unet")
    vae = load_vae(towers["vae"])
    text_encoder, tokenizer = load_clip_text(towers["text_encoder"], tokenizer_path=towers["tokenizer"],
                                             with_projection=False)
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise UserError(f"{folder}: the UNet attends to width {unet.config.cross_attention_dim} but the text encoder "
                        f"gives {text_encoder.config.hidden_size}: they do not belong together")
    for module in (unet, vae, text_encoder):  # tiny checkpoints may store a frozen tower in float16
        param = next(module.parameters())
        if param.dtype != dtype:
            module.to(dtype=dtype)
        if param.device != torch.device(device):
            module.to(device)
        module.eval()
    return unet, vae, text_encoder, tokenizer, scheduler_config, towers


def load_contextdiff(
    folder: PathLike,
    adapter_path: Optional[PathLike] = None,
    *,
    require_adapter: bool = True,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    t5_path: Optional[PathLike] = None,
    t5_max_length: Optional[int] = None,
) -> ContextDiffModel:
    """Load a ContextDiff checkpoint (or a plain SD folder plus ``adapter_path``), the adapter checked to fit.

    Process settings come from ``contextdiff.json``, else from the adapter's ``process.json``, else from the
    scheduler's ``prediction_type`` and the quadratic k schedule. ``require_adapter=False`` (``--no_shift``) loads
    without one when the folder has none.

    An adapter that reads T5 gets its T5 from ``t5_path`` (wins), else the checkpoint's ``t5`` entry (or, for an
    explicit ``adapter_path``, the adapter's own provenance first), else the adapter's provenance; its width is
    checked against the adapter before anything loads. ``t5_max_length`` likewise (default 77).
    """
    folder = Path(folder)
    configs = read_sd_configs(folder)  # folder checks before any weight loads
    meta = read_checkpoint_meta(folder)
    adapter_folder = None
    if adapter_path is not None:
        adapter_folder = resolve_adapter_folder(adapter_path)
    elif (folder / meta.get("adapter", "adapter") / CONFIG_NAME).is_file():
        adapter_folder = resolve_adapter_folder(folder / meta.get("adapter", "adapter"))
    elif require_adapter:
        raise UserError(f"{folder} has no ContextDiff adapter (no adapter/ folder): pass --adapter_path <stage-1 "
                        "output>, or --no_shift to sample the plain model")
    t5_folder, t5_length = None, None
    if adapter_folder is not None:
        adapter_config = read_adapter_config(adapter_folder)
        widths: dict[str, Optional[int]] = {"clip": configs["text_width"], "t5": None}
        if "t5" in adapter_config.get("text_sources", []):
            t5_folder, t5_length, how = _find_t5(folder, meta, adapter_folder, adapter_path is not None, t5_path)
            if t5_folder is None and not require_adapter:
                warnings.warn(f"adapter {adapter_folder} reads T5 states but no T5 encoder is known ({how}): loading "
                              "without the adapter (no shift)", stacklevel=2)
                adapter_folder = None
            elif t5_folder is None:
                raise UserError(f"adapter {adapter_folder} reads T5 text states but no T5 encoder is known ({how}): "
                                f"pass {T5_FLAG} <local T5 encoder folder> (t5_path= in Python)")
            else:
                widths["t5"] = read_t5_width(t5_folder, f"the T5 folder ({how})")
        elif t5_path is not None:
            warnings.warn(f"adapter {adapter_folder} reads only {adapter_config.get('text_sources')}: the T5 at "
                          f"{t5_path} is not used", stacklevel=2)
        if adapter_folder is not None:
            check_adapter_fits(adapter_config, configs["unet"]["in_channels"], None, widths,
                               where=f"adapter {adapter_folder}")
    process = {**(read_process(adapter_folder) if adapter_folder else {}),
               **{k: meta[k] for k in PROCESS_KEYS if k in meta}}
    parameterization = check_parameterization(process.get("parameterization") or parameterization_from_prediction_type(
        configs["scheduler"].get("prediction_type", "epsilon")))
    k_schedule = process.get("k_schedule", "quadratic")
    contextual_k(k_schedule)
    length = check_t5_max_length(t5_max_length if t5_max_length is not None else t5_length)
    unet, vae, text_encoder, tokenizer, scheduler_config, towers = load_sd_parts(folder, dtype, device)
    adapter = None if adapter_folder is None else load_adapter(adapter_folder, device=device, dtype=dtype)
    t5 = None
    if adapter is not None and t5_folder is not None:
        t5 = load_t5(t5_folder, dtype, device)
        towers = {**towers, "t5": t5_folder.resolve()}
    return ContextDiffModel(unet, adapter, vae, text_encoder, tokenizer, scheduler_config, parameterization,
                            k_schedule, float(process.get("k_scale", 1.0)), towers, t5, length)


def _find_t5(folder: Path, meta: dict, adapter_folder: Path, explicit_adapter: bool, t5_path):
    """``(T5 folder or None, max_length or None, how it was found)`` for an adapter that reads T5."""
    if t5_path is not None:
        return Path(t5_path), None, f"{T5_FLAG} {t5_path}"
    from_meta = (folder / meta["t5"], meta.get("t5_max_length"), f"referenced in {folder / CHECKPOINT_FILE}") \
        if meta.get("t5") else (None, None, "")
    path, length = adapter_t5(adapter_folder)
    from_adapter = (path, length, f"recorded in {adapter_folder / PROCESS_FILE}") if path is not None else \
        (None, None, "")
    order = (from_adapter, from_meta) if explicit_adapter else (from_meta, from_adapter)
    for found in order:
        if found[0] is not None:
            return found
    return None, None, "neither the checkpoint nor the adapter's process.json names one"


# ------------------------------------------------------------------------------------------------------ saving


def process_dict(parameterization: str, k_schedule: str, k_scale: float) -> dict:
    contextual_k(k_schedule)  # validates the name
    return {"parameterization": check_parameterization(parameterization), "k_schedule": k_schedule,
            "k_scale": float(k_scale)}


def write_adapter(target: Path, adapter: RelationalNet, process: dict, provenance: Optional[dict] = None) -> None:
    """``save_pretrained`` (safetensors + config.json) plus ``process.json`` into the (temporary) folder ``target``."""
    adapter.save_pretrained(str(target), safe_serialization=True)
    (target / PROCESS_FILE).write_text(json.dumps({**process, "provenance": provenance or {}}, indent=2) + "\n")


def save_adapter(folder: PathLike, adapter: RelationalNet, process: dict, provenance: Optional[dict] = None) -> Path:
    """Write an adapter folder atomically (nothing half-written)."""
    from common.io import atomic_write_dir

    with atomic_write_dir(folder) as tmp:
        write_adapter(tmp, adapter, process, provenance)
    return Path(folder)


def save_contextdiff(
    folder: PathLike,
    *,
    unet: nn.Module,
    adapter: RelationalNet,
    vae: nn.Module,
    text_encoder: nn.Module,
    tokenizer: Any,
    scheduler_config: dict,
    process: dict,
    reference_towers: Optional[dict[str, Path]] = None,
    text_encoder_dtype: torch.dtype = torch.float32,
    provenance: Optional[dict] = None,
    t5: Optional[tuple] = None,
    t5_max_length: int = T5_MAX_LENGTH,
    adapter_provenance: Optional[dict] = None,
    beside_existing: bool = False,
) -> Path:
    """Write a checkpoint folder atomically (layout in the module docstring).

    ``beside_existing``: ``folder`` is a training run's output folder (checkpoints, logs): the checkpoint's entries
    go into it next to those (``common.io.save_pretrained_into``), replacing an earlier export's entries only.
    ``adapter_provenance`` goes into ``adapter/process.json``, so the folder also serves as a stage-1 output.

    Without ``reference_towers`` it is a complete diffusers ``StableDiffusionPipeline`` folder (plain
    ``from_pretrained`` loads it; the adapter and ``contextdiff.json`` ride along). With it (``{"vae": path,
    "text_encoder": path, "tokenizer": path}`` of the frozen towers' folders) only the UNet, scheduler and adapter are
    written and the towers are referenced by relative path. The scheduler's ``prediction_type`` follows the
    parameterisation (shifted_eps -> epsilon, x0 -> sample).

    An adapter that reads T5 needs ``t5=(T5EncoderModel, tokenizer)`` (width checked against the adapter): it is
    written to ``t5/`` (in ``text_encoder_dtype``), or referenced via ``reference_towers["t5"]`` (its folder). Bad
    input is a one-line UserError and nothing is written.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from common.io import save_model_folder

    folder = Path(folder)
    scheduler = DDIMScheduler.from_config(
        {**scheduler_config, "prediction_type": SCHEDULER_PREDICTION_TYPE[process["parameterization"]]})
    meta = {"format": FORMAT, **process, "adapter": "adapter", "provenance": provenance or {}}
    sources = list(adapter.config.text_sources)
    if "t5" in sources:
        if t5 is None:
            raise UserError(f"the adapter reads T5 text states but no T5 was given to save: pass t5=(encoder, "
                            f"tokenizer) ({T5_FLAG} on the command line)")
        width = int(t5[0].config.d_model)
        expected = int(adapter.config.text_dims[sources.index("t5")])
        if width != expected:
            raise UserError(f"the adapter expects t5 text width {expected} but the T5 encoder gives {width}: save "
                            "the T5 the adapter was trained with")
        if reference_towers is not None and not reference_towers.get("t5"):
            raise UserError("reference_towers must name the T5 folder too (key 't5') when the adapter reads T5")
        meta["t5_max_length"] = check_t5_max_length(t5_max_length)

    def write(tmp: Path) -> None:
        if reference_towers is None:
            dtype = next(text_encoder.parameters()).dtype
            pipe = StableDiffusionPipeline(
                vae=vae, text_encoder=text_encoder.to(text_encoder_dtype), tokenizer=tokenizer, unet=unet,
                scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            try:
                pipe.save_pretrained(tmp, safe_serialization=True)
            finally:
                text_encoder.to(dtype)
        else:
            final = folder.resolve()
            meta["towers"] = {name: os.path.relpath(Path(reference_towers[name]).resolve(), final) for name in TOWERS}
            unet.save_pretrained(str(tmp / "unet"), safe_serialization=True)
            scheduler.save_pretrained(str(tmp / "scheduler"))
        if "t5" in sources:
            if reference_towers is None:
                meta["t5"] = T5_FOLDER
                _write_t5(tmp / T5_FOLDER, t5, text_encoder_dtype)
            else:
                meta["t5"] = os.path.relpath(Path(reference_towers["t5"]).resolve(), folder.resolve())
        (tmp / "adapter").mkdir()
        write_adapter(tmp / "adapter", adapter, process, adapter_provenance)
        (tmp / CHECKPOINT_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    save_model_folder(folder, write, beside_existing=beside_existing)
    return folder


def _write_t5(target: Path, t5: tuple, dtype: torch.dtype) -> None:
    """The T5 encoder (safetensors, in ``dtype``) and its tokenizer into one folder (the Hub layout)."""
    encoder, tokenizer = t5
    original = next(encoder.parameters()).dtype
    try:
        encoder.to(dtype).save_pretrained(str(target), safe_serialization=True)
    finally:
        encoder.to(original)
    tokenizer.save_pretrained(str(target))
