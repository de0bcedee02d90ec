"""The data flags every image trainer shares, and the one function turning them into a training dataset.

Sources (exactly one):

- ``--train_data_dir DIR``: an image folder with ``metadata.jsonl`` or ``metadata.csv`` (``file_name`` + caption
  column), or a dataset folder with split folders (``DIR/train/metadata.jsonl``), or the CelebAMask-HQ layout
  (``CelebA-HQ-img/`` + masks); with ``--coco_annotations captions_train2017.json`` it is COCO's image folder;
- ``--dataset_name NAME``: a Hugging Face dataset (``--dataset_config_name``, ``--image_column``,
  ``--caption_column`` as in diffusers' ``train_text_to_image.py``) or a local folder read with ``datasets``'
  ``imagefolder`` builder;
- ``--train_shards DIR|GLOB``: tar shards streamed by position (:mod:`common.shards`).

``--max_train_samples N`` keeps N samples: a seeded random subset for folders and Hugging Face datasets (as
diffusers does), the first N of the stored order for shards (a stream cannot pick at random cheaply).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

import numpy as np

from common.errors import UserError, one_line


SOURCE_FLAGS = ("train_data_dir", "dataset_name", "train_shards")


def add_dataset_args(parser: argparse.ArgumentParser, *, captions: bool = True) -> None:
    """Add the data flags a script does not define yet (scripts keep their own ``--train_data_dir`` help)."""
    group = parser.add_argument_group("data")

    def add(flag: str, **kwargs: Any) -> None:
        if flag not in parser._option_string_actions:
            group.add_argument(flag, **kwargs)

    add("--train_data_dir", default=None,
        help="image folder with metadata.jsonl or metadata.csv (or a train/ folder holding one), or CelebAMask-HQ")
    add("--dataset_name", default=None,
        help="a Hugging Face dataset name, or a local folder read with datasets' imagefolder builder")
    add("--dataset_config_name", default=None, help="the dataset's config (leave unset if it has only one)")
    add("--image_column", default="image", help="--dataset_name: the column holding the images")
    add("--caption_column", default="text", help="the column (or shard .json key) holding the captions")
    add("--max_train_samples", type=int, default=None,
        help="train on this many samples (debugging, quick runs): a seeded subset; the first N for shards")
    add("--train_shards", default=None,
        help="webdataset-style .tar shards (a folder or glob) streamed by position; see scripts/make_shards.py")
    if captions:
        add("--coco_annotations", default=None,
            help="a COCO captions_*.json; --train_data_dir is then the folder holding its images")


def describe_source(args: argparse.Namespace) -> str:
    """The data source the flags name, for run records (``train_info.json``) and logs."""
    for flag in SOURCE_FLAGS:
        if getattr(args, flag, None):
            return str(getattr(args, flag))
    return ""


def _subset(records: list, n: Optional[int], seed: int) -> list:
    if n is None:
        return records
    if n < 1:
        raise UserError(f"--max_train_samples must be >= 1, got {n}")
    if n >= len(records):
        return records
    keep = np.random.default_rng(seed).permutation(len(records))[:n]
    return [records[i] for i in sorted(keep)]


def load_hub_table(name: str, config: Optional[str] = None, split: str = "train"):
    """A split of a Hugging Face dataset (``load_dataset``), or of a local folder read by ``imagefolder``."""
    try:
        import datasets as hf_datasets
    except ImportError:
        raise UserError("--dataset_name needs Hugging Face datasets: pip install -r requirements.txt") from None
    if not hasattr(hf_datasets, "load_dataset"):
        raise UserError(f"`import datasets` found {getattr(hf_datasets, '__path__', '?')}, not Hugging Face datasets: "
                        "rename that folder or run from another directory")
    local = Path(name).expanduser()
    try:
        if local.is_dir():
            table = hf_datasets.load_dataset("imagefolder", data_dir=str(local))
        else:
            table = hf_datasets.load_dataset(name, config)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as err:
        raise UserError(f"cannot load dataset {name!r} ({one_line(str(err))}): check the name or folder, "
                        "--dataset_config_name and the network (HF_HUB_OFFLINE=1 reads only the local cache)") from None
    except Exception as err:  # datasets' own errors (DatasetNotFoundError, DataFilesNotFoundError, ...)
        if type(err).__module__.split(".")[0] != "datasets":
            raise
        raise UserError(f"cannot load dataset {name!r} ({one_line(str(err))}): check the name or folder and "
                        "--dataset_config_name") from None
    if hasattr(table, "keys"):  # a DatasetDict
        splits = list(table.keys())
        if split in table:
            table = table[split]
        elif len(splits) == 1:
            table = table[splits[0]]
        else:
            raise UserError(f"dataset {name!r} has no {split!r} split (it has {', '.join(splits)})")
    return table


def check_data_source(args: argparse.Namespace) -> None:
    """Exactly one data source given (checked before any model loads): else one line naming the flags."""
    given = [flag for flag in SOURCE_FLAGS if getattr(args, flag, None)]
    if getattr(args, "coco_annotations", None) and not getattr(args, "train_data_dir", None):
        raise UserError("--coco_annotations needs --train_data_dir: the folder holding COCO's images (e.g. train2017/)")
    if len(given) != 1:
        names = ", ".join("--" + flag for flag in SOURCE_FLAGS if hasattr(args, flag))
        got = ", ".join("--" + flag for flag in given) or "none"
        raise UserError(f"pass exactly one data source of {names} (got {got}), or set it in --config")


def training_dataset(args: argparse.Namespace, resolution: int, *, require_captions: bool = True,
                     num_mask_classes: Optional[int] = None, mask_ignore_index: Optional[int] = None,
                     center_crop: bool = True, random_flip: bool = False, vae_scale_factor: int = 1,
                     seed: Optional[int] = None, caption_column: Optional[str] = None):
    """The training dataset the data flags name (see the module docstring): an
    :class:`~common.data.ImageTextDataset`, a :class:`~common.data.HubImageTextDataset` or a
    :class:`~common.shards.ShardStream`; all give the same items (``pixel_values``, ``text``, ``index``, ``mask``)."""
    from common.data import HubImageTextDataset, ImageTextDataset, coco_records, folder_records

    check_data_source(args)
    coco = getattr(args, "coco_annotations", None)
    seed = getattr(args, "seed", None) if seed is None else seed
    seed = 0 if seed is None else int(seed)
    limit = getattr(args, "max_train_samples", None)
    column = caption_column or getattr(args, "caption_column", None) or "text"

    if getattr(args, "train_shards", None):
        from common.shards import ShardStream

        return ShardStream(args.train_shards, resolution, caption_column=column, require_captions=require_captions,
                           center_crop=center_crop, random_flip=random_flip, num_mask_classes=num_mask_classes,
                           mask_ignore_index=mask_ignore_index, vae_scale_factor=vae_scale_factor, seed=seed,
                           max_samples=limit)
    if getattr(args, "dataset_name", None):
        if num_mask_classes:
            raise UserError("--dataset_name gives images and captions only: masks need --train_data_dir (a "
                            "mask_file_name column, or CelebAMask-HQ) or --train_shards with mask.png members")
        table = load_hub_table(args.dataset_name, getattr(args, "dataset_config_name", None))
        if limit is not None:
            if limit < 1:
                raise UserError(f"--max_train_samples must be >= 1, got {limit}")
            table = table.shuffle(seed=seed).select(range(min(limit, len(table))))
        return HubImageTextDataset(table, resolution, image_column=getattr(args, "image_column", None) or "image",
                                   caption_column=column if require_captions else None, center_crop=center_crop,
                                   random_flip=random_flip, vae_scale_factor=vae_scale_factor,
                                   source=f"dataset {args.dataset_name!r}")
    root = Path(args.train_data_dir)
    if coco:
        records = coco_records(root, Path(coco), random_caption=True)
        source = str(coco)
    else:
        records = folder_records(root, column, require_captions)
        source = str(root)
    return ImageTextDataset(_subset(records, limit, seed), resolution, center_crop, random_flip, num_mask_classes,
                            vae_scale_factor, source=source, mask_ignore_index=mask_ignore_index)
