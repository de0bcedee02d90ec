"""Datasets for the real formats users feed: image folder + ``metadata.jsonl``, COCO captions, palette masks.

Every item is a dict: ``pixel_values`` ``[3, R, R]`` in [-1, 1], ``text`` (caption), ``index``, and when the
folder has masks (``mask_file_name`` column, palette PNGs of class ids as CelebAMask-HQ) ``mask`` ``[R, R]`` long.
Images in any PIL mode (grayscale, RGBA, palette, 16-bit) are converted to RGB by ``common.io.pil_to_rgb``.

Broken data never crashes a run. Missing, unreadable or truncated files are found when the index is built
(``validate="decode"``, a full decode; ``"verify"`` is PIL's cheaper structural check; ``"none"`` skips it),
skipped and counted (``dataset.skipped``) with one warning naming how many. A file that breaks later (changed
on disk, or missed by ``"verify"``) is caught in ``__getitem__``: the item deterministically falls back to the
next readable index, and the file is counted too (``dataset.skipped_at_load``, per process).

Encodings (VAE latents, text embeddings) are computed once by :func:`encode_once`, the cache every trainer uses:
in memory, or stored by :func:`build_embedding_cache` as safetensors shards keyed by a fingerprint
(:func:`cache_fingerprint` of the model and data fingerprints) and served by :class:`CachedEmbeddingDataset`.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from common.errors import UserError
from common.io import open_image
from common.limits import inside


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VALIDATE_MODES = ("decode", "verify", "none")
# What a broken or vanished file raises while PIL opens or decodes it.
_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass
class Record:
    """One sample: an image path, its caption (``captions`` holds alternatives to draw from), optional mask."""

    image: Path
    text: str
    mask: Optional[Path] = None
    extra: Optional[dict] = None
    captions: Optional[tuple[str, ...]] = None


def _readable(path: Path, validate: str = "decode") -> bool:
    """Whether ``path`` opens as an image: ``"decode"`` decodes it fully, ``"verify"`` runs PIL's ``verify()``."""
    if validate == "none":
        return path.is_file()
    try:
        with open_image(path) as im:
            if validate == "verify":
                im.verify()  # chunk structure and checksums, no pixel decode
            else:
                im.load()
        return True
    except _READ_ERRORS:
        return False


def caption_fields(value: Any) -> tuple[str, Optional[tuple[str, ...]]]:
    """A caption cell -> ``(text, alternatives)``: a list of captions (HF datasets) is kept to draw from."""
    if isinstance(value, (list, tuple)):
        captions = tuple(str(c).strip() for c in value if str(c).strip())
        if not captions:
            return "", None
        return captions[0], (captions if len(captions) > 1 else None)
    return ("" if value is None else str(value)), None


def read_jsonl_rows(path: Path) -> list[dict]:
    """The rows of an imagefolder jsonl (``metadata.jsonl`` and the like): one JSON object per non-blank line, each
    with a ``file_name``; a bad line is a one-line :class:`UserError` naming the file and line."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{n} is not valid JSON: fix or remove that line") from None
        if not isinstance(row, dict) or not row.get("file_name"):
            raise UserError(f"{path}:{n} has no file_name: each line needs {{\"file_name\": ..., \"text\": ...}}")
        rows.append(row)
    return rows


def read_csv_rows(path: Path) -> list[dict]:
    """The rows of an imagefolder ``metadata.csv`` (a header line with ``file_name``); a bad file is one line."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (csv.Error, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not a readable CSV ({err}): save it as UTF-8 with a header line") from None
    for n, row in enumerate(rows, 2):
        if not row.get("file_name"):
            raise UserError(f"{path}:{n} has no file_name: the header needs a file_name column, e.g. file_name,text")
    return rows


def _metadata_rows(root: Path) -> tuple[Optional[Path], list[dict]]:
    """``(metadata file, rows)`` of an image folder: ``metadata.jsonl`` or ``metadata.csv`` (not both)."""
    jsonl, csv_file = root / "metadata.jsonl", root / "metadata.csv"
    if jsonl.is_file() and csv_file.is_file():
        raise UserError(f"{root} has both metadata.jsonl and metadata.csv: keep one of them")
    if jsonl.is_file():
        return jsonl, read_jsonl_rows(jsonl)
    if csv_file.is_file():
        return csv_file, read_csv_rows(csv_file)
    return None, []


def _split_folder(root: Path, split: str = "train") -> Path:
    """``root/<split>`` when ``root`` is a dataset with split folders (``train/``, ``test/``...) and no metadata of
    its own, as Hugging Face's imagefolder reads it; else ``root``."""
    has_own = any((root / name).is_file() for name in ("metadata.jsonl", "metadata.csv"))
    if not has_own and (root / split).is_dir():
        return root / split
    return root


def folder_records(root: Path, caption_column: str = "text", require_captions: bool = True) -> list[Record]:
    """Records of an image folder: ``metadata.jsonl`` or ``metadata.csv`` (in ``root`` or its ``train/`` split
    folder), the CelebAMask-HQ layout (:func:`celebamask_records`), or, without captions, every image file."""
    if not root.is_dir():
        raise UserError(f"data directory {root} does not exist: pass --train_data_dir pointing at an image folder")
    if (root / CELEBA_IMAGES).is_dir():
        return celebamask_records(root, require_captions=require_captions)
    root = _split_folder(root)
    meta, rows = _metadata_rows(root)
    if meta is not None:
        records = []
        for row in rows:
            if require_captions and caption_column not in row:
                raise UserError(f"{meta}: a line has no {caption_column!r} column: pass --caption_column")
            mask = inside(root, row["mask_file_name"], f"{meta}: mask_file_name") if row.get("mask_file_name") \
                else None
            extra = {k: v for k, v in row.items() if k not in ("file_name", caption_column, "mask_file_name")}
            text, captions = caption_fields(row.get(caption_column, ""))
            image = inside(root, row["file_name"], f"{meta}: file_name")
            records.append(Record(image, text, mask, extra, captions))
        return records
    if require_captions:
        raise UserError(f"{root} has no metadata.jsonl or metadata.csv: add one with file_name and text per image "
                        "(or a train/ folder holding it, or pass --dataset_name / --coco_annotations / --train_shards)")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return [Record(p, "") for p in files]


# CelebAMask-HQ as distributed: CelebA-HQ-img/<i>.jpg (1024 px), CelebAMask-HQ-mask-anno/<i // 2000>/<i:05d>_<part>.png
# (512 px binary maps, one per face part), or a combined folder of palette PNGs of class ids.
CELEBA_IMAGES = "CelebA-HQ-img"
CELEBA_PART_MASKS = "CelebAMask-HQ-mask-anno"
CELEBA_COMBINED_MASKS = ("CelebAMask-HQ-mask", "CelebAMask-HQ-mask-color-palette", "mask")
CELEBA_CAPTIONS = ("celeba-caption", "text")
# Class ids 1..18 in the dataset's own order (0 is background); a later part overwrites an earlier one where they
# overlap, as the dataset's own combining script does.
CELEBA_PARTS = ("skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear", "mouth", "u_lip",
                "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth")
CELEBA_NUM_CLASSES = len(CELEBA_PARTS) + 1


@dataclass(frozen=True)
class PartMasks:
    """One image's per-part binary masks, combined into class ids on load (CelebAMask-HQ-mask-anno)."""

    parts: tuple[tuple[int, Path], ...]

    def is_file(self) -> bool:  # a record's mask is checked like a path: present when one part exists
        return bool(self.parts)

    @property
    def name(self) -> str:
        return self.parts[0][1].name if self.parts else "no part masks"


def celebamask_records(root: Path, require_captions: bool = False) -> list[Record]:
    """Records of a CelebAMask-HQ folder: ``CelebA-HQ-img/<i>.jpg``; masks from a combined folder of class-id PNGs
    (``CelebAMask-HQ-mask/<i>.png``) or from the per-part maps of ``CelebAMask-HQ-mask-anno/``; captions (optional)
    from ``celeba-caption/<i>.txt`` (one caption per line, drawn at random), as Multi-Modal-CelebA-HQ ships them."""
    images_dir = root / CELEBA_IMAGES
    images = sorted((p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES),
                    key=lambda p: (len(p.stem), p.stem))
    if not images:
        raise UserError(f"{images_dir} holds no images: it should hold CelebA-HQ's 0.jpg, 1.jpg, ...")
    combined = next((root / name for name in CELEBA_COMBINED_MASKS if (root / name).is_dir()), None)
    anno = root / CELEBA_PART_MASKS
    parts_by_id: dict[int, list[tuple[int, Path]]] = {}
    if combined is None and anno.is_dir():
        ids = {name: k for k, name in enumerate(CELEBA_PARTS, 1)}
        for path in sorted(anno.rglob("*.png")):
            stem, _, part = path.stem.partition("_")
            if part in ids and stem.isdigit():
                parts_by_id.setdefault(int(stem), []).append((ids[part], path))
    captions_dir = next((root / name for name in CELEBA_CAPTIONS if (root / name).is_dir()), None)
    records = []
    for image in images:
        mask: Any = None
        if combined is not None:
            mask = combined / f"{image.stem}.png"
        elif image.stem.isdigit() and int(image.stem) in parts_by_id:
            mask = PartMasks(tuple(sorted(parts_by_id[int(image.stem)])))
        text, captions = "", None
        if captions_dir is not None and (captions_dir / f"{image.stem}.txt").is_file():
            lines = (captions_dir / f"{image.stem}.txt").read_text(encoding="utf-8").splitlines()
            text, captions = caption_fields([line for line in lines if line.strip()])
        if require_captions and not text:
            raise UserError(f"{root}: image {image.name} has no caption: add celeba-caption/{image.stem}.txt "
                            "(Multi-Modal-CelebA-HQ's captions) or train a model that needs no text")
        records.append(Record(image, text, mask, {"image_id": image.stem}, captions))
    return records


def coco_records(images_dir: Path, captions_json: Path, one_per_image: bool = False,
                 random_caption: bool = False) -> list[Record]:
    """Records of a COCO captions file (``captions_train2017.json`` layout).

    One record per (image, caption) by default; ``one_per_image`` keeps each image's first caption;
    ``random_caption`` keeps one record per image that draws one of its captions at random on every access.
    Annotations naming an image id absent from ``images[]`` are dropped.
    """
    if not images_dir.is_dir():
        raise UserError(f"COCO images folder {images_dir} does not exist: pass the folder holding the jpgs")
    if not captions_json.is_file():
        raise UserError(f"captions file {captions_json} does not exist: pass the COCO captions_*.json")
    try:
        data = json.loads(captions_json.read_text(encoding="utf-8"))
        files = {img["id"]: img["file_name"] for img in data["images"]}
        files = {key: inside(images_dir, str(name), f"{captions_json}: file_name") for key, name in files.items()}
        annotations = data["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{captions_json} is not a COCO captions file (needs images[] and annotations[])") from None
    if random_caption:
        grouped: dict[Any, list[str]] = {}
        for ann in annotations:
            if isinstance(ann, dict) and ann.get("image_id") in files:
                grouped.setdefault(ann["image_id"], []).append(str(ann.get("caption", "")).strip())
        return [Record(files[i], caps[0], captions=tuple(caps) if len(caps) > 1 else None)
                for i, caps in grouped.items()]
    seen, records = set(), []
    for ann in annotations:
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if image_id not in files or (one_per_image and image_id in seen):
            continue
        seen.add(image_id)
        records.append(Record(files[image_id], str(ann.get("caption", "")).strip()))
    return records


def load_mask_ids(path: Path, num_classes: int, ignore_index: Optional[int] = None) -> np.ndarray:
    """A palette / grayscale PNG of class ids -> ``[H, W]`` int64, every id checked to be < num_classes.

    ``ignore_index`` (e.g. 255, the "void" label of VOC-style masks) is allowed through unchanged. ``path`` may be
    :class:`PartMasks` (one binary map per class), combined in order, a later class winning where parts overlap.
    """
    if isinstance(path, PartMasks):
        ids = None
        for class_id, part in path.parts:
            if class_id >= num_classes:
                raise UserError(f"mask {part} is class {class_id} but there are only {num_classes} classes")
            with open_image(part) as im:
                on = np.asarray(im.convert("L")) > 127
            ids = np.zeros(on.shape, np.int64) if ids is None else ids
            if on.shape != ids.shape:
                raise UserError(f"mask {part} is {on.shape[1]}x{on.shape[0]}, the other parts {ids.shape[1]}x"
                                f"{ids.shape[0]}: every part map of an image must have one size")
            ids[on] = class_id
        return ids
    with open_image(path) as im:
        if im.mode not in ("P", "L", "I", "I;16"):
            raise UserError(f"mask {path} is {im.mode}: masks must be palette or grayscale PNGs of class ids")
        ids = np.asarray(im).astype(np.int64)
    bad = ids[(ids >= num_classes) | (ids < 0)]
    if ignore_index is not None:
        bad = bad[bad != ignore_index]
    if bad.size:
        raise UserError(f"mask {path} holds class id {int(bad.max())} but there are only {num_classes} classes")
    return ids


class ImageTextDataset(torch.utils.data.Dataset):
    """Image-caption(-mask) records with resize, centre/random crop and flip (image and mask flipped together).

    Items: ``pixel_values`` ``[3, R, R]`` float32 in [-1, 1], ``text``, ``index``, the record's scalar extra
    columns, and ``mask`` ``[R, R]`` int64 class ids when records carry masks and ``num_mask_classes`` is given.
    The shortest side is resized to ``resolution`` (bicubic; masks nearest), then an ``R x R`` crop is taken
    (centre, or uniform from the global torch RNG), then an optional horizontal flip with probability 1/2.

    Args:
        records: the samples; those whose image (or mask) is missing or unreadable are skipped and counted.
        validate: ``"decode"`` (full decode per file), ``"verify"`` (PIL ``verify()``, cheaper) or ``"none"``.
        mask_ignore_index: a mask id let through although >= ``num_mask_classes`` (e.g. 255 "void").
    """

    def __init__(self, records: list[Record], resolution: int, center_crop: bool = True, random_flip: bool = False,
                 num_mask_classes: Optional[int] = None, vae_scale_factor: int = 1, source: str = "dataset",
                 validate: str = "decode", mask_ignore_index: Optional[int] = None):
        if resolution < 1 or resolution % vae_scale_factor:
            raise UserError(f"resolution {resolution} is not divisible by the VAE's factor {vae_scale_factor}: "
                            "pick a multiple")
        if validate not in VALIDATE_MODES:
            raise UserError(f"validate must be one of {', '.join(VALIDATE_MODES)}, got {validate!r}")
        good, problems = [], []
        for rec in records:
            problem = self._problem(rec, validate, num_mask_classes)
            if problem:
                problems.append(problem)
            else:
                good.append(rec)
        self.skipped_at_index = len(records) - len(good)
        if not good:
            raise UserError(f"{source} has no readable images ({len(records)} listed): check the folder")
        if self.skipped_at_index:
            listed = ", ".join(problems[:5]) + (", ..." if len(problems) > 5 else "")
            warnings.warn(f"{source}: skipped {self.skipped_at_index} of {len(records)} images that are missing or "
                          f"unreadable ({listed})", stacklevel=2)
        self.records, self.resolution = good, resolution
        self.center_crop, self.random_flip = center_crop, random_flip
        self.num_mask_classes, self.mask_ignore_index = num_mask_classes, mask_ignore_index
        self._broken: set[int] = set()  # indices whose files failed in __getitem__ (this process only)

    @staticmethod
    def _problem(rec: Record, validate: str, num_mask_classes: Optional[int]) -> Optional[str]:
        """``"<file> missing"`` / ``"<file> unreadable"`` for the record's first bad file (image, then mask)."""
        files = [rec.image]
        if num_mask_classes and isinstance(rec.mask, PartMasks):
            files += [part for _, part in rec.mask.parts]
        elif num_mask_classes and rec.mask is not None:
            files.append(rec.mask)
        for path in files:
            if not path.is_file():
                return f"{path.name} missing"
            if not _readable(path, validate):
                return f"{path.name} unreadable"
        return None

    @property
    def skipped_at_load(self) -> int:
        """Files that broke after indexing, found by ``__getitem__`` in this process (not summed over workers)."""
        return len(self._broken)

    @property
    def skipped(self) -> int:
        """All samples skipped so far: at index time plus at load time (this process)."""
        return self.skipped_at_index + self.skipped_at_load

    def __len__(self) -> int:
        return len(self.records)

    def _describe(self, index: int) -> str:
        return str(self.records[index].image)

    def __getitem__(self, index: int) -> dict:
        """The item at ``index``; if its files cannot be read, the next readable index's (counted, warned once)."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        for step in range(n):
            candidate = (index + step) % n
            if candidate in self._broken:
                continue
            try:
                item = self._load(candidate)
            except _READ_ERRORS as err:
                self._broken.add(candidate)
                warnings.warn(f"skipping unreadable {self._describe(candidate)} ({type(err).__name__}); "
                              f"{self.skipped_at_load} file(s) skipped at load time so far", stacklevel=2)
                continue
            item["index"] = index
            return item
        raise UserError(f"none of the {n} images can be read any more: check the data folder")

    def _load(self, index: int) -> dict:
        """Decode, transform and package record ``index`` (raises the reader's error if a file is broken)."""
        from PIL import ImageOps

        from common.io import pil_to_rgb

        rec = self.records[index]
        with open_image(rec.image) as im:
            im.load()
            image = pil_to_rgb(ImageOps.exif_transpose(im))
        ids = None
        if rec.mask is not None and self.num_mask_classes:
            ids = load_mask_ids(rec.mask, self.num_mask_classes, self.mask_ignore_index)
        item = transform_sample(image, self.resolution, center_crop=self.center_crop, random_flip=self.random_flip,
                                mask_ids=ids)
        text = rec.text
        if rec.captions:
            text = rec.captions[int(torch.randint(len(rec.captions), ()).item())]
        item.update(text=text, index=index)
        if rec.extra:
            item.update({k: v for k, v in rec.extra.items() if isinstance(v, (int, float, str))})
        return item


def transform_sample(image: Image.Image, resolution: int, *, center_crop: bool = True, random_flip: bool = False,
                     mask_ids: Optional[np.ndarray] = None, generator: Optional[torch.Generator] = None) -> dict:
    """An RGB image (and its class-id mask) -> ``{"pixel_values" [3, R, R] in [-1, 1], "mask" [R, R]}``.

    The shortest side is resized to ``resolution`` (bicubic; the mask nearest, from whatever size it has), then an
    ``R x R`` crop is taken (centre, or uniform), then an optional horizontal flip with probability 1/2 (image and
    mask together). Random draws come from ``generator`` (default: the global torch RNG).
    """
    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if center_crop:
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
    else:
        left = int(torch.randint(0, nw - resolution + 1, (), generator=generator).item())
        top = int(torch.randint(0, nh - resolution + 1, (), generator=generator).item())
    box = (left, top, left + resolution, top + resolution)
    image = image.resize((nw, nh), Image.BICUBIC).crop(box)
    flip = random_flip and bool(torch.rand((), generator=generator) < 0.5)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    item = {"pixel_values": (pixels.flip(-1) if flip else pixels).contiguous()}
    if mask_ids is not None:
        mask = Image.fromarray(mask_ids.astype(np.int32)).resize((nw, nh), Image.NEAREST).crop(box)
        mask_t = torch.from_numpy(np.asarray(mask).astype(np.int64))
        item["mask"] = (mask_t.flip(-1) if flip else mask_t).contiguous()
    return item
def add_image_augmentation_args(parser, *, cached_flag: Optional[str] = None, random_flip: bool = True) -> None:
    """``--center_crop`` / ``--random_flip`` (diffusers' example names and defaults: centre crop on, no flip) unless
    the parser has them. ``cached_flag``: the option that makes the trainer encode each image once; a random flip
    then needs ``--no-<cached_flag>`` (see :func:`check_image_augmentation_args`). ``random_flip=False``: a trainer
    that always encodes each image once offers the crop only."""
    import argparse

    have = set(parser._option_string_actions)
    if "--center_crop" not in have:
        parser.add_argument("--center_crop", action=argparse.BooleanOptionalAction, default=True,
                            help="crop the centre square after resizing (--no-center_crop: a random crop)")
    if random_flip and "--random_flip" not in have:
        parser.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=False,
                            help="flip each training image horizontally with probability 1/2"
                                 + (f" (needs --no-{cached_flag.lstrip('-')})" if cached_flag else ""))


def check_image_augmentation_args(args, cached: bool, cached_flag: str) -> None:
    """One line when a random flip is asked of images that are encoded once (the cache would freeze one draw)."""
    if getattr(args, "random_flip", False) and cached:
        raise UserError(f"--random_flip needs on-the-fly encoding (the cache holds one view of each image): add "
                        f"--no-{cached_flag.lstrip('-')}")


def image_text_dataset(root: str | Path, resolution: int, *, caption_column: str = "text",
                       require_captions: bool = True, center_crop: bool = True, random_flip: bool = False,
                       num_mask_classes: Optional[int] = None, vae_scale_factor: int = 1,
                       validate: str = "decode", mask_ignore_index: Optional[int] = None) -> ImageTextDataset:
    """The training dataset of an image folder with ``metadata.jsonl`` (Hugging Face imagefolder convention).

    Each line is ``{"file_name": ..., "<caption_column>": ..., ...}`` with paths relative to ``root``; a
    ``mask_file_name`` column adds class-id masks (loaded when ``num_mask_classes`` is given); other scalar
    columns (``label``, ``digit``...) are passed through. A list-valued caption cell is drawn from at random.
    """
    root = Path(root)
    return ImageTextDataset(folder_records(root, caption_column, require_captions), resolution, center_crop,
                            random_flip, num_mask_classes, vae_scale_factor, source=str(root), validate=validate,
                            mask_ignore_index=mask_ignore_index)


def coco_dataset(images_dir: str | Path, captions_json: str | Path, resolution: int, *, one_per_image: bool = False,
                 random_caption: bool = False, center_crop: bool = True, random_flip: bool = False,
                 vae_scale_factor: int = 1, validate: str = "decode") -> ImageTextDataset:
    """The training dataset of COCO images with a ``captions_*.json`` file (see :func:`coco_records`)."""
    records = coco_records(Path(images_dir), Path(captions_json), one_per_image, random_caption)
    return ImageTextDataset(records, resolution, center_crop, random_flip, vae_scale_factor=vae_scale_factor,
                            source=str(captions_json), validate=validate)


def check_columns(table, image_column: str, caption_column: Optional[str], source: str) -> None:
    """A Hugging Face dataset must have the image (and caption) column: else one line listing its columns."""
    columns = list(table.column_names)
    if image_column not in columns:
        raise UserError(f"{source} has no image column {image_column!r} (columns: {', '.join(columns)}): "
                        "pass --image_column")
    if caption_column is not None and caption_column not in columns:
        raise UserError(f"{source} has no caption column {caption_column!r} (columns: {', '.join(columns)}): "
                        "pass --caption_column")


class HubImageTextDataset(ImageTextDataset):
    """A Hugging Face ``datasets.Dataset`` (hub name or local imagefolder) served as :class:`ImageTextDataset`
    items: the ``image_column`` (decoded by ``datasets`` to PIL) and ``caption_column`` (a string or a list of
    captions to draw from); other scalar columns are passed through."""

    def __init__(self, table, resolution: int, *, image_column: str = "image", caption_column: Optional[str] = "text",
                 center_crop: bool = True, random_flip: bool = False, vae_scale_factor: int = 1,
                 source: str = "dataset"):
        if resolution < 1 or resolution % vae_scale_factor:
            raise UserError(f"resolution {resolution} is not divisible by the VAE's factor {vae_scale_factor}: "
                            "pick a multiple")
        check_columns(table, image_column, caption_column, source)
        if len(table) == 0:
            raise UserError(f"{source} has no rows: check the dataset name, config and split")
        self.table, self.image_column, self.caption_column = table, image_column, caption_column
        self.records: list[Record] = []  # rows live in the arrow table, read on access
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.num_mask_classes, self.mask_ignore_index = None, None
        self.skipped_at_index = 0
        self.source = source
        self.fingerprint = getattr(table, "_fingerprint", None) or source
        self._broken: set[int] = set()

    def __len__(self) -> int:
        return len(self.table)

    def _describe(self, index: int) -> str:
        return f"{self.source} row {index}"

    def _load(self, index: int) -> dict:
        from PIL import ImageOps

        from common.io import pil_to_rgb

        row = self.table[int(index)]
        image = row[self.image_column]
        if not isinstance(image, Image.Image):
            raise UserError(f"{self.source}: column {self.image_column!r} holds {type(image).__name__}, not images: "
                            "pass --image_column naming the image column")
        image = pil_to_rgb(ImageOps.exif_transpose(image))
        item = transform_sample(image, self.resolution, center_crop=self.center_crop, random_flip=self.random_flip)
        text, captions = caption_fields(row.get(self.caption_column) if self.caption_column else "")
        if captions:
            text = captions[int(torch.randint(len(captions), ()).item())]
        item.update(text=text, index=index)
        item.update({k: v for k, v in row.items() if k not in (self.image_column, self.caption_column, "index")
                     and isinstance(v, (int, float, str))})
        return item


# ------------------------------------------------------------------------------------------ encoding caches


def dataset_fingerprint(dataset: ImageTextDataset) -> str:
    """Changes whenever the files (path, size, mtime), their captions or the transform settings change."""
    h = hashlib.blake2b(digest_size=16)
    if getattr(dataset, "fingerprint", None):  # a Hugging Face dataset (its own content hash) or tar shards
        h.update(repr((dataset.fingerprint, dataset.resolution, dataset.center_crop, dataset.random_flip)).encode())
        return h.hexdigest()
    h.update(repr((dataset.resolution, dataset.center_crop, dataset.random_flip)).encode())
    for rec in dataset.records:
        stat = rec.image.stat()
        h.update(f"{rec.image}|{stat.st_size}|{stat.st_mtime_ns}|{rec.text}\n".encode())
        if rec.captions:
            h.update(json.dumps(rec.captions).encode())
        masks = [] if rec.mask is None or not dataset.num_mask_classes else \
            [part for _, part in rec.mask.parts] if isinstance(rec.mask, PartMasks) else [rec.mask]
        for mask in masks:
            if mask.is_file():
                mstat = mask.stat()
                h.update(f"{mask}|{mstat.st_size}|{mstat.st_mtime_ns}\n".encode())
    return h.hexdigest()


def module_fingerprint(module: torch.nn.Module) -> str:
    """A hash of a module's class and weights (not its config, which records load paths): a cache made with
    other weights is never reused, the same weights loaded from another folder are recognised."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(module).__name__.encode())
    for name, tensor in module.state_dict().items():
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        # reshape(-1): 0-dim buffers (BatchNorm's num_batches_tracked) cannot be viewed as bytes directly
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ sharded encoding cache

CACHE_MANIFEST = "manifest.json"
CACHE_FORMAT = 1


def cache_fingerprint(*parts: str, **settings: Any) -> str:
    """One hex fingerprint from component fingerprints and settings, for :func:`build_embedding_cache`.

    Typical parts: :func:`module_fingerprint` of each encoder (the model identity), :func:`dataset_fingerprint`
    (file list with sizes and mtimes, captions, transform settings); settings: anything else the encodings
    depend on (``dtype="fp16"``, ``max_length=77``). Changing any of them changes the fingerprint.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"parts": list(parts), "settings": settings}, sort_keys=True, default=str).encode())
    return h.hexdigest()


def collate_items(items: Sequence[dict]) -> dict:
    """Batch dataset items: tensors stacked, ints and floats as tensors, anything else as a list.

    Only keys present in every item are kept, so records with differing extra columns still batch.
    """
    if not items:
        raise ValueError("collate_items needs at least one item")
    keys = [k for k in items[0] if all(k in it for it in items[1:])]
    batch: dict[str, Any] = {}
    for key in keys:
        values = [it[key] for it in items]
        if all(isinstance(v, torch.Tensor) for v in values):
            batch[key] = torch.stack(values)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


def read_cache_manifest(cache_dir: str | Path) -> Optional[dict]:
    """The manifest of a finished embedding cache in ``cache_dir``, or None (absent, unreadable, other format)."""
    try:
        manifest = json.loads((Path(cache_dir) / CACHE_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        return None
    return manifest


def _cache_is_current(cache_dir: Path, fingerprint: str, num_samples: int) -> bool:
    manifest = read_cache_manifest(cache_dir)
    return (
        manifest is not None
        and manifest.get("fingerprint") == fingerprint
        and manifest.get("num_samples") == num_samples
        and all((cache_dir / shard["file"]).is_file() for shard in manifest.get("shards", []))
    )


def _check_encoded(out: Any, batch_size: int) -> dict[str, torch.Tensor]:
    """``encode_fn``'s result must be ``{name: tensor [B, ...]}``; returned on CPU, contiguous."""
    if not isinstance(out, dict) or not out:
        raise TypeError(f"encode_fn must return a non-empty dict of tensors, got {type(out).__name__}")
    checked = {}
    for name, value in out.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != batch_size:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"encode_fn output {name!r} must be a tensor with {batch_size} rows, got {shape}")
        checked[name] = value.detach().cpu().contiguous()
    return checked


def build_embedding_cache(dataset: Sequence[dict], encode_fn: Callable[[dict], dict[str, torch.Tensor]],
                          cache_dir: str | Path, fingerprint: str, *, batch_size: int = 64,
                          shard_size: int = 4096, progress: bool = False) -> Path:
    """Encode every item of ``dataset`` once into safetensors shards under ``cache_dir``; reuse them later.

    ``encode_fn(batch) -> {name: tensor [B, ...]}`` gets :func:`collate_items` batches (e.g. VAE latents of
    ``batch["pixel_values"]``, text embeddings of ``batch["text"]``) and runs under ``torch.no_grad``. Row ``i``
    of the cache is item ``i``. If ``cache_dir`` already holds a finished cache with the same ``fingerprint``
    (see :func:`cache_fingerprint`) and length, nothing is computed; otherwise the cache is rebuilt and replaces
    the old one. The folder is written atomically (:func:`common.io.atomic_write_dir`): it holds either the old
    cache or the complete new one, never a partial write; a folder the project did not write is refused. In multi-process training, build on the main process
    first (``accelerator.main_process_first()``). Layout::

        cache_dir/manifest.json                {"format", "fingerprint", "num_samples", "keys", "shards"}
        cache_dir/shard-00000.safetensors      rows [0, shard_size) of every key

    A dataset with random augmentation (``random_flip``, random crop) is cached with one frozen draw: a warning
    says so. Returns ``cache_dir``.
    """
    from common.io import atomic_write_dir, save_safetensors

    cache_dir, n = Path(cache_dir), len(dataset)
    if batch_size < 1 or shard_size < 1:
        raise UserError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    if n == 0:
        raise UserError("cannot cache an empty dataset: check the data folder")
    if _cache_is_current(cache_dir, fingerprint, n):
        return cache_dir
    if getattr(dataset, "random_flip", False) or getattr(dataset, "center_crop", True) is False:
        warnings.warn("the dataset uses random flips/crops: the cache freezes one augmentation draw per item",
                      stacklevel=2)
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"caching encodings in {cache_dir}")
    with atomic_write_dir(cache_dir) as tmp:
        shards: list[dict] = []
        pending: dict[str, list[torch.Tensor]] = {}
        pending_rows, written, keys = 0, 0, None

        def flush(rows: int) -> None:
            nonlocal pending, pending_rows, written
            merged = {k: torch.cat(v) for k, v in pending.items()}
            name = f"shard-{len(shards):05d}.safetensors"
            save_safetensors({k: v[:rows] for k, v in merged.items()}, tmp / name)
            shards.append({"file": name, "start": written, "count": rows})
            pending = {k: [v[rows:]] for k, v in merged.items()}
            pending_rows -= rows
            written += rows

        for start in starts:
            items = [dataset[i] for i in range(start, min(start + batch_size, n))]
            with torch.no_grad():
                encoded = _check_encoded(encode_fn(collate_items(items)), len(items))
            if keys is None:
                keys = {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape[1:])}
                        for k, v in encoded.items()}
            elif set(encoded) != set(keys):
                raise ValueError(f"encode_fn returned keys {sorted(encoded)}, earlier batches {sorted(keys)}")
            for k, v in encoded.items():
                pending.setdefault(k, []).append(v)
            pending_rows += len(items)
            while pending_rows >= shard_size:
                flush(shard_size)
        if pending_rows:
            flush(pending_rows)
        manifest = {"format": CACHE_FORMAT, "fingerprint": fingerprint, "num_samples": n, "keys": keys,
                    "shards": shards}
        (tmp / CACHE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return cache_dir


def load_embedding_cache(cache_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every row of a finished :func:`build_embedding_cache` folder, in memory: ``{name: tensor [N, ...]}``."""
    from common.io import load_safetensors

    cache_dir = Path(cache_dir)
    manifest = read_cache_manifest(cache_dir)
    if manifest is None:
        raise UserError(f"{cache_dir} holds no finished embedding cache: delete it and run again")
    shards = [load_safetensors(cache_dir / shard["file"]) for shard in manifest["shards"]]
    return {key: torch.cat([shard[key] for shard in shards]) for key in manifest["keys"]}


def encode_once(dataset: Sequence[dict], encode_fn: Callable[[dict], dict[str, Any]], *,
                cache_dir: Optional[str | Path] = None, key: Optional[str] = None, batch_size: int = 64,
                progress: bool = False) -> tuple[dict[str, Any], bool]:
    """Encode every item of ``dataset`` once; the one encoding cache every trainer uses.

    ``encode_fn(batch)`` gets :func:`collate_items` batches and returns ``{name: tensor [B, ...]}`` (in memory, a
    list of B values is allowed too: it is kept as a list). Returns ``({name: all N rows}, reused)``. With
    ``cache_dir`` the tensors are stored by :func:`build_embedding_cache` in ``<cache_dir>/<key>/`` (``key``: the
    fingerprints of the data and the encoders, :func:`cache_fingerprint`) and reused by any later run with the same
    key (``reused`` is then True); a change of data or encoder makes another key, never a stale reuse.
    """
    if cache_dir is not None:
        if not key:
            raise ValueError("encode_once with a cache_dir needs the key of the data and encoders")
        folder = Path(cache_dir) / key
        reused = _cache_is_current(folder, key, len(dataset))
        build_embedding_cache(dataset, encode_fn, folder, key, batch_size=batch_size, progress=progress)
        return load_embedding_cache(folder), reused
    n = len(dataset)
    if n == 0:
        raise UserError("cannot encode an empty dataset: check the data folder")
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="encoding the dataset once")
    columns: dict[str, list] = {}
    for start in starts:
        items = [dataset[i] for i in range(start, min(start + batch_size, n))]
        with torch.no_grad():
            out = encode_fn(collate_items(items))
        lists = {k: list(v) for k, v in out.items() if isinstance(v, (list, tuple))}
        if any(len(v) != len(items) for v in lists.values()):
            raise ValueError(f"encode_fn must return {len(items)} values per list column")
        tensors = _check_encoded({k: v for k, v in out.items() if k not in lists}, len(items)) if len(lists) < \
            len(out) else {}
        for k, v in {**tensors, **lists}.items():
            columns.setdefault(k, []).append(v)
    return {k: torch.cat(v) if isinstance(v[0], torch.Tensor) else sum(v, []) for k, v in columns.items()}, False


class CachedEmbeddingDataset(torch.utils.data.Dataset):
    """Items ``{name: tensor [...], "index": i}`` read from a cache written by :func:`build_embedding_cache`.

    Shards are memory-mapped lazily (one handle per shard per process, so it works in DataLoader workers) and
    only the requested row is read. Pass ``fingerprint`` to refuse a cache built for other data or models.
    """

    def __init__(self, cache_dir: str | Path, fingerprint: Optional[str] = None):
        self.cache_dir = Path(cache_dir)
        manifest = read_cache_manifest(self.cache_dir)
        if manifest is None:
            raise UserError(f"{self.cache_dir} holds no finished embedding cache: build it with build_embedding_cache")
        if fingerprint is not None and manifest["fingerprint"] != fingerprint:
            raise UserError(f"the embedding cache in {self.cache_dir} was built for other data or models: "
                            "rebuild it (build_embedding_cache) or point at the right cache folder")
        self.manifest = manifest
        self.keys = list(manifest["keys"])
        self._starts = [shard["start"] for shard in manifest["shards"]]
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return int(self.manifest["num_samples"])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}  # open safetensors handles do not pickle; each worker reopens its own
        return state

    def _shard(self, number: int):
        if number not in self._handles:
            from safetensors import safe_open

            path = self.cache_dir / self.manifest["shards"][number]["file"]
            self._handles[number] = safe_open(str(path), framework="pt", device="cpu")
        return self._handles[number]

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} cached samples")
        index %= n
        number = bisect.bisect_right(self._starts, index) - 1
        row = index - self._starts[number]
        handle = self._shard(number)
        item: dict[str, Any] = {key: handle.get_slice(key)[row] for key in self.keys}
        item["index"] = index
        return item
