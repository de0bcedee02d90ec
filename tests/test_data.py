"""Real data formats: image folders with metadata.jsonl, COCO captions, palette masks, broken files."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from common.data import coco_dataset, image_text_dataset, load_mask_ids
from common.errors import UserError


def write_folder(root, n=4, modes=("RGB",), corrupt=(), truncated=(), missing=()):
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = f"img{i}.png"
        mode = modes[i % len(modes)]
        if i in missing:
            pass
        elif i in corrupt:
            (root / name).write_bytes(b"not an image at all")
        else:
            if mode == "I;16":
                img = Image.new("I;16", (24, 20))
                img.frombytes(np.full((20, 24), 60000, dtype="<u2").tobytes())
            elif mode == "P":
                img = Image.new("P", (24, 20), 1)
                img.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
            else:
                img = Image.new(mode, (24, 20), {"RGB": (10, 200, 30), "L": 128, "RGBA": (255, 0, 0, 255)}[mode])
            img.save(root / name)
            if i in truncated:
                data = (root / name).read_bytes()
                (root / name).write_bytes(data[: len(data) // 2])
        mask = Image.fromarray(np.eye(20, 24, dtype=np.uint8), mode="P")
        mask.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
        mask.save(root / f"mask{i}.png")
        rows.append({"file_name": name, "text": f"caption {i}", "mask_file_name": f"mask{i}.png", "digit": i})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def test_imagefolder_items_and_masks(tmp_path):
    ds = image_text_dataset(write_folder(tmp_path / "d"), 16, num_mask_classes=2, random_flip=False)
    item = ds[1]
    assert item["pixel_values"].shape == (3, 16, 16) and item["text"] == "caption 1" and item["digit"] == 1
    assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
    assert item["mask"].dtype == torch.long and set(item["mask"].unique().tolist()) <= {0, 1}


def test_flip_moves_image_and_mask_together(tmp_path):
    ds = image_text_dataset(write_folder(tmp_path / "d", n=1), 16, num_mask_classes=2, random_flip=True)
    plain = image_text_dataset(tmp_path / "d", 16, num_mask_classes=2)[0]
    torch.manual_seed(0)
    seen = set()
    for _ in range(12):
        item = ds[0]
        flipped = not torch.equal(item["mask"], plain["mask"])
        seen.add(flipped)
        if flipped:
            assert torch.equal(item["mask"], plain["mask"].flip(-1))
    assert seen == {True, False}


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_image_modes_become_rgb(tmp_path, mode):
    ds = image_text_dataset(write_folder(tmp_path / "d", n=1, modes=(mode,)), 8)
    px = ds[0]["pixel_values"]
    assert px.shape == (3, 8, 8)
    if mode == "I;16":  # 60000/65535 scaled to 8 bits, not clipped to white
        value = (px[0, 0, 0].item() + 1) * 127.5
        assert 225 < value < 240
    if mode == "P":
        assert px[0].mean() > 0.4 and px[1].mean() < -0.8  # the palette colour, red


def test_corrupt_truncated_and_missing_images_are_skipped_and_counted(tmp_path):
    root = write_folder(tmp_path / "d", n=6, corrupt=(1,), truncated=(2,), missing=(3,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = image_text_dataset(root, 8)
    assert len(ds) == 3 and ds.skipped == 3
    assert any("skipped 3 of 6" in str(w.message) for w in caught)
    assert [ds[i]["text"] for i in range(3)] == ["caption 0", "caption 4", "caption 5"]


def test_clear_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        image_text_dataset(tmp_path / "nope", 8)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metadata.jsonl").write_text("")
    with pytest.raises(UserError, match="no readable images"):
        image_text_dataset(tmp_path / "empty", 8)
    bad = write_folder(tmp_path / "bad", n=2)
    (bad / "metadata.jsonl").write_text('{"file_name": "img0.png", "text": "x"}\n{broken\n')
    with pytest.raises(UserError, match=r"metadata.jsonl:2 is not valid JSON"):
        image_text_dataset(bad, 8)
    with pytest.raises(UserError, match="not divisible by the VAE's factor 8"):
        image_text_dataset(write_folder(tmp_path / "r", n=1), 12, vae_scale_factor=8)
    allbad = write_folder(tmp_path / "allbad", n=2, corrupt=(0, 1))
    with pytest.raises(UserError, match="no readable images"):
        image_text_dataset(allbad, 8)


def test_mask_ids_outside_the_palette_are_refused(tmp_path):
    m = Image.fromarray(np.full((4, 4), 5, dtype=np.uint8), mode="P")
    m.putpalette([v % 256 for v in range(768)])
    m.save(tmp_path / "m.png")
    with pytest.raises(UserError, match="class id 5 but there are only 2 classes"):
        load_mask_ids(tmp_path / "m.png", 2)
    assert load_mask_ids(tmp_path / "m.png", 6).max() == 5


def test_coco_captions_layout(tmp_path):
    root = write_folder(tmp_path / "imgs", n=2)
    coco = {"images": [{"id": 1, "file_name": "img0.png"}, {"id": 2, "file_name": "img1.png"}],
            "annotations": [{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"},
                            {"image_id": 2, "caption": "c"}, {"image_id": 9, "caption": "no image"}]}
    (tmp_path / "captions_train2017.json").write_text(json.dumps(coco))
    every = coco_dataset(root, tmp_path / "captions_train2017.json", 8)
    assert [every[i]["text"] for i in range(len(every))] == ["a", "b", "c"]
    one = coco_dataset(root, tmp_path / "captions_train2017.json", 8, one_per_image=True)
    assert len(one) == 2
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError, match="not a COCO captions file"):
        coco_dataset(root, tmp_path / "bad.json", 8)


def test_encoding_cache_is_reused_and_invalidated(tmp_path):
    from common.data import cached_tensors, dataset_fingerprint, module_fingerprint

    root = write_folder(tmp_path / "d", n=3)
    ds = image_text_dataset(root, 8)
    net = torch.nn.Linear(2, 2)
    calls = []

    def compute():
        calls.append(1)
        return {"x": torch.arange(3.0)}

    key = dataset_fingerprint(ds) + module_fingerprint(net)
    first, reused = cached_tensors(tmp_path / "cache", key, compute)
    again, reused_again = cached_tensors(tmp_path / "cache", key, compute)
    assert not reused and reused_again and len(calls) == 1 and torch.equal(first["x"], again["x"])
    with torch.no_grad():
        net.weight.add_(1.0)
    assert module_fingerprint(net) not in key  # other weights, other key
    (root / "metadata.jsonl").write_text((root / "metadata.jsonl").read_text().replace("caption 0", "changed"))
    assert dataset_fingerprint(image_text_dataset(root, 8)) != dataset_fingerprint(ds)
    assert dataset_fingerprint(image_text_dataset(root, 16)) != dataset_fingerprint(image_text_dataset(root, 8))
