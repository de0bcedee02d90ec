"""Write an image folder (or the digits world) into webdataset-style tar shards for --train_shards.

    python scripts/make_shards.py --digits --output_dir data/digits_shards --samples_per_shard 500
    python scripts/make_shards.py --train_data_dir my_images --output_dir my_images_shards

Each sample becomes ``<key>.<png|jpg|...>`` (the file's own bytes, not re-encoded), ``<key>.txt`` (its caption),
``<key>.json`` (caption and scalar columns) and, when the folder has masks, ``<key>.mask.png`` (class ids). Keys are
the sample's place in the folder's order (``00000000``, ...); ``shards.json`` lists every shard with its count.
The output folder appears only when complete.
"""

import argparse
import io
from pathlib import Path

from common.errors import UserError, cli_entry


def folder_samples(root: Path, caption_column: str, require_captions: bool):
    """Items for :func:`common.shards.write_shards` from any folder :func:`common.data.folder_records` reads."""
    import numpy as np
    from PIL import Image

    from common.data import PartMasks, folder_records, load_mask_ids

    records = folder_records(root, caption_column, require_captions)
    for number, rec in enumerate(records):
        if not rec.image.is_file():
            raise UserError(f"{rec.image} is listed in {root}'s metadata but missing: fix the metadata or add it")
        ext = rec.image.suffix.lower().lstrip(".")
        ext = {"jpeg": "jpg"}.get(ext, ext)
        meta = {k: v for k, v in (rec.extra or {}).items() if isinstance(v, (int, float, str))}
        meta[caption_column] = list(rec.captions) if rec.captions else rec.text
        item = {"key": f"{number:08d}", "image": rec.image.read_bytes(), "image_ext": ext, "json": meta}
        if rec.text:
            item["text"] = rec.text
        if isinstance(rec.mask, PartMasks):
            ids = load_mask_ids(rec.mask, 256)
            buffer = io.BytesIO()
            Image.fromarray(ids.astype(np.uint8), mode="L").save(buffer, format="PNG")
            item["mask"] = buffer.getvalue()
        elif rec.mask is not None and rec.mask.is_file():
            item["mask"] = rec.mask.read_bytes()
        yield item


@cli_entry
def main(argv=None) -> int:
    from common.shards import write_shards

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--train_data_dir", help="an image folder (metadata.jsonl / metadata.csv, a train/ split "
                                                  "folder, or CelebAMask-HQ)")
    source.add_argument("--digits", action="store_true", help="the digits world's train split (built if needed)")
    parser.add_argument("--digits_dir", default="data/digits", help="--digits: where the digits world is built")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--samples_per_shard", type=int, default=1000)
    parser.add_argument("--caption_column", default="text")
    parser.add_argument("--no_captions", action="store_true", help="the folder has no captions (images only)")
    args = parser.parse_args(argv)
    if args.digits:
        from common.digits import build_digits

        root = Path(build_digits(args.digits_dir)) / "train"
    else:
        root = Path(args.train_data_dir)
    out = write_shards(folder_samples(root, args.caption_column, not args.no_captions), args.output_dir,
                       samples_per_shard=args.samples_per_shard)
    print(f"shards written to {out} (train with --train_shards {out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
