"""bench/contextdiff_arms.py: the arms are trained at equal budget with the flags they claim, and the paired
statistics are right (closed forms on constructed correctness tables)."""

import sys
from pathlib import Path

import numpy as np
import pytest


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import contextdiff_arms as arms  # noqa: E402


@pytest.mark.parametrize("world", ["digits", "pairs"])
@pytest.mark.parametrize("arm", ["simple", "simple_t", "elbo", "elbo_t"])
def test_contextdiff_arm_commands_parse_to_the_claimed_objective_and_adapter(world, arm):
    from common.train import parse_args_with_config
    from contextdiff.training import build_parser

    stage1, stage2 = arms.commands(world, arm, seed=2)
    a1 = parse_args_with_config(build_parser(1), stage1[2:])
    a2 = parse_args_with_config(build_parser(2), stage2[2:])
    objective = "elbo" if arm.startswith("elbo") else "simple"
    assert a1.objective == a2.objective == objective
    assert a1.adapter_time_aware is arm.endswith("_t")
    assert a1.freeze_unet is True  # stage 1 trains the adapter only: the UNet's steps are stage 2's
    assert a1.seed == a2.seed == 2
    assert a1.pretrained_model_name_or_path == a2.pretrained_model_name_or_path == arms.WORLDS[world]["start"]
    assert a1.train_data_dir == a2.train_data_dir == f"{arms.WORLDS[world]['data']}/train"
    assert Path(a2.adapter_path) == Path(a1.output_dir)
    assert (a1.max_train_steps, a2.max_train_steps) == (arms.STAGE1, arms.STAGE2)
    assert a1.train_batch_size == a2.train_batch_size == 64


def test_plain_arm_gets_the_same_number_of_steps_batch_and_start():
    from common.train import parse_args_with_config

    sys.path.insert(0, str(REPO / "scripts"))
    import train_text_to_image

    (plain,) = arms.commands("pairs", "plain", seed=1)
    args = parse_args_with_config(train_text_to_image.build_parser(), plain[2:])
    stage2 = parse_args_with_config(__import__("contextdiff.training", fromlist=["x"]).build_parser(2),
                                    arms.commands("pairs", "elbo", seed=1)[1][2:])
    assert args.max_train_steps == arms.STAGE1 + arms.STAGE2
    assert args.pretrained_model_name_or_path == arms.WORLDS["pairs"]["start"]
    for key in ("train_batch_size", "learning_rate", "use_ema", "ema_decay", "seed", "lr_scheduler"):
        assert getattr(args, key) == getattr(stage2, key), key


def test_paired_stats_identical_arms_have_a_zero_interval():
    rng = np.random.default_rng(0)
    a = (rng.random((3, 50)) < 0.7).astype(float)
    s = arms.paired_stats(a, a.copy())
    assert s["diff"] == s["boot_lo"] == s["boot_hi"] == 0.0
    assert s["t_lo"] == pytest.approx(0.0) and s["t_hi"] == pytest.approx(0.0)


def test_paired_stats_closed_forms():
    # 3 seeds x 100 prompts; the arm fixes 10, 20, 30 prompts the other gets wrong (per-seed gains 0.1, 0.2, 0.3).
    b = np.zeros((3, 100))
    a = np.zeros((3, 100))
    for seed, fixed in enumerate((10, 20, 30)):
        a[seed, :fixed] = 1
    s = arms.paired_stats(a, b, reps=4000)
    assert s["diff"] == pytest.approx(0.2)
    assert s["per_seed"] == [0.1, 0.2, 0.3]
    half = 4.302652729911275 * 0.1 / np.sqrt(3)  # t_{0.975, 2} * sd / sqrt(n)
    assert (s["t_lo"], s["t_hi"]) == (pytest.approx(0.2 - half), pytest.approx(0.2 + half))
    # Bootstrap over prompts of the seed-mean: per prompt 1, 2/3, 1/3, 0 on 10 / 10 / 10 / 70 prompts.
    per_prompt = a.mean(0)
    se = per_prompt.std() / np.sqrt(100)
    assert s["boot_lo"] < 0.2 < s["boot_hi"]
    assert s["boot_lo"] == pytest.approx(0.2 - 1.96 * se, abs=0.02)
    assert s["boot_hi"] == pytest.approx(0.2 + 1.96 * se, abs=0.02)
    one = arms.paired_stats(a[:1], b[:1], reps=1000)
    assert one["t_lo"] is None and one["diff"] == pytest.approx(0.1)


def _judged(correct, binding=None, diag=True):
    out = {"both_accuracy": float(np.mean(correct)), "correct": list(map(int, correct))}
    if binding is not None:
        out.update(binding_accuracy=float(np.mean(binding)), binding_correct=list(map(int, binding)))
    if diag:
        one = {"r_abs": 0.1, "cos_r_x0": 0.0, "affine_r2": 0.0, "r_hat_rel_err": 0.1}
        out["diagnostics"] = {"x0_abs": 0.9, "t100": one, "t500": one, "t900": one}
    return out


def test_report_compares_pairs_on_colour_binding_and_the_whole_prompt(tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.setattr(arms, "RUNS", tmp_path)
    monkeypatch.setattr(arms, "N_PROMPTS", 4)
    rows = {  # per seed: (whole prompt right, colours in place) over 4 prompts
        "plain": [([0, 0, 0, 0], [1, 0, 0, 1]), ([0, 0, 0, 0], [1, 0, 1, 0])],
        "elbo": [([1, 0, 0, 0], [1, 1, 1, 1]), ([0, 0, 0, 0], [1, 1, 1, 1])],
    }
    for arm, seeds in rows.items():
        for seed, (correct, binding) in enumerate(seeds):
            d = arms.run_dir("pairs", arm, seed)
            d.mkdir(parents=True)
            (d / "judged.json").write_text(json.dumps(_judged(correct, binding, diag=arm != "plain")))
    arms.report(type("A", (), {"no_write": True})())
    table = capsys.readouterr().out
    # colours in place: plain 50 % on both seeds, elbo 100 %: +50 points; whole prompt: 0 % vs 12.5 %: +12.5
    assert "| pairs | colours in place | elbo | [0, 1] | 100.0 % (100.0, 100.0) | +50.0 [" in table
    assert "| pairs | whole prompt | elbo | [0, 1] | 12.5 % (25.0, 0.0) | +12.5 [" in table
    assert "| pairs | colours in place | plain | [0, 1] | 50.0 % (50.0, 50.0) |" in table


def test_judge_rows_counts_colour_binding_per_prompt_on_pairs(monkeypatch):
    import common.judge

    rows = [{"left_digit": 1, "left_color": "red", "right_digit": 2, "right_color": "blue"}] * 3
    predicted = [(1, "red", 2, "blue"), (7, "red", 7, "blue"), (1, "blue", 2, "red")]
    monkeypatch.setattr(common.judge, "judge_pair_images", lambda arrays, targets: {
        "predicted": predicted, "left_digit_accuracy": 0, "right_digit_accuracy": 0, "left_color_accuracy": 0,
        "right_color_accuracy": 0, "binding_accuracy": 0, "both_accuracy": 0})
    import torch

    out = arms.judge_rows("pairs", torch.zeros(3, 3, 4, 4), rows)
    assert out["correct"] == [1, 0, 0]
    assert out["binding_correct"] == [1, 1, 0]
