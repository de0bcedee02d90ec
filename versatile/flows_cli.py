"""Shared command-line pieces of the Versatile Diffusion scripts (``scripts/versatile/sample.py``, ``sample_cli``).

Everything here validates user input BEFORE a model is loaded or a file is written, so bad input is one line and
exit 2 (``common.errors.UserError``) with nothing on disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from common.errors import UserError
from versatile.multiflow import FLOW_ALIASES, FLOWS, Flow


FLOW_CHOICES = ("t2i", "i2i", "iv", "i2t", "t2t", "tv", "dual")


def parse_flow(name: str) -> Flow:
    """A flow from its CLI name (``t2i i2i/iv i2t t2t/tv dual``, plus [R0]'s long names)."""
    key = FLOW_ALIASES.get(str(name), str(name))
    if key not in FLOWS:
        raise UserError(f"unknown flow {name!r}: choose one of {', '.join(FLOW_CHOICES)}")
    return FLOWS[key]


def check_flow_inputs(flow: Flow, prompts: Sequence[str], images: Sequence[str], mix_ratio: Optional[float],
                      prompts_are_labels: bool = False) -> None:
    """The inputs a flow takes: prompts for text contexts, images for image contexts, a ratio for dual only.

    ``prompts_are_labels``: prompts are allowed (as output labels) for image-only flows (``scripts/sample.py``
    always has prompts).
    """
    needs_text, needs_image = "text" in flow.ctypes, "image" in flow.ctypes
    if needs_text and not prompts:
        raise UserError(f"flow {flow.name} ({flow.description}) needs a prompt: pass --prompt TEXT")
    if needs_image and not images:
        raise UserError(f"flow {flow.name} ({flow.description}) needs an image: pass --image PATH")
    if images and not needs_image:
        raise UserError(f"flow {flow.name} ({flow.description}) takes no image, but --image was given: drop it, or "
                        "use iv / i2t / dual")
    if prompts and not needs_text and not prompts_are_labels:
        raise UserError(f"flow {flow.name} ({flow.description}) takes no prompt, but --prompt was given: drop it, "
                        "or use t2i / tv / dual")
    if mix_ratio is not None:
        if flow.name != "dual":
            raise UserError(f"--mix_ratio only applies to the dual flow, not {flow.name}: drop it")
        if not 0.0 <= float(mix_ratio) <= 1.0:
            raise UserError(f"--mix_ratio {mix_ratio} is outside [0, 1]: 0 = image context only, 1 = text only")


def check_image_paths(images: Sequence[str]) -> list[Path]:
    paths = [Path(p) for p in images]
    for path in paths:
        if not path.is_file():
            raise UserError(f"image {path} does not exist: pass an existing image file")
    return paths


def load_images(paths: Sequence[Path], size: int) -> torch.Tensor:
    """RGB images in [0, 1], resized (bicubic) to ``size`` x ``size``: ``[N, 3, size, size]``."""
    import numpy as np
    from PIL import Image

    from common.io import load_image_rgb

    out = []
    for path in paths:
        try:
            image = load_image_rgb(path)
        except (OSError, ValueError):
            raise UserError(f"cannot read image {path}: pass a PNG / JPEG file") from None
        if image.size != (size, size):
            image = image.resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255.0)
    return torch.stack(out)


def check_positive(name: str, value, minimum=1) -> None:
    if value is not None and value < minimum:
        raise UserError(f"--{name} must be >= {minimum}, got {value}")
