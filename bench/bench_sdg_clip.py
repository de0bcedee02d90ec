"""SDG: does a noise-aware CLIP that reads digits through more noise guide better? Probe vs guided accuracy.

For each noise-aware CLIP folder (``--clips label=path ...``; the shipped ``ckpt/tiny/sdg/clip`` and fine-tuning
variants of ``scripts/sdg/finetune_clip.py``), on the shipped unconditional digits ADM (``ckpt/tiny/sdg/unet``):

- the probe: zero-shot digit accuracy of E'(x_t, t) against "a handwritten <digit>" on the 297 noised test digits,
  t = 0 / 200 / 400 / 600 / 800 (``sdg.digits_eval.zero_shot_accuracy``, the probe of ``bench/bench_sdg.py``);
- language guidance: judged digit accuracy of samples guided by "a handwritten <digit>" (``--per_class`` per digit,
  DDPM ``--steps`` steps, the paper's 100), per text weight;
- content (semantic) and style guidance from test references (one per sample, digits balanced): judged digit and
  colour agreement with the reference.

Every CLIP sees the same prompts, references and sampling seeds; 95 % Wilson intervals. ``--unet`` guides another
unconditional model (e.g. one trained longer) instead; its rows name it. Each result is appended to ``--out`` (JSON
lines) as soon as it exists, so an interrupted run keeps what it measured::

    OMP_NUM_THREADS=1 python bench/bench_sdg_clip.py --clips shipped=ckpt/tiny/sdg/clip new=outputs/clip_run/clip \
        --text_weights 100 300 1000 3000 --out sdg_clip.jsonl
    python bench/bench_sdg_clip.py --report sdg_clip.jsonl     # upserts its rows into bench/results.json

``--report ... --replace_section`` also drops the section's rows that are not in the given files.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from common.metrics.intervals import paired_difference, wilson


REPO = Path(__file__).resolve().parent.parent
CKPT = REPO / "ckpt" / "tiny" / "sdg"
SECTION = "sdg: noise-aware CLIP variants, probe vs guided accuracy"


def measure(args) -> int:
    from common.digits import build_digits
    from common.judge import judge_images
    from common.metrics.images import tensor_to_uint8
    from sdg.adm import noise_schedule
    from sdg.checkpoint import load_diffusion_model, load_noise_aware_clip_folder
    from sdg.digits_eval import digit_prompts, labelled_images, zero_shot_accuracy
    from sdg.sample_cli import run_loaded

    torch.set_num_threads(1)
    data = build_digits(args.data_dir)
    unet, flags = load_diffusion_model(args.unet or CKPT)
    unet_label = args.unet_label or (None if args.unet is None else Path(args.unet).name)
    schedule = noise_schedule(flags)
    images, labels, colors = labelled_images(data / "test", 32)
    n = 10 * args.per_class
    prompts = [digit_prompts()[i % 10] for i in range(n)]
    targets = [(i % 10, None) for i in range(n)]
    picks = []
    for i in range(n):
        idx = [j for j in range(len(labels)) if int(labels[j]) == i % 10]
        picks.append(idx[(i // 10) % len(idx)])
    refs = images[picks]
    ref_targets = [(int(labels[j]), colors[j]) for j in picks]
    out = Path(args.out)

    def emit(row: dict) -> None:
        if unet_label:
            row = {**row, "unet": unet_label}
        with open(out, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    def judged(imgs, tg):
        return judge_images(list(tensor_to_uint8(imgs).permute(0, 2, 3, 1).numpy()), tg)

    clips = dict(item.split("=", 1) for item in args.clips)
    bundles = {label: load_noise_aware_clip_folder(path) for label, path in clips.items()}
    for label, bundle in bundles.items():
        text = bundle.encode_text(digit_prompts())
        for t, acc in zero_shot_accuracy(bundle.clip, text, images, labels, schedule).items():
            emit({"clip": label, "kind": "probe", "t": t, "accuracy": acc, "n": len(labels)})
    jobs = [("language", w) for w in args.text_weights] + [("content", w) for w in args.content_weights] + [
        ("style", w) for w in args.style_weights]
    for kind, w in jobs:
        for label, bundle in bundles.items():
            start = time.time()
            if kind == "language":
                imgs = run_loaded(unet, flags, bundle, prompts, text_weight=w, respacing=str(args.steps), seed=0)
                scores = judged(imgs, targets)
                correct = [int(p == d) for p, (d, _) in zip(scores["predicted_digits"], targets)]
                emit({"clip": label, "kind": kind, "weight": w, "digit_correct": sum(correct), "n": n,
                      "digit_per_image": correct, "seconds": round(time.time() - start)})
            else:
                imgs = run_loaded(unet, flags, bundle, ["x"] * n, text_weight=0.0, image_weight=w,
                                  image_loss="semantic" if kind == "content" else "style", references=refs,
                                  respacing=str(args.steps), seed=0)
                scores = judged(imgs, ref_targets)
                digit = [int(p == d) for p, (d, _) in zip(scores["predicted_digits"], ref_targets)]
                color = [int(p == c) for p, (_, c) in zip(scores["predicted_colors"], ref_targets)]
                emit({"clip": label, "kind": kind, "weight": w, "digit_correct": sum(digit),
                      "color_correct": sum(color), "n": n, "digit_per_image": digit, "color_per_image": color,
                      "seconds": round(time.time() - start)})
    return 0


def paired_rows(rows_in: list[dict], reference: str | None, steps: int) -> list[dict]:
    """Each CLIP minus ``reference`` on the same images (same prompts or references, same starting noise and the
    same UNet): mean difference of per-image correctness with a 95 % paired-bootstrap interval."""
    if not reference:
        return []
    guided = [r for r in rows_in if r["kind"] != "probe" and "digit_per_image" in r]
    key = lambda r: (r["kind"], r["weight"], r["n"], r.get("unet"))  # noqa: E731
    refs = {key(r): r for r in guided if r["clip"] == reference}
    rows = []
    for r in guided:
        ref = refs.get(key(r))
        if r["clip"] == reference or ref is None:
            continue
        for part in ("digit", "color"):
            if f"{part}_per_image" not in r or f"{part}_per_image" not in ref:
                continue
            d, lo, hi = paired_difference(r[f"{part}_per_image"], ref[f"{part}_per_image"])
            what = {"language": "'a handwritten <digit>' digit accuracy",
                    "content": f"content guidance {part} agreement", "style": f"style guidance {part} agreement"}
            unet = f", UNet {r['unet']}" if r.get("unet") else ""
            rows.append(dict(name=f"sdg CLIP {r['clip']} minus {reference}: {what[r['kind']]}, weight "
                                  f"{r['weight']:g}{unet} (DDPM {steps} steps, paired over {r['n']} images, 95% "
                                  f"bootstrap CI {lo:+.2f} to {hi:+.2f})", value=round(d, 3), unit="acc"))
    return rows


def report(args) -> int:
    rows_in = [json.loads(line) for p in args.report for line in Path(p).read_text().splitlines() if line.strip()]
    command = "OMP_NUM_THREADS=1 python bench/bench_sdg_clip.py " + " ".join(args.command_note)
    rows = []
    for r in rows_in:
        if r.get("unet"):
            if r["kind"] == "probe":  # the probe does not involve the diffusion model
                continue
            r = {**r, "clip": f"{r['clip']} guiding the UNet {r['unet']}"}
        if r["kind"] == "probe":
            k = round(r["accuracy"] * r["n"])
            lo, hi = wilson(k, r["n"])
            rows.append(dict(name=f"sdg CLIP {r['clip']}: probe, zero-shot digit accuracy on x_t, t={r['t']} "
                                  f"({r['n']} test digits, 95% CI {lo:.2f}-{hi:.2f})", value=round(r["accuracy"], 3),
                             unit="acc"))
            continue
        for key in ("digit_correct", "color_correct"):
            if key not in r:
                continue
            lo, hi = wilson(r[key], r["n"])
            what = {"language": "'a handwritten <digit>', judged digit accuracy",
                    "content": f"content guidance, judged {key.split('_')[0]} agreement with the reference",
                    "style": f"style guidance, judged {key.split('_')[0]} agreement with the reference"}[r["kind"]]
            rows.append(dict(name=f"sdg CLIP {r['clip']}: {what}, weight {r['weight']:g} (DDPM {args.steps} steps, "
                                  f"{r['n']} images, 95% CI {lo:.2f}-{hi:.2f})", value=round(r[key] / r["n"], 3),
                             unit="acc"))
    rows += paired_rows(rows_in, args.paired_against, args.steps)
    for item in args.finetune_log:
        # validation lines of scripts/sdg/finetune_clip.py --eval_dir (the same probe, during fine-tuning)
        label, path = item.split("=", 1)
        for line in Path(path).read_text().splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            for t in (0, 200, 400, 600, 800):
                acc = entry[f"zero_shot_digit_acc_t{t}_noise_aware"]
                lo, hi = wilson(round(acc * 297), 297)
                rows.append(dict(name=f"sdg CLIP {label} at step {entry['step']}: probe, zero-shot digit accuracy on "
                                      f"x_t, t={t} (297 test digits, 95% CI {lo:.2f}-{hi:.2f})", value=round(acc, 3),
                                 unit="acc"))
    for row in rows:
        print(f"{row['name']}: {row['value']}")
    if not args.no_write:
        from common.bench_records import write_records

        write_records([{**row, "command": command, "section": SECTION} for row in rows],
                      replace_section=SECTION if args.replace_section else None)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", nargs="*", default=[f"shipped={CKPT / 'clip'}"], help="label=folder ...")
    parser.add_argument("--text_weights", type=float, nargs="*", default=[100.0, 300.0, 1000.0, 3000.0])
    parser.add_argument("--content_weights", type=float, nargs="*", default=[1000.0])
    parser.add_argument("--style_weights", type=float, nargs="*", default=[1e-3])
    parser.add_argument("--per_class", type=int, default=6)
    parser.add_argument("--steps", type=int, default=100, help="DDPM steps (the paper's 100)")
    parser.add_argument("--data_dir", default=str(REPO / "data" / "digits"))
    parser.add_argument("--out", default="sdg_clip.jsonl")
    parser.add_argument("--report", nargs="*", default=None, help="JSON-lines files of earlier runs: write records")
    parser.add_argument("--finetune_log", nargs="*", default=[],
                        help="label=<output_dir>/zero_shot.jsonl of finetune_clip.py runs: their probe lines as records")
    parser.add_argument("--command_note", nargs="*", default=[], help="the measuring command, for the records")
    parser.add_argument("--no_write", action="store_true")
    parser.add_argument("--paired_against", default=None,
                        help="with --report: the CLIP label every other CLIP is compared with, image by image")
    parser.add_argument("--replace_section", action="store_true",
                        help="with --report: drop this section's rows that the given files do not have")
    parser.add_argument("--unet", default=None, help="unconditional model folder (default: ckpt/tiny/sdg/unet)")
    parser.add_argument("--unet_label", default=None, help="its name in the records (default: the folder's name)")
    args = parser.parse_args(argv)
    return report(args) if args.report is not None else measure(args)


if __name__ == "__main__":
    sys.exit(main())
