"""Small on-disk datasets shared by the script tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_captioned_images(root: Path, count: int = 8, size: int = 32) -> Path:
    """``count`` random ``size``x``size`` RGB images with captions ("a red handwritten 0", ...) in the imagefolder
    layout (``images/N.png`` + ``metadata.jsonl`` with file_name and text) under ``root``; returns ``root``."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        name = f"images/{i}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / name)
        rows.append(json.dumps({"file_name": name, "text": f"a {['red', 'blue'][i % 2]} handwritten {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root
