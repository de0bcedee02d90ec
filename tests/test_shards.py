"""Streaming from tar shards (common/shards.py): every sample once per epoch across ranks and workers, an exact
resume by position after a kill, and the shard writer (scripts/make_shards.py)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from script_loading import load_script

from common.errors import UserError
from common.shards import SHARD_INDEX, ShardStream, scan_shard, write_shards
from common.train import TrainConfig, Trainer


REPO_ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def png(value: int, size: int = 8) -> bytes:
    rng = np.random.default_rng(value)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_shards(folder: Path, n: int = 24, per_shard: int = 5) -> Path:
    """``n`` samples (random 8x8 images, caption "sample <i>") in shards of ``per_shard`` (uneven last shard)."""
    items = ({"key": f"s{i:04d}", "image": png(i), "text": f"sample {i}", "json": {"number": i}} for i in range(n))
    return write_shards(items, folder, samples_per_shard=per_shard)


def test_shards_roundtrip_and_index(tmp_path):
    out = make_shards(tmp_path / "shards", n=12, per_shard=5)
    index = json.loads((out / SHARD_INDEX).read_text())
    assert [s["count"] for s in index["shards"]] == [5, 5, 2] and index["num_samples"] == 12
    assert [s.key for s in scan_shard(out / "shard-00002.tar")] == ["s0010", "s0011"]
    stream = ShardStream(out, 8)
    assert len(stream) == 12
    item = stream[7]
    assert (item["index"], item["number"], item["text"], item["key"]) == (7, 7, "sample 7", "s0007")
    expected = torch.from_numpy(np.asarray(Image.open(io.BytesIO(png(7))), np.float32) / 127.5 - 1).permute(2, 0, 1)
    torch.testing.assert_close(item["pixel_values"], expected)
    # iterating gives every sample once, shard-local: all of one shard before the next
    order = [it["index"] for it in stream]
    assert sorted(order) == list(range(12)) and order != list(range(12))
    shard_of = [i // 5 for i in order]
    assert sum(a != b for a, b in zip(shard_of, shard_of[1:])) == 2
    assert len(ShardStream(out, 8, max_samples=7)) == 7


def test_bad_shards_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="no .tar shards"):
        ShardStream(tmp_path, 8)
    bad = tmp_path / "bad"
    bad.mkdir()
    with tarfile.open(bad / "a.tar", "w") as tar:  # a sample with a caption but no image
        info = tarfile.TarInfo("k1.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    stream = ShardStream(bad, 8)
    with pytest.raises(UserError, match=r"a.tar: sample 'k1' has no image"):
        stream[0]
    (bad / "b.tar.gz").write_bytes(b"\x1f\x8b not a tar")
    with pytest.raises(UserError, match="not an uncompressed tar shard"):
        ShardStream(bad / "b.tar.gz", 8)


def test_workers_do_not_change_the_batch_order(tmp_path):
    """Batch j is built by worker j % num_workers and handed back in order: 0, 1 or 2 workers, one sequence."""
    stream = ShardStream(make_shards(tmp_path / "shards", n=17, per_shard=4), 8, random_flip=True, center_crop=False)
    runs = {}
    for workers in (0, 2):
        loader = stream.make_loader(batch_size=3, rank=0, world=1, num_workers=workers, seed=5)
        loader.set_epoch(1)
        batches = list(loader)
        runs[workers] = ([b["index"].tolist() for b in batches], torch.cat([b["pixel_values"] for b in batches]))
        loader.start_at(2)  # a resume at batch 2: the tail of the same sequence, the same augmentation
        tail = list(loader)
        assert [b["index"].tolist() for b in tail] == runs[workers][0][2:]
        torch.testing.assert_close(torch.cat([b["pixel_values"] for b in tail]), runs[workers][1][6:], rtol=0, atol=0)
    assert runs[0][0] == runs[2][0] and torch.equal(runs[0][1], runs[2][1])
    assert sorted(sum(runs[0][0], [])) == list(range(17)) and len(runs[0][0]) == 6


# ---------------------------------------------------------------------------------------------- the trainer


class PixelMean(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)

    def forward(self, pixels):
        return self.linear(pixels.mean((2, 3)))


def train_on_shards(tmp_path: Path, shards: Path, name: str, kill_at: int | None = None, **overrides):
    """Train 10 steps (batch 4 of 24 samples: 6 steps per epoch, so the run crosses into epoch 2); returns the
    sample ids of every step and the final weights."""
    config = TrainConfig(output_dir=str(tmp_path / name), seed=3, train_batch_size=4, max_train_steps=10,
                         learning_rate=1e-2, checkpointing_steps=2, report_to="none", **overrides)
    seen: list[list[int]] = []

    def loss_fn(batch, ctx):
        seen.append(batch["index"].tolist())
        if kill_at is not None and ctx.step + 1 == kill_at and len(seen) == kill_at:
            os.kill(os.getpid(), signal.SIGTERM)
        noise = 0.01 * torch.randn(batch["pixel_values"].shape[0], 1)
        return (ctx.models["model"](batch["pixel_values"]) + noise).pow(2).mean()

    stream = ShardStream(shards, 8, random_flip=True, center_crop=False)
    with Trainer(config) as trainer:
        result = trainer.fit(PixelMean(), loss_fn, stream)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return seen, result, [p.detach().clone() for p in result.models["model"].parameters()]


def test_kill_and_resume_continue_exactly_where_the_stream_stopped(tmp_path):
    shards = make_shards(tmp_path / "shards")
    straight, result, straight_weights = train_on_shards(tmp_path, shards, "straight")
    assert result.completed and len(straight) == 10
    assert sorted(sum(straight[:6], [])) == list(range(24))  # epoch 1: every sample once
    assert sum(straight[6:], []) != sum(straight[:4], [])  # epoch 2 is reshuffled

    first, result, _ = train_on_shards(tmp_path, shards, "killed", kill_at=4)  # mid-epoch 1
    assert result.stop_reason == "SIGTERM" and result.global_step == 4
    resumed, result, resumed_weights = train_on_shards(tmp_path, shards, "killed", resume_from_checkpoint="latest")
    assert result.completed
    assert first + resumed == straight  # the same samples in the same order, none repeated or skipped
    assert all(torch.equal(a, b) for a, b in zip(resumed_weights, straight_weights))

    # Negative control: a resume that restarts the epoch instead of starting at the position sees other ids.
    original = ShardStream.make_loader

    def no_position(self, **kwargs):
        loader = original(self, **kwargs)
        loader.start_at = lambda batch: None
        return loader

    ShardStream.make_loader = no_position
    try:
        replayed, _, _ = train_on_shards(tmp_path, shards, "killed", resume_from_checkpoint=str(
            tmp_path / "killed" / "checkpoint-4"))
    finally:
        ShardStream.make_loader = original
    assert first + replayed != straight


def test_an_iterable_dataset_without_positions_is_refused(tmp_path):
    class Plain(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield {"pixel_values": torch.zeros(3, 8, 8)}

    config = TrainConfig(output_dir=str(tmp_path / "out"), max_train_steps=1, report_to="none")
    with Trainer(config) as trainer, pytest.raises(UserError, match="cannot resume by position: stream tar shards"):
        trainer.fit(PixelMean(), lambda batch, ctx: batch["pixel_values"].sum(), Plain())


WORKER = textwrap.dedent("""
    import json, sys
    import torch
    from common.shards import ShardStream
    from common.train import TrainConfig, Trainer

    shards, out = sys.argv[1], sys.argv[2]
    config = TrainConfig(output_dir=out, seed=3, train_batch_size=3, max_train_steps=8, learning_rate=1e-2,
                         checkpointing_steps=100, report_to="none")
    seen = []

    def loss_fn(batch, ctx):
        seen.append(batch["index"].tolist())
        return ctx.models["model"](batch["pixel_values"].mean((2, 3))).pow(2).mean()

    with Trainer(config) as trainer:
        trainer.fit(torch.nn.Linear(3, 1), loss_fn, ShardStream(shards, 8))
        rank = trainer.accelerator.process_index
    with open(f"{out}/seen-{rank}.json", "w") as handle:
        json.dump(seen, handle)
""")


def test_two_processes_over_shards_see_each_sample_once_per_epoch(tmp_path):
    shards = make_shards(tmp_path / "shards", n=24, per_shard=5)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
           str(shards), str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "run" / f"seen-{r}.json").read_text()) for r in (0, 1)]
    assert [len(steps) for steps in ranks] == [8, 8]  # 12 samples per rank and epoch, batch 3: 4 steps per epoch
    for epoch in (0, 1):
        ids = [i for steps in ranks for batch in steps[4 * epoch: 4 * epoch + 4] for i in batch]
        assert sorted(ids) == list(range(24)), f"epoch {epoch}: {sorted(ids)}"
    epoch_orders = [[i for batch in ranks[0][4 * e: 4 * e + 4] for i in batch] for e in (0, 1)]
    assert epoch_orders[0] != epoch_orders[1]


def test_make_shards_writes_an_image_folder_with_masks(tmp_path, capsys):
    folder = tmp_path / "folder"
    (folder / "masks").mkdir(parents=True)
    rows = []
    for i in range(5):
        Image.open(io.BytesIO(png(i))).save(folder / f"{i}.jpg")
        Image.fromarray((np.arange(64).reshape(8, 8) % 3 == 0).astype(np.uint8)).save(folder / "masks" / f"{i}.png")
        rows.append({"file_name": f"{i}.jpg", "text": f"photo {i}", "mask_file_name": f"masks/{i}.png", "label": i})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    make = load_script("scripts/make_shards.py").main
    args = ["--train_data_dir", str(folder), "--samples_per_shard", "2"]
    assert make(args + ["--output_dir", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == [f"shard-0000{i}.tar" for i in range(3)]
    stream = ShardStream(tmp_path / "out", 8, num_mask_classes=2)
    item = stream[3]
    assert (item["text"], item["label"]) == ("photo 3", 3)
    assert (folder / "3.jpg").read_bytes() in (tmp_path / "out" / "shard-00001.tar").read_bytes()  # not re-encoded
    assert item["mask"].tolist() == (torch.arange(64).reshape(8, 8) % 3 == 0).long().tolist()
    # a folder without captions is refused with one line naming the fix
    (folder / "metadata.jsonl").unlink()
    with pytest.raises(SystemExit) as exit_info:
        make(args + ["--output_dir", str(tmp_path / "out2")])
    assert exit_info.value.code == 2 and "metadata.jsonl or metadata.csv" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


def test_a_training_script_streams_shards(tmp_path):
    """A trainer's command line with --train_shards (the VAE trainer: the cheapest of the image trainers), 2 steps."""
    from tiny_data import write_captioned_images

    folder = write_captioned_images(tmp_path / "folder", count=8, size=16)
    make = load_script("scripts/make_shards.py").main
    assert make(["--train_data_dir", str(folder), "--output_dir", str(tmp_path / "shards"),
                 "--samples_per_shard", "3"]) == 0
    train = load_script("scripts/train_vae.py").main
    assert train(["--train_shards", str(tmp_path / "shards"), "--resolution", "16", "--num_validation_images", "2",
                  "--output_dir", str(tmp_path / "out"), "--max_train_steps", "2", "--train_batch_size", "4",
                  "--lr_warmup_steps", "0", "--report_to", "none"]) == 0
    assert (tmp_path / "out" / "diffusion_pytorch_model.safetensors").is_file()
