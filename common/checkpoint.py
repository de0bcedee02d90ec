"""Trainer checkpoint files that prove they are whole and never run code, plus the one-writer lock.

A checkpoint folder written by :mod:`common.train` holds accelerate's model / optimizer / scheduler files, and
instead of accelerate's pickles (``random_states_<rank>.pkl`` and ``custom_checkpoint_<i>.pkl``, the latter read
with ``torch.load(weights_only=False)``):

- ``rng_state_<rank>.safetensors``: torch CPU / CUDA, numpy and python RNG states of each process;
- ``ema_<name>.safetensors``: a diffusers ``EMAModel``'s shadow parameters and its scalars (in the metadata);
- ``trainer_state.json``; and, written last, ``manifest.json``: every file's size and sha256.

:func:`verify_checkpoint` checks the manifest (no file missing, extra, resized or altered) and parses the RNG and
EMA states, so a damaged checkpoint is refused with one line naming the file instead of resuming to other weights.
accelerate's ``optimizer.bin`` / ``scheduler.bin`` stay torch pickles, which accelerate reads with
``weights_only=True`` (tensors and plain containers only).

:class:`OutputLock` makes one trainer the only writer of an output folder; :func:`disk_fault` turns a full,
read-only or forbidden disk into one line naming the path and the space a save needs.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import shutil
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from common.errors import UserError, one_line


logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "diffusion-lab/checkpoint-manifest/v1"
RNG_PREFIX = "rng_state_"
EMA_PREFIX = "ema_"
LOCK_FILE = ".trainer.lock"
EMA_SCALARS = {
    "decay": (float, int),
    "min_decay": (float,),
    "optimization_step": (int,),
    "update_after_step": (int,),
    "use_ema_warmup": (bool,),
    "inv_gamma": (float, int),
    "power": (float, int),
}
RNG_TENSORS = ("torch_cpu", "numpy_keys", "python_state")
RNG_SCALARS = ("numpy_pos", "numpy_has_gauss", "numpy_cached_gaussian", "python_version", "python_gauss_next", "cuda")
DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}


class CheckpointInvalid(Exception):
    """A checkpoint fails verification; the message is one line naming the file."""


# --------------------------------------------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def write_manifest(folder: str | os.PathLike) -> Path:
    """Record every file of ``folder`` (size, sha256) in ``manifest.json``; call it after everything else is written."""
    folder = Path(folder)
    files = {
        name: {"size": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
        for name in _files(folder)
        if name != MANIFEST_FILE
    }
    target = folder / MANIFEST_FILE
    with open(target, "w") as fh:
        json.dump({"format": MANIFEST_FORMAT, "files": files}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    return target


def verify_manifest(folder: str | os.PathLike) -> None:
    """Raise :class:`CheckpointInvalid` unless ``folder`` holds exactly the manifest's files, byte for byte."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointInvalid(
            f"{manifest_path} is missing: the save did not finish, or the checkpoint predates manifests"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict) or not files:
            raise ValueError("unknown format or no files")
        expected = {str(name): (int(v["size"]), str(v["sha256"])) for name, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointInvalid(f"{manifest_path} is unreadable ({one_line(str(err))[:200]})") from None
    present = set(_files(folder)) - {MANIFEST_FILE}
    for name in sorted(present - set(expected)):
        raise CheckpointInvalid(f"{folder / name} is not listed in {MANIFEST_FILE}: not written by the trainer")
    for name, (size, sha) in sorted(expected.items()):
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointInvalid(f"{manifest_path} lists a path outside the checkpoint: {name}")
        if not path.is_file():
            raise CheckpointInvalid(f"{path} is missing")
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointInvalid(f"{path} has {actual} bytes, the manifest says {size} (truncated or replaced)")
        if _sha256(path) != sha:
            raise CheckpointInvalid(f"{path} does not match its sha256 in {MANIFEST_FILE} (altered or corrupt)")


# --------------------------------------------------------------------------------------------------------------
# RNG states (safetensors, one file per process)
# --------------------------------------------------------------------------------------------------------------


def rng_file(folder: str | os.PathLike, process_index: int) -> Path:
    return Path(folder) / f"{RNG_PREFIX}{process_index}.safetensors"


def save_rng_state(folder: str | os.PathLike, process_index: int) -> Path:
    """This process's torch (CPU and every CUDA device), numpy and python RNG states, as tensors + JSON metadata."""
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    py_version, py_internal, py_gauss_next = random.getstate()
    assert np_kind == "MT19937"
    tensors = {
        "torch_cpu": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "python_state": torch.tensor(py_internal, dtype=torch.int64),
    }
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    for i, state in enumerate(cuda):
        tensors[f"torch_cuda_{i}"] = state
    meta = {
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_cached_gaussian": float(np_cached),
        "python_version": int(py_version),
        "python_gauss_next": py_gauss_next,
        "cuda": len(cuda),
    }
    path = rng_file(folder, process_index)
    save_file(tensors, str(path), metadata={"rng": json.dumps(meta)})
    return path


def _read_rng(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})["rng"])
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise CheckpointInvalid(f"{path} is not a readable RNG state ({one_line(str(err))[:200]})") from None
    missing = [k for k in RNG_TENSORS if k not in tensors] + [k for k in RNG_SCALARS if k not in meta]
    missing += [f"torch_cuda_{i}" for i in range(int(meta.get("cuda", 0))) if f"torch_cuda_{i}" not in tensors]
    if missing:
        raise CheckpointInvalid(f"{path} lacks RNG state keys: {', '.join(missing)}")
    shapes = {"numpy_keys": (624,), "python_state": (625,)}
    for key, shape in shapes.items():
        if tuple(tensors[key].shape) != shape:
            raise CheckpointInvalid(f"{path}: {key} has shape {tuple(tensors[key].shape)}, expected {shape}")
    if tensors["torch_cpu"].dtype != torch.uint8:
        raise CheckpointInvalid(f"{path}: torch_cpu is {tensors['torch_cpu'].dtype}, expected torch.uint8")
    return tensors, meta


def check_rng_state(path: Path) -> None:
    _read_rng(path)


def load_rng_state(path: Path) -> None:
    """Restore this process's RNGs from :func:`save_rng_state`'s file; a bad file raises :class:`CheckpointInvalid`."""
    tensors, meta = _read_rng(path)
    try:
        torch.set_rng_state(tensors["torch_cpu"])
        np.random.set_state(
            (
                "MT19937",
                tensors["numpy_keys"].numpy().astype(np.uint32),
                int(meta["numpy_pos"]),
                int(meta["numpy_has_gauss"]),
                float(meta["numpy_cached_gaussian"]),
            )
        )
        gauss = meta["python_gauss_next"]
        random.setstate(
            (int(meta["python_version"]), tuple(int(v) for v in tensors["python_state"].tolist()), gauss)
        )
    except (ValueError, TypeError, RuntimeError) as err:
        raise CheckpointInvalid(f"{path} holds an invalid RNG state ({one_line(str(err))[:200]})") from None
    if torch.cuda.is_available():
        cuda = [tensors[f"torch_cuda_{i}"] for i in range(int(meta["cuda"]))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning(
                "%s has %d CUDA RNG states, this machine %d devices: CUDA randomness is not restored",
                path,
                len(cuda),
                torch.cuda.device_count(),
            )


# --------------------------------------------------------------------------------------------------------------
# EMA states (diffusers EMAModel) as safetensors
# --------------------------------------------------------------------------------------------------------------


def ema_file(folder: str | os.PathLike, name: str) -> Path:
    return Path(folder) / f"{EMA_PREFIX}{name}.safetensors"


def save_ema_state(ema: Any, path: Path) -> Path:
    """``EMAModel.state_dict()`` as safetensors: ``shadow.<i>`` tensors, the scalars as JSON metadata."""
    state = ema.state_dict()
    scalars = {k: state[k] for k in EMA_SCALARS}
    shadow = state["shadow_params"]
    tensors = {f"shadow.{i:06d}": p.detach().to("cpu").contiguous().clone() for i, p in enumerate(shadow)}
    save_file(tensors, str(path), metadata={"ema": json.dumps({**scalars, "count": len(shadow)})})
    return path


def _read_ema(path: Path) -> tuple[dict[str, Any], list[torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})["ema"])
        tensors = load_file(str(path))
        if not isinstance(meta, dict):
            raise TypeError("metadata is not a mapping")
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise CheckpointInvalid(f"{path} is not a readable EMA state ({one_line(str(err))[:200]})") from None
    missing = [k for k in (*EMA_SCALARS, "count") if k not in meta]
    if missing:
        raise CheckpointInvalid(f"{path} lacks EMA state keys: {', '.join(missing)}")
    for key, types in EMA_SCALARS.items():
        value = meta[key]
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            raise CheckpointInvalid(f"{path}: EMA {key} = {value!r} is not a {types[0].__name__}")
    count = meta["count"]
    names = [f"shadow.{i:06d}" for i in range(count)] if isinstance(count, int) and count > 0 else []
    if not names or sorted(tensors) != names:
        raise CheckpointInvalid(f"{path}: EMA shadow parameters missing or misnumbered ({len(tensors)} tensors)")
    return meta, [tensors[n] for n in names]


def check_ema_state(path: Path) -> None:
    _read_ema(path)


def load_ema_state(ema: Any, path: Path, device: torch.device) -> None:
    """Load :func:`save_ema_state`'s file into ``ema``; count, shapes and dtypes must match its parameters."""
    meta, shadow = _read_ema(path)
    mine = ema.shadow_params
    if len(shadow) != len(mine) or any(a.shape != b.shape or a.dtype != b.dtype for a, b in zip(shadow, mine)):
        raise CheckpointInvalid(
            f"{path}: EMA shadow parameters ({len(shadow)} tensors) do not match this model ({len(mine)} tensors)"
        )
    state = {k: meta[k] for k in EMA_SCALARS}
    state["shadow_params"] = [t.to(device) for t in shadow]
    try:
        ema.load_state_dict(state)
    except ValueError as err:
        raise CheckpointInvalid(f"{path}: invalid EMA state ({one_line(str(err))})") from None


def verify_checkpoint(folder: str | os.PathLike) -> None:
    """Manifest (every file whole) plus a parse of every RNG and EMA state; :class:`CheckpointInvalid` otherwise."""
    folder = Path(folder)
    for path in sorted(folder.glob("*.pkl")):  # accelerate's custom / RNG states: never written, never loaded here
        raise CheckpointInvalid(
            f"{path} is a pickle: this trainer writes none and loads none (unpickling can run code); "
            "delete the file if the rest of the checkpoint is yours"
        )
    verify_manifest(folder)
    rng_files = sorted(folder.glob(f"{RNG_PREFIX}*.safetensors"))
    if not rng_files:
        raise CheckpointInvalid(f"{rng_file(folder, 0)} is missing")
    for path in rng_files:
        check_rng_state(path)
    for path in sorted(folder.glob(f"{EMA_PREFIX}*.safetensors")):
        check_ema_state(path)


# --------------------------------------------------------------------------------------------------------------
# one writer per output folder
# --------------------------------------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def writer_token() -> str:
    """``<host>-<pid>-<random>``: names this writer's temporary files, so no other writer's cleanup matches them."""
    host = "".join(c if c.isalnum() or c in "._" else "_" for c in socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def token_owner(token: str) -> tuple[str, int] | None:
    """(host, pid) of a :func:`writer_token`, or None when ``token`` is not one."""
    parts = token.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def token_writer_alive(token: str) -> bool:
    """False only when the token's writer is a dead process on this host (its leftovers are safe to remove)."""
    owner = token_owner(token)
    if owner is None:
        return False
    host, pid = owner
    return host != writer_token().rsplit("-", 2)[0] or pid_alive(pid)


class OutputLock:
    """``<folder>/.trainer.lock`` holding ``{pid, host, started, token}``: taken at start, released at exit.

    A lock whose holder is a dead process on this host is stale: it is taken over with a warning. A live holder,
    or a holder on another host (whose liveness cannot be checked), makes :meth:`acquire` raise a UserError.
    """

    def __init__(self, folder: str | os.PathLike, token: str):
        self.path = Path(folder) / LOCK_FILE
        self.token = token
        self.held = False

    def _create(self) -> bool:
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "token": self.token,
        }
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh)
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def read(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def acquire(self) -> None:
        for _ in range(3):
            if self._create():
                self.held = True
                return
            holder = self.read()
            if holder is None:
                # unreadable: a writer between O_EXCL create and its write, or a damaged file. Look again shortly.
                time.sleep(0.2)
                holder = self.read()
            if holder is None:
                raise UserError(
                    f"{self.path} exists but cannot be read: another trainer may be writing to {self.path.parent}; "
                    "if none is, delete the lock file"
                )
            pid, host = holder.get("pid"), holder.get("host")
            if host == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid):
                logger.warning(
                    "%s: taking over the stale lock of process %s (started %s), which is no longer running",
                    self.path,
                    pid,
                    holder.get("started"),
                )
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            raise UserError(
                f"{self.path.parent} is in use by another trainer (pid {pid} on {host}, started "
                f"{holder.get('started')}): wait for it, or pass another --output_dir; if that process is gone, "
                f"delete {self.path}"
            )
        raise UserError(f"{self.path}: could not take the lock (other trainers keep taking it); try again")

    def release(self) -> None:
        """Remove the lock file if it is still ours (never another writer's)."""
        if not self.held:
            return
        self.held = False
        holder = self.read()
        if holder is not None and holder.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


# --------------------------------------------------------------------------------------------------------------
# disk faults
# --------------------------------------------------------------------------------------------------------------


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def is_disk_fault(err: BaseException) -> bool:
    """An OSError of a full / read-only / forbidden disk, or torch's zip writer failing on one (a RuntimeError)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
            return True
        if isinstance(err, RuntimeError) and any(
            s in str(err) for s in ("inline_container", "unexpected pos", "file write failed", "PytorchStreamWriter")
        ):
            return True
        err = err.__cause__ or err.__context__
    return False


def free_bytes(path: str | os.PathLike) -> int | None:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def disk_fault(err: BaseException, path: str | os.PathLike, needed_bytes: int, what: str = "write") -> UserError:
    """The one-line UserError for a disk fault while writing ``path`` (``needed_bytes``: the size of the write)."""
    code = next(
        (e.errno for e in (err, err.__cause__, err.__context__) if isinstance(e, OSError) and e.errno), None
    )
    reason = f"{os.strerror(code)} ({errno.errorcode.get(code, code)})" if code else one_line(str(err))[:160]
    free = free_bytes(path)
    free_text = f" ({_human(free)} free now)" if free is not None else ""
    return UserError(
        f"cannot {what} {path}: {reason}; it needs a writable folder with about {_human(needed_bytes)} free"
        f"{free_text}: free space or pass another --output_dir"
    )


@contextlib.contextmanager
def disk_faults_as_user_errors(path: str | os.PathLike, needed_bytes: int, what: str = "write") -> Iterator[None]:
    """Turn a disk fault inside the block into :func:`disk_fault`'s UserError (other errors pass through)."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if is_disk_fault(err):
            raise disk_fault(err, path, needed_bytes, what) from None
        raise


def state_bytes(tensors: Mapping[str, Any] | Any) -> int:
    """Bytes of every tensor reachable in nested dicts / lists (optimizer state, EMA shadows)."""
    if torch.is_tensor(tensors):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, Mapping):
        return sum(state_bytes(v) for v in tensors.values())
    if isinstance(tensors, (list, tuple)):
        return sum(state_bytes(v) for v in tensors)
    return 0
