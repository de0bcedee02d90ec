"""Tests of the shared training loop (common/train.py): tiny models, CPU, seconds each.

In-process runs share accelerate's singletons (AcceleratorState, GradientState); an autouse fixture resets them
so every test starts from a fresh process-like state. The multi-process and real-signal tests start their own
interpreters (a worker script written to tmp_path) because torchrun and an external SIGTERM need a process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from torch import nn
from torch.utils.data import TensorDataset

from common import train as train_mod
from common.checkpoint import write_manifest
from common.errors import UserError
from common.train import (
    LossOutput,
    TrainConfig,
    Trainer,
    add_train_args,
    config_from_args,
    list_checkpoints,
    parse_args_with_config,
    resolve_resume_path,
)


REPO_ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


# --------------------------------------------------------------------------------------------------------------
# tiny problem: a dropout MLP regressing a fixed target, plus fresh noise in the loss (RNG inside the step)
# --------------------------------------------------------------------------------------------------------------


def make_mlp(hidden: int = 16, dropout: float = 0.25) -> nn.Module:
    return nn.Sequential(nn.Linear(4, hidden), nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden, 2))


def make_dataset(n: int = 13) -> TensorDataset:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, torch.tanh(x[:, :2] * 1.5) + 0.1 * torch.randn(n, 2, generator=g))


def noisy_mse(batch, ctx):
    """Uses the global RNG inside the step (like a diffusion loss drawing noise/timesteps)."""
    x, y = batch
    pred = ctx.models["model"](x + 0.05 * torch.randn_like(x))
    return LossOutput(nn.functional.mse_loss(pred, y), logs={"pred_std": pred.std()})


def base_config(tmp_path: Path, name: str, **overrides) -> TrainConfig:
    values = dict(
        output_dir=str(tmp_path / name),
        seed=7,
        train_batch_size=3,
        max_train_steps=9,
        gradient_accumulation_steps=2,
        learning_rate=3e-2,
        lr_scheduler="cosine",
        lr_warmup_steps=2,
        use_ema=True,
        ema_decay=0.9,
        checkpointing_steps=3,
        report_to="none",
    )
    values.update(overrides)
    return TrainConfig(**values)


def run_training(config: TrainConfig, loss_fn=noisy_mse, **fit_kwargs):
    """Build the model after the Trainer (as scripts do) and train; returns (result, EMA shadow params)."""
    with Trainer(config) as trainer:
        model = make_mlp()
        result = trainer.fit(model, loss_fn, make_dataset(), **fit_kwargs)
        ema = [p.detach().clone() for p in trainer._emas["model"].shadow_params] if trainer._emas else []
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return result, ema


def weights(result) -> list[torch.Tensor]:
    return [p.detach().clone() for p in result.models["model"].parameters()]


def all_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def sigterm_at(step: int):
    """A loss_fn that sends this process SIGTERM while computing step ``step`` (1-based): a kill mid-run."""
    sent = []

    def loss_fn(batch, ctx):
        if ctx.step + 1 == step and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return noisy_mse(batch, ctx)

    return loss_fn


# --------------------------------------------------------------------------------------------------------------
# 1. smoke: a tiny diffusers UNet, 2 steps, checkpoint + logs + validation grid + summary
# --------------------------------------------------------------------------------------------------------------


def test_two_step_smoke_writes_checkpoint_logs_and_validation(tmp_path):
    from diffusers import UNet2DModel
    from PIL import Image

    config = base_config(
        tmp_path, "smoke", max_train_steps=2, checkpointing_steps=2, validation_steps=1, train_batch_size=2,
        gradient_accumulation_steps=1, gradient_checkpointing=True, report_to="tensorboard",
    )  # fmt: skip
    seen_modes = []

    def loss_fn(batch, ctx):
        (x,) = batch
        t = torch.randint(0, 1000, (x.shape[0],))
        noise = torch.randn_like(x)
        return nn.functional.mse_loss(ctx.models["unet"](x + noise, t).sample, noise)

    def validation_fn(step, models):
        seen_modes.append(models["unet"].training)
        with torch.no_grad():
            out = models["unet"](torch.randn(2, 3, 8, 8), torch.tensor([10, 10])).sample
        images = [Image.fromarray((o.clamp(-1, 1).permute(1, 2, 0).numpy() * 127 + 128).astype(np.uint8)) for o in out]
        return {"samples": images, "out_mean": float(out.mean())}

    with Trainer(config) as trainer:
        unet = UNet2DModel(
            sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4,
        )  # fmt: skip
        data = TensorDataset(torch.randn(6, 3, 8, 8))
        result = trainer.fit({"unet": unet}, loss_fn, data, validation_fn=validation_fn)
        assert unet.is_gradient_checkpointing
        # The returned module is the unwrapped one and carries the EMA weights (what save_pretrained should write).
        assert result.models["unet"] is unet
        shadow = trainer._emas["unet"].shadow_params
        assert all(torch.equal(p, s) for p, s in zip(unet.parameters(), shadow))

    out = Path(config.output_dir)
    assert result.completed and result.global_step == 2 and result.exit_code == 0
    assert seen_modes == [False, False]  # validated at steps 1 and 2, in eval mode
    ckpt = out / "checkpoint-2"
    for name in ("model.safetensors", "optimizer.bin", "scheduler.bin", "rng_state_0.safetensors",
                 "ema_unet.safetensors", "trainer_state.json", "manifest.json"):  # fmt: skip
        assert (ckpt / name).is_file(), name
    assert not list(ckpt.glob("*.pkl")), "a checkpoint holds a pickle"
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 2
    assert list((out / "logs").rglob("events.out.tfevents*")), "no tensorboard event file"
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-1", "step-2"]
    assert sorted(p.name for p in (out / "validation" / "step-2").iterdir()) == [
        "samples-000.png",
        "samples-001.png",
        "samples-grid.png",
    ]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["samples_per_second"] > 0 and summary["peak_memory_mb"] > 0
    assert len(result.loss_history) == 2 and all(np.isfinite(result.loss_history))


# --------------------------------------------------------------------------------------------------------------
# 2. exact resume: N straight == N/2, SIGTERM, resume latest to N (dropout + noise + shuffle + accumulation + EMA)
# --------------------------------------------------------------------------------------------------------------
#
# 13 samples / batch 3 = 5 batches per epoch; accumulation 2 -> optimizer steps after batches 2, 4 and 5 (the last
# one syncs at the end of the data), 3 steps per epoch, 9 steps = 3 shuffled epochs. The kill lands in step 4,
# the first step of epoch 1, so the resumed run must skip the 2 batches of epoch 1 it already consumed, in epoch
# 1's shuffled order, and continue the RNG stream that dropout and the loss noise draw from. The cosine schedule
# with warmup, AdamW moments and the EMA (decay warm-up depends on its step count) all carry state too.


def test_exact_resume_after_sigterm_matches_uninterrupted_run(tmp_path, monkeypatch):
    straight, straight_ema = run_training(base_config(tmp_path, "straight"))
    assert straight.completed and straight.global_step == 9

    first, _ = run_training(base_config(tmp_path, "killed"), loss_fn=sigterm_at(4))
    assert (first.global_step, first.stop_reason, first.exit_code, first.completed) == (4, "SIGTERM", 143, False)
    killed_dir = Path(tmp_path / "killed")
    assert [p.name for p in list_checkpoints(killed_dir)] == ["checkpoint-3", "checkpoint-4"]

    resumed, resumed_ema = run_training(base_config(tmp_path, "killed", resume_from_checkpoint="latest"))
    assert resumed.completed and resumed.global_step == 9
    assert first.loss_history + resumed.loss_history == straight.loss_history  # every step's loss, exactly
    assert all_equal(weights(resumed), weights(straight)), "resumed weights differ from the uninterrupted run"
    assert all_equal(resumed_ema, straight_ema), "resumed EMA differs from the uninterrupted run"
    assert not all_equal(weights(resumed), [p.detach() for p in make_mlp().parameters()])  # it did train

    # Negative controls: the comparison above is sensitive to both things a resume must restore.
    checkpoint_4 = str(killed_dir / "checkpoint-4")

    # (a) RNG not restored: undo accelerate's RNG restore right after load_state -> dropout/noise draws differ.
    original_resume = Trainer._resume

    def resume_without_rng(self, *args):
        states = torch.get_rng_state(), np.random.get_state(), random.getstate()
        step = original_resume(self, *args)
        torch.set_rng_state(states[0]), np.random.set_state(states[1]), random.setstate(states[2])
        return step

    monkeypatch.setattr(Trainer, "_resume", resume_without_rng)
    no_rng, _ = run_training(base_config(tmp_path, "no_rng", resume_from_checkpoint=checkpoint_4))
    monkeypatch.undo()
    assert no_rng.global_step == 9 and not all_equal(weights(no_rng), weights(straight))

    # (b) data position not restored: replay epoch 1 from its first batch -> different batches per step.
    original_batches = Trainer._epoch_batches
    monkeypatch.setattr(Trainer, "_epoch_batches", lambda self, dl, epoch, skip: original_batches(self, dl, epoch, 0))
    no_skip, _ = run_training(base_config(tmp_path, "no_skip", resume_from_checkpoint=checkpoint_4))
    monkeypatch.undo()
    assert no_skip.global_step == 9 and not all_equal(weights(no_skip), weights(straight))


def test_validation_and_data_loading_do_not_perturb_training_randomness(tmp_path):
    """Validation (and its RNG use) runs in its own RNG scope: the training trajectory is the same with or without."""
    plain, _ = run_training(base_config(tmp_path, "plain", max_train_steps=4))

    def greedy_validation(step, models):
        torch.rand(1000), np.random.rand(10), random.random()  # consumes every global RNG
        return {"score": 1.0}

    validated, _ = run_training(
        base_config(tmp_path, "val", max_train_steps=4, validation_steps=1), validation_fn=greedy_validation
    )
    assert validated.loss_history == plain.loss_history
    assert all_equal(weights(validated), weights(plain))


# --------------------------------------------------------------------------------------------------------------
# 3. two processes (gloo) with batch B/2 each == one process with batch B
# --------------------------------------------------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    from common.train import TrainConfig, Trainer

    torch.set_num_threads(1)
    mode, out_dir, batch, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    resume = sys.argv[5] if len(sys.argv) > 5 else None

    def make_model():
        return nn.Sequential(nn.Linear(4, 16), nn.SiLU(), nn.Linear(16, 2))

    def data():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(16, 4, generator=g)
        return TensorDataset(x, torch.tanh(x[:, :2]))

    def loss_fn(batch, ctx):
        if mode == "slow":
            time.sleep(0.05)
            if ctx.step >= 3:
                open(os.path.join(out_dir, "RUNNING"), "w").close()
        x, y = batch
        return nn.functional.mse_loss(ctx.models["model"](x), y)

    config = TrainConfig(output_dir=out_dir, seed=3, train_batch_size=batch, max_train_steps=steps,
                         learning_rate=5e-2, lr_warmup_steps=0, checkpointing_steps=1000, report_to="none",
                         resume_from_checkpoint=resume)
    with Trainer(config) as trainer:
        result = trainer.fit(make_model(), loss_fn, data())
        if trainer.is_main_process:
            params = [p.detach().flatten().tolist() for p in result.models["model"].parameters()]
            with open(os.path.join(out_dir, "result.json"), "w") as fh:
                json.dump({"history": result.loss_history, "params": params, "step": result.global_step,
                           "num_processes": trainer.accelerator.num_processes}, fh)
    assert not torch.distributed.is_initialized()
    sys.exit(result.exit_code)
    """
)


def write_worker(tmp_path: Path) -> Path:
    path = tmp_path / "train_worker.py"
    path.write_text(WORKER)
    return path


def worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def test_two_processes_match_one_process(tmp_path):
    worker = write_worker(tmp_path)
    steps = 4  # 16 samples: 2 steps per epoch, so epoch 2's reshuffle is compared too
    for name, nproc, batch in (("single", 1, 8), ("ddp", 2, 4)):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(worker), "plain", str(tmp_path / name), str(batch), str(steps)]  # fmt: skip
        proc = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
    single = json.loads((tmp_path / "single" / "result.json").read_text())
    ddp = json.loads((tmp_path / "ddp" / "result.json").read_text())
    assert (single["num_processes"], ddp["num_processes"]) == (1, 2)
    assert ddp["step"] == single["step"] == steps
    np.testing.assert_allclose(ddp["history"], single["history"], rtol=0, atol=1e-5)
    for a, b in zip(ddp["params"], single["params"]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert single["history"][-1] < single["history"][0]


# --------------------------------------------------------------------------------------------------------------
# 4. rotation, .tmp leftovers, bad resume paths
# --------------------------------------------------------------------------------------------------------------


def test_rotation_keeps_total_limit_and_latest_ignores_tmp(tmp_path):
    config = base_config(tmp_path, "rot", max_train_steps=5, gradient_accumulation_steps=1, checkpointing_steps=1,
                         checkpoints_total_limit=2)  # fmt: skip
    out = Path(config.output_dir)
    out.mkdir(parents=True)
    (out / "checkpoint-1.tmp").mkdir()  # a save killed half-way in an earlier run: removed by the next save
    run_training(config)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-5"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-4",
        "checkpoint-5",
    ]

    (out / "checkpoint-99.tmp").mkdir()  # a newer, unfinished save must not be picked by "latest"
    (out / "checkpoint-99.tmp" / "model.safetensors").write_bytes(b"partial")
    assert resolve_resume_path("latest", out) == out / "checkpoint-5"
    assert resolve_resume_path("checkpoint-4", out) == out / "checkpoint-4"  # a name inside output_dir
    assert resolve_resume_path("latest", tmp_path / "empty") is None  # nothing yet: fresh start


def test_bad_resume_paths_are_one_line_user_errors(tmp_path):
    good = base_config(tmp_path, "src", max_train_steps=2, gradient_accumulation_steps=1, checkpointing_steps=2)
    run_training(good)
    checkpoint = Path(good.output_dir) / "checkpoint-2"

    with pytest.raises(UserError, match="no such checkpoint folder"):
        Trainer(base_config(tmp_path, "a", resume_from_checkpoint=str(tmp_path / "missing")))
    foreign = tmp_path / "not-ours"
    foreign.mkdir()
    (foreign / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="not a checkpoint of this trainer"):
        Trainer(base_config(tmp_path, "b", resume_from_checkpoint=str(foreign)))

    # A checkpoint of another model (hidden width 32 instead of 16): refused before anything is loaded.
    with Trainer(base_config(tmp_path, "c", resume_from_checkpoint=str(checkpoint))) as trainer:
        with pytest.raises(UserError, match="different run") as info:
            trainer.fit(make_mlp(hidden=32), noisy_mse, make_dataset())
        assert "\n" not in str(info.value)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()

    # A truncated weights file (disk full, copy interrupted): a UserError naming the checkpoint, not a traceback.
    weights_file = checkpoint / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:100])
    with pytest.raises(UserError, match=r"checkpoint-2/model.safetensors has 100 bytes, the manifest says") as info:
        Trainer(base_config(tmp_path, "d", resume_from_checkpoint=str(checkpoint)))  # refused by its manifest
    assert "\n" not in str(info.value)
    # Even with a manifest that matches the damage (re-written by hand), loading fails with one line.
    write_manifest(checkpoint)
    with Trainer(base_config(tmp_path, "d", resume_from_checkpoint=str(checkpoint))) as trainer:
        with pytest.raises(UserError, match="cannot resume from .*checkpoint-2") as info:
            trainer.fit(make_mlp(), noisy_mse, make_dataset())
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------------------------
# 5. a real SIGTERM from outside: checkpoint, exit 143, resume continues
# --------------------------------------------------------------------------------------------------------------


def test_external_sigterm_writes_checkpoint_and_resume_continues(tmp_path):
    worker = write_worker(tmp_path)
    out = tmp_path / "job"
    out.mkdir()
    cmd = [sys.executable, str(worker), "slow", str(out), "4", "500"]
    proc = subprocess.Popen(cmd, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "RUNNING").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "worker never reached step 3"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "SIGTERM: finishing the current step" in stderr
    checkpoints = list_checkpoints(out)
    assert len(checkpoints) == 1 and not list(out.glob("*.tmp"))
    stopped_at = json.loads((checkpoints[0] / "trainer_state.json").read_text())["global_step"]
    assert 4 <= stopped_at < 500

    # Resume in a second process, two more steps: it continues from the checkpoint, not from scratch.
    cmd = [sys.executable, str(worker), "plain", str(out), "4", str(stopped_at + 2), "latest"]
    done = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["step"] == stopped_at + 2 and len(result["history"]) == 2


# --------------------------------------------------------------------------------------------------------------
# 6. mixed precision on CPU
# --------------------------------------------------------------------------------------------------------------


def test_bf16_runs_a_step_on_cpu_and_fp16_is_refused(tmp_path):
    seen = []

    def loss_fn(batch, ctx):
        x, y = batch
        hidden = trainer_box[0].unwrap(ctx.models["model"])[0]  # accelerate casts the model *outputs* back to fp32,
        handle = hidden.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))  # so look inside
        pred = ctx.models["model"](x)
        handle.remove()
        seen.append(pred.dtype)
        return nn.functional.mse_loss(pred, y)

    trainer_box = []
    config = base_config(tmp_path, "bf16", mixed_precision="bf16", max_train_steps=1, gradient_accumulation_steps=1)
    with Trainer(config) as trainer:
        trainer_box.append(trainer)
        result = trainer.fit(make_mlp(), loss_fn, make_dataset())
    assert result.completed and np.isfinite(result.loss_history[0])
    assert seen == [torch.bfloat16, torch.float32]  # autocast inside, fp32 outputs (accelerate's wrapper)
    assert all(p.dtype == torch.float32 for p in result.models["model"].parameters())  # fp32 master weights
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        Trainer(base_config(tmp_path, "fp16", mixed_precision="fp16"))


# --------------------------------------------------------------------------------------------------------------
# flags, YAML config, validation
# --------------------------------------------------------------------------------------------------------------


def test_flags_yaml_config_and_command_line_precedence(tmp_path):
    yaml_file = tmp_path / "tiny.yaml"
    yaml_file.write_text("learning_rate: 1e-3\nuse_ema: true\nmax_train_steps: 50\nmethod_flag: 7\n")
    parser = argparse.ArgumentParser()
    add_train_args(parser, defaults={"train_batch_size": 4})
    parser.add_argument("--method_flag", type=int, default=1)

    args = parse_args_with_config(parser, ["--config", str(yaml_file), "--max_train_steps", "60", "--no-use_ema"])
    config = config_from_args(args)
    assert config.learning_rate == 1e-3  # "1e-3" is a str in YAML 1.1; the flag's type converts it
    assert (config.max_train_steps, config.use_ema, config.train_batch_size) == (60, False, 4)
    assert args.method_flag == 7
    assert config_from_args(parse_args_with_config(parser, [])).learning_rate == 1e-4

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("learning_rat: 1e-3\n")
    with pytest.raises(UserError, match="unknown keys learning_rat"):
        parse_args_with_config(parser, ["--config", str(bad_yaml)])
    with pytest.raises(UserError, match="no such file"):
        parse_args_with_config(parser, ["--config", str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_train_steps": -5}, "--max_train_steps must be >= 1"),
        ({"checkpointing_steps": 0}, "--checkpointing_steps must be >= 1"),
        ({"lr_warmup_steps": -1}, "--lr_warmup_steps must be >= 0"),
        ({"lr_scheduler": "cosine_annealing"}, "unknown --lr_scheduler 'cosine_annealing'"),
        ({"mixed_precision": "fp8"}, "--mixed_precision must be one of no, fp16, bf16"),
        ({"use_8bit_adam": True}, "bitsandbytes"),
    ],
)
def test_invalid_settings_are_user_errors(tmp_path, overrides, message, monkeypatch):
    # The 8-bit Adam case checks the message for a machine without bitsandbytes, whether or not this one has it.
    monkeypatch.setattr(train_mod, "_importable", lambda name: False if name == "bitsandbytes" else True)
    with pytest.raises(UserError, match=message):
        base_config(tmp_path, "x", **overrides).validate()


def test_request_stop_checkpoints_and_exits_zero(tmp_path):
    trainer_box = []

    def loss_fn(batch, ctx):
        if ctx.step == 1:
            trainer_box[0].request_stop()
        return noisy_mse(batch, ctx)

    config = base_config(tmp_path, "req", gradient_accumulation_steps=1, checkpointing_steps=100)
    with Trainer(config) as trainer:
        trainer_box.append(trainer)
        result = trainer.fit(make_mlp(), loss_fn, make_dataset())
    assert (result.global_step, result.stop_reason, result.exit_code) == (2, "requested", 0)
    assert result.last_checkpoint == Path(config.output_dir) / "checkpoint-2"
