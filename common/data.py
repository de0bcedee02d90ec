"""Datasets for the real formats users feed: image folder + ``metadata.jsonl``, COCO captions, palette masks.

Every item is a dict: ``pixel_values`` ``[3, R, R]`` in [-1, 1], ``text`` (caption), ``index``, and when the
folder has masks (``mask_file_name`` column, palette PNGs of class ids as CelebAMask-HQ) ``mask`` ``[R, R]`` long.
Images in any PIL mode (grayscale, RGBA, palette, 16-bit) are converted to RGB by ``common.io.pil_to_rgb``.
Unreadable or truncated files are found when the index is built (a full decode, so a run never crashes midway),
skipped and counted (``dataset.skipped``) with one warning naming how many.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from common.errors import UserError


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class Record:
    image: Path
    text: str
    mask: Optional[Path] = None
    extra: Optional[dict] = None


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()  # a full decode: verify() misses truncated data
        return True
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{n} is not valid JSON: fix or remove that line") from None
        if not isinstance(row, dict) or "file_name" not in row:
            raise UserError(f"{path}:{n} has no file_name: each line needs {{\"file_name\": ..., \"text\": ...}}")
        rows.append(row)
    return rows


def folder_records(root: Path, caption_column: str = "text", require_captions: bool = True) -> list[Record]:
    """Records of an image folder: from ``metadata.jsonl`` if present, else every image file (no captions)."""
    if not root.is_dir():
        raise UserError(f"data directory {root} does not exist: pass --train_data_dir pointing at an image folder")
    meta = root / "metadata.jsonl"
    if meta.is_file():
        records = []
        for row in _read_jsonl(meta):
            if require_captions and caption_column not in row:
                raise UserError(f"{meta}: a line has no {caption_column!r} column: pass --caption_column")
            mask = root / row["mask_file_name"] if row.get("mask_file_name") else None
            extra = {k: v for k, v in row.items() if k not in ("file_name", caption_column, "mask_file_name")}
            records.append(Record(root / row["file_name"], str(row.get(caption_column, "")), mask, extra))
        return records
    if require_captions:
        raise UserError(f"{root} has no metadata.jsonl: add one with file_name and text per image")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return [Record(p, "") for p in files]


def coco_records(images_dir: Path, captions_json: Path, one_per_image: bool = False) -> list[Record]:
    """Records of a COCO captions file (``captions_train2017.json`` layout): one per caption, or per image."""
    if not captions_json.is_file():
        raise UserError(f"captions file {captions_json} does not exist: pass the COCO captions_*.json")
    try:
        data = json.loads(captions_json.read_text(encoding="utf-8"))
        files = {img["id"]: img["file_name"] for img in data["images"]}
        annotations = data["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{captions_json} is not a COCO captions file (needs images[] and annotations[])") from None
    seen, records = set(), []
    for ann in annotations:
        image_id = ann.get("image_id")
        if image_id not in files or (one_per_image and image_id in seen):
            continue
        seen.add(image_id)
        records.append(Record(images_dir / files[image_id], str(ann.get("caption", "")).strip()))
    return records


def load_mask_ids(path: Path, num_classes: int) -> np.ndarray:
    """A palette / grayscale PNG of class ids -> ``[H, W]`` int64, every id checked to be < num_classes."""
    with Image.open(path) as im:
        if im.mode not in ("P", "L", "I", "I;16"):
            raise UserError(f"mask {path} is {im.mode}: masks must be palette or grayscale PNGs of class ids")
        ids = np.asarray(im).astype(np.int64)
    bad = ids[ids >= num_classes]
    if bad.size:
        raise UserError(f"mask {path} holds class id {int(bad.max())} but there are only {num_classes} classes")
    return ids


class ImageTextDataset(torch.utils.data.Dataset):
    """Image-caption(-mask) records with resize, centre/random crop and flip (image and mask flipped together)."""

    def __init__(self, records: list[Record], resolution: int, center_crop: bool = True, random_flip: bool = False,
                 num_mask_classes: Optional[int] = None, vae_scale_factor: int = 1, source: str = "dataset"):
        if resolution < 1 or resolution % vae_scale_factor:
            raise UserError(f"resolution {resolution} is not divisible by the VAE's factor {vae_scale_factor}: "
                            "pick a multiple")
        good = [r for r in records if r.image.is_file() and _readable(r.image)]
        self.skipped = len(records) - len(good)
        if not good:
            raise UserError(f"{source} has no readable images ({len(records)} listed): check the folder")
        if self.skipped:
            warnings.warn(f"{source}: skipped {self.skipped} of {len(records)} images that are missing or "
                          "unreadable", stacklevel=2)
        self.records, self.resolution = good, resolution
        self.center_crop, self.random_flip = center_crop, random_flip
        self.num_mask_classes = num_mask_classes

    def __len__(self) -> int:
        return len(self.records)

    def _geometry(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        w, h = size
        scale = self.resolution / min(w, h)
        nw, nh = max(self.resolution, round(w * scale)), max(self.resolution, round(h * scale))
        if self.center_crop:
            left, top = (nw - self.resolution) // 2, (nh - self.resolution) // 2
        else:
            left = int(torch.randint(0, nw - self.resolution + 1, ()).item())
            top = int(torch.randint(0, nh - self.resolution + 1, ()).item())
        return nw, nh, left, top

    def __getitem__(self, index: int) -> dict:
        from common.io import pil_to_rgb

        rec = self.records[index]
        with Image.open(rec.image) as im:
            image = pil_to_rgb(im)
        nw, nh, left, top = self._geometry(image.size)
        box = (left, top, left + self.resolution, top + self.resolution)
        image = image.resize((nw, nh), Image.BICUBIC).crop(box)
        flip = self.random_flip and bool(torch.rand(()) < 0.5)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        if flip:
            pixels = pixels.flip(-1)
        item = {"pixel_values": pixels.contiguous(), "text": rec.text, "index": index}
        if rec.extra:
            item.update({k: v for k, v in rec.extra.items() if isinstance(v, (int, float, str))})
        if rec.mask is not None and self.num_mask_classes:
            ids = load_mask_ids(rec.mask, self.num_mask_classes)
            mask = Image.fromarray(ids.astype(np.uint8)).resize((nw, nh), Image.NEAREST).crop(box)
            mask_t = torch.from_numpy(np.asarray(mask).astype(np.int64))
            item["mask"] = mask_t.flip(-1) if flip else mask_t
        return item


def image_text_dataset(root: str | Path, resolution: int, *, caption_column: str = "text",
                       require_captions: bool = True, center_crop: bool = True, random_flip: bool = False,
                       num_mask_classes: Optional[int] = None, vae_scale_factor: int = 1) -> ImageTextDataset:
    """The training dataset of an image folder with ``metadata.jsonl`` (Hugging Face imagefolder convention)."""
    root = Path(root)
    return ImageTextDataset(folder_records(root, caption_column, require_captions), resolution, center_crop,
                            random_flip, num_mask_classes, vae_scale_factor, source=str(root))


def coco_dataset(images_dir: str | Path, captions_json: str | Path, resolution: int, *, one_per_image: bool = False,
                 center_crop: bool = True, random_flip: bool = False) -> ImageTextDataset:
    records = coco_records(Path(images_dir), Path(captions_json), one_per_image)
    return ImageTextDataset(records, resolution, center_crop, random_flip, source=str(captions_json))


# ------------------------------------------------------------------------------------------ encoding caches


def dataset_fingerprint(dataset: ImageTextDataset) -> str:
    """Changes whenever the files, their captions or the transform settings change."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    h.update(repr((dataset.resolution, dataset.center_crop, dataset.random_flip)).encode())
    for rec in dataset.records:
        stat = rec.image.stat()
        h.update(f"{rec.image}|{stat.st_size}|{stat.st_mtime_ns}|{rec.text}\n".encode())
    return h.hexdigest()


def module_fingerprint(module: torch.nn.Module) -> str:
    """A hash of a module's class and weights (not its config, which records load paths): a cache made with
    other weights is never reused, the same weights loaded from another folder are recognised."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    h.update(type(module).__name__.encode())
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cached_tensors(cache_dir: str | Path, key: str, compute) -> tuple[dict[str, torch.Tensor], bool]:
    """``(tensors, reused)``: load ``<cache_dir>/<key>.safetensors`` if present, else ``compute()`` and save it.

    The key carries the fingerprints of the data and of the encoding models, so a change of either makes a new
    file instead of silently reusing stale encodings. The file is written atomically.
    """
    from common.io import load_safetensors, save_safetensors

    path = Path(cache_dir) / f"{key}.safetensors"
    if path.is_file():
        return load_safetensors(path), True
    tensors = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: v.contiguous() for k, v in tensors.items()}, path)
    return tensors, False
