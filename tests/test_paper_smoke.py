"""The paper-scale smoke driver (scripts/ci/paper_smoke.py, `make paper-smoke`) kept from rotting on tiny configs.

The full run builds the paper-size networks and takes minutes per stage; here the same stage code runs on a tiny
config, through the driver's subprocess path once, and the estimate-and-skip path is checked to refuse a stage
over the budget with one line and without starting anything.
"""

from __future__ import annotations

import math
import subprocess

import pytest
from script_loading import load_script


@pytest.fixture(scope="module")
def smoke():
    return load_script("scripts/ci/paper_smoke.py")


def _opts(smoke, *argv):
    return smoke.build_parser().parse_args(list(argv))


def test_every_method_has_paper_stages(smoke):
    names = {(s.method, s.kind) for s in smoke.STAGES}
    for method in smoke.METHODS:
        assert (method, "train") in names and (method, "sample") in names, method
        assert (smoke.ROOT / "configs" / method / "paper.yaml").is_file()


def test_tiny_stage_takes_one_training_step(smoke):
    """The stage code itself (builders, the method's loss, common.train.Trainer) on the tiny codiff config."""
    opts = _opts(smoke, "--config", "configs/codiff/tiny.yaml", "--methods", "codiff", "--threads", "1")
    stage = smoke.find("codiff", "train_mask")
    cfg = smoke.load_config(smoke.config_path("codiff", opts))
    out = stage.run(cfg, opts)
    assert out["train_s"] > 0
    assert math.isfinite(out["loss"]) and out["loss"] > 0
    plan = stage.plan(cfg, opts)
    assert plan.trainable == out["trainable"]  # the meta-device count is what the run trained
    assert 0 < plan.total_gb() < 2


def test_text_vae_step_with_gradient_checkpointing(smoke):
    """The Optimus VAE under the trainer's --gradient_checkpointing keeps its memory injection (GPT-2's own switch
    used to drop it: the step failed on the attention mask's extra memory slot)."""
    opts = _opts(smoke, "--config", "configs/versatile/tiny.yaml", "--methods", "versatile")
    cfg = smoke.load_config(smoke.config_path("versatile", opts))
    out = smoke.find("versatile", "train_text_vae").run(cfg, opts)
    assert out["train_s"] > 0 and math.isfinite(out["loss"])


def test_without_optimizer_fallback_runs_forward_and_backward(smoke):
    """An over-budget stage's fallback: same modules and loss, gradients computed, no optimizer step."""
    opts = _opts(smoke, "--config", "configs/shifted/tiny.yaml", "--methods", "shifted", "--without_optimizer")
    cfg = smoke.load_config(smoke.config_path("shifted", opts))
    out = smoke.find("shifted", "prior").run(cfg, opts)
    assert out["without_optimizer"] and out["train_s"] > 0 and math.isfinite(out["loss"])


def test_driver_runs_a_stage_in_a_subprocess(smoke, tmp_path):
    """One whole driver round: estimate, subprocess, result line, table row with the stage's own peak RSS."""
    rows_file = tmp_path / "rows.json"
    code = smoke.main(["--config", "configs/shifted/tiny.yaml", "--methods", "shifted", "--stages", "prior",
                       "--threads", "1", "--json", str(rows_file)])
    assert code == 0
    import json

    (row,) = json.loads(rows_file.read_text())
    assert row["stage"] == "shifted:prior" and row["status"].startswith("ok")
    assert row["train_s"] > 0 and math.isfinite(row["loss"])
    assert 0.1 < row["peak_rss_gb"] < row["estimate_gb"] + 1.0
    assert "| shifted:prior |" in smoke.format_table([row])


def test_over_budget_stage_is_skipped_with_one_line(smoke, monkeypatch):
    def no_process(*args, **kwargs):
        raise AssertionError("a skipped stage must not start a process")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    opts = _opts(smoke, "--config", "configs/codiff/tiny.yaml", "--methods", "codiff", "--max_memory_gb", "0.5")
    row = smoke.run_stage(smoke.find("codiff", "train_mask"), opts)
    status = row["status"]
    assert "\n" not in status
    assert status.startswith("skipped: needs ~")
    assert "would need --max_memory_gb 2 (budget 0.5 GB)" in status
    assert "train_s" not in row and "peak_rss_gb" not in row


def test_skip_reason_names_what_does_not_fit(smoke):
    billion = 1_000_000_000
    plan = smoke.Plan(trainable=billion, frozen=billion // 2, ema=True, activations_gb=1.0, setting="x")
    gb = 4 * billion / 1024**3
    assert plan.total_gb() == pytest.approx(1.5 * gb + gb + 2 * gb + gb + 1.0 + smoke.BASE_GB)
    assert smoke.skip_reason(plan, plan.total_gb() + 0.1) is None
    reason = smoke.skip_reason(plan, 12.0)  # weights + grads + activations fit, AdamW moments and EMA do not
    assert "the AdamW state (and EMA) do not fit" in reason
    assert f"would need --max_memory_gb {math.ceil(plan.total_gb())}" in reason
    assert "AdamW state" not in smoke.skip_reason(plan, 4.0)
