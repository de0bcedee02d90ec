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
    from common.data import dataset_fingerprint, encode_once, module_fingerprint

    root = write_folder(tmp_path / "d", n=3)
    ds = image_text_dataset(root, 8)
    net = torch.nn.Linear(2, 2)
    calls = []

    def encode(batch):
        calls.append(len(batch["text"]))
        return {"x": batch["pixel_values"].mean((1, 2, 3)), "texts": list(batch["text"])}

    in_memory, reused = encode_once(ds, encode, batch_size=2)
    assert not reused and calls == [2, 1] and in_memory["texts"] == [ds[i]["text"] for i in range(3)]
    calls.clear()

    def encode_tensors(batch):
        calls.append(1)
        return {"x": batch["pixel_values"].mean((1, 2, 3))}

    key = dataset_fingerprint(ds) + module_fingerprint(net)
    first, reused = encode_once(ds, encode_tensors, cache_dir=tmp_path / "cache", key=key, batch_size=2)
    again, reused_again = encode_once(ds, encode_tensors, cache_dir=tmp_path / "cache", key=key, batch_size=2)
    assert not reused and reused_again and len(calls) == 2 and torch.equal(first["x"], again["x"])
    torch.testing.assert_close(first["x"], in_memory["x"], rtol=0, atol=0)
    with torch.no_grad():
        net.weight.add_(1.0)
    assert module_fingerprint(net) not in key  # other weights, other key
    (root / "metadata.jsonl").write_text((root / "metadata.jsonl").read_text().replace("caption 0", "changed"))
    assert dataset_fingerprint(image_text_dataset(root, 8)) != dataset_fingerprint(ds)
    assert dataset_fingerprint(image_text_dataset(root, 16)) != dataset_fingerprint(image_text_dataset(root, 8))


def test_32bit_int_images_are_scaled_as_16bit(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    Image.fromarray(np.full((12, 12), 30000, dtype=np.int32)).save(root / "a.tif")  # mode "I"
    assert Image.open(root / "a.tif").mode == "I"
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "a.tif", "text": "x"}) + "\n")
    value = (image_text_dataset(root, 8)[0]["pixel_values"][0, 0, 0].item() + 1) * 127.5
    assert abs(value - 30000 / 257) < 1.5  # about 117, not clipped to 255


def test_file_broken_after_indexing_falls_back_deterministically_and_is_counted(tmp_path):
    root = write_folder(tmp_path / "d", n=4)
    ds = image_text_dataset(root, 8)
    assert ds.skipped == 0
    (root / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken later")
    with pytest.warns(UserWarning, match="skipping unreadable"):
        item = ds[1]
    assert item["text"] == "caption 2" and item["index"] == 1  # the next readable record, position kept
    assert ds[1]["text"] == "caption 2" and ds.skipped_at_load == 1 and ds.skipped == 1
    (root / "img3.png").unlink()
    with pytest.warns(UserWarning):
        assert ds[3]["text"] == "caption 0"  # wraps around
    assert ds.skipped == 2


def test_every_file_broken_after_indexing_is_a_user_error(tmp_path):
    root = write_folder(tmp_path / "d", n=2)
    ds = image_text_dataset(root, 8)
    for i in range(2):
        (root / f"img{i}.png").unlink()
    with pytest.warns(UserWarning), pytest.raises(UserError, match="none of the 2 images can be read"):
        ds[0]


def test_verify_mode_catches_corrupt_and_truncated_files(tmp_path):
    root = write_folder(tmp_path / "d", n=4, corrupt=(0,), truncated=(1,))
    with pytest.warns(UserWarning, match="skipped 2 of 4"):
        ds = image_text_dataset(root, 8, validate="verify")
    assert len(ds) == 2 and ds.skipped == 2
    with pytest.raises(UserError, match="validate must be one of"):
        image_text_dataset(root, 8, validate="fast")


def test_missing_mask_file_skips_the_sample_and_names_it(tmp_path):
    root = write_folder(tmp_path / "d", n=3)
    (root / "mask1.png").unlink()
    with pytest.warns(UserWarning, match="mask1.png missing"):
        ds = image_text_dataset(root, 8, num_mask_classes=2)
    assert len(ds) == 2 and ds.skipped == 1
    assert len(image_text_dataset(root, 8)) == 3  # masks not requested: the image alone is fine


def test_mask_ignore_index_is_let_through(tmp_path):
    m = Image.fromarray(np.array([[0, 1], [255, 1]], dtype=np.uint8), mode="L")
    m.save(tmp_path / "m.png")
    with pytest.raises(UserError, match="class id 255"):
        load_mask_ids(tmp_path / "m.png", 2)
    assert load_mask_ids(tmp_path / "m.png", 2, ignore_index=255).tolist() == [[0, 1], [255, 1]]


def test_list_captions_and_coco_random_caption_are_drawn_from(tmp_path):
    root = write_folder(tmp_path / "imgs", n=2)
    rows = [{"file_name": "img0.png", "text": ["first", "second"]}, {"file_name": "img1.png", "text": ["only"]}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = image_text_dataset(root, 8)
    torch.manual_seed(0)
    assert {ds[0]["text"] for _ in range(20)} == {"first", "second"} and ds[1]["text"] == "only"

    coco = {"images": [{"id": 1, "file_name": "img0.png"}, {"id": 2, "file_name": "img1.png"}],
            "annotations": [{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"},
                            {"image_id": 2, "caption": "c"}]}
    (tmp_path / "caps.json").write_text(json.dumps(coco))
    rand = coco_dataset(root, tmp_path / "caps.json", 8, random_caption=True)
    assert len(rand) == 2 and {rand[0]["text"] for _ in range(20)} == {"a", "b"} and rand[1]["text"] == "c"
    with pytest.raises(UserError, match="COCO images folder"):
        coco_dataset(tmp_path / "nope", tmp_path / "caps.json", 8)


def test_collate_items_stacks_tensors_and_keeps_shared_keys():
    from common.data import collate_items

    batch = collate_items([{"x": torch.zeros(2), "t": "a", "n": 1, "extra": 5}, {"x": torch.ones(2), "t": "b", "n": 2}])
    assert batch["x"].shape == (2, 2) and batch["t"] == ["a", "b"] and batch["n"].tolist() == [1, 2]
    assert "extra" not in batch


def test_module_fingerprint_handles_zero_dim_buffers():
    from common.data import module_fingerprint

    net = torch.nn.BatchNorm1d(3)
    before = module_fingerprint(net)
    net.num_batches_tracked += 1
    assert module_fingerprint(net) != before


def test_embedding_cache_shards_reuse_and_invalidation(tmp_path):
    import pickle

    from common.data import (
        CachedEmbeddingDataset,
        build_embedding_cache,
        cache_fingerprint,
        dataset_fingerprint,
        module_fingerprint,
    )

    root = write_folder(tmp_path / "d", n=5)
    ds = image_text_dataset(root, 8)
    net = torch.nn.Conv2d(3, 2, 4, stride=4)
    calls = []

    def encode(batch):
        calls.append(len(batch["text"]))
        return {"latents": net(batch["pixel_values"]), "length": torch.tensor([len(t) for t in batch["text"]])}

    fp = cache_fingerprint(module_fingerprint(net), dataset_fingerprint(ds), dtype="fp32")
    cache = tmp_path / "cache"
    build_embedding_cache(ds, encode, cache, fp, batch_size=2, shard_size=3)
    assert calls == [2, 2, 1]
    assert sorted(p.name for p in cache.glob("shard-*.safetensors")) == ["shard-00000.safetensors",
                                                                          "shard-00001.safetensors"]
    build_embedding_cache(ds, encode, cache, fp, batch_size=2, shard_size=3)
    assert calls == [2, 2, 1]  # second run: nothing encoded

    cached = CachedEmbeddingDataset(cache, fingerprint=fp)
    assert len(cached) == 5
    with torch.no_grad():
        expected = net(ds[4]["pixel_values"][None])[0]
    assert torch.allclose(cached[4]["latents"], expected) and cached[4]["length"].item() == len("caption 4")
    assert torch.equal(pickle.loads(pickle.dumps(cached))[3]["latents"], cached[3]["latents"])

    with torch.no_grad():
        net.weight.mul_(2.0)
    fp2 = cache_fingerprint(module_fingerprint(net), dataset_fingerprint(ds), dtype="fp32")
    assert fp2 != fp
    build_embedding_cache(ds, encode, cache, fp2, batch_size=5)
    assert calls == [2, 2, 1, 5]  # recomputed, in one shard now
    assert [p.name for p in cache.glob("shard-*.safetensors")] == ["shard-00000.safetensors"]
    with torch.no_grad():
        doubled = net(ds[4]["pixel_values"][None])[0]
    assert torch.allclose(CachedEmbeddingDataset(cache)[4]["latents"], doubled)
    assert not torch.allclose(doubled, expected)
    with pytest.raises(UserError, match="built for other data or models"):
        CachedEmbeddingDataset(cache, fingerprint=fp)
    with pytest.raises(UserError, match="holds no finished embedding cache"):
        CachedEmbeddingDataset(tmp_path / "nothing")


def test_embedding_cache_failure_leaves_no_partial_cache(tmp_path):
    from common.data import build_embedding_cache

    ds = image_text_dataset(write_folder(tmp_path / "d", n=3), 8)

    def broken(batch):
        if batch["index"][0] >= 2:
            raise RuntimeError("encoder crashed")
        return {"x": batch["pixel_values"].mean((1, 2, 3))}

    with pytest.raises(RuntimeError, match="encoder crashed"):
        build_embedding_cache(ds, broken, tmp_path / "cache", "fp", batch_size=2)
    assert not (tmp_path / "cache").exists() and list(tmp_path.glob(".tmp-*")) == []
