"""The data flags every image trainer takes (common/data_sources.py): metadata.csv, split folders, COCO captions,
Hugging Face datasets (a local folder through imagefolder), CelebAMask-HQ's layout, and `import datasets` giving
Hugging Face's library from the repository root."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from script_loading import load_script

from common.data import CELEBA_NUM_CLASSES
from common.data_sources import add_dataset_args, training_dataset
from common.errors import UserError


REPO = Path(__file__).resolve().parent.parent
TRAINERS = ("scripts/train_text_to_image.py", "scripts/train_vae.py", "scripts/train_clip.py",
            "scripts/codiff/train_dynamic.py", "scripts/codiff/train_unimodal.py", "scripts/versatile/train.py",
            "scripts/shifted/finetune.py", "scripts/shifted/train.py", "scripts/sdg/train_unconditional.py",
            "scripts/sdg/finetune_clip.py")
CAPTION_TRAINERS = ("scripts/train_text_to_image.py", "scripts/train_clip.py", "scripts/codiff/train_dynamic.py",
                    "scripts/codiff/train_unimodal.py", "scripts/versatile/train.py", "scripts/shifted/train.py")


def flags(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    add_dataset_args(parser)
    return parser.parse_args(argv)


def write_images(folder: Path, n: int, size: int = 8) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        names.append(f"{i}.png")
    return names


def test_metadata_csv_and_split_folders(tmp_path):
    names = write_images(tmp_path / "csv", 4)
    (tmp_path / "csv" / "metadata.csv").write_text("file_name,text,label\n" + "".join(
        f'{name},"a picture, number {i}",{i}\n' for i, name in enumerate(names)))
    dataset = training_dataset(flags(["--train_data_dir", str(tmp_path / "csv")]), 8)
    assert len(dataset) == 4 and dataset[2]["text"] == "a picture, number 2" and dataset[2]["label"] == "2"

    # a dataset folder with split folders: train/ is read, test/ is not
    for split, n in (("train", 3), ("test", 2)):
        write_images(tmp_path / "splits" / split, n)
        rows = [{"file_name": f"{i}.png", "text": f"{split} {i}"} for i in range(n)]
        (tmp_path / "splits" / split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = training_dataset(flags(["--train_data_dir", str(tmp_path / "splits")]), 8)
    assert [dataset[i]["text"] for i in range(len(dataset))] == ["train 0", "train 1", "train 2"]

    # --max_train_samples: a seeded subset
    dataset = training_dataset(flags(["--train_data_dir", str(tmp_path / "csv"), "--max_train_samples", "2"]), 8)
    assert len(dataset) == 2

    # bad data: one line naming the file and the fix
    (tmp_path / "csv" / "metadata.jsonl").write_text("")
    with pytest.raises(UserError, match="both metadata.jsonl and metadata.csv: keep one"):
        training_dataset(flags(["--train_data_dir", str(tmp_path / "csv")]), 8)
    (tmp_path / "csv" / "metadata.jsonl").unlink()
    (tmp_path / "csv" / "metadata.csv").write_text("name,text\na.png,x\n")
    with pytest.raises(UserError, match=r"metadata.csv:2 has no file_name"):
        training_dataset(flags(["--train_data_dir", str(tmp_path / "csv")]), 8)
    (tmp_path / "no_metadata").mkdir()
    with pytest.raises(UserError, match="has no metadata.jsonl or metadata.csv: add one"):
        training_dataset(flags(["--train_data_dir", str(tmp_path / "no_metadata")]), 8)


def test_exactly_one_source(tmp_path):
    with pytest.raises(UserError, match="exactly one data source"):
        training_dataset(flags([]), 8)
    with pytest.raises(UserError, match=r"exactly one data source .*\(got --train_data_dir, --dataset_name\)"):
        training_dataset(flags(["--train_data_dir", "a", "--dataset_name", "b"]), 8)
    with pytest.raises(UserError, match="--coco_annotations needs --train_data_dir"):
        training_dataset(flags(["--coco_annotations", "c.json", "--dataset_name", "b"]), 8)


def test_coco_captions(tmp_path):
    names = write_images(tmp_path / "train2017", 3)
    captions = {
        "images": [{"id": 10 + i, "file_name": name} for i, name in enumerate(names)],
        "annotations": [{"image_id": 10, "caption": "first a"}, {"image_id": 10, "caption": "first b"},
                        {"image_id": 11, "caption": "second"}, {"image_id": 12, "caption": "third"},
                        {"image_id": 99, "caption": "no such image"}],
    }
    (tmp_path / "captions_train2017.json").write_text(json.dumps(captions))
    args = flags(["--train_data_dir", str(tmp_path / "train2017"), "--coco_annotations",
                  str(tmp_path / "captions_train2017.json")])
    dataset = training_dataset(args, 8)
    assert len(dataset) == 3  # one sample per image, a caption drawn from its list each time
    torch.manual_seed(0)
    assert {dataset[0]["text"] for _ in range(20)} == {"first a", "first b"}
    assert dataset[2]["text"] == "third"
    (tmp_path / "bad.json").write_text('{"images": 3}')
    with pytest.raises(UserError, match="bad.json is not a COCO captions file"):
        training_dataset(flags(["--train_data_dir", str(tmp_path / "train2017"), "--coco_annotations",
                                str(tmp_path / "bad.json")]), 8)


def test_dataset_name_reads_a_local_folder_with_imagefolder(tmp_path, monkeypatch):
    import datasets as hf_datasets

    monkeypatch.setattr(hf_datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    names = write_images(tmp_path / "folder", 5, size=12)
    rows = [{"file_name": name, "caption": f"caption {i}"} for i, name in enumerate(names)]
    (tmp_path / "folder" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = flags(["--dataset_name", str(tmp_path / "folder"), "--caption_column", "caption"])
    hub = training_dataset(args, 8)
    local = training_dataset(flags(["--train_data_dir", str(tmp_path / "folder"), "--caption_column", "caption"]), 8)
    assert len(hub) == len(local) == 5
    by_text = {local[i]["text"]: local[i]["pixel_values"] for i in range(5)}
    for i in range(5):  # the same pixels and captions as the folder reader (imagefolder may reorder rows)
        item = hub[i]
        torch.testing.assert_close(item["pixel_values"], by_text[item["text"]], rtol=0, atol=0)
    assert len(training_dataset(flags([*sys_args(args), "--max_train_samples", "2"]), 8)) == 2
    with pytest.raises(UserError, match=r"no image column 'picture' \(columns: image, caption\): pass --image_column"):
        training_dataset(flags([*sys_args(args), "--image_column", "picture"]), 8)
    with pytest.raises(UserError, match="no caption column 'text'"):
        training_dataset(flags(["--dataset_name", str(tmp_path / "folder")]), 8)

    # a Hugging Face dataset written into shards keeps its stored image bytes and captions
    make = load_script("scripts/make_shards.py").main
    assert make(["--dataset_name", str(tmp_path / "folder"), "--caption_column", "caption", "--output_dir",
                 str(tmp_path / "shards"), "--samples_per_shard", "2"]) == 0
    stream = training_dataset(flags(["--train_shards", str(tmp_path / "shards"), "--caption_column", "caption"]), 8)
    assert len(stream) == 5
    for i in range(5):
        torch.testing.assert_close(stream[i]["pixel_values"], by_text[stream[i]["text"]], rtol=0, atol=0)


def sys_args(args: argparse.Namespace) -> list[str]:
    return ["--dataset_name", args.dataset_name, "--caption_column", args.caption_column]


def make_celebamask(root: Path, combined: bool) -> None:
    """Two 16 px images; masks at 8 px (CelebAMask-HQ's masks are half the image size), captions for image 0."""
    write_images(root / "CelebA-HQ-img", 2, size=16)
    skin = np.zeros((8, 8), np.uint8)
    skin[2:6, 2:6] = 255
    hair = np.zeros((8, 8), np.uint8)
    hair[0:3, :] = 255
    if combined:
        (root / "CelebAMask-HQ-mask").mkdir()
        for i in range(2):
            ids = np.where(hair > 0, 13, np.where(skin > 0, 1, 0)).astype(np.uint8)
            Image.fromarray(ids, mode="L").save(root / "CelebAMask-HQ-mask" / f"{i}.png")
    else:
        for i in range(2):
            folder = root / "CelebAMask-HQ-mask-anno" / "0"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(skin).save(folder / f"{i:05d}_skin.png")
            Image.fromarray(hair).save(folder / f"{i:05d}_hair.png")
    (root / "celeba-caption").mkdir()
    (root / "celeba-caption" / "0.txt").write_text("she has long hair.\nthe woman has long hair.\n")


@pytest.mark.parametrize("combined", [False, True])
def test_celebamask_hq_layout(tmp_path, combined):
    make_celebamask(tmp_path, combined)
    dataset = training_dataset(flags(["--train_data_dir", str(tmp_path)]), 16, require_captions=False,
                               num_mask_classes=CELEBA_NUM_CLASSES)
    assert len(dataset) == 2
    item = dataset[0]
    expected = np.zeros((8, 8), np.int64)
    expected[2:6, 2:6] = 1  # skin
    expected[0:3, :] = 13  # hair, combined after skin, wins where they overlap
    expected = np.kron(expected, np.ones((2, 2), np.int64))  # nearest upsampling to the image's 16 px
    assert item["mask"].tolist() == expected.tolist()
    assert item["text"] in ("she has long hair.", "the woman has long hair.") and dataset[1]["text"] == ""
    with pytest.raises(UserError, match=r"image 1.png has no caption: add celeba-caption/1.txt"):
        training_dataset(flags(["--train_data_dir", str(tmp_path)]), 16)


@pytest.mark.parametrize("script", TRAINERS)
def test_every_image_trainer_takes_the_data_flags(script):
    options = load_script(script).build_parser()._option_string_actions
    wanted = ["--train_data_dir", "--dataset_name", "--dataset_config_name", "--image_column", "--caption_column",
              "--max_train_samples", "--train_shards"]
    wanted += ["--coco_annotations"] if script in CAPTION_TRAINERS else []
    assert not [flag for flag in wanted if flag not in options]


def test_contextdiff_trainers_take_the_data_flags():
    from contextdiff.training import build_parser

    for stage in (1, 2):
        options = build_parser(stage)._option_string_actions
        assert {"--dataset_name", "--train_shards", "--coco_annotations", "--max_train_samples"} <= set(options)


def test_import_datasets_from_the_repository_root_is_hugging_face():
    """No module named ``datasets`` in the project shadows Hugging Face's library, from the root or anywhere."""
    assert not (REPO / "datasets").exists() and not (REPO / "datasets.py").exists()
    code = "import datasets, sys; print(datasets.__file__); sys.exit(0 if hasattr(datasets, 'load_dataset') else 1)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # resolved to an installed package (the venv may live inside the repository), not to a project folder
    assert "site-packages" in Path(proc.stdout.strip()).parts, proc.stdout


@pytest.mark.parametrize("script", ["scripts/make_digits.py", "scripts/make_digits_pairs.py", "scripts/make_shards.py"])
def test_dataset_builders_are_entry_points_in_scripts(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script(script).main(["--help"])
    assert exit_info.value.code == 0 and "--output_dir" in capsys.readouterr().out
