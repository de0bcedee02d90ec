"""SDG checkpoint folders: the frozen diffusion model and the noise-aware CLIP, as written by ``scripts/sdg/*``.

An SDG folder (``ckpt/tiny/sdg``; ``scripts/sdg/convert_checkpoint.py`` writes the same from released files)::

    <folder>/unet/                     diffusers UNet2DModel (learn_sigma: 6 output channels), safetensors
    <folder>/unet/adm_flags.json       the guided-diffusion flags it was built from (schedule, respacing, ...)
    <folder>/clip/noise_aware_clip.json           how to rebuild E'(x_t, t): the base open_clip CLIP (path, relative
                                                   to this folder when it can be), image_size, t_dim, hidden, ...
    <folder>/clip/noise_aware_clip.safetensors    ``NoiseAwareCLIP.state_dict()`` (tower + time MLP + FiLM projection)

The base CLIP is referenced, not copied: its frozen TEXT tower embeds the language instructions (METHOD.md §2), and
its architecture is rebuilt before the fine-tuned image-side weights are loaded over it.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from common.errors import UserError, one_line
from sdg.adm import ADMFlags, noise_schedule
from sdg.noisy_clip import NoiseAwareCLIP, load_noise_aware_clip


PathLike = Union[str, os.PathLike]
UNET_SUBFOLDER = "unet"
CLIP_SUBFOLDER = "clip"
ADM_FLAGS_FILE = "adm_flags.json"
CLIP_CONFIG_FILE = "noise_aware_clip.json"
CLIP_WEIGHTS_FILE = "noise_aware_clip.safetensors"
CLIP_FORMAT = "diffusion-lab/sdg-noise-aware-clip/v1"


# ------------------------------------------------------------------------------------------------ diffusion model


def save_unet_folder(unet: torch.nn.Module, flags: ADMFlags, folder: PathLike, dtype: torch.dtype = torch.float32,
                     extra: Optional[dict[str, Any]] = None, beside_existing: bool = False) -> Path:
    """Write ``unet`` (``save_pretrained``, safetensors, weights cast to ``dtype``) and ``adm_flags.json``, atomically
    (``beside_existing``: into a training run's output folder, next to its checkpoints)."""
    from common.io import save_model_folder

    folder = Path(folder)
    model = copy.deepcopy(unet)
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(dtype)  # not ModelMixin.to(): it warns about fp32-kept modules

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / ADM_FLAGS_FILE).write_text(json.dumps({**flags.to_dict(), **(extra or {})}, indent=2))

    save_model_folder(folder, write, beside_existing=beside_existing)
    return folder


def _read_flags(path: Path) -> ADMFlags:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({one_line(str(err))}): re-write the model folder") from None
    known = set(ADMFlags.__dataclass_fields__)
    return ADMFlags.from_dict({k: v for k, v in values.items() if k in known})


def unet_folder(path: PathLike) -> Optional[Path]:
    """The UNet folder inside an SDG folder (``<path>/unet``) or ``path`` itself; None if neither holds a config."""
    path = Path(path)
    for candidate in (path / UNET_SUBFOLDER, path):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def load_diffusion_model(model_path: PathLike, flags: Optional[ADMFlags] = None, device="cpu"):
    """``(unet, flags)``: the learn_sigma ``UNet2DModel`` (float32, eval) and its ADM flags.

    ``model_path``: an SDG folder / its ``unet/`` folder (flags from ``adm_flags.json``; ``flags`` only fills in when
    the file is absent), or a guided-diffusion state-dict ``.pt`` (converted on the fly, ``weights_only``; then
    ``flags`` must describe it, as guided-diffusion's command line does).
    """
    path = Path(model_path)
    if not path.exists():
        raise UserError(f"--checkpoint {path} does not exist: pass an SDG model folder or a guided-diffusion .pt")
    if path.is_dir():
        from common.models import load_unet

        folder = unet_folder(path)
        if folder is None:
            raise UserError(f"{path} holds no UNet (no config.json in it or in {path / UNET_SUBFOLDER}): pass the "
                            "folder written by scripts/sdg/train_unconditional.py or convert_checkpoint.py")
        unet = load_unet(folder).float().eval()
        flags_file = folder / ADM_FLAGS_FILE
        flags = _read_flags(flags_file) if flags_file.is_file() else (flags or ADMFlags(learn_sigma=True))
    else:
        from sdg.convert import load_adm_unet

        if flags is None:
            raise UserError(f"{path} is a guided-diffusion checkpoint: pass its model flags (--image_size ...)")
        unet = load_adm_unet(str(path), flags)
    config = unet.config
    if getattr(config, "out_channels", None) != 2 * getattr(config, "in_channels", -1):
        raise UserError(f"{path} is not a learn_sigma model (out_channels {config.out_channels}, in_channels "
                        f"{config.in_channels}): SDG samples with ADM's learned variance")
    return unet.to(device).eval(), flags


# ------------------------------------------------------------------------------------------------ noise-aware CLIP


@dataclass
class NoiseAwareCLIPBundle:
    """A loaded noise-aware CLIP: ``clip`` (E'), the base open_clip ``model`` (frozen text tower) and its tokenizer."""

    clip: NoiseAwareCLIP
    model: torch.nn.Module
    tokenizer: Any
    folder: Optional[Path] = None

    def encode_text(self, prompts) -> torch.Tensor:
        from sdg.pipeline import encode_text

        return encode_text(self.model, self.tokenizer, prompts)


REPO = Path(__file__).resolve().parent.parent


def portable_path(target: PathLike) -> str:
    """A stored path that survives copying the checkpoint inside the repository: repo-relative when the target lies
    in the repository (``ckpt/tiny/clip``), absolute otherwise."""
    target = Path(target).resolve()
    try:
        return target.relative_to(REPO).as_posix()
    except ValueError:
        return str(target)


def clip_settings(clip: NoiseAwareCLIP, film_init: str, pos_init: str) -> dict[str, Any]:
    return {"image_size": clip.image_size, "t_dim": clip.t_dim, "hidden": clip.time_embed[0].out_features,
            "film_init": film_init, "pos_init": pos_init, "kind": clip.kind}


def save_noise_aware_clip(clip: NoiseAwareCLIP, folder: PathLike, *, base_clip: PathLike,
                          base_clip_weights: Optional[PathLike] = None, settings: dict[str, Any],
                          extra: Optional[dict[str, Any]] = None, dtype: torch.dtype = torch.float32,
                          base_model: Optional[torch.nn.Module] = None, beside_existing: bool = False) -> Path:
    """Write ``noise_aware_clip.{json,safetensors}`` into ``folder`` atomically; the base CLIP is referenced by path
    (repo-relative when inside the repository, so the folder can be copied to ``ckpt/tiny/sdg/clip``) and, given
    ``base_model``, by the fingerprint of its weights (checked at load)."""
    from common.io import save_model_folder, save_safetensors

    folder = Path(folder)
    base = str(base_clip)
    if Path(base).exists():
        base = portable_path(base)
    weights = None if base_clip_weights is None else portable_path(base_clip_weights)
    config = {"format": CLIP_FORMAT, "base_clip": base, "base_clip_weights": weights, **settings, **(extra or {})}
    if base_model is not None:
        config["base_fingerprint"] = base_fingerprint(base_model)
    state = {k: v.detach().to(dtype) if v.is_floating_point() else v for k, v in clip.state_dict().items()}
    def write(tmp: Path) -> None:
        save_safetensors(state, tmp / CLIP_WEIGHTS_FILE)
        (tmp / CLIP_CONFIG_FILE).write_text(json.dumps(config, indent=2))

    save_model_folder(folder, write, beside_existing=beside_existing)
    return folder


def _resolve(folder: Path, value: Optional[str]) -> Optional[str]:
    """A stored path: absolute as is; relative: next to the config, else under the repository, else as given (an
    open_clip model name)."""
    if value is None or Path(value).is_absolute():
        return value
    for base in (folder, REPO):
        if (base / value).exists():
            return str(base / value)
    return value


def clip_folder(path: PathLike) -> Path:
    """The folder holding ``noise_aware_clip.json``: ``path``, ``path/clip``, or the parent of a file inside it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--clip_path {path} does not exist: pass the folder written by scripts/sdg/finetune_clip.py")
    if path.is_file():
        if path.name in (CLIP_CONFIG_FILE, CLIP_WEIGHTS_FILE):
            return path.parent
        raise UserError(
            f"--clip_path {path} is a bare weights file: pass the noise-aware CLIP folder written by "
            "scripts/sdg/finetune_clip.py (or convert SDG's CLIP_gd .pt with scripts/sdg/convert_checkpoint.py "
            "--clip_gd_path)"
        )
    for candidate in (path, path / CLIP_SUBFOLDER):
        if (candidate / CLIP_CONFIG_FILE).is_file():
            return candidate
    if (path / "open_clip_config.json").is_file():
        raise UserError(
            f"--clip_path {path} is a plain (not noise-aware) CLIP: fine-tune a noise-aware one from it with "
            "scripts/sdg/finetune_clip.py --clip_model_path and pass that folder"
        )
    raise UserError(f"--clip_path {path} has no {CLIP_CONFIG_FILE}: pass the folder written by "
                    "scripts/sdg/finetune_clip.py or convert_checkpoint.py")


def load_base_clip(base: PathLike, weights: Optional[PathLike] = None, device="cpu"):
    """``(open_clip model, tokenizer)`` of the base CLIP (a local open_clip folder, a config .json or a name + weights)."""
    from common.models import load_open_clip

    model, _, tokenizer = load_open_clip(base, weights, device=device)
    return model.float().eval(), tokenizer


def base_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the base CLIP's weights (names + float32 values): the text tower that scores E' must be the one whose
    image tower was distilled, so a retrained or swapped base CLIP is detected at load time."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def noise_aware_from_base(model: torch.nn.Module, settings: dict[str, Any]) -> NoiseAwareCLIP:
    """A fresh ``NoiseAwareCLIP`` around a deep copy of ``model.visual`` with the stored settings."""
    return NoiseAwareCLIP(
        copy.deepcopy(model.visual),
        image_size=settings.get("image_size"),
        t_dim=int(settings.get("t_dim", 128)),
        hidden=int(settings.get("hidden", 512)),
        film_init=settings.get("film_init", "zero"),
        pos_init=settings.get("pos_init", "interp"),
    )


def load_noise_aware_clip_folder(path: PathLike, device="cpu") -> NoiseAwareCLIPBundle:
    """Load the noise-aware CLIP of a folder (``--clip_path``), its base model and tokenizer; eval mode, float32.

    A plain CLIP folder, a weights file without the time-modulation keys or a mismatched architecture is a one-line
    ``UserError``.
    """
    from common.io import load_safetensors

    folder = clip_folder(path)
    config_path = folder / CLIP_CONFIG_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{config_path} is not valid JSON ({one_line(str(err))})") from None
    if not isinstance(config, dict) or config.get("format") != CLIP_FORMAT or not config.get("base_clip"):
        raise UserError(f"{config_path} is not a noise-aware CLIP config ({CLIP_FORMAT} with base_clip)")
    model, tokenizer = load_base_clip(_resolve(folder, config["base_clip"]),
                                      _resolve(folder, config.get("base_clip_weights")), device)
    expected = config.get("base_fingerprint")
    if expected and base_fingerprint(model) != expected:
        raise UserError(
            f"the base CLIP {config['base_clip']} of {folder} has changed since the noise-aware CLIP was trained "
            "(weights fingerprint differs): its text tower no longer matches; re-run scripts/sdg/finetune_clip.py"
        )
    clip = noise_aware_from_base(model, config)
    load_noise_aware_clip(clip, load_safetensors(folder / CLIP_WEIGHTS_FILE), source=str(folder / CLIP_WEIGHTS_FILE))
    return NoiseAwareCLIPBundle(clip.float().to(device).eval(), model.to(device), tokenizer, folder)


def plain_clip_guide(model: torch.nn.Module, image_size: Optional[int] = None) -> NoiseAwareCLIP:
    """The ablation guide: the base CLIP's image tower on x_t with NO time modulation (zero FiLM = plain CLIP, bit for
    bit), i.e. off-the-shelf CLIP used as SDG's matching score (METHOD.md §3)."""
    return NoiseAwareCLIP(copy.deepcopy(model.visual), image_size=image_size, t_dim=8, hidden=8,
                          film_init="zero").eval()


def schedule_of(flags: ADMFlags):
    return noise_schedule(flags)
