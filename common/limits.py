"""Bounds on what users pass in: finite numbers, seeds a generator accepts, counts, memory, image sizes, paths.

Every entry script checks its flags here before any work, so a bad value is one line (a
:class:`~common.errors.UserError`) instead of black images (``nan`` guidance), a traceback (a seed beyond int64)
or a machine swapping itself to death (``--resolution 100000``).

The memory bound is an estimate, not a measurement: the activations of sampling grow with
``batch x frames x pixels``, and :func:`sampling_memory_bytes` charges :data:`BYTES_PER_PIXEL` bytes for every
output pixel (a Stable Diffusion VAE decoder keeps about 128-256 float32 channels at full resolution, so 1 KiB
per pixel is the right order for the largest models the lab runs; the tiny ones need far less). The limit
defaults to the memory of the machine (or of the GPU for ``--device cuda``) and ``--max_memory_gb`` raises it.
A pipeline that knows its models (every method of ``scripts/sample.py``) replaces this rough bound by
:mod:`common.memory`, which estimates from the models' widths and picks the VAE slicing / tiling, attention chunking
and denoiser micro-batching that fit the same budget.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from common.errors import UserError


MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit integer
MAX_STEPS = 1000  # the training schedules have 1000 steps: a sampling plan cannot be longer
BYTES_PER_PIXEL = 1024
# Declared image size above which a file is refused before decoding: 8192 x 8192 (a 200 MB RGB decode).
MAX_IMAGE_PIXELS = 8192 * 8192


def finite(value, flag: str, low: float | None = None, high: float | None = None):
    """``value`` if it is a finite number within ``[low, high]`` (either bound optional), else a UserError."""
    if value is None:
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{flag} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise UserError(f"{flag} must be a finite number, got {value}: pass a real value such as 7.5")
    if (low is not None and number < low) or (high is not None and number > high):
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise UserError(f"{flag} must lie in [{lo}, {hi}], got {number:g}")
    return value


def finite_all(values, flag: str, low: float | None = None, high: float | None = None):
    """:func:`finite` for every element of a list of numbers (e.g. per-modality weights)."""
    for value in values or ():
        finite(value, flag, low, high)
    return values


def seed(value, flag: str = "--seed") -> int:
    """A seed ``torch.Generator().manual_seed`` accepts: an integer in ``0..2**63-1``."""
    if value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{flag} must be a whole number, got {value!r}")
    if not 0 <= value <= MAX_SEED:
        raise UserError(f"{flag} must lie in 0..{MAX_SEED} (2**63-1), got {value}")
    return value


def count(value, flag: str, low: int = 1, high: int | None = None) -> int:
    """An integer count in ``[low, high]``: ``--num_images 0`` is refused rather than silently read as 1."""
    if value is None:
        return value
    if not low <= value <= (high if high is not None else value):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise UserError(f"{flag} must be {bound}, got {value}")
    return value


def steps(value, flag: str = "--steps") -> int:
    return count(value, flag, 1, MAX_STEPS)


def machine_memory_bytes(device: str = "cpu") -> int:
    """Total memory of the machine, or of the GPU when ``device`` is a CUDA device."""
    if str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            index = torch.device(device).index or 0
            return int(torch.cuda.get_device_properties(index).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def memory_limit_bytes(limit_gb: float | None = None, device: str = "cpu") -> int:
    """The memory bound in bytes: ``limit_gb`` (``--max_memory_gb``) when given, else the machine's memory."""
    if limit_gb is None:
        return machine_memory_bytes(device)
    finite(limit_gb, "--max_memory_gb", low=0)
    return int(limit_gb * 2**30)


def add_memory_argument(parser) -> None:
    """``--max_memory_gb``: the bound that :func:`check_memory` applies (default: the machine's memory)."""
    parser.add_argument("--max_memory_gb", type=float, default=None,
                        help="memory budget in GB: the VAE runs sliced or tiled and attention in chunks as needed to "
                             "stay within it, and settings that cannot are refused up front (default: the memory "
                             "of the machine, or of the GPU with --device cuda)")


def sampling_memory_bytes(batch: int, height: int, width: int | None = None, frames: int = 1) -> int:
    """Estimated peak bytes to sample ``batch`` outputs of ``frames`` frames of ``height x width`` pixels."""
    width = height if width is None else width
    return int(batch) * int(frames) * int(height) * int(width) * BYTES_PER_PIXEL


def check_memory(args: argparse.Namespace | None = None, *, batch: int, height: int | None, width: int | None = None,
                 frames: int = 1, limit_gb: float | None = None, device: str = "cpu",
                 what: str = "--resolution/--num_images") -> int:
    """Refuse settings whose :func:`sampling_memory_bytes` estimate exceeds the limit; returns the estimate.

    The limit is ``limit_gb`` (or ``args.max_memory_gb``), else the machine's memory. ``height=None`` (the
    model's own size) is not checked.
    """
    if height is None:
        return 0
    if args is not None:
        limit_gb = getattr(args, "max_memory_gb", None) if limit_gb is None else limit_gb
        device = getattr(args, "device", device) or device
    limit = memory_limit_bytes(limit_gb, device)
    estimate = sampling_memory_bytes(batch, height, width, frames)
    if estimate > limit:
        raise UserError(
            f"{what} need an estimated {estimate / 2**30:.1f} GB ({batch} x {frames} frame(s) x {height}x"
            f"{width if width is not None else height} pixels), above the {limit / 2**30:.1f} GB limit: lower "
            f"them, or raise the limit with --max_memory_gb"
        )
    return estimate


def image_pixels(width: int, height: int, name: str, limit: int | None = None) -> None:
    """Refuse an image whose *declared* size (from its header, before decoding) exceeds the pixel limit."""
    limit = MAX_IMAGE_PIXELS if limit is None else limit
    if int(width) * int(height) > limit:
        raise UserError(
            f"{name} declares {width}x{height} pixels, above the limit of {limit} ({math.isqrt(limit)}^2) pixels "
            f"read without decoding: resize it before using it"
        )


def inside(root: str | os.PathLike, relative: str, what: str) -> Path:
    """``root / relative``, refused unless it stays inside ``root``: no absolute path, no ``..`` climbing out.

    The test is on the written path, not on where symlinks lead: a data folder whose ``images/`` is a link to
    another disk is the user's own choice and keeps working.
    """
    root = Path(root)
    candidate = Path(str(relative))
    base = os.path.normpath(os.path.abspath(root))
    target = os.path.normpath(os.path.join(base, str(relative)))
    if candidate.is_absolute() or not (target == base or target.startswith(base.rstrip(os.sep) + os.sep)):
        raise UserError(
            f"{what} {str(relative)!r} points outside the data folder {root}: file names must be relative paths "
            "inside it"
        )
    return root / candidate


def check_namespace(args: argparse.Namespace) -> argparse.Namespace:
    """The checks every script shares, over all its parsed flags: every float (and list of floats) is finite,
    every ``seed`` / ``*_seed`` lies in ``0..2**63-1``. Scripts call it right after parsing; their own bounds
    (ranges, memory) come after."""
    for name, value in vars(args).items():
        flag = f"--{name}"
        if isinstance(value, float):
            finite(value, flag)
        elif isinstance(value, (list, tuple)) and any(isinstance(v, float) for v in value):
            finite_all([v for v in value if isinstance(v, float)], flag)
        if (name == "seed" or name.endswith("_seed")) and isinstance(value, int):
            seed(value, flag)
    return args
