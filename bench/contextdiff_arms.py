"""ContextDiff's claim at equal budget: five arms x training seeds x two worlds, judged on the same prompts and noise.

    python bench/contextdiff_arms.py train  --world digits --arm elbo_t --seed 0   # one training run (skips if done)
    python bench/contextdiff_arms.py judge  --world digits --arm elbo_t --seed 0   # sample + judge it
    python bench/contextdiff_arms.py run    --world digits --seeds 0 1 2            # train + judge every arm
    python bench/contextdiff_arms.py report [--no_write]                            # paired statistics -> records

Arms, all starting from the world's tiny baseline (``ckpt/tiny/baseline`` or ``ckpt/tiny/pairs/baseline``) with the
same batch (64), learning rates, EMA and data cache, and the same total number of optimizer steps:

- ``plain``: the baseline UNet fine-tuned plainly (``scripts/train_text_to_image.py``) for STAGE1 + STAGE2 steps;
- ``simple`` / ``simple_t``: ContextDiff with today's objective (shifted-eps MSE, r term off), adapter t-free / fed t;
- ``elbo`` / ``elbo_t``: the same with ``--objective elbo`` (the shifted process's bound, one joint term per step).

A ContextDiff arm is stage 1 (adapter, UNet frozen, STAGE1 steps) then stage 2 (UNet on the adapter's process,
STAGE2 steps). Training seed = ``--seed`` (initialisation, batches, noise); sampling is identical for every arm and
seed: the world's N_PROMPTS evaluation prompts, x_T from seed 0, 25 DDIM steps, CFG 3. Each run leaves
``outputs/contextdiff_arms/<world>/<arm>/seed<k>/judged.json`` with per-prompt correctness and, for ContextDiff arms,
the diagnostics of its adapter on held-out latents (|r|, |x0|, cos(r, x0), share of r's variance that is an affine
function of x0, and |r_phi(x0_hat) - r_phi(x0)| / |r| along the chain).

``report`` pairs every ContextDiff arm with ``plain`` prompt by prompt: the difference of both-correct rates
(averaged over the seeds both arms have) with a 95 % paired bootstrap interval over prompts, and a 95 % t interval
over training seeds of the per-seed differences.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common.metrics.intervals import bootstrap_mean


REPO = Path(__file__).resolve().parent.parent
RUNS = REPO / "outputs" / "contextdiff_arms"
SECTION = "contextdiff: the claim at equal budget (five arms, training seeds, digits and digits-pairs)"
ARMS = ("plain", "simple", "simple_t", "elbo", "elbo_t")
STAGE1, STAGE2 = 60, 120  # adapter steps, then UNet steps; ``plain`` gets STAGE1 + STAGE2 UNet steps
N_PROMPTS = 300
SAMPLING_SEED = 0
WORLDS = {
    "digits": {"data": "data/digits", "start": "ckpt/tiny/baseline"},
    "pairs": {"data": "data/digits_pairs", "start": "ckpt/tiny/pairs/baseline"},
}
COMMON = ["--train_batch_size", "64", "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--cache_latents",
          "--checkpointing_steps", "100000", "--validation_steps", "100000"]


def run_dir(world: str, arm: str, seed: int) -> Path:
    return RUNS / world / arm / f"seed{seed}"


def checkpoint_of(world: str, arm: str, seed: int) -> Path:
    d = run_dir(world, arm, seed)
    if arm == "plain":
        return d / "train"
    # stage 2 writes its checkpoint at its output folder; runs from before that change hold it in pipeline/
    return d / "stage2" / "pipeline" if (d / "stage2" / "pipeline").is_dir() else d / "stage2"


def commands(world: str, arm: str, seed: int) -> list[list[str]]:
    w, d = WORLDS[world], run_dir(world, arm, seed)
    data, cache = f"{w['data']}/train", str(RUNS / world / "cache")
    py = sys.executable
    if arm == "plain":
        return [[py, "scripts/train_text_to_image.py", "--pretrained_model_name_or_path", w["start"],
                 "--train_data_dir", data, "--output_dir", str(d / "train"), "--resolution", "32",
                 "--learning_rate", "1e-4", "--max_train_steps", str(STAGE1 + STAGE2), "--use_ema",
                 "--ema_decay", "0.999", "--proportion_empty_prompts", "0.1", "--cache_dir", cache,
                 "--seed", str(seed), *COMMON]]
    objective = arm.split("_")[0]
    time_flag = "--adapter_time_aware" if arm.endswith("_t") else "--no-adapter_time_aware"
    stage1 = [py, "scripts/contextdiff/train_adapter.py", "--config", "configs/contextdiff/train_adapter_tiny.yaml",
              "--pretrained_model_name_or_path", w["start"], "--train_data_dir", data,
              "--output_dir", str(d / "stage1"), "--max_train_steps", str(STAGE1), "--objective", objective,
              time_flag, "--cache_dir", cache, "--seed", str(seed), *COMMON]
    stage2 = [py, "scripts/contextdiff/finetune_diffusion.py", "--config",
              "configs/contextdiff/finetune_diffusion_tiny.yaml", "--pretrained_model_name_or_path", w["start"],
              "--adapter_path", str(d / "stage1"), "--train_data_dir", data, "--output_dir", str(d / "stage2"),
              "--max_train_steps", str(STAGE2), "--objective", objective, "--cache_dir", cache, "--seed", str(seed),
              *COMMON]
    return [stage1, stage2]


def train(world: str, arm: str, seed: int) -> None:
    done = run_dir(world, arm, seed) / "trained.json"
    if done.is_file():
        print(f"[{world} {arm} seed {seed}] already trained")
        return
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for cmd in commands(world, arm, seed):
        print(f"[{world} {arm} seed {seed}] " + " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    done.write_text(json.dumps({"seconds": round(time.perf_counter() - start, 1),
                                "commands": [" ".join(["python", *c[1:]]) for c in commands(world, arm, seed)]},
                               indent=1) + "\n")


def prompts(world: str) -> list[dict]:
    if world == "digits":
        from common.digits import evaluation_prompts

        return evaluation_prompts(N_PROMPTS)
    from common.digits_pairs import pair_prompts

    return pair_prompts(N_PROMPTS)


def judge_rows(world: str, images: torch.Tensor, rows: list[dict]) -> dict:
    """Per-prompt correctness (``correct``: the whole prompt right) and the summary of the world's judge."""
    from common.judge import judge_images, judge_pair_images

    arrays = [np.round(im.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8) for im in images]
    if world == "digits":
        s = judge_images(arrays, [(r["digit"], r["color"]) for r in rows])
        correct = [int(d == r["digit"] and c == r["color"])
                   for d, c, r in zip(s["predicted_digits"], s["predicted_colors"], rows)]
        summary = {k: s[k] for k in ("digit_accuracy", "color_accuracy", "both_accuracy")}
    else:
        s = judge_pair_images(arrays, [(r["left_digit"], r["left_color"], r["right_digit"], r["right_color"])
                                       for r in rows])
        correct = [int(tuple(p) == (r["left_digit"], r["left_color"], r["right_digit"], r["right_color"]))
                   for p, r in zip(s["predicted"], rows)]
        binding = [int(p[1] == r["left_color"] and p[3] == r["right_color"]) for p, r in zip(s["predicted"], rows)]
        summary = {k: s[k] for k in ("left_digit_accuracy", "right_digit_accuracy", "left_color_accuracy",
                                     "right_color_accuracy", "binding_accuracy", "both_accuracy")}
        return {**summary, "correct": correct, "binding_correct": binding}
    return {**summary, "correct": correct}


@torch.no_grad()
def diagnostics(model, world: str, n: int = 256) -> dict:
    """The adapter on held-out latents: scale, alignment with x0 and its affine share, and r(x0_hat) vs r(x0)."""
    from common.data import image_text_dataset
    from common.process import Shift, q_sample, x0_from_eps
    from common.schedule import NoiseSchedule
    from contextdiff.pipeline import encode_clip, encode_images
    from contextdiff.process import contextual_k, is_time_aware

    data = REPO / WORLDS[world]["data"] / "test"
    dataset = image_text_dataset(data, resolution=32)
    texts = [json.loads(line)["text"] for line in (data / "metadata.jsonl").read_text().splitlines()[:n]]
    x0 = encode_images(model.vae, torch.stack([dataset[i]["pixel_values"] for i in range(len(texts))]) / 2 + 0.5)
    text = encode_clip(model.text_encoder, model.tokenizer, texts)
    schedule = NoiseSchedule.from_config(model.scheduler_config)
    k = contextual_k(model.k_schedule, model.k_scale)
    time_aware = is_time_aware(model.adapter)

    def r_of(x, abar):
        return model.adapter(x, text, abar=abar.reshape(-1)) if time_aware else model.adapter(x, text)

    out = {"x0_abs": float(x0.abs().mean())}
    for t in (100, 500, 900):
        tt = torch.full((len(texts),), t)
        abar = schedule.abar(tt, like=x0)
        r = r_of(x0, abar)
        flat_r, flat_x = r.flatten(1), x0.flatten(1)
        # Affine share: r per position as A x0 + b (A a 4x4 channel map shared over positions), R^2 of the fit.
        rc = r.permute(0, 2, 3, 1).reshape(-1, r.shape[1]).double()
        xc = torch.cat([x0.permute(0, 2, 3, 1).reshape(-1, x0.shape[1]).double(), torch.ones(rc.shape[0], 1,
                                                                                            dtype=torch.double)], 1)
        fit = xc @ torch.linalg.lstsq(xc, rc).solution
        r2 = 1 - float((rc - fit).pow(2).sum() / (rc - rc.mean(0)).pow(2).sum())
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t))
        x_t = q_sample(x0, abar, noise, Shift(k=k), m=r)
        x0_hat = x0_from_eps(x_t, model.unet(x_t, tt, encoder_hidden_states=text).sample, abar)
        out[f"t{t}"] = {"r_abs": float(r.abs().mean()),
                        "cos_r_x0": float(torch.nn.functional.cosine_similarity(flat_r, flat_x, dim=1).mean()),
                        "affine_r2": round(r2, 4),
                        "r_hat_rel_err": float((r_of(x0_hat, abar) - r).abs().mean() / r.abs().mean()),
                        "x0_hat_rel_err": float((x0_hat - x0).abs().mean() / x0.abs().mean())}
        if not time_aware:  # the same r at every t
            out["t_free"] = True
    return out


def judge(world: str, arm: str, seed: int) -> dict:
    from contextdiff.checkpoint import load_contextdiff
    from contextdiff.sample_cli import EVAL_SAMPLING, sample

    out = run_dir(world, arm, seed) / "judged.json"
    if out.is_file():
        return json.loads(out.read_text())
    start = time.perf_counter()
    rows = prompts(world)
    plain = arm == "plain"
    model = load_contextdiff(checkpoint_of(world, arm, seed), require_adapter=not plain)
    images = sample(model, [r["text"] for r in rows], steps=EVAL_SAMPLING["steps"],
                    guidance_scale=EVAL_SAMPLING["guidance_scale"], seed=SAMPLING_SEED, no_shift=plain, chunk=100)
    result = judge_rows(world, images, rows)
    if not plain:
        result["diagnostics"] = diagnostics(model, world)
    from torchvision.utils import save_image

    save_image(images[:100], run_dir(world, arm, seed) / "grid.png", nrow=10)
    result["seconds"] = round(time.perf_counter() - start, 1)
    out.write_text(json.dumps(result) + "\n")
    print(f"[{world} {arm} seed {seed}] both-correct {result['both_accuracy']:.3f} ({result['seconds']} s)",
          flush=True)
    return result


# ------------------------------------------------------------------------------------------------------- report


def paired_stats(a: np.ndarray, b: np.ndarray, reps: int = 10000, seed: int = 0) -> dict:
    """``a``, ``b``: ``[seeds, prompts]`` 0/1 correctness of two arms on the same prompts and noise, seed-paired.

    diff = mean(a) - mean(b); ``boot``: 95 % percentile interval resampling prompts (the seed-mean per prompt is the
    unit); ``t``: 95 % t interval over the per-seed differences (None with one seed)."""
    diff, boot_lo, boot_hi = bootstrap_mean(a.mean(0) - b.mean(0), reps, seed)
    per_seed = a.mean(1) - b.mean(1)
    out = {"diff": diff, "boot_lo": boot_lo, "boot_hi": boot_hi, "per_seed": [round(float(v), 4) for v in per_seed],
           "t_lo": None, "t_hi": None}
    if len(per_seed) > 1:
        from scipy.stats import t as student

        half = student.ppf(0.975, len(per_seed) - 1) * per_seed.std(ddof=1) / math.sqrt(len(per_seed))
        out["t_lo"], out["t_hi"] = float(per_seed.mean() - half), float(per_seed.mean() + half)
    return out


def load_judged(world: str, arm: str) -> dict[int, dict]:
    found = {}
    for d in sorted((RUNS / world / arm).glob("seed*")):
        if (d / "judged.json").is_file():
            found[int(d.name[4:])] = json.loads((d / "judged.json").read_text())
    return found


# What each world's comparison counts per prompt: (key in judged.json, summary rate, label). On digits-pairs the
# baseline's digits are near chance at the budget this machine allows, so the part of the prompt it can render,
# both colours on their sides (colour binding), is compared first; the whole prompt is reported beside it.
METRICS = {
    "digits": [("correct", "both_accuracy", "both-correct")],
    "pairs": [("binding_correct", "binding_accuracy", "colours in place"), ("correct", "both_accuracy", "whole prompt")],
}


def report(args) -> None:
    from records import write_records  # bench/records.py: this script's folder is on sys.path

    command = "OMP_NUM_THREADS=1 python bench/contextdiff_arms.py run --world WORLD --seeds 0 1 2 && " \
              "python bench/contextdiff_arms.py report"
    budget = f"{STAGE1} adapter + {STAGE2} UNet steps vs plain {STAGE1 + STAGE2} UNet steps, batch 64"
    records, summary = [], {}
    for world in WORLDS:
        judged = {arm: load_judged(world, arm) for arm in ARMS}
        if not judged["plain"]:
            continue
        summary[world] = {}
        for key, rate, label in METRICS[world]:
            per_arm = summary[world][label] = {}
            for arm in ARMS:
                seeds = sorted(judged[arm])
                if not seeds:
                    continue
                acc = [judged[arm][s][rate] for s in seeds]
                entry = {"seeds": seeds, "accuracy": [round(v, 4) for v in acc]}
                records.append(dict(
                    name=f"[{world}] {arm}: {label}, mean over training seeds {seeds} ({N_PROMPTS} prompts; {budget})",
                    value=round(100 * float(np.mean(acc)), 1), unit="%", command=command, section=SECTION))
                if arm != "plain":
                    common = [s for s in seeds if s in judged["plain"]]
                    a = np.array([judged[arm][s][key] for s in common], dtype=float)
                    b = np.array([judged["plain"][s][key] for s in common], dtype=float)
                    stats = paired_stats(a, b)
                    entry["vs_plain"] = stats
                    t_part = (f"; seed t 95% [{100 * stats['t_lo']:+.1f}, {100 * stats['t_hi']:+.1f}]"
                              if stats["t_lo"] is not None else "; one seed, no t interval")
                    records.append(dict(
                        name=f"[{world}] {arm} minus plain, {label}, paired on seeds {common} x {N_PROMPTS} prompts "
                             "(95% paired bootstrap over prompts; t interval over seeds)",
                        value=f"{100 * stats['diff']:+.1f} [{100 * stats['boot_lo']:+.1f}, "
                              f"{100 * stats['boot_hi']:+.1f}]" + t_part, unit="points", command=command,
                        section=SECTION))
                    entry["diagnostics"] = [judged[arm][s]["diagnostics"] for s in seeds]
                per_arm[arm] = entry
            # The factors head to head: objective (elbo vs simple) and time input (t-aware vs t-free).
            for a_name, b_name in (("elbo", "simple"), ("elbo_t", "simple_t"), ("simple_t", "simple"),
                                   ("elbo_t", "elbo")):
                common = [s for s in sorted(judged[a_name]) if s in judged[b_name]]
                if not common:
                    continue
                stats = paired_stats(np.array([judged[a_name][s][key] for s in common], dtype=float),
                                     np.array([judged[b_name][s][key] for s in common], dtype=float))
                per_arm.setdefault("contrasts", {})[f"{a_name} minus {b_name}"] = stats
                records.append(dict(
                    name=f"[{world}] {a_name} minus {b_name}, {label}, paired on seeds {common} x {N_PROMPTS} "
                         "prompts (95% paired bootstrap over prompts)",
                    value=f"{100 * stats['diff']:+.1f} [{100 * stats['boot_lo']:+.1f}, {100 * stats['boot_hi']:+.1f}]",
                    unit="points", command=command, section=SECTION))
        # The adapter's diagnostics do not depend on the metric: once per arm.
        for arm in ARMS[1:]:
            seeds = sorted(judged[arm])
            if not seeds:
                continue
            diag = [judged[arm][s]["diagnostics"] for s in seeds]
            for t in ("t100", "t500", "t900"):
                mean = {k: float(np.mean([d[t][k] for d in diag])) for k in diag[0][t]}
                records.append(dict(
                    name=f"[{world}] {arm} adapter at {t.replace('t', 't=')} on 256 test latents (mean over "
                         f"seeds {seeds}; |x0| = {np.mean([d['x0_abs'] for d in diag]):.2f}): |r| / cos(r, x0) / "
                         "affine R^2 of r on x0 / |r(x0_hat) - r(x0)|/|r|",
                    value=f"{mean['r_abs']:.3f} / {mean['cos_r_x0']:.2f} / {mean['affine_r2']:.2f} / "
                          f"{mean['r_hat_rel_err']:.2f}", unit="", command=command, section=SECTION))
    print(markdown_table(summary))
    if not args.no_write:
        (RUNS / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        write_records(records, replace_section=SECTION)  # the section is this bench's current state only


def markdown_table(summary: dict) -> str:
    """The comparison as a markdown table (for METHOD.md): one row per world, metric and arm."""
    lines = ["| world | metric | arm | seeds | rate: mean (per seed) | minus plain, 95 % bootstrap over prompts | "
             "95 % t over seeds | r at t=500: abs(r) / cos(r, x0) / affine R^2 / r(x0_hat) error |",
             "|---|---|---|---|---|---|---|---|"]
    for world, per_metric in summary.items():
        for metric, per_arm in per_metric.items():
            for arm, e in per_arm.items():
                if arm == "contrasts":
                    lines += [f"| {world} | {metric} | {name} | | | {100 * v['diff']:+.1f} [{100 * v['boot_lo']:+.1f}, "
                              f"{100 * v['boot_hi']:+.1f}] (head to head) | | |" for name, v in e.items()]
                    continue
                acc = (f"{100 * np.mean(e['accuracy']):.1f} % "
                       f"({', '.join(f'{100 * v:.1f}' for v in e['accuracy'])})")
                vs, t_part, diag = "", "", ""
                if "vs_plain" in e:
                    v = e["vs_plain"]
                    vs = f"{100 * v['diff']:+.1f} [{100 * v['boot_lo']:+.1f}, {100 * v['boot_hi']:+.1f}]"
                    t_part = ("n/a (1 seed)" if v["t_lo"] is None
                              else f"[{100 * v['t_lo']:+.1f}, {100 * v['t_hi']:+.1f}]")
                    d = [x["t500"] for x in e["diagnostics"]]
                    x0 = np.mean([x["x0_abs"] for x in e["diagnostics"]])
                    diag = (f"{np.mean([x['r_abs'] for x in d]):.2f} (abs(x0) {x0:.2f}) / "
                            f"{np.mean([x['cos_r_x0'] for x in d]):.2f} / {np.mean([x['affine_r2'] for x in d]):.2f}"
                            f" / {np.mean([x['r_hat_rel_err'] for x in d]):.2f}")
                lines.append(f"| {world} | {metric} | {arm} | {e['seeds']} | {acc} | {vs} | {t_part} | {diag} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("train", "judge", "run", "report"))
    p.add_argument("--world", choices=tuple(WORLDS), default="digits")
    p.add_argument("--arm", choices=ARMS, default="plain")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--no_write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.command == "report":
        return report(args)
    jobs = [(args.arm, args.seed)] if args.command in ("train", "judge") else \
        [(arm, seed) for seed in args.seeds for arm in args.arms]
    for arm, seed in jobs:
        run_dir(args.world, arm, seed).mkdir(parents=True, exist_ok=True)
        if args.command != "judge":
            train(args.world, arm, seed)
        if args.command != "train":
            judge(args.world, arm, seed)


if __name__ == "__main__":
    main()
