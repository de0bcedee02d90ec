"""Checkpoints of the shared trainer (common/train.py, common/checkpoint.py) under hostile conditions.

No pickle from a checkpoint folder ever runs; a damaged checkpoint is refused with one line naming the file (and
``latest`` falls back to the newest one that verifies); one trainer per output folder (a lock), and a folder of
another run is refused; a full / read-only / forbidden disk during a save is one line, leaves no temporary folder
and keeps the last good checkpoint. Tiny MLPs from tests/test_train.py, CPU, a few seconds each.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from test_train import (
    all_equal,
    base_config,
    make_dataset,
    make_mlp,
    noisy_mse,
    run_training,
    weights,
    worker_env,
)

from common import checkpoint as ckpt_mod
from common import train as train_mod
from common.checkpoint import LOCK_FILE, verify_checkpoint, write_manifest
from common.errors import UserError
from common.train import Trainer, list_checkpoints, resolve_resume_path


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def six_steps(tmp_path: Path, name: str, **overrides):
    """9 -> 6 optimizer steps without accumulation, a checkpoint every 3: checkpoint-3 and checkpoint-6."""
    values = dict(max_train_steps=6, gradient_accumulation_steps=1, checkpointing_steps=3)
    values.update(overrides)
    return base_config(tmp_path, name, **values)


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


class RunsCode:
    """Unpickling this creates ``path`` (a stand-in for any code a hostile checkpoint would run)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished 6-step run (checkpoint-3, checkpoint-6, final weights); tests copy it before damaging it."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    root = tmp_path_factory.mktemp("trained")
    result, _ = run_training(six_steps(root, "run"))
    assert [p.name for p in list_checkpoints(root / "run")] == ["checkpoint-3", "checkpoint-6"]
    return root / "run", weights(result)


def copy_run(trained, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(trained[0], target)
    return target


# --------------------------------------------------------------------------------------------------------------
# no pickles
# --------------------------------------------------------------------------------------------------------------


def test_checkpoint_has_no_pickles_and_a_planted_pickle_never_runs(trained, tmp_path, caplog):
    out = copy_run(trained, tmp_path, "planted")
    checkpoint = out / "checkpoint-6"
    assert not list(checkpoint.glob("*.pkl")), "the trainer wrote a pickle"
    assert {"rng_state_0.safetensors", "ema_model.safetensors", "manifest.json"} <= set(os.listdir(checkpoint))

    marker = tmp_path / "code-ran"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl"):  # what accelerate would unpickle
        torch.save({"shadow_params": RunsCode(str(marker))}, checkpoint / name)

    # Refused by name (even when a re-written manifest lists them), and `latest` falls back to checkpoint-3.
    for rewrite_manifest in (False, True):
        if rewrite_manifest:
            write_manifest(checkpoint)
        with pytest.raises(UserError, match=r"checkpoint-6/custom_checkpoint_0.pkl is a pickle") as info:
            Trainer(six_steps(tmp_path, "planted", resume_from_checkpoint=str(checkpoint)))
        assert "\n" not in str(info.value)
    with caplog.at_level(logging.WARNING, logger="common.train"):
        result, _ = run_training(six_steps(tmp_path, "planted", resume_from_checkpoint="latest"))
    assert "skipping checkpoint-6" in caplog.text and "newest checkpoint that verifies" in caplog.text
    assert result.global_step == 6 and len(result.loss_history) == 3  # resumed from checkpoint-3
    assert not marker.exists(), "a pickle from the checkpoint folder was executed"


# --------------------------------------------------------------------------------------------------------------
# damaged checkpoints
# --------------------------------------------------------------------------------------------------------------


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = {
    # name: (damage(checkpoint), re-write the manifest afterwards?, expected message)
    "missing_file": (lambda c: (c / "optimizer.bin").unlink(), False, r"optimizer.bin is missing"),
    "empty_file": (lambda c: (c / "model.safetensors").write_bytes(b""), False, r"model.safetensors has 0 bytes"),
    "garbled_file": (lambda c: _garble(c / "scheduler.bin"), False, r"scheduler.bin does not match its sha256"),
    "no_manifest": (lambda c: (c / "manifest.json").unlink(), False, r"manifest.json is missing"),
    "garbage_manifest": (lambda c: (c / "manifest.json").write_text("{"), False, r"manifest.json is unreadable"),
    "garbage_rng": (
        lambda c: (c / "rng_state_0.safetensors").write_bytes(b"not an RNG state"),
        True,
        r"rng_state_0.safetensors is not a readable RNG state",
    ),
    "rng_without_keys": (
        lambda c: save_file({"torch_cpu": torch.get_rng_state()}, str(c / "rng_state_0.safetensors"), {"rng": "{}"}),
        True,
        r"rng_state_0.safetensors lacks RNG state keys: numpy_keys",
    ),
    "empty_ema": (
        lambda c: save_file({}, str(c / "ema_model.safetensors"), metadata={"ema": "{}"}),
        True,
        r"ema_model.safetensors lacks EMA state keys: decay",
    ),
    "ema_wrong_type": (
        lambda c: _rewrite_ema(c, optimization_step="7"),
        True,
        r"ema_model.safetensors: EMA optimization_step = '7' is not a int",
    ),
}


def _rewrite_ema(checkpoint: Path, **changes) -> None:
    from safetensors import safe_open

    path = checkpoint / "ema_model.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["ema"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    save_file(tensors, str(path), metadata={"ema": json.dumps({**meta, **changes})})


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_checkpoint_is_refused_with_one_line_naming_the_file(trained, tmp_path, damage):
    out = copy_run(trained, tmp_path, "run")
    checkpoint = out / "checkpoint-6"
    apply, rewrite_manifest, message = DAMAGES[damage]
    apply(checkpoint)
    if rewrite_manifest:  # the file is damaged but the manifest agrees with it: the parse must catch it
        write_manifest(checkpoint)
    with pytest.raises(UserError, match=message) as info:
        Trainer(six_steps(tmp_path, "run", resume_from_checkpoint=str(checkpoint)))
    assert "\n" not in str(info.value) and "checkpoint-6" in str(info.value)
    assert not (out / LOCK_FILE).exists(), "a refused start left its lock behind"
    with pytest.raises(ckpt_mod.CheckpointInvalid):
        verify_checkpoint(checkpoint)


def test_latest_falls_back_to_newest_good_checkpoint_and_resumes_exactly(trained, tmp_path, caplog):
    out = copy_run(trained, tmp_path, "run")
    (out / "checkpoint-6" / "rng_state_0.safetensors").write_bytes(b"garbage")  # damaged newest checkpoint
    (out / "checkpoint-6.tmp").mkdir()  # and an unfinished save: never a candidate
    with caplog.at_level(logging.WARNING, logger="common.train"):
        resumed, _ = run_training(six_steps(tmp_path, "run", resume_from_checkpoint="latest"))
    assert "skipping checkpoint-6" in caplog.text and "rng_state_0.safetensors" in caplog.text
    assert resumed.global_step == 6 and len(resumed.loss_history) == 3  # steps 4..6 from checkpoint-3
    assert all_equal(weights(resumed), trained[1]), "the fallback resume differs from the uninterrupted run"

    # Nothing verifies: refused (not a silent fresh start over the user's checkpoints).
    for checkpoint in list_checkpoints(out):
        (checkpoint / "manifest.json").unlink()
    with pytest.raises(UserError, match=r"no checkpoint in .* verifies"):
        Trainer(six_steps(tmp_path, "run", resume_from_checkpoint="latest"))


# --------------------------------------------------------------------------------------------------------------
# one writer per output folder, one run per output folder
# --------------------------------------------------------------------------------------------------------------


def _lock_record(pid: int) -> str:
    return json.dumps({"pid": pid, "host": socket.gethostname(), "started": "earlier", "token": "x"})


def test_second_trainer_on_the_same_folder_is_refused_and_stale_lock_is_taken_over(tmp_path, caplog):
    config = six_steps(tmp_path, "shared")
    lock = Path(config.output_dir) / LOCK_FILE
    first = Trainer(config)
    try:
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["started"]
        with pytest.raises(UserError, match=r"is in use by another trainer \(pid \d+ on") as info:
            Trainer(six_steps(tmp_path, "shared"))
        assert "\n" not in str(info.value)
        assert lock.exists(), "the refused trainer removed the holder's lock"
    finally:
        first.close()
    assert not lock.exists(), "close() did not release the lock"

    # A lock left by a process that died (SIGKILL): recognised as stale and taken over.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(_lock_record(dead.pid))
    with caplog.at_level(logging.WARNING, logger="common.checkpoint"):
        result, _ = run_training(six_steps(tmp_path, "shared", max_train_steps=1))
    assert result.completed and "stale lock" in caplog.text
    assert not lock.exists()


def test_second_trainer_process_exits_2_with_one_line(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / LOCK_FILE).write_text(_lock_record(holder.pid))
        script = tmp_path / "start.py"
        script.write_text(
            textwrap.dedent(
                """
                import sys
                from common.errors import cli_entry
                from common.train import TrainConfig, Trainer

                @cli_entry
                def main():
                    with Trainer(TrainConfig(output_dir=sys.argv[1], report_to="none")):
                        pass

                main()
                """
            )
        )
        proc = subprocess.run(
            [sys.executable, str(script), str(out)], env=worker_env(), capture_output=True, text=True, timeout=180
        )
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and f"pid {holder.pid}" in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid  # the holder's lock is untouched


def test_temporary_names_are_per_writer_and_a_live_writers_save_is_never_removed(tmp_path, monkeypatch):
    config = six_steps(tmp_path, "tmpnames", max_train_steps=3)
    out = Path(config.output_dir)
    out.mkdir()
    host = ckpt_mod.writer_token().rsplit("-", 2)[0]
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    in_progress = out / f"checkpoint-3.tmp-{host}-{live.pid}-0123abcd"  # another writer's save in progress
    abandoned = out / f"checkpoint-2.tmp-{host}-{dead.pid}-0123abcd"  # a killed writer's leftover
    for folder in (in_progress, abandoned):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    written = []
    original = Accelerator.save_state
    monkeypatch.setattr(Accelerator, "save_state", lambda self, d, **kw: written.append(d) or original(self, d, **kw))
    try:
        run_training(config)
    finally:
        live.kill()
        live.wait()
    assert len(written) == 1
    assert re.fullmatch(rf"checkpoint-3\.tmp-{re.escape(host)}-{os.getpid()}-[0-9a-f]{{8}}", Path(written[0]).name)
    assert (in_progress / "model.safetensors").read_bytes() == b"partial"
    assert not abandoned.exists()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3"]


def test_folder_of_a_different_run_is_refused_unless_resumed(trained, tmp_path, caplog):
    out = copy_run(trained, tmp_path, "other")
    before = {c.name: folder_digest(c) for c in list_checkpoints(out)}
    with pytest.raises(UserError, match=r"holds checkpoints of a different run \(checkpoint-6") as info:
        run_training(six_steps(tmp_path, "other", learning_rate=1e-3))  # another run: not rotated over
    assert "--resume_from_checkpoint latest" in str(info.value) and "\n" not in str(info.value)
    assert {c.name: folder_digest(c) for c in list_checkpoints(out)} == before
    assert not (out / LOCK_FILE).exists()

    # The same run started afresh is allowed (as before, with a warning); asking to resume the other run is too.
    with caplog.at_level(logging.WARNING, logger="common.train"):
        same, _ = run_training(six_steps(tmp_path, "other", max_train_steps=2))
        assert same.completed and "already has checkpoints of this run" in caplog.text
        resumed, _ = run_training(
            six_steps(tmp_path, "other", learning_rate=1e-3, max_train_steps=7, resume_from_checkpoint="latest")
        )
    assert resumed.global_step == 7 and "different learning_rate" in caplog.text


# --------------------------------------------------------------------------------------------------------------
# disk faults
# --------------------------------------------------------------------------------------------------------------


def _fail_in_second_checkpoint(real, exc):
    """Wrap a writer: while saving checkpoint-6 it writes half a file, then fails with ``exc``."""

    def fake(*args, **kwargs):
        path = next((Path(a) for a in args if isinstance(a, (str, os.PathLike))), None)
        if path is not None and "checkpoint-6" in str(path):
            if not path.is_dir():
                path.write_bytes(b"half a file")
            raise exc
        return real(*args, **kwargs)

    return fake


@pytest.mark.parametrize(
    ("target", "exc", "reason"),
    [
        ("torch.save", OSError(errno.ENOSPC, "No space left on device"), "ENOSPC"),
        ("torch.save", RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4480 vs 4374"),
         "unexpected pos"),
        ("safetensors", OSError(errno.EROFS, "Read-only file system"), "EROFS"),
        ("manifest", PermissionError(errno.EACCES, "Permission denied"), "EACCES"),
    ],
)  # fmt: skip
def test_disk_fault_during_save_is_one_line_no_tmp_and_last_checkpoint_kept(tmp_path, monkeypatch, target, exc, reason):
    config = six_steps(tmp_path, "disk")
    out = Path(config.output_dir)
    if target == "torch.save":  # accelerate writes optimizer.bin / scheduler.bin with torch.save
        monkeypatch.setattr(torch, "save", _fail_in_second_checkpoint(torch.save, exc))
    elif target == "safetensors":  # RNG / EMA states
        monkeypatch.setattr(ckpt_mod, "save_file", _fail_in_second_checkpoint(ckpt_mod.save_file, exc))
    else:  # the last file of a checkpoint
        real = train_mod.write_manifest
        monkeypatch.setattr(train_mod, "write_manifest", _fail_in_second_checkpoint(real, exc))
    snapshot = {}

    def loss_fn(batch, ctx):  # remember checkpoint-3 byte for byte once it exists
        if ctx.step == 4 and not snapshot:
            snapshot.update(folder_digest(out / "checkpoint-3"))
        return noisy_mse(batch, ctx)

    with pytest.raises(UserError) as info:
        run_training(config, loss_fn=loss_fn)
    message = str(info.value)
    assert "\n" not in message
    assert re.search(r"^cannot write checkpoint \S*/disk/checkpoint-6: ", message), message
    assert reason in message and "free now" in message, message
    needed = re.search(r"about ([\d.]+) (KB|MB) free", message)
    assert needed and float(needed[1]) * 1024 ** (1 + (needed[2] == "MB")) >= sum(
        p.stat().st_size for p in (out / "checkpoint-3").iterdir()
    ), message  # asks for at least a checkpoint's size
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-3"]
    assert folder_digest(out / "checkpoint-3") == snapshot  # the last good checkpoint, untouched
    verify_checkpoint(out / "checkpoint-3")
    assert not (out / LOCK_FILE).exists()
    monkeypatch.undo()
    assert resolve_resume_path("latest", out) == out / "checkpoint-3"  # and it is what a resume picks


def test_disk_fault_during_final_export_is_one_line(tmp_path):
    """A script exports inside ``with Trainer(...)``: a full disk there is one line naming the file, lock released."""
    config = six_steps(tmp_path, "export", max_train_steps=1, checkpointing_steps=100)
    target = Path(config.output_dir) / "unet" / "diffusion_pytorch_model.safetensors"

    def export_to_full_disk(model):
        target.parent.mkdir(parents=True, exist_ok=True)
        raise OSError(errno.ENOSPC, "No space left on device", str(target))  # what open()/write() raise

    with pytest.raises(UserError) as info:
        with Trainer(config) as trainer:
            result = trainer.fit(make_mlp(), noisy_mse, make_dataset())
            export_to_full_disk(result.models["model"])
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"cannot write {target}: No space left on device (ENOSPC)")
    assert re.search(r"about [\d.]+ (KB|MB) free \([\d.]+ [KMGT]?B free now\)", message), message
    assert not (Path(config.output_dir) / LOCK_FILE).exists()

    with pytest.raises(ValueError, match="not a disk fault"):  # other errors pass through unchanged
        with Trainer(six_steps(tmp_path, "export2", max_train_steps=1)):
            raise ValueError("not a disk fault")


def test_checkpoint_size_estimate_covers_the_written_checkpoint(trained):
    """The free space a disk-fault message asks for is not below what a checkpoint really takes."""
    checkpoint = trained[0] / "checkpoint-6"
    written = sum(p.stat().st_size for p in checkpoint.iterdir())
    params = sum(p.numel() for p in make_mlp().parameters()) * 4
    # weights + AdamW moments (2x) + EMA + 1 MB: the estimate in Trainer._checkpoint_bytes
    assert params * 4 + (1 << 20) >= written
    assert np.isfinite(written) and written > params * 4


# --------------------------------------------------------------------------------------------------------------
# two processes: each rank writes its RNG state, rank 0 the rest and the manifest; resume is exact
# --------------------------------------------------------------------------------------------------------------

DDP_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from accelerate.state import AcceleratorState, GradientState
    from torch import nn
    from torch.utils.data import TensorDataset
    from common.train import TrainConfig, Trainer

    torch.set_num_threads(1)
    root = sys.argv[1]

    def loss_fn(batch, ctx):
        x, y = batch
        pred = ctx.models["model"](x + 0.05 * torch.randn_like(x))  # per-rank noise: the RNG states matter
        return nn.functional.mse_loss(pred, y)

    def train(out_dir, resume):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(16, 4, generator=g)
        config = TrainConfig(output_dir=out_dir, seed=3, train_batch_size=4, max_train_steps=4, use_ema=True,
                             learning_rate=5e-2, lr_warmup_steps=0, checkpointing_steps=2, report_to="none",
                             resume_from_checkpoint=resume)
        with Trainer(config) as trainer:
            model = nn.Sequential(nn.Linear(4, 16), nn.SiLU(), nn.Linear(16, 2))
            result = trainer.fit(model, loss_fn, TensorDataset(x, torch.tanh(x[:, :2])))
            if trainer.is_main_process:
                params = [p.detach().flatten().tolist() for p in result.models["model"].parameters()]
                with open(os.path.join(out_dir, "result.json"), "w") as fh:
                    json.dump({"params": params, "history": result.loss_history}, fh)
        assert result.exit_code == 0

    # One launch, two runs on one process group (kept open in between): straight to step 4, then resumed from
    # its checkpoint-2 into another folder.
    destroy = torch.distributed.destroy_process_group
    torch.distributed.destroy_process_group = lambda *a, **k: None
    train(os.path.join(root, "straight"), None)
    torch.distributed.destroy_process_group = destroy
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    train(os.path.join(root, "resumed"), os.path.join(root, "straight", "checkpoint-2"))
    """
)


def test_two_process_checkpoints_verify_and_resume_exactly(tmp_path):
    worker = tmp_path / "ddp_worker.py"
    worker.write_text(DDP_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
           str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    straight = json.loads((tmp_path / "straight" / "result.json").read_text())
    resumed = json.loads((tmp_path / "resumed" / "result.json").read_text())

    checkpoint = tmp_path / "straight" / "checkpoint-2"
    files = set(json.loads((checkpoint / "manifest.json").read_text())["files"])
    assert {"rng_state_0.safetensors", "rng_state_1.safetensors", "ema_model.safetensors"} <= files
    assert not list(checkpoint.glob("*.pkl"))
    verify_checkpoint(checkpoint)
    assert straight["history"][2:] == resumed["history"]
    assert straight["params"] == resumed["params"], "two-process resume is not exact"
