"""Square an image folder for the CLIP encoders: centre-crop to the short side, LANCZOS-resize (``process_img.py``).

    python scripts/shifted/process_img.py --src photos/ --dest photos_256/ --size 256

The reference SD scripts resize CLIP inputs without cropping, so non-square images break ViT position embeddings;
this makes every image square first. ``metadata.jsonl`` is copied along (file names and formats are
kept, images become RGB). Any unreadable image stops the run with one line
naming it, and ``--dest`` is written all at once or not at all.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from common.errors import UserError, cli_entry  # noqa: E402


SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def square(image, size: int):
    from PIL import Image

    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)


@cli_entry
def main(argv=None) -> int:

    from common.io import atomic_write_dir, open_image, pil_to_rgb

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="image folder (searched recursively)")
    p.add_argument("--dest", required=True, help="output folder (same relative paths)")
    p.add_argument("--size", type=int, default=512, help="output side in pixels")
    args = p.parse_args(argv)
    src, dest = Path(args.src), Path(args.dest)
    if args.size < 8:
        raise UserError(f"--size must be >= 8, got {args.size}")
    if not src.is_dir():
        raise UserError(f"--src {src} does not exist: pass an image folder")
    if dest.resolve() == src.resolve():
        raise UserError("--dest must differ from --src (the folder is written anew)")
    files = sorted(f for f in src.rglob("*") if f.suffix.lower() in SUFFIXES and f.is_file())
    if not files:
        raise UserError(f"{src} holds no images ({', '.join(SUFFIXES)})")
    with atomic_write_dir(dest, "--dest") as tmp:
        for f in files:
            try:
                with open_image(f) as im:
                    image = pil_to_rgb(im)
            except (OSError, ValueError):
                raise UserError(f"cannot read image {f}: fix or remove it") from None
            target = tmp / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            square(image, args.size).save(target)
        if (src / "metadata.jsonl").is_file():
            shutil.copy(src / "metadata.jsonl", tmp / "metadata.jsonl")
    print(f"wrote {len(files)} images of {args.size}x{args.size} to {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
