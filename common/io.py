"""Files on disk: atomic writes, safetensors, ``weights_only`` torch loads, images and image grids.

Two promises hold for everything here:

- *Nothing half-written.* Outputs go to a temporary sibling first and are renamed into place only when the
  writer finished; an exception (or Ctrl-C) removes the temporary and leaves any previous output intact.
- *No code runs on load.* Weights come from safetensors or from ``torch.load(weights_only=True)``; a pickle
  that would import or call anything else becomes a one-line :class:`~common.errors.UserError`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import pickle
import shutil
import uuid
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.jit._pickle
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors import SafetensorError
from safetensors.torch import load_file as _st_load_file
from safetensors.torch import save_file as _st_save_file

from common.errors import UserError, one_line


PathLike = Union[str, os.PathLike]
ImageLike = Union[torch.Tensor, Image.Image]


# --------------------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------------------


def _temp_sibling(path: Path, tag: str) -> Path:
    """A hidden name next to ``path`` (same filesystem, so ``os.rename`` is atomic) that keeps its suffix."""
    return path.parent / f".{tag}-{uuid.uuid4().hex[:12]}-{path.name}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# A folder the project wrote holds this file, listing what it wrote there (relative paths) and which program wrote it.
# It is what allows a later run of the same program to replace those files, and only those: a folder without it
# (or written by another program) is never emptied, merged into or overwritten.
OUTPUT_MANIFEST = ".diffusion-lab-manifest.json"
_STAGING_PREFIX = ".diffusion-lab-staging-"


def _caller_label(depth: int = 2) -> str:
    """``parent/file.py`` of the function ``depth`` frames up: who writes, the same whether run as a script or
    imported (tests call ``main(argv)``)."""
    import sys

    file = sys._getframe(depth).f_globals.get("__file__") or "?"
    parts = Path(file).parts
    return "/".join(parts[-2:])


def read_output_manifest(folder: PathLike) -> dict | None:
    """The manifest of a folder this project wrote, or None (no manifest, or one that does not parse)."""
    import json

    path = Path(folder) / OUTPUT_MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        return None
    files = []
    for name in data["files"]:
        # A manifest never grants anything outside its folder: no absolute paths, no "..".
        if isinstance(name, str) and name and not Path(name).is_absolute() and ".." not in Path(name).parts:
            files.append(Path(name).as_posix())
    return {"writer": str(data.get("writer", "?")), "files": files}


def check_output_dir(path: PathLike, flag: str = "--output_dir", writer: str | None = None) -> Path:
    """Refuse, before any work, an output folder this writer may not write into; returns ``Path(path)``.

    Allowed: a path that does not exist yet, an empty folder, or a folder whose manifest says this ``writer``
    (default: the calling file) wrote it. Anything else is a one-line :class:`UserError` naming the folder and
    ``flag``, the option that picks another one. Nothing is created or removed here.
    """
    path = Path(path)
    writer = writer or _caller_label()
    if path.is_symlink() and not path.exists():
        raise UserError(f"output folder {path} is a broken symlink: pass another folder with {flag}")
    if not path.exists():
        return path
    if not path.is_dir():
        raise UserError(f"output path {path} is a file, not a folder: pass a folder path with {flag}")
    # A staging folder left by a killed run is ours (by its name) and does not make a folder the user's.
    if not any(not entry.name.startswith(_STAGING_PREFIX) for entry in path.iterdir()):
        return path
    manifest = read_output_manifest(path)
    if manifest is None:
        raise UserError(
            f"output folder {path} is not empty and was not written by this project: refusing to write into it "
            f"(nothing was changed); choose a new or empty folder with {flag}"
        )
    if manifest["writer"] != writer:
        raise UserError(
            f"output folder {path} holds the output of {manifest['writer']}, not of {writer}: refusing to replace "
            f"it (nothing was changed); choose another folder with {flag}"
        )
    return path


def claim_output_dir(path: PathLike, flag: str = "--output_dir", writer: str | None = None) -> Path:
    """Make ``path`` this writer's folder for outputs written into it piece by piece (subfolders by other
    writers, a summary file by this one): refused like :func:`check_output_dir`; a new or empty folder gets a
    manifest naming ``writer`` (and no files), so a later run of the same writer is recognised."""
    writer = writer or _caller_label()
    path = check_output_dir(path, flag, writer)
    path.mkdir(parents=True, exist_ok=True)
    if read_output_manifest(path) is None:
        _write_manifest(path, writer, [])
    return path


def _relative_files(root: Path) -> list[str]:
    """Every file (and symlink) below ``root``, as sorted POSIX relative paths; a manifest at the top (a copied
    output) is left out: the writer's own replaces it."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for name in filenames + [d for d in dirnames if (base / d).is_symlink()]:
            found.append((base / name).relative_to(root).as_posix())
    return sorted(name for name in found if name != OUTPUT_MANIFEST)


def _write_manifest(folder: Path, writer: str, files: list[str]) -> None:
    import json

    target = folder / OUTPUT_MANIFEST
    tmp = folder / f"{OUTPUT_MANIFEST}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        tmp.write_text(json.dumps({"format": 1, "writer": writer, "files": files}, indent=1) + "\n")
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def _prune_empty_parents(file: Path, root: Path) -> None:
    """Remove the folders above ``file`` that became empty, up to (not including) ``root``."""
    parent = file.parent
    while parent != root and root in parent.parents:
        try:
            parent.rmdir()  # only succeeds on an empty folder: nothing of anyone's is lost
        except OSError:
            return
        parent = parent.parent


def _merge_into(folder: Path, staged: Path, writer: str, flag: str) -> None:
    """Move the staged files into ``folder``, replacing the files the previous output of ``writer`` listed there.

    Files the manifest does not list are never touched; a staged file whose name is taken by such a file is a
    :class:`UserError` before anything moves. If a move fails part-way, the moved files go back and the
    previous files are restored.
    """
    manifest = read_output_manifest(folder)
    if manifest is None and any(not entry.name.startswith(_STAGING_PREFIX) for entry in folder.iterdir()):
        check_output_dir(folder, flag, writer)  # something appeared meanwhile: the same refusal as up front
    if manifest is not None and manifest["writer"] != writer:
        check_output_dir(folder, flag, writer)
    owned = set(manifest["files"]) if manifest else set()
    new = _relative_files(staged)
    for name in new:
        target = folder / name
        between = [p for p in target.parents if folder in p.parents]
        blocked = next((p for p in between if p.is_symlink() or (p.exists() and not p.is_dir())), None)
        if blocked is None and (target.exists() or target.is_symlink()):
            if name not in owned or (target.is_dir() and not target.is_symlink()):
                blocked = target
        if blocked is not None:
            raise UserError(
                f"output folder {folder} already holds {blocked.relative_to(folder).as_posix()}, which this project "
                f"did not write: refusing to overwrite it (nothing was changed); move it away or choose another "
                f"folder with {flag}"
            )
    backup = staged.parent / f"{staged.name}-previous"
    backup.mkdir()
    moved_old: list[str] = []
    moved_new: list[str] = []
    try:
        for name in sorted(owned):  # the previous output of this writer steps aside
            source = folder / name
            if source.is_file() or source.is_symlink():
                (backup / name).parent.mkdir(parents=True, exist_ok=True)
                os.rename(source, backup / name)
                moved_old.append(name)
        for name in new:
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staged / name, target)
            moved_new.append(name)
        _write_manifest(folder, writer, new)
    except BaseException:
        for name in reversed(moved_new):
            with contextlib.suppress(OSError):
                os.rename(folder / name, staged / name)
                _prune_empty_parents(folder / name, folder)
        for name in moved_old:
            with contextlib.suppress(OSError):
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                os.rename(backup / name, folder / name)
        _remove(backup)
        raise
    for name in moved_old:  # only the writer's own previous files, now replaced
        if name not in new:
            _prune_empty_parents(folder / name, folder)
    _remove(backup)


def atomic_write_dir(path: PathLike, flag: str = "--output_dir", writer: str | None = None):
    """Write a folder all-or-nothing, never losing anything that was there: ``with atomic_write_dir(out) as tmp:
    model.save_pretrained(tmp)``.

    The body writes into an empty hidden staging folder. When it finishes:

    - ``path`` does not exist: the staging folder is renamed to ``path`` (one atomic step);
    - ``path`` is an empty folder, or holds an earlier output of the same ``writer`` (default: the calling file),
      as its :data:`OUTPUT_MANIFEST` says: the new files are moved in file by file; the files the earlier output
      listed are replaced or, when the new output lacks them, removed. Files the manifest does not list are
      never touched, and a new file whose name one of them takes is refused;
    - otherwise (a non-empty folder the project did not write, e.g. ``--output_dir .``): a one-line
      :class:`UserError` naming the folder and ``flag`` (the option choosing another folder), raised before the
      body runs, with nothing changed.

    Every folder written here ends with the manifest listing its files. On any exception, including
    ``KeyboardInterrupt``, the staging folder is removed and ``path`` is left exactly as it was.
    """
    return _atomic_write_dir(Path(path), flag, writer or _caller_label())


@contextlib.contextmanager
def _atomic_write_dir(path: Path, flag: str, writer: str) -> Iterator[Path]:
    check_output_dir(path, flag, writer)
    existed = path.is_dir()
    # Stage inside an existing folder (same filesystem, and no need to write its parent), else beside it.
    parent = path if existed else Path(os.path.abspath(path)).parent
    parent.mkdir(parents=True, exist_ok=True)
    staged = parent / f"{_STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
    staged.mkdir()
    try:
        yield staged
        if existed or path.exists():
            _merge_into(path, staged, writer, flag)
        else:
            _write_manifest(staged, writer, _relative_files(staged))
            os.rename(staged, path)
    except (OSError, RuntimeError) as err:  # a full or read-only disk: one line with the size, nothing left behind
        from common.checkpoint import disk_fault, is_disk_fault

        if not is_disk_fault(err):
            raise
        written = sum(f.stat().st_size for f in staged.rglob("*") if f.is_file()) if staged.is_dir() else 0
        raise disk_fault(err, path, written, "write the output folder") from None
    finally:
        _remove(staged)
        _remove(staged.parent / f"{staged.name}-previous")


@contextlib.contextmanager
def atomic_write_file(path: PathLike) -> Iterator[Path]:
    """Write one file all-or-nothing: ``with atomic_write_file("a.png") as tmp: image.save(tmp)``.

    Yields a temporary path in the same folder whose name ends like ``path`` (so writers that pick a format
    from the suffix, such as PIL, still do the right thing). On success the file is fsynced and
    ``os.replace``-d over ``path`` (atomic on POSIX); on any exception it is removed and ``path`` is untouched.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"output path {path} is a folder, not a file: pass a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path, "tmp")
    try:
        yield tmp
        if not tmp.is_file():
            raise RuntimeError(f"atomic_write_file: the body did not write {tmp}")
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


# --------------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------------


def read_json_object(path: PathLike, what: str, fix: str) -> dict:
    """The JSON object in ``path`` (a ``what``). Missing, unreadable, invalid or not an object: one line ending in ``fix``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist: {fix}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{what} {path} is not valid JSON ({one_line(str(err))}): {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must hold a JSON object: {fix}")
    return data


def require_file(path: PathLike, what: str = "file") -> Path:
    """``Path(path)`` if it is an existing file, else a :class:`UserError` naming it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {path} does not exist: check the path")
    if not path.is_file():
        raise UserError(f"{what} {path} is a folder, not a file: pass the file inside it")
    return path


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Save a flat ``name -> tensor`` dict as safetensors, atomically.

    Tensors are detached, moved to CPU and made contiguous; tensors that share storage with an earlier one
    (tied weights) are cloned, because safetensors refuses aliased buffers.
    """
    plain: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"save_safetensors: {name!r} is a {type(tensor).__name__}, not a tensor")
        tensor = tensor.detach().cpu().contiguous()
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if tensor.numel() and key in seen:
            tensor = tensor.clone()
        seen.add(key)
        plain[name] = tensor
    with atomic_write_file(path) as tmp:
        _st_save_file(plain, str(tmp), metadata=dict(metadata) if metadata else None)
    return Path(path)


def load_safetensors(path: PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file to a ``name -> tensor`` dict; a missing, truncated or corrupt file is a UserError."""
    path = require_file(path, "weights file")
    try:
        return _st_load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise UserError(
            f"{path} is not a readable safetensors file ({one_line(str(err))}): it is truncated or corrupt, "
            "re-create or re-download it"
        ) from None


def is_torchscript_archive(path: PathLike) -> bool:
    """True if ``path`` is a zip written by ``torch.jit.save`` (it holds a ``constants.pkl`` record)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or name == "constants.pkl" for name in archive.namelist())


def safe_torch_load(path: PathLike) -> object:
    """``torch.load(path, weights_only=True, map_location="cpu")`` with one-line errors.

    ``weights_only=True`` restricts unpickling to tensors and plain containers, so a checkpoint whose pickle
    would import or call anything (``os.system`` in a ``__reduce__``, a pickled ``nn.Module``, an optimizer
    holding custom classes) is refused *before* any of it runs, and becomes a :class:`UserError`. A
    ``.safetensors`` path is read with safetensors. TorchScript archives are refused with a pointer to
    :func:`common.models.load_open_clip`, which reads their weights without running their code.
    """
    path = require_file(path, "weights file")
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    if is_torchscript_archive(path):
        raise UserError(
            f"{path} is a TorchScript archive (torch.jit.save), not a state dict: load it with "
            "common.models.load_open_clip if it is an OpenAI CLIP release, or export its state_dict to safetensors"
        )
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        reason = one_line(str(err)).split(" Check the documentation")[0][:300]
        raise UserError(
            f"{path} holds pickled Python objects, not plain weights: refusing to load it (convert it to "
            f"safetensors where it was made, with safetensors.torch.save_file(model.state_dict(), ...)); "
            f"detail: {reason}"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise UserError(
            f"{path} is not a readable torch checkpoint ({one_line(str(err))[:300]}): it is truncated or "
            "corrupt, re-create or re-download it"
        ) from None


# TorchScript archives (torch.jit.save), e.g. the original OpenAI CLIP release: read the weights, run nothing.
# ``torch.jit.load`` would compile and run the archive's TorchScript (class ``__setstate__`` hooks included), and
# ``torch.load(weights_only=True)`` refuses such archives. The weights, though, are ordinary: ``data.pkl`` pickles
# the module tree as ``__torch__.<Class>`` objects whose attribute dicts hold tensors, submodules and plain
# values, and tensor bytes sit in ``data/<key>`` records. The unpickler below resolves only those names: module
# classes become inert stand-ins and tensors are rebuilt from the records; any other global is refused.

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_JIT_PICKLE_HELPERS = ("build_intlist", "build_tensorlist", "build_doublelist", "build_boollist", "restore_type_tag")


class _ScriptObject:
    """Inert stand-in for a pickled TorchScript object: keeps the attribute dict that BUILD hands it."""

    qualname = "?"

    def __setstate__(self, state: object) -> None:
        self.state = state


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """``torch._utils._rebuild_tensor_v2`` over a flat tensor standing in for the storage (views share memory)."""
    del requires_grad, backward_hooks, metadata
    return torch.empty(0, dtype=storage.dtype).set_(storage.untyped_storage(), storage_offset, size, stride)


class _TorchScriptWeightsUnpickler(pickle.Unpickler):
    def __init__(self, file, read_record) -> None:
        super().__init__(file)
        self._read_record = read_record
        self._classes: dict[str, type] = {}
        self._storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self._classes:
                self._classes[qualname] = type("ScriptObject", (_ScriptObject,), {"qualname": qualname})
            return self._classes[qualname]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch.jit._pickle" and name in _JIT_PICKLE_HELPERS:
            return getattr(torch.jit._pickle, name)
        raise pickle.UnpicklingError(f"refusing to resolve the global {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:80]}")
        _, storage_type, key, _location, numel = pid
        if key not in self._storages:
            raw = self._read_record(f"data/{key}")
            flat = torch.frombuffer(bytearray(raw), dtype=storage_type.dtype) if raw else torch.empty(0)
            if flat.numel() < numel:
                raise pickle.UnpicklingError(f"tensor record data/{key} is shorter than its {numel} elements")
            self._storages[key] = flat.to(storage_type.dtype)
        return self._storages[key]


def _collect_tensors(obj: _ScriptObject, prefix: str, out: dict[str, torch.Tensor]) -> None:
    state = getattr(obj, "state", None)
    if not isinstance(state, dict):
        return
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            _collect_tensors(value, f"{prefix}{name}.", out)


def load_torchscript_weights(path: PathLike) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a ``torch.jit.save`` archive, as ``ScriptModule.state_dict()`` names them.

    Reads ``<archive>/data.pkl`` with an unpickler that resolves only module stand-ins, tensor rebuilding,
    ``OrderedDict`` and TorchScript's list helpers, so no code from the archive runs (contrast ``torch.jit.load``).
    Tensor constants folded into traced code (``constants.pkl``) are not weights and are not returned.
    """
    path = require_file(path, "weights file")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            roots = [name[: -len("data.pkl")] for name in names if name.endswith("data.pkl") and name.count("/") <= 1]
            if len(roots) != 1 or f"{roots[0]}constants.pkl" not in names:
                raise UserError(f"{path} is not a TorchScript archive (torch.jit.save): pass one, or use safe_torch_load")
            root = roots[0]
            if f"{root}byteorder" in names and archive.read(f"{root}byteorder").strip() not in (b"little", b""):
                raise UserError(f"{path} was written on a big-endian machine: re-save it on a little-endian one")
            unpickler = _TorchScriptWeightsUnpickler(
                BytesIO(archive.read(f"{root}data.pkl")), lambda record: archive.read(root + record)
            )
            module = unpickler.load()
    except UserError:
        raise
    except pickle.UnpicklingError as err:
        raise UserError(
            f"{path} holds pickled Python objects, not plain weights: refusing to load it (convert it to "
            f"safetensors where it was made); detail: {one_line(str(err))[:200]}"
        ) from None
    except (zipfile.BadZipFile, KeyError, EOFError, ValueError, RuntimeError, OSError) as err:
        raise UserError(
            f"{path} is not a readable TorchScript archive ({one_line(str(err))[:200]}): it is truncated or "
            "corrupt, re-create or re-download it"
        ) from None
    if not isinstance(module, _ScriptObject):
        raise UserError(f"{path} does not hold a TorchScript module (its root is a {type(module).__name__})")
    weights: dict[str, torch.Tensor] = {}
    _collect_tensors(module, "", weights)
    return weights


# --------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------


def to_pil(image: ImageLike, value_range: tuple[float, float] = (-1.0, 1.0)) -> Image.Image:
    """One image tensor to a PIL image.

    ``image``: float ``[C, H, W]`` or ``[1, C, H, W]`` with ``C`` in {1, 3, 4}, values in ``value_range``
    (``(-1, 1)``, the diffusion convention and the default, or ``(0, 1)``); or ``uint8`` with values 0..255.
    The range is explicit because it cannot be guessed: a dark ``[-1, 1]`` image can be all non-negative.
    Values are clamped to the range, then rounded to 8 bits. PIL images pass through unchanged.
    """
    if isinstance(image, Image.Image):
        return image
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(f"to_pil expects [C, H, W] with C in (1, 3, 4), got shape {tuple(image.shape)}")
    image = image.detach().cpu()
    if image.dtype == torch.uint8:
        array = image.permute(1, 2, 0).numpy()
    else:
        low, high = value_range
        if not high > low:
            raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
        scaled = (image.float().clamp(low, high) - low) / (high - low)
        array = (scaled * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    # fromarray infers L / RGB / RGBA from a uint8 array's shape (its ``mode`` argument is deprecated).
    return Image.fromarray(np.ascontiguousarray(array[:, :, 0] if array.shape[2] == 1 else array))


def make_image_grid(
    images: torch.Tensor | Sequence[ImageLike],
    nrow: int = 8,
    padding: int = 2,
    value_range: tuple[float, float] = (-1.0, 1.0),
    pad_value: int = 0,
) -> Image.Image:
    """Tile images into one RGB grid, ``nrow`` images per row (torchvision's ``make_grid`` layout).

    ``images``: a ``[N, C, H, W]`` tensor or a sequence of ``[C, H, W]`` tensors / PIL images of one size.
    The grid is ``ceil(N / nrow)`` rows by ``min(N, nrow)`` columns with ``padding`` pixels of ``pad_value``
    around every tile.
    """
    tiles = [to_pil(image, value_range).convert("RGB") for image in images]
    if not tiles:
        raise ValueError("make_image_grid needs at least one image")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    width, height = tiles[0].size
    if any(tile.size != (width, height) for tile in tiles):
        raise ValueError(f"all images in a grid must have one size, got {sorted({t.size for t in tiles})}")
    cols = min(len(tiles), nrow)
    rows = math.ceil(len(tiles) / nrow)
    grid = Image.new(
        "RGB",
        (cols * (width + padding) + padding, rows * (height + padding) + padding),
        (pad_value,) * 3,
    )
    for index, tile in enumerate(tiles):
        row, col = divmod(index, nrow)
        grid.paste(tile, (padding + col * (width + padding), padding + row * (height + padding)))
    return grid


def save_image_grid(
    images: torch.Tensor | Sequence[ImageLike],
    path: PathLike,
    nrow: int = 8,
    padding: int = 2,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> Image.Image:
    """:func:`make_image_grid`, then save it atomically (format from the suffix, e.g. ``.png``); returns the grid."""
    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise UserError(f"cannot save an image grid to {path}: unknown image suffix, use .png or .jpg")
    grid = make_image_grid(images, nrow=nrow, padding=padding, value_range=value_range)
    with atomic_write_file(path) as tmp:
        grid.save(tmp, format=image_format)
    return grid


def write_image_folder(
    folder: PathLike,
    images: torch.Tensor | Sequence[ImageLike],
    rows: Sequence[Mapping],
    extra_files: Mapping[str, object] | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    grid_limit: int = 100,
    flag: str = "--output_dir",
    writer: str | None = None,
) -> Path:
    """An imagefolder of results, written atomically (all of it or nothing): ``images/NNNN.png``, ``metadata.jsonl``
    (one row per image, ``file_name`` added first) and ``grid.png`` (the first ``grid_limit`` images, 10 per row).

    ``extra_files``: ``{relative name: writer}``, each writer called with the path to create inside the folder
    (e.g. masks or a settings file), so they land in the same atomic commit. ``folder`` follows the rules of
    :func:`atomic_write_dir` (``writer`` defaults to the calling file, ``flag`` names the option in refusals).
    """
    import json

    if len(images) != len(rows):
        raise ValueError(f"{len(images)} images but {len(rows)} metadata rows")
    folder = Path(folder)
    with atomic_write_dir(folder, flag, writer or _caller_label()) as tmp:
        (tmp / "images").mkdir()
        with open(tmp / "metadata.jsonl", "w") as meta:
            for i, (image, row) in enumerate(zip(images, rows)):
                name = f"images/{i:04d}.png"
                to_pil(image, value_range=value_range).save(tmp / name)
                meta.write(json.dumps({"file_name": name, **row}) + "\n")
        if len(rows):
            shown = images[:grid_limit]
            save_image_grid(shown, tmp / "grid.png", nrow=min(10, len(shown)), value_range=value_range)
        for name, writer in (extra_files or {}).items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            writer(target)
    return folder


def _sixteen_bit_to_8(image: Image.Image) -> Image.Image:
    """``I;16*`` / ``I`` (16-bit grayscale PNG/TIFF) to ``L``: divide by 257 instead of PIL's clip at 255."""
    array = np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.clip(np.round(array / 257.0), 0, 255).astype(np.uint8))


def _float_to_8(image: Image.Image) -> Image.Image:
    """Mode ``F`` (float TIFF): values in [0, 1] are scaled to 0..255, anything else is clipped to 0..255."""
    array = np.asarray(image, dtype=np.float64)
    if array.size and np.nanmax(array) <= 1.0:
        array = array * 255.0
    return Image.fromarray(np.clip(np.round(np.nan_to_num(array)), 0, 255).astype(np.uint8))


def _flatten_alpha(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Composite a transparent image over ``background``: the RGB under alpha 0 is arbitrary, often garbage."""
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def pil_to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode to 8-bit RGB: grayscale, palette, CMYK, 16-bit and float grayscale, and alpha (flattened)."""
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        return _flatten_alpha(image, background)
    if image.mode.startswith("I;16") or image.mode == "I":
        image = _sixteen_bit_to_8(image)
    elif image.mode == "F":
        image = _float_to_8(image)
    return image.convert("RGB")


def open_image(path: PathLike, max_pixels: int | None = None) -> Image.Image:
    """``Image.open(path)`` (header only, nothing decoded yet), refused as a one-line :class:`UserError` when the
    declared size exceeds ``max_pixels`` (default :data:`common.limits.MAX_IMAGE_PIXELS`), so a small file that
    declares a huge canvas (a decompression bomb) is never decoded. Use it as ``with open_image(p) as im:``.
    PIL's own :class:`~PIL.Image.DecompressionBombError` becomes a UserError too; other read errors pass through.
    """
    import warnings

    from common.limits import image_pixels

    try:
        with warnings.catch_warnings():  # PIL's warning threshold lies above our limit: the refusal below says it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as err:
        raise UserError(f"{path} is too large to decode safely ({one_line(str(err))}): resize it first") from None
    try:
        image_pixels(image.size[0], image.size[1], str(path), max_pixels)
    except BaseException:
        image.close()
        raise
    return image


def load_image_rgb(path: PathLike, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Open an image file as 8-bit RGB, fully decoded, with EXIF orientation applied.

    Grayscale, palette, CMYK, 16-bit and alpha images are converted (see :func:`pil_to_rgb`). The file is
    decoded here (``Image.load``), so a truncated or corrupt file fails now, as a :class:`UserError` naming
    it, rather than later inside a data loader worker.
    """
    path = require_file(path, "image")
    try:
        with open_image(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            return pil_to_rgb(image, background)
    except UnidentifiedImageError:
        raise UserError(f"{path} is not an image PIL can read: remove it or convert it to PNG/JPEG") from None
    except Image.DecompressionBombError as err:
        raise UserError(f"{path} is too large to decode safely ({one_line(str(err))}): resize it first") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(
            f"{path} is truncated or corrupt ({one_line(str(err))}): re-export it or remove it from the dataset"
        ) from None


def save_pretrained_into(folder: PathLike, write: Callable[[Path], Any]) -> Path:
    """Write a model into ``folder`` itself, beside what is already there (a training run's checkpoints, logs).

    ``write(tmp)`` saves into a fresh hidden folder inside ``folder`` (e.g. ``pipe.save_pretrained(tmp)``); then
    each entry it wrote is moved into ``folder``, an older entry of the same name (the previous export) being
    moved aside first and deleted only after the new one is in place. Entries ``write`` did not produce are never
    touched. On an exception nothing of the new export is left behind.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"output path {folder} is a file, not a folder: pass a folder path or remove the file")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".export-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        write(tmp)
        for entry in sorted(tmp.iterdir()):
            target = folder / entry.name
            old = None
            if target.exists() or target.is_symlink():
                old = _temp_sibling(target, "old")
                os.rename(target, old)
            os.rename(entry, target)
            if old is not None:
                _remove(old)
    finally:
        _remove(tmp)
    return folder


def save_model_folder(folder: PathLike, write: Callable[[Path], Any], *, beside_existing: bool = False,
                      flag: str = "--output_dir") -> Path:
    """Write a model folder with ``write(tmp)``: on its own, all-or-nothing (:func:`atomic_write_dir`), or, with
    ``beside_existing``, into a training run's output folder next to its checkpoints and logs
    (:func:`save_pretrained_into`), so that ``from_pretrained(output_dir)`` loads the run's result."""
    if beside_existing:
        return save_pretrained_into(folder, write)
    with atomic_write_dir(folder, flag, _caller_label()) as tmp:
        write(tmp)
    return Path(folder)
