"""Collaborative Diffusion on digits: which mask member, which weighting? Paired statistics with 95 % intervals.

Two mask-to-image members of the same budget (configs/codiff/train_mask_tiny.yaml: 0.79M-parameter UNet, 2000 steps,
batch 64, 10 % null masks) are compared inside a collaboration with the shipped text member (ckpt/tiny/baseline):

- ``concat``: the mask's class maps pooled to latent size are extra input channels (LDM semantic synthesis;
  ``codiff/spatial.py``), plus the class tokens through cross-attention;
- ``crossattn``: the paper's member, the class tokens (one token per class, the flattened one-hot grid, Linear ->
  the UNet's cross-attention width) through cross-attention only.

For every collaboration checkpoint (one per dynamic-diffuser training seed) and every per-member CFG scale, the same
prompt/mask pairs (``codiff.evaluation``: every digit x colour, each with a test mask of the same digit) are sampled
from the same initial noise by: each member alone, the equal-weight average, the collaboration (learned maps) and the
collaboration with the released re-weighting. Per image: digit / colour / both correct (the judge) and the stroke IoU
with the mask. Paired differences are bootstrapped over prompts (the seeds' per-prompt means for multi-seed variants).

Also the held-out eps-MSE (the diffusers' objective) per timestep band, split into additive parts on the latent grid
(the test mask pooled to 8x8 marks the digit's latent pixels, as in ``influence_profile``):
``colour`` = the per-channel mean error over the digit's pixels (a uniform shift of the digit's latent: its colour and
brightness), ``layout`` = the rest (the background, where a wrong stroke appears, plus the error's variation across
the digit's pixels: its shape); ``colour + layout`` = the total.

    # one process per collaboration family (each writes a JSON of per-image scores), then the report
    OMP_NUM_THREADS=1 python bench/bench_codiff_members.py run --name concat --dirs ckpt/tiny/codiff --out concat.json
    OMP_NUM_THREADS=1 python bench/bench_codiff_members.py run --name crossattn \
        --dirs ckpt/tiny/codiff_crossattn,ckpt/tiny/codiff_crossattn/seeds/seed1,ckpt/tiny/codiff_crossattn/seeds/seed2 \
        --out crossattn.json
    python bench/bench_codiff_members.py report concat.json crossattn.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common.metrics.intervals import bootstrap_mean, paired_difference, wilson  # noqa: F401 (the tests use them here)


REPO = Path(__file__).resolve().parent.parent
SECTION = "codiff: members, fixed average and collaboration settings, paired"
MEMBER_VARIANTS = ("mask_only", "text_only", "average")  # independent of the dynamic diffusers
COLLAB_VARIANTS = ("collaborative", "collaborative+released")
BANDS = {"low t (50-250)": (50, 150, 250), "mid t (350-650)": (350, 450, 550, 650), "high t (750-950)": (750, 850, 950)}


# ------------------------------------------------------------------------------------------------ measurement


def per_image_scores(images: torch.Tensor, prompts: list[dict], masks: list[torch.Tensor]) -> dict[str, list]:
    """Per image: ``digit`` / ``color`` / ``both`` correct (0/1, the judge) and ``iou`` of the parsed stroke with
    the mask (the dataset's 0.35 threshold)."""
    from codiff.evaluation import IOU_THRESHOLD, to_pil_list
    from common.judge import judge_images
    from common.metrics.masks import parse_stroke_mask

    pil = to_pil_list(images)
    judged = judge_images(pil, [(p["digit"], p["color"]) for p in prompts])
    digit = [int(d == p["digit"]) for d, p in zip(judged["predicted_digits"], prompts)]
    color = [int(c == p["color"]) for c, p in zip(judged["predicted_colors"], prompts)]
    iou = []
    for im, m in zip(pil, masks):
        parsed = parse_stroke_mask(im, IOU_THRESHOLD).astype(bool)
        target = np.asarray(m).astype(bool)
        union = (parsed | target).sum()
        iou.append(float((parsed & target).sum() / union) if union else 1.0)
    return {"digit": digit, "color": color, "both": [d * c for d, c in zip(digit, color)], "iou": iou}


def split_error(err: torch.Tensor, digit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image ``(colour, layout, total)`` parts of the mean squared error ``err [B, C, h, w]`` given the digit's
    latent pixels ``digit [B, 1, h, w]`` (0/1): ``colour`` = (digit pixels / all pixels) x the squared norm of the
    per-channel mean error over the digit; ``layout`` = ``total - colour`` (the background's error plus the error's
    deviation from its mean over the digit), both >= 0."""
    n_pix = err.shape[1] * err.shape[2] * err.shape[3]
    total = (err ** 2).sum(dim=(1, 2, 3)) / n_pix
    count = digit.sum(dim=(1, 2, 3))
    mean = (err * digit).sum(dim=(2, 3)) / count.clamp(min=1)[:, None]  # [B, C]
    colour = (mean ** 2).sum(dim=1) * count / n_pix
    return colour, total - colour, total


@torch.no_grad()
def eps_mse_split(collab, data_root: Path, variants, count: int = 297, seed: int = 0, batch_size: int = 99) -> dict:
    """Held-out eps-MSE per variant and timestep band, split into ``colour`` / ``layout`` (module docstring).
    Every variant sees the same latents (posterior means), timesteps and noise."""
    import torch.nn.functional as F

    from codiff.collaborate import ReleasedReweighting
    from codiff.evaluation import test_split
    from codiff.variants import variant_weights
    from common.data import image_text_dataset

    dataset = image_text_dataset(test_split(data_root), resolution=collab.image_size, num_mask_classes=2)
    count = min(count, len(dataset))
    kinds = {n: m.kind for n, m in collab.members.items()}
    mask_name, text_name = collab.modality_of_kind("mask"), collab.modality_of_kind("text")
    g = torch.Generator().manual_seed(seed)
    sums = {v: {band: {"colour": 0.0, "layout": 0.0, "total": 0.0, "n": 0} for band in BANDS} for v in variants}
    for start in range(0, count, batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, count))]
        pixels = torch.stack([it["pixel_values"] for it in items])
        latents = collab.vae.encode(pixels).latent_dist.mean * float(collab.vae.config.scaling_factor)
        ids = torch.stack([it["mask"] for it in items])
        digit = (F.adaptive_avg_pool2d(ids.float()[:, None], latents.shape[-2:]) > 0.25).float()  # [B, 1, h, w]
        conds = {mask_name: collab.members[mask_name].encode(ids), text_name: collab.members[text_name].encode(
            [it["text"] for it in items])}
        for band, timesteps in BANDS.items():
            for t in timesteps:
                tt = torch.full((len(items),), int(t), dtype=torch.long)
                noise = torch.randn(latents.shape, generator=g)
                abar = collab.schedule.abar(tt, like=latents)
                x_t = abar.sqrt() * latents + (1 - abar).sqrt() * noise
                for variant in variants:
                    base, _, extra = variant.partition("+")
                    weights = variant_weights(base, collab.modalities, kinds)
                    if weights is None:
                        rw = ReleasedReweighting.released((mask_name,)) if extra == "released" else None
                        eps = collab.model.predict(x_t, tt, conds, reweighting=rw).eps
                    else:
                        names = [n for n, w in weights.items() if w > 0]
                        member = collab.model.member_eps(x_t, tt, conds, names=names)
                        eps = sum(weights[n] * e for n, e in zip(names, member))
                    colour, layout, total = split_error(eps - noise, digit)
                    acc = sums[variant][band]
                    acc["total"] += float(total.sum())
                    acc["colour"] += float(colour.sum())
                    acc["layout"] += float(layout.sum())
                    acc["n"] += len(items)
    return {v: {band: {k: acc[k] / acc["n"] for k in ("colour", "layout", "total")} for band, acc in per.items()}
            for v, per in sums.items()}


def run(args) -> int:
    from codiff.checkpoint import load_collaboration
    from codiff.evaluation import SamplingSettings, generate_variant, paired_masks
    from common.digits import build_digits, evaluation_prompts

    torch.set_num_threads(1)
    data_root = build_digits(args.data_root)
    prompts = evaluation_prompts(args.num_prompts)
    masks = [m.ids for m in paired_masks([p["digit"] for p in prompts], data_root)]
    texts = [p["text"] for p in prompts]
    scales = [float(s) for s in args.guidance_scales.split(",")]
    member_variants = [v for v in args.member_variants.split(",") if v]
    result = {"name": args.name, "dirs": args.dirs.split(","), "num_prompts": args.num_prompts, "seed": args.seed,
              "steps": args.steps, "eta": args.eta, "scores": {}, "eps_mse": {}}
    out = Path(args.out)
    for k, folder in enumerate(result["dirs"]):
        collab = load_collaboration(folder)
        variants = (member_variants if k == 0 else []) + list(COLLAB_VARIANTS)
        for scale in scales:
            for variant in variants:
                base, _, extra = variant.partition("+")
                settings = SamplingSettings(steps=args.steps, eta=args.eta, guidance_scale=scale,
                                            released_reweighting=(extra == "released"))
                start = time.time()
                images = generate_variant(collab, texts, masks, base, settings, seed=args.seed)
                scores = per_image_scores(images, prompts, masks)
                key = f"{variant}|cfg{scale:g}|{folder if base == 'collaborative' else 'member'}"
                result["scores"][key] = scores
                print(f"{args.name} {key}: both {np.mean(scores['both']):.3f} digit {np.mean(scores['digit']):.3f} "
                      f"colour {np.mean(scores['color']):.3f} IoU {np.mean(scores['iou']):.3f} "
                      f"({time.time() - start:.0f} s)", flush=True)
                out.write_text(json.dumps(result) + "\n")
        if args.mse_images > 0:
            start = time.time()
            result["eps_mse"][folder] = eps_mse_split(collab, data_root, variants, count=args.mse_images,
                                                       seed=args.seed)
            print(f"{args.name} eps-MSE split of {folder} ({time.time() - start:.0f} s): "
                  + json.dumps(result["eps_mse"][folder]), flush=True)
            out.write_text(json.dumps(result) + "\n")
    return 0


# ------------------------------------------------------------------------------------------------ report


def collect(runs: list[dict]) -> dict:
    """``table[(name, variant, scale)] = {"per_seed": [scores, ...], "mean": per-prompt mean over seeds}``."""
    table: dict = {}
    for r in runs:
        for key, scores in r["scores"].items():
            variant, scale, _ = key.split("|")
            entry = table.setdefault((r["name"], variant, scale), {"per_seed": []})
            entry["per_seed"].append(scores)
    for entry in table.values():
        entry["mean"] = {m: np.mean([s[m] for s in entry["per_seed"]], axis=0) for m in ("digit", "color", "both",
                                                                                        "iou")}
    return table


def report(args) -> int:
    runs = [json.loads(Path(p).read_text()) for p in args.inputs]
    table = collect(runs)
    n = runs[0]["num_prompts"]
    setting = f"DDIM {runs[0]['steps']}, eta {runs[0]['eta']:g}, sampling seed {runs[0]['seed']}, {n} pairs"
    command = "; ".join(f"OMP_NUM_THREADS=1 python bench/bench_codiff_members.py run --name {r['name']} --dirs "
                        f"{','.join(r['dirs'])} --out {r['name']}.json" for r in runs)
    command += "; python bench/bench_codiff_members.py report " + " ".join(f"{r['name']}.json" for r in runs)
    rows = []

    def cfg_label(scale: str) -> str:
        return "no CFG" if scale == "cfg1" else f"CFG {scale[3:]} per member"

    names = sorted({k[0] for k in table})
    text_only = {k[2]: v for k, v in table.items() if k[1] == "text_only"}
    for (name, variant, scale), entry in sorted(table.items()):
        seeds = len(entry["per_seed"])
        label = "text member (shipped baseline)" if variant == "text_only" else f"{name} {variant}"
        if variant == "text_only" and name != names[0]:
            continue
        for metric in ("both", "digit", "color", "iou"):
            if seeds == 1 and metric != "iou":
                k = float(np.sum(entry["mean"][metric]))
                lo, hi = wilson(k, n)
                value = k / n
            else:
                value, lo, hi = bootstrap_mean(entry["mean"][metric])
            per_seed = ("" if seeds == 1 else "; per seed " + "/".join(
                f"{np.mean(s[metric]):.3f}" for s in entry["per_seed"]))
            rows.append(dict(name=f"{label} [{cfg_label(scale)}]: {metric} (95% CI {lo:.3f}-{hi:.3f}; "
                                  f"{seeds} diffuser seed{'s' if seeds > 1 else ''}{per_seed})",
                             value=round(value, 4), unit="IoU" if metric == "iou" else "acc"))
    comparisons = [("collaborative", "average"), ("collaborative+released", "average"),
                   ("collaborative+released", "collaborative"), ("collaborative+released", "mask_only"),
                   ("average", "mask_only")]
    for name in names:
        for scale in sorted({k[2] for k in table}):
            for a, b in comparisons:
                ea, eb = table.get((name, a, scale)), table.get((name, b, scale))
                if ea is None or eb is None:
                    continue
                for metric in ("both", "iou"):
                    d, lo, hi = paired_difference(ea["mean"][metric], eb["mean"][metric])
                    rows.append(dict(name=f"{name}: {a} - {b} [{cfg_label(scale)}]: {metric} (paired, 95% CI "
                                          f"{lo:+.3f} to {hi:+.3f})", value=round(d, 4), unit="diff"))
    if len(names) == 2:
        other, ref = (names[1], names[0]) if names[0] == "concat" else (names[0], names[1])
        for scale in sorted({k[2] for k in table}):
            for variant in ("mask_only", "average") + COLLAB_VARIANTS:
                ea, eb = table.get((other, variant, scale)), table.get((ref, variant, scale))
                if ea is None or eb is None:
                    continue
                for metric in ("both", "iou"):
                    d, lo, hi = paired_difference(ea["mean"][metric], eb["mean"][metric])
                    rows.append(dict(name=f"{other} - {ref}, {variant} [{cfg_label(scale)}]: {metric} (paired, 95% CI "
                                          f"{lo:+.3f} to {hi:+.3f})", value=round(d, 4), unit="diff"))
    for r in runs:
        for folder, per_variant in r["eps_mse"].items():
            for variant, bands in per_variant.items():
                for band, parts in bands.items():
                    for part in ("layout", "colour", "total"):
                        rows.append(dict(name=f"{r['name']} held-out eps-MSE, {variant}, {band}: {part} "
                                              f"({Path(folder).name}; 297 test images)",
                                         value=round(parts[part], 5), unit="MSE"))
    for row in rows:
        print(f"{row['name']}: {row['value']}")
    del text_only
    if not args.no_write:
        from common.bench_records import write_records

        write_records([{**row, "command": command, "section": f"{SECTION} ({setting})"} for row in rows],
                      replace_section=f"{SECTION} ({setting})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="sample and score one collaboration family")
    p.add_argument("--name", required=True, help="label of the mask member: concat or crossattn")
    p.add_argument("--dirs", required=True, help="comma-separated collaboration checkpoints (one per diffuser seed)")
    p.add_argument("--out", required=True, help="JSON of per-image scores")
    p.add_argument("--num_prompts", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--guidance_scales", default="1,3")
    p.add_argument("--member_variants", default=",".join(MEMBER_VARIANTS),
                   help="variants that do not use the diffusers (sampled with the first checkpoint only)")
    p.add_argument("--mse_images", type=int, default=297)
    p.add_argument("--data_root", default=str(REPO / "data" / "digits"))
    r = sub.add_parser("report", help="statistics over run outputs, written to bench/results.json")
    r.add_argument("inputs", nargs="+")
    r.add_argument("--no_write", action="store_true")
    args = parser.parse_args(argv)
    return run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    sys.exit(main())
