"""SDG's inputs: reference images (``--data_dir``), instruction files (``--text_instruction_file``), training images.

Reference images (as the released ``sample.py`` reads them): the folder is searched recursively for jpg / jpeg / png / gif (any case), sorted by path;
each is converted to RGB, halved with a BOX filter while its short side is >= 2 x size, resized BICUBIC so the
short side equals ``size``, centre-cropped to ``size x size`` and scaled to [-1, 1] (guided-diffusion's
``center_crop_arr``).

Instruction files: one instruction per line, used verbatim (no prompt template), trailing newline / whitespace
stripped. Blank lines are SKIPPED (the released reader keeps them as "" and would guide towards the empty text's
embedding, which no user asks for); a file with no instruction at all is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from common.errors import UserError


REFERENCE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif")


def list_reference_images(data_dir: Union[str, Path]) -> list[Path]:
    """Every reference image under ``data_dir`` (recursive, sorted); an empty or missing folder is a UserError."""
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"--data_dir {root} is not a folder: pass a folder of reference images (jpg/png/gif)")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in REFERENCE_SUFFIXES)
    if not files:
        raise UserError(f"--data_dir {root} holds no reference images ({', '.join(REFERENCE_SUFFIXES)}): add some "
                        "or set --image_weight 0")
    return files


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """guided-diffusion's ``center_crop_arr``: BOX halving, BICUBIC to short side ``size``, centre crop -> uint8."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top: top + size, left: left + size]


def load_reference(path: Union[str, Path], size: int) -> torch.Tensor:
    """One reference image as ``[1, 3, size, size]`` in [-1, 1]."""
    from common.io import load_image_rgb

    try:
        image = load_image_rgb(path)
    except UserError:
        raise
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read reference image {path} ({err}): remove or replace it") from None
    arr = center_crop_arr(image, size).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def read_instructions(path: Union[str, Path]) -> list[str]:
    """The instructions of a ``--text_instruction_file``: one per non-blank line, stripped, in order."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--text_instruction_file {path} does not exist: pass a text file with one instruction per "
                        "line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"--text_instruction_file {path} is not UTF-8 text") from None
    instructions = [line.strip() for line in lines if line.strip()]
    if not instructions:
        raise UserError(f"--text_instruction_file {path} holds no instruction: write one per line, e.g. "
                        "'a handwritten seven'")
    return instructions


class InMemoryImages(torch.utils.data.Dataset):
    """Every image of a training folder decoded once: items ``[3, S, S]`` in [-1, 1] (small datasets: digits).

    Captions are not needed (``metadata.jsonl`` optional): SDG's diffusion model is unconditional and its CLIP
    fine-tuning is self-supervised.
    """

    def __init__(self, root: Union[str, Path, torch.utils.data.Dataset], resolution: int, *,
                 center_crop: bool = True, random_flip: bool = False):
        from common.data import image_text_dataset

        # decoded once without a flip; the flip is drawn per item below, so every epoch sees fresh draws
        if isinstance(root, (str, Path)):
            dataset = image_text_dataset(root, resolution=resolution, require_captions=False,
                                         center_crop=center_crop)
        else:  # any dataset of {"pixel_values", ...} items (common.data_sources.training_dataset), built unflipped
            dataset = root
        self.pixels = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
        self.records = getattr(dataset, "records", [])
        self.random_flip = random_flip

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.random_flip and bool(torch.rand(()) < 0.5):  # the global RNG: the trainer checkpoints it
            return self.pixels[index].flip(-1)
        return self.pixels[index]
