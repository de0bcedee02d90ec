"""Image inputs for the metrics: folders, lists of PIL images or tensors, read lazily in batches.

An *image source* is any of

- a folder (``str`` / ``Path``): every image file in it or its sub-folders (``scripts/sample.py`` writes
  ``images/``), in sorted relative-path order, without grids (``grid.png``, ``*-grid.png``) and hidden entries;
- a sequence of file paths or ``PIL.Image`` objects;
- a tensor ``[N, 3, H, W]``: ``uint8`` in ``[0, 255]`` or floating point in ``[0, 1]``.

Folders are read a batch at a time, so a 30k-image FID reference never has to fit in memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from common.errors import UserError
from common.io import load_image_rgb


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")

ImageSource = Union[str, Path, Sequence[Union[str, Path, Image.Image]], torch.Tensor]


def is_grid_file(path: Path) -> bool:
    """A contact sheet of other images (``grid.png``, ``validation-grid.png``, ``grid_3.png``), not a sample."""
    stem = path.stem.lower()
    return stem == "grid" or stem.startswith(("grid_", "grid-")) or stem.endswith(("-grid", "_grid"))


def list_image_files(folder: str | Path) -> list[Path]:
    """Image files in ``folder`` and its sub-folders, sorted by relative path, grids and hidden entries skipped;
    UserError if there are none."""
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"image folder {path} does not exist or is not a folder; pass a folder of image files")
    files = []
    for p in path.rglob("*"):
        rel = p.relative_to(path)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES and not is_grid_file(p):
            files.append(p)
    files.sort(key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise UserError(
            f"image folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}; grids are skipped); point at the images"
        )
    return files


def load_image_folder(folder: str | Path) -> list[Image.Image]:
    """All images of ``folder`` as RGB PIL images in sorted file-name order (use for small sets only)."""
    return [load_image_rgb(p) for p in list_image_files(folder)]


def count_images(source: ImageSource) -> int:
    """Number of images in a source without decoding them."""
    if isinstance(source, (str, Path)):
        return len(list_image_files(source))
    if isinstance(source, torch.Tensor):
        return int(source.shape[0])
    return len(source)


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> ``uint8`` tensor ``[3, H, W]``."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def tensor_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` uint8, or float in ``[0, 1]`` quantised like a PNG save (round(255 x)), -> uint8."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise UserError(f"image tensor must have shape [N, 3, H, W], got {list(images.shape)}; stack RGB images")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise UserError(f"image tensor must be uint8 or float in [0, 1], got {images.dtype}")
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def uint8_to_pil(image: torch.Tensor) -> Image.Image:
    """``uint8`` tensor ``[3, H, W]`` -> RGB PIL image."""
    return Image.fromarray(image.permute(1, 2, 0).cpu().numpy(), mode="RGB")


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")


def _as_items(source: ImageSource) -> Sequence:
    if isinstance(source, (str, Path)):
        return list_image_files(source)
    if isinstance(source, torch.Tensor):
        return tensor_to_uint8(source)
    if len(source) == 0:
        raise UserError("no images were given; pass a non-empty folder or list of images")
    return source


def _item_to_pil(item) -> Image.Image:
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, torch.Tensor):
        return uint8_to_pil(item)
    return load_image_rgb(item)


def iter_pil_batches(source: ImageSource, batch_size: int) -> Iterator[list[Image.Image]]:
    """Yield the source's images as lists of at most ``batch_size`` RGB PIL images, in order."""
    _check_batch_size(batch_size)
    items = _as_items(source)
    for start in range(0, len(items), batch_size):
        yield [_item_to_pil(item) for item in items[start : start + batch_size]]


def iter_uint8_batches(source: ImageSource, batch_size: int) -> Iterator[list[torch.Tensor]]:
    """Yield lists of ``uint8 [3, H, W]`` tensors (sizes may differ between images), in order."""
    if isinstance(source, torch.Tensor):
        _check_batch_size(batch_size)
        images = tensor_to_uint8(source)
        for start in range(0, images.shape[0], batch_size):
            yield list(images[start : start + batch_size])
        return
    for batch in iter_pil_batches(source, batch_size):
        yield [pil_to_uint8(image) for image in batch]
