"""ContextDiff benchmarks: adapter overhead (sampling and training steps, peak memory) and the judged comparison.

    python bench/bench_contextdiff.py overhead [--reps 5]     # default subcommand
    python bench/bench_contextdiff.py compare --baseline DIR --contextdiff DIR [--start DIR] [--n 600 --seeds 0 1]
    python bench/bench_contextdiff.py diagnose [--checkpoint ckpt/tiny/contextdiff]   # r_phi(x0_hat) vs r_phi(x0)

``overhead``: ContextDiff vs the plain model of the same size, side by side in one process (interleaved repetitions,
medians), at two sizes on 8x8x4 digits latents:

- tiny: ``configs/contextdiff/tiny.yaml`` (UNet 0.79M, adapter 0.137M = 17.3 % of the UNet);
- medium: the same adapter with a 6.9M UNet (block_out (80, 160), 2 layers per block), so the adapter is 2.0 % of the
  UNet, the ratio of ``paper.yaml`` (17.35M adapter on SD-2.1-base's 866M UNet).

Sampling step: one DDIM step with classifier-free guidance (batch 60 = the judging batch; ``[uncond; cond]`` in one
UNet call) for the plain model (eps denoiser, as ``common.pipeline``) vs ContextDiff (shifted-eps -> x0 wrapper plus
one adapter call on the guided x0_hat and the whitened step). Training step (batch 64, AdamW step included): the
plain eps loss vs ContextDiff stage 1 with the UNet frozen (gradients through the UNet into x_t), stage 1 joint, and
stage 2 (adapter forward without a graph). Peak memory: each variant in its own process, the peak RSS above the
RSS before its first step (``/proc/self/clear_refs`` resets the high-water mark). At paper scale (SD-2.1-base, 64x64x4
latents) a CPU cannot time it, so FLOPs are counted instead (``torch.utils.flop_counter`` on the meta device).

``compare``: judge (digit, colour, both; ``common.judge``) the baseline arm and the ContextDiff arm of a same-budget
comparison with the same prompts (``evaluation_prompts(n)``), seeds and sampler (25 DDIM steps, CFG 3), plus
ContextDiff sampled without its shift and, optionally, the starting checkpoint; the training commands of both arms go
into the records (``--baseline_command`` / ``--contextdiff_command``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


REPO = Path(__file__).resolve().parent.parent

OVERHEAD_SECTION = "contextdiff: adapter overhead"
COMPARE_SECTION = "contextdiff: ContextDiff vs baseline on digits, same training budget"
TRAIN_VARIANTS = ("plain", "stage1_frozen", "stage1_joint", "stage2")
SAMPLE_VARIANTS = ("plain", "contextdiff")
SCALES = ("tiny", "medium")
GUIDANCE = 3.0


# ------------------------------------------------------------------------------------------------------- models


def unet_config(scale: str) -> dict:
    from contextdiff.config import load_config

    config = dict(load_config(REPO / "configs" / "contextdiff" / "tiny.yaml")["unet"])
    if scale == "medium":
        config.update(block_out_channels=[80, 160], layers_per_block=2)
    return config


def build(scale: str, device="cpu"):
    """``(unet, adapter, scheduler_config)`` of a scale; the adapter head is drawn small (a trained-looking r != 0)."""
    from diffusers import UNet2DConditionModel

    from common.tiny import sd_ddim_scheduler, seeded
    from contextdiff.adapter import tiny_adapter

    with seeded(0), torch.device(device):
        unet = UNet2DConditionModel(**unet_config(scale))
    adapter = tiny_adapter(seed=1, head_std=0.02).to(device)
    return unet.eval(), adapter, dict(sd_ddim_scheduler().config)


def text_states(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 77, 32, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------- runners


def sampling_runner(variant: str, unet, adapter, scheduler_config, batch: int, steps: int):
    """A closure running ``steps`` DDIM steps with CFG for ``batch`` prompts (plain or ContextDiff)."""
    from common.denoisers import guided_unet
    from common.samplers import sample_ddim
    from common.schedule import NoiseSchedule, plan_like_diffusers
    from contextdiff.process import ShiftedEpsToX0, contextual_shift

    schedule = NoiseSchedule.from_config(scheduler_config)
    plan = plan_like_diffusers(schedule, scheduler_config, steps, "ddim")
    cond, uncond = text_states(batch, 0), text_states(1, 1).expand(batch, -1, -1)
    guided = guided_unet(unet, cond, uncond, GUIDANCE, "eps")
    if variant == "plain":
        denoiser, shift = guided, None
    else:
        denoiser, shift = ShiftedEpsToX0(guided, schedule), contextual_shift(adapter, cond)
    shape = (batch, 4, 8, 8)

    @torch.no_grad()
    def run():
        return sample_ddim(denoiser, schedule, plan, shape, generator=torch.Generator().manual_seed(0), shift=shift,
                           progress=False)

    return run


def training_runner(variant: str, unet, adapter, scheduler_config, batch: int):
    """A closure doing one optimizer step (zero_grad, loss, backward, AdamW step) of a training variant."""
    from common.process import q_sample
    from common.schedule import NoiseSchedule
    from contextdiff.process import ContextLossConfig, contextual_loss, trainable_modules

    schedule = NoiseSchedule.from_config(scheduler_config)
    unet, adapter = copy.deepcopy(unet).train(), copy.deepcopy(adapter).train()
    g = torch.Generator().manual_seed(0)
    latents, states, null = torch.randn(batch, 4, 8, 8, generator=g), text_states(batch), text_states(1, 1)
    if variant == "plain":
        unet.requires_grad_(True)
        params = list(unet.parameters())

        def loss_fn():  # scripts/train_text_to_image.py's loss
            drop = torch.rand(batch) < 0.1
            cond = torch.where(drop.view(-1, 1, 1), null.expand_as(states), states)
            noise = torch.randn_like(latents)
            t = torch.randint(0, schedule.num_train_timesteps, (batch,))
            noisy = q_sample(latents, schedule.abar(t, like=latents), noise)
            return F.mse_loss(unet(noisy, t, encoder_hidden_states=cond).sample, noise)
    else:
        stage = 2 if variant == "stage2" else 1
        config = ContextLossConfig(stage=stage, freeze_unet=variant == "stage1_frozen", cfg_drop_prob=0.1)
        trainable, _ = trainable_modules(config, unet, adapter)
        params = [p for m in trainable.values() for p in m.parameters()]
        batch_dict = {"latents": latents, "encoder_hidden_states": states}

        def loss_fn():
            return contextual_loss(batch_dict, unet, adapter, schedule, config, null_text=null).loss
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()

    return step


def interleaved(runners: dict, reps: int, inner: int = 1) -> dict[str, float]:
    """Median seconds per call of each runner; one warm-up call each, then repetitions interleaved."""
    for fn in runners.values():
        fn()
    times = {name: [] for name in runners}
    for _ in range(reps):
        for name, fn in runners.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(v) for name, v in times.items()}


# ------------------------------------------------------------------------------------------------------- memory


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def probe_memory(kind: str, variant: str, scale: str, batch: int) -> float:
    """MB of peak RSS above the RSS right before the first step, for 3 steps of one variant (this process only)."""
    torch.manual_seed(0)
    unet, adapter, sched = build(scale)
    if kind == "train":
        run = training_runner(variant, unet, adapter, sched, batch)
    else:
        run = sampling_runner(variant, unet, adapter, sched, batch, steps=3)
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark VmHWM to the current RSS
    start = _rss_kb("VmRSS")
    for _ in range(3):
        run()
    return (_rss_kb("VmHWM") - start) / 1024


def memory_in_subprocess(kind: str, variant: str, scale: str, batch: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "probe", kind, variant, scale, str(batch)], capture_output=True,
                         text=True, env=env, check=True).stdout
    return float(out.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------- paper FLOPs


def paper_flops() -> dict[str, float]:
    """GFLOPs per sampling step (CFG, batch 1) and per training sample at SD-2.1-base scale (paper.yaml), counted on
    the meta device: ``{"unet_cfg", "adapter", "train_<variant>"}``."""
    from torch.utils.flop_counter import FlopCounterMode

    from contextdiff.config import build_adapter, build_unet, load_config

    cfg = load_config(REPO / "configs" / "contextdiff" / "paper.yaml")
    unet, adapter = build_unet(cfg, "meta"), build_adapter(cfg, "meta")
    x = torch.randn(2, 4, 64, 64, device="meta")
    c = torch.randn(2, 77, 1024, device="meta")
    t = torch.full((2,), 500, device="meta")

    def count(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e9

    out = {}
    with torch.no_grad():
        out["unet_cfg"] = count(lambda: unet(x, t, encoder_hidden_states=c))
        out["adapter"] = count(lambda: adapter(x[:1], c[:1]))
    one_x, one_c, one_t = x[:1], c[:1], t[:1]
    for variant in TRAIN_VARIANTS:
        unet_grad = variant in ("plain", "stage1_joint", "stage2")
        adapter_grad = variant in ("stage1_frozen", "stage1_joint")
        unet.requires_grad_(unet_grad)
        adapter.requires_grad_(adapter_grad)

        def step(variant=variant, adapter_grad=adapter_grad):
            if variant == "plain":
                x_t = one_x
            elif adapter_grad:
                x_t = one_x + adapter(one_x, one_c)
            else:
                with torch.no_grad():
                    x_t = one_x + adapter(one_x, one_c)
            out_ = unet(x_t, one_t, encoder_hidden_states=one_c).sample
            loss = out_.float().pow(2).mean()
            if loss.requires_grad:
                loss.backward()

        out[f"train_{variant}"] = count(step)
    return out


# ------------------------------------------------------------------------------------------------------ overhead


def overhead(args) -> None:
    from records import write_records

    from common.modules import count_parameters

    command = "OMP_NUM_THREADS=1 python bench/bench_contextdiff.py overhead " + " ".join(args.argv)
    records = []
    torch.set_num_threads(1)
    for scale in SCALES:
        unet, adapter, sched = build(scale)
        n_unet, n_adapter = count_parameters(unet), count_parameters(adapter)
        label = f"{scale}: UNet {n_unet / 1e6:.2f}M, adapter {n_adapter / 1e6:.3f}M = {n_adapter / n_unet:.1%}"
        samplers = {v: sampling_runner(v, unet, adapter, sched, args.sample_batch, args.sample_steps)
                    for v in SAMPLE_VARIANTS}
        med = interleaved(samplers, args.reps)
        sample_ratio = med["contextdiff"] / med["plain"] - 1
        print(f"[{label}] sampling s/step plain {med['plain'] / args.sample_steps:.4f}, contextdiff "
              f"{med['contextdiff'] / args.sample_steps:.4f}: overhead {sample_ratio:+.1%}")
        records.append(dict(name=f"sampling step overhead vs plain ({label}; DDIM, CFG, batch {args.sample_batch})",
                            value=round(100 * sample_ratio, 1), unit="%", target="<= 15", command=command,
                            section=OVERHEAD_SECTION))
        records.append(dict(name=f"sampling seconds per step, plain / contextdiff ({scale})",
                            value=f"{med['plain'] / args.sample_steps:.4f} / {med['contextdiff'] / args.sample_steps:.4f}",
                            unit="s", command=command, section=OVERHEAD_SECTION))
        trainers = {v: training_runner(v, unet, adapter, sched, args.train_batch) for v in TRAIN_VARIANTS}
        med = interleaved(trainers, args.reps, inner=args.train_inner)
        print(f"[{label}] training s/step " + ", ".join(f"{k} {v:.4f}" for k, v in med.items()))
        for variant in TRAIN_VARIANTS[1:]:
            ratio = med[variant] / med["plain"] - 1
            records.append(dict(name=f"training step overhead vs plain, {variant} ({label}; batch {args.train_batch})",
                                value=round(100 * ratio, 1), unit="%", target="<= 15", command=command,
                                section=OVERHEAD_SECTION))
        records.append(dict(name=f"training seconds per step, {' / '.join(TRAIN_VARIANTS)} ({scale})",
                            value=" / ".join(f"{med[v]:.4f}" for v in TRAIN_VARIANTS), unit="s", command=command,
                            section=OVERHEAD_SECTION))
        if not args.no_memory:
            mem = {f"train {v}": memory_in_subprocess("train", v, scale, args.train_batch) for v in TRAIN_VARIANTS}
            mem.update({f"sample {v}": memory_in_subprocess("sample", v, scale, args.sample_batch)
                        for v in SAMPLE_VARIANTS})
            print(f"[{label}] peak RSS above start (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in mem.items()))
            records.append(dict(
                name=f"peak memory above start, MB: train {' / '.join(TRAIN_VARIANTS)}; sample plain / contextdiff "
                     f"({scale}, own process each)",
                value=" / ".join(f"{mem[f'train {v}']:.0f}" for v in TRAIN_VARIANTS) + "; "
                      + " / ".join(f"{mem[f'sample {v}']:.0f}" for v in SAMPLE_VARIANTS),
                unit="MB", command=command, section=OVERHEAD_SECTION))
    flops = paper_flops()
    print("paper scale GFLOPs: " + ", ".join(f"{k} {v:.1f}" for k, v in flops.items()))
    label = "paper scale SD-2.1-base 866M + adapter 17.3M = 2.0%, 64x64x4; counted FLOPs, not timed"
    records.append(dict(name=f"sampling step overhead vs plain ({label}; CFG)",
                        value=round(100 * flops["adapter"] / flops["unet_cfg"], 1), unit="%", target="<= 15",
                        command=command, section=OVERHEAD_SECTION))
    for variant in TRAIN_VARIANTS[1:]:
        records.append(dict(name=f"training step overhead vs plain, {variant} ({label})",
                            value=round(100 * (flops[f"train_{variant}"] / flops["train_plain"] - 1), 1), unit="%",
                            target="<= 15", command=command, section=OVERHEAD_SECTION))
    if not args.no_write:
        write_records(records)


# ------------------------------------------------------------------------------------------------------ compare


def judge_arm(checkpoint, folder: Path, n: int, seed: int, no_shift: bool, reuse: bool) -> dict:
    """``judge_checkpoint``, or with ``reuse`` only re-judge images already sampled with identical settings."""
    from common.judge import judge_folder
    from contextdiff.sample_cli import EVAL_SAMPLING, judge_checkpoint

    saved = folder / "scores.json"
    if reuse and saved.is_file():
        settings = json.loads(saved.read_text()).get("settings", {})
        wanted = {"checkpoint": str(checkpoint), "seed": seed, "steps": EVAL_SAMPLING["steps"],
                  "guidance_scale": EVAL_SAMPLING["guidance_scale"], "sampler": "ddim", "eta": 0.0,
                  "no_shift": no_shift}
        if settings == wanted and json.loads(saved.read_text()).get("count") == n:
            print(f"reusing the images in {folder}")
            return {**judge_folder(folder), "seconds": 0.0}
    return judge_checkpoint(checkpoint, folder, n, seed, no_shift=no_shift)


def compare(args) -> None:
    from records import write_records

    from common.digits import evaluation_prompts
    from common.judge import summary_line
    from contextdiff.sample_cli import EVAL_SAMPLING

    arms = {"baseline arm": (args.baseline, True), "contextdiff arm": (args.contextdiff, False),
            "contextdiff arm sampled without shift": (args.contextdiff, True)}
    if args.start:
        arms = {"starting checkpoint": (args.start, True), **arms}
    out = Path(args.output_dir)
    targets = [(r["digit"], r["color"]) for r in evaluation_prompts(args.n)] * len(args.seeds)
    results, correct = {}, {}
    for name, (folder, no_shift) in arms.items():
        runs = [judge_arm(folder, out / name.replace(" ", "_") / f"seed{seed}", args.n, seed, no_shift, args.reuse)
                for seed in args.seeds]
        count = sum(r["count"] for r in runs)
        merged = {k: sum(r[k] * r["count"] for r in runs) / count
                  for k in ("digit_accuracy", "color_accuracy", "both_accuracy")}
        merged.update(count=count, judge_heldout_digit_accuracy=runs[0]["judge_heldout_digit_accuracy"],
                      seconds=sum(r["seconds"] for r in runs))
        digits = [d for r in runs for d in r["predicted_digits"]]
        colors = [c for r in runs for c in r["predicted_colors"]]
        correct[name] = [d == td and c == tc for d, c, (td, tc) in zip(digits, colors, targets)]
        results[name] = merged
        print(summary_line(merged, f"{name:<40}"))
    # Paired on identical prompts and initial noise: McNemar's exact test on "both correct".
    from scipy.stats import binomtest

    a, b = correct["contextdiff arm"], correct["baseline arm"]
    wins, losses = sum(x and not y for x, y in zip(a, b)), sum(y and not x for x, y in zip(a, b))
    p_value = binomtest(min(wins, losses), wins + losses, 0.5).pvalue if wins + losses else 1.0
    results["paired"] = {"contextdiff_right_baseline_wrong": wins, "baseline_right_contextdiff_wrong": losses,
                         "mcnemar_exact_p": p_value}
    print(f"paired on {len(a)} images: contextdiff right & baseline wrong {wins}, the reverse {losses}, "
          f"McNemar exact p = {p_value:.3g}")
    (out / "compare.json").write_text(json.dumps(results, indent=2) + "\n")
    judge_cmd = ("OMP_NUM_THREADS=1 python bench/bench_contextdiff.py compare " + " ".join(args.argv))
    commands = {"baseline arm": args.baseline_command, "contextdiff arm": args.contextdiff_command,
                "contextdiff arm sampled without shift": args.contextdiff_command,
                "starting checkpoint": "ckpt/tiny/baseline (make tiny-checkpoints)"}
    sampling = f"{EVAL_SAMPLING['steps']} DDIM steps, CFG {EVAL_SAMPLING['guidance_scale']}"
    label = f"[{args.label}] " if args.label else ""
    records = [dict(name=f"{label}contextdiff arm vs baseline arm, paired on {len(a)} images: both-correct wins / "
                         "losses (McNemar exact p)", value=f"{wins} / {losses} (p = {p_value:.2g})", unit="images",
                    command=judge_cmd, section=COMPARE_SECTION)]
    for name, scores in results.items():
        if name == "paired":
            continue
        for key, what in (("both_accuracy", "both"), ("digit_accuracy", "digit"), ("color_accuracy", "colour")):
            records.append(dict(
                name=f"{label}{name}: judged {what} accuracy ({scores['count']} images, seeds {args.seeds}, {sampling})",
                value=round(100 * scores[key], 1), unit="%", command=f"{commands[name]} ; {judge_cmd}".strip(" ;"),
                section=COMPARE_SECTION))
    if not args.no_write:
        write_records(records)


# ------------------------------------------------------------------------------------------------------ diagnose


def diagnose(args) -> None:
    """How far the adapter's r_hat = r_phi(x0_hat, c) (what sampling uses) is from r_phi(x0, c) (what training used)
    along the chain, on real test latents: the train/sample mismatch of the shift."""
    import json as _json

    from records import write_records

    from common.data import image_text_dataset
    from common.process import Shift, q_sample, x0_from_eps
    from common.schedule import NoiseSchedule
    from contextdiff.checkpoint import load_contextdiff
    from contextdiff.pipeline import encode_clip, encode_images
    from contextdiff.process import contextual_k

    model = load_contextdiff(args.checkpoint)
    data = Path(args.data_dir)
    dataset = image_text_dataset(data, resolution=32)
    rows = [_json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()[: args.n]]
    schedule = NoiseSchedule.from_config(model.scheduler_config)
    k = contextual_k(model.k_schedule, model.k_scale)
    lines, records = [], []
    with torch.no_grad():
        x0 = encode_images(model.vae, torch.stack([dataset[i]["pixel_values"] for i in range(len(rows))]) / 2 + 0.5)
        text = encode_clip(model.text_encoder, model.tokenizer, [r["text"] for r in rows])
        r = model.adapter(x0, text)
        for t in (100, 300, 500, 700, 900, 999):
            tt = torch.full((len(rows),), t)
            abar = schedule.abar(tt, like=x0)
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t))
            x_t = q_sample(x0, abar, noise, Shift(k=k), m=r)
            x0_hat = x0_from_eps(x_t, model.unet(x_t, tt, encoder_hidden_states=text).sample, abar)
            rel = float((model.adapter(x0_hat, text) - r).abs().mean() / r.abs().mean())
            err = float((x0_hat - x0).abs().mean() / x0.abs().mean())
            lines.append(f"t={t}: k_t={float(k(abar.flatten()[0])):.3f} |x0_hat - x0|/|x0| = {err:.2f}  "
                         f"|r_hat - r|/|r| = {rel:.2f}")
            records.append(dict(name=f"diagnosis ({args.checkpoint}): |r_phi(x0_hat) - r_phi(x0)| / |r| at t={t} "
                                     f"(|x0_hat - x0|/|x0| = {err:.2f}; {len(rows)} test latents)",
                                value=round(rel, 2), unit="ratio", section=COMPARE_SECTION,
                                command="OMP_NUM_THREADS=1 python bench/bench_contextdiff.py diagnose "
                                        + " ".join(args.argv)))
    print(f"|r| = {float(r.abs().mean()):.3f}, |x0| = {float(x0.abs().mean()):.3f}")
    print("\n".join(lines))
    if not args.no_write:
        write_records(records)


# --------------------------------------------------------------------------------------------------------- main


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "probe":  # internal: one memory measurement in a fresh process
        kind, variant, scale, batch = argv[1:5]
        torch.set_num_threads(1)
        print(probe_memory(kind, variant, scale, int(batch)))
        return
    if not argv or argv[0].startswith("-"):
        argv = ["overhead", *argv]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    o = sub.add_parser("overhead", help="adapter overhead per sampling / training step and peak memory")
    o.add_argument("--reps", type=int, default=5)
    o.add_argument("--sample_steps", type=int, default=10)
    o.add_argument("--sample_batch", type=int, default=60)
    o.add_argument("--train_batch", type=int, default=64)
    o.add_argument("--train_inner", type=int, default=2, help="training steps per timed repetition")
    o.add_argument("--no_memory", action="store_true", help="skip the per-variant memory processes")
    o.add_argument("--no_write", action="store_true", help="print only, do not update bench/results.json")
    c = sub.add_parser("compare", help="judge a same-budget ContextDiff vs baseline comparison")
    c.add_argument("--baseline", required=True, help="the baseline arm: a Stable Diffusion folder")
    c.add_argument("--contextdiff", required=True, help="the ContextDiff arm: a ContextDiff checkpoint folder")
    c.add_argument("--start", default=None, help="the common starting checkpoint (judged for reference)")
    c.add_argument("--n", type=int, default=600, help="prompts per seed (600 = every (digit, colour) pair 10x)")
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    c.add_argument("--output_dir", default="outputs/contextdiff/compare")
    c.add_argument("--baseline_command", default="", help="how the baseline arm was trained (for the record)")
    c.add_argument("--contextdiff_command", default="", help="how the ContextDiff arm was trained (for the record)")
    c.add_argument("--label", default="", help="names the comparison in the record names (e.g. 'fine-tune +800')")
    c.add_argument("--reuse", action="store_true",
                   help="re-judge images already sampled into --output_dir with the same settings instead of sampling")
    c.add_argument("--no_write", action="store_true")
    d = sub.add_parser("diagnose", help="how far r_phi(x0_hat) is from r_phi(x0) along the chain")
    d.add_argument("--checkpoint", default="ckpt/tiny/contextdiff")
    d.add_argument("--data_dir", default="data/digits/test")
    d.add_argument("--n", type=int, default=64)
    d.add_argument("--no_write", action="store_true")
    args = parser.parse_args(argv)
    args.argv = argv[1:]
    {"overhead": overhead, "compare": compare, "diagnose": diagnose}[args.command](args)


if __name__ == "__main__":
    main()
