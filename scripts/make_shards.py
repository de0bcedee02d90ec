"""Write an image folder (or the digits world) into webdataset-style tar shards for --train_shards.

    python scripts/make_shards.py --digits --output_dir data/digits_shards --samples_per_shard 500
    python scripts/make_shards.py --train_data_dir my_images --output_dir my_images_shards
    python scripts/make_shards.py --dataset_name user/hub_dataset --output_dir hub_shards   # a Hugging Face dataset

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


def hub_samples(name: str, config, image_column: str, caption_column: str, require_captions: bool):
    """Items for :func:`common.shards.write_shards` from a Hugging Face dataset (its stored image bytes, when it
    keeps them, else the decoded image as PNG)."""
    import datasets as hf_datasets

    from common.data import check_columns
    from common.data_sources import load_hub_table

    table = load_hub_table(name, config)
    check_columns(table, image_column, caption_column if require_captions else None, f"dataset {name!r}")
    table = table.cast_column(image_column, hf_datasets.Image(decode=False))
    for number, row in enumerate(table):
        stored = row[image_column] or {}
        data, path = stored.get("bytes"), stored.get("path")
        if data is None and path:
            data = Path(path).read_bytes()
        if data is None:
            raise UserError(f"dataset {name!r} row {number} has no image: fix the dataset or drop that row")
        ext = Path(path).suffix.lower().lstrip(".") if path else ""
        ext = {"jpeg": "jpg"}.get(ext, ext) if ext in ("jpg", "jpeg", "png", "webp") else ""
        if not ext:  # unknown container: store it as PNG so every reader can decode it
            from PIL import Image

            buffer = io.BytesIO()
            with Image.open(io.BytesIO(data)) as im:
                im.save(buffer, format="PNG")
            data, ext = buffer.getvalue(), "png"
        meta = {k: v for k, v in row.items() if k != image_column and isinstance(v, (int, float, str, list))}
        item = {"key": f"{number:08d}", "image": data, "image_ext": ext, "json": meta}
        caption = row.get(caption_column)
        if isinstance(caption, str) and caption:
            item["text"] = caption
        yield item


@cli_entry
def main(argv=None) -> int:
    from common.shards import write_shards

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--train_data_dir", help="an image folder (metadata.jsonl / metadata.csv, a train/ split "
                                                  "folder, or CelebAMask-HQ)")
    source.add_argument("--digits", action="store_true", help="the digits world's train split (built if needed)")
    source.add_argument("--dataset_name", help="a Hugging Face dataset (or a local folder read by imagefolder)")
    parser.add_argument("--dataset_config_name", default=None)
    parser.add_argument("--image_column", default="image", help="--dataset_name: the column holding the images")
    parser.add_argument("--digits_dir", default="data/digits", help="--digits: where the digits world is built")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--samples_per_shard", type=int, default=1000)
    parser.add_argument("--caption_column", default="text")
    parser.add_argument("--no_captions", action="store_true", help="the folder has no captions (images only)")
    args = parser.parse_args(argv)
    if args.dataset_name:
        samples = hub_samples(args.dataset_name, args.dataset_config_name, args.image_column, args.caption_column,
                              not args.no_captions)
    else:
        if args.digits:
            from common.digits import build_digits

            root = Path(build_digits(args.digits_dir)) / "train"
        else:
            root = Path(args.train_data_dir)
        samples = folder_samples(root, args.caption_column, not args.no_captions)
    out = write_shards(samples, args.output_dir, samples_per_shard=args.samples_per_shard)
    print(f"shards written to {out} (train with --train_shards {out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
