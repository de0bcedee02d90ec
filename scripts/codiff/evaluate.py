"""Measure the paper's claim on digits: a collaboration follows BOTH a mask and a text, better than either member
alone and better than a fixed equal-weight average (Composable Diffusion); and an edit by text keeps the layout::

    OMP_NUM_THREADS=1 python scripts/codiff/evaluate.py --write_records        # ~10 min on 2 busy cores

Generation: the 60 evaluation prompts (every digit x colour), each paired with a test mask of the SAME digit, every
variant from the same initial noise, scored by stroke IoU with the mask and by the judge (digit, colour); for each
``--guidance_scales`` value (1 = no CFG, the paper; > 1 = CFG on each member, an extension). Editing: the first
``--edit_images`` test images re-coloured by text with their own mask (Imagic per member, then collaboration),
scored by the NEW colour and by stroke IoU with the input's mask. See ``codiff/evaluation.py``. ``--write_records``
puts every number into bench/results.md (section "codiff: ..."), with this command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]

from common.errors import UserError, cli_entry  # noqa: E402
from common.methods import add_flag  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_flag(p, "--checkpoint", "--model_dir", dest="model_dir", default=str(REPO / "ckpt" / "tiny" / "codiff"))
    p.add_argument("--data_root", default=str(REPO / "data" / "digits"), help="digits build (made if missing)")
    p.add_argument("--num_prompts", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    add_flag(p, "--num_inference_steps", "--steps", dest="steps", type=int, default=50)
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--guidance_scales", default="1,3", help="comma-separated per-member CFG scales to evaluate")
    p.add_argument("--variants", default="mask_only,text_only,average,collaborative,collaborative+released")
    p.add_argument("--record_label", default="",
                   help="with --write_records: appended to the section names, so an ablation checkpoint's numbers sit "
                        "beside the shipped one's instead of replacing them")
    p.add_argument("--mse_images", type=int, default=297, help="test images for the held-out eps-MSE (0 skips it)")
    p.add_argument("--edit_images", type=int, default=12, help="0 skips the editing evaluation")
    p.add_argument("--edit_alphas", default="0,1,1.5,2,3")
    p.add_argument("--stage1_num_iter", type=int, default=100)
    p.add_argument("--stage2_num_iter", type=int, default=100)
    p.add_argument("--stage1_lr", type=float, default=1e-3)
    p.add_argument("--stage2_lr", type=float, default=1e-5)
    p.add_argument("--edit_guidance_scales", default="1,3", help="per-member CFG scales of the edit sampling")
    p.add_argument("--save_dir", default="outputs/codiff/evaluate", help="image grids and scores.json go here")
    p.add_argument("--write_records", action="store_true", help="write the numbers to bench/results.md")
    return p


def pct(v):
    return "n/a" if v is None else f"{100 * v:5.1f}%"


@cli_entry
def main(argv=None) -> int:
    from codiff.checkpoint import load_collaboration
    from codiff.evaluation import (
        SamplingSettings,
        denoising_losses,
        evaluate_claim,
        evaluate_editing,
        influence_profile,
        paired_masks,
        reference_scores,
    )
    from common.digits import evaluation_prompts

    args = build_parser().parse_args(argv)
    scales = [float(s) for s in args.guidance_scales.split(",") if s.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    alphas = tuple(float(a) for a in args.edit_alphas.split(",") if a.strip())
    if args.num_prompts < 0 or not scales or not variants:
        raise UserError("--num_prompts must be >= 0 (0 skips generation); --guidance_scales and --variants must "
                        "not be empty")
    collab = load_collaboration(args.model_dir)
    data_root = Path(args.data_root)
    save_dir = Path(args.save_dir)
    prompts = evaluation_prompts(args.num_prompts)
    refs = (reference_scores(prompts, paired_masks([p["digit"] for p in prompts], data_root), data_root)
            if prompts else {})
    results: dict = {"references": refs, "generation": {}, "editing": {}}
    if args.mse_images > 0:
        results["denoising_mse"] = denoising_losses(collab, data_root, count=args.mse_images, seed=args.seed)
    if args.mse_images > 0:
        results["influence"] = influence_profile(collab, data_root=data_root, steps=args.steps, seed=args.seed)
        print("text member's mean influence over the trajectory (noisiest first): "
              + ", ".join(f"{v:.3f}" for v in results["influence"]["text_influence_by_stretch"]), flush=True)
    for variant, scores in results.get("denoising_mse", {}).items():
        print(f"held-out eps-MSE {variant:<15} " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items()), flush=True)
    for scale in scales if prompts else ():
        for variant in variants:
            base, _, extra = variant.partition("+")
            settings = SamplingSettings(steps=args.steps, eta=args.eta, guidance_scale=scale,
                                        released_reweighting=(extra == "released"))
            label = f"{variant} [{settings.describe()}]"
            scores = evaluate_claim(collab, args.num_prompts, data_root=data_root, settings=settings,
                                    variants=[base], seed=args.seed,
                                    save_dir=save_dir / f"cfg{scale:g}" / variant.replace("+", "_"))[base]
            results["generation"][label] = scores
            print(f"{label:<90} stroke IoU {scores['stroke_iou']:.3f}  digit {pct(scores['digit_accuracy'])}  "
                  f"colour {pct(scores['color_accuracy'])}  both {pct(scores['both_accuracy'])}  "
                  f"({scores['seconds']:.0f} s)", flush=True)
    if args.edit_images > 0:
        settings = SamplingSettings(steps=args.steps, eta=args.eta)
        edit_scales = [float(s) for s in args.edit_guidance_scales.split(",") if s.strip()]
        results["editing_settings"] = {"images": args.edit_images, "alphas": list(alphas),
                                       "stage1": [args.stage1_num_iter, args.stage1_lr],
                                       "stage2": [args.stage2_num_iter, args.stage2_lr],
                                       "sampling": f"DDIM {args.steps} steps, eta {args.eta:g}"}
        results["editing"] = evaluate_editing(
            collab, args.edit_images, data_root=data_root, stage1_steps=args.stage1_num_iter,
            stage1_lr=args.stage1_lr, stage2_steps=args.stage2_num_iter, stage2_lr=args.stage2_lr, alphas=alphas,
            settings=settings, guidance_scales=edit_scales, seed=args.seed, save_dir=save_dir / "edit")
        for key, scores in results["editing"].items():
            print(f"edit {key:<45} new colour {pct(scores['color_accuracy'])}  digit {pct(scores['digit_accuracy'])}  "
                  f"stroke IoU with the input's mask {scores['stroke_iou']:.3f}", flush=True)
    for label, scores in refs.items():
        print(f"reference: {label:<45} stroke IoU {scores['stroke_iou']:.3f}")
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / "scores.json").write_text(json.dumps(results, indent=2) + "\n")
    if args.write_records:
        write(results, args, argv)
    return 0


def write(results: dict, args, argv) -> None:
    from common.bench_records import write_records

    command = "OMP_NUM_THREADS=1 python scripts/codiff/evaluate.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    label = f" ({args.record_label})" if args.record_label else ""
    section = "codiff: condition following and editing on digits" + label
    mse_section = "codiff: held-out eps-MSE of each variant and where the influence goes" + label
    rows, mse_rows = [], []
    n = args.num_prompts
    for label, scores in results["generation"].items():
        for metric, unit in (("stroke_iou", "IoU"), ("digit_accuracy", "acc"), ("color_accuracy", "acc"),
                             ("both_accuracy", "acc")):
            rows.append(dict(name=f"codiff gen {label}: {metric} (n={n})", value=round(scores[metric], 4), unit=unit,
                             command=command, section=section))
    for label, scores in results["references"].items():
        rows.append(dict(name=f"codiff gen reference, {label}: stroke_iou (n={n})", value=round(scores["stroke_iou"], 4),
                         unit="IoU", command=command, section=section))
    for variant, scores in results.get("denoising_mse", {}).items():
        mse_rows.append(dict(name=f"codiff held-out eps-MSE (the diffusers' training objective), {variant}: mean "
                                  f"over t in {{100,300,500,700,900}} ({args.mse_images} test images)",
                             value=round(scores["mean"], 5), unit="MSE", command=command, section=mse_section))
    settings = results.get("editing_settings", {})
    for key, scores in results["editing"].items():
        tag = f"codiff edit {key} [{settings.get('sampling', '')}, {settings.get('images')} images]"
        rows.append(dict(name=f"{tag}: new colour accuracy", value=round(scores["color_accuracy"], 4), unit="acc",
                         command=command, section=section))
        rows.append(dict(name=f"{tag}: stroke IoU with the input's mask", value=round(scores["stroke_iou"], 4),
                         unit="IoU", command=command, section=section))
        rows.append(dict(name=f"{tag}: digit accuracy", value=round(scores["digit_accuracy"], 4), unit="acc",
                         command=command, section=section))
    profile = results.get("influence")
    if profile:
        for i, value in enumerate(profile["text_influence_by_stretch"]):
            mse_rows.append(dict(name=f"codiff text member's mean influence, DDIM {args.steps} steps, stretch {i + 1} of "
                                      f"{len(profile['text_influence_by_stretch'])} (1 = noisiest; 24 prompts)",
                                 value=round(value, 3), unit="weight", command=command, section=mse_section))
        for where in ("stroke", "background"):
            mse_rows.append(dict(name=f"codiff text member's mean influence on {where} latent pixels (24 prompts)",
                                 value=round(profile[f"text_influence_{where}"], 3), unit="weight", command=command,
                                 section=mse_section))
    # Each section is replaced only by a run that measured it, so an MSE-only run keeps the generation table.
    if rows:
        write_records(rows, replace_section=section)
    if mse_rows:
        write_records(mse_rows, replace_section=mse_section)


if __name__ == "__main__":
    raise SystemExit(main())
