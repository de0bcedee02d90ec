"""SDG: does a noise-aware CLIP that reads digits through more noise guide better? Probe vs guided accuracy.

For each noise-aware CLIP folder (``--clips label=path ...``; the shipped ``ckpt/tiny/sdg/clip`` and fine-tuning
variants of ``scripts/sdg/finetune_clip.py``), on the shipped unconditional digits ADM (``ckpt/tiny/sdg/unet``):

- the probe: zero-shot digit accuracy of E'(x_t, t) against "a handwritten <digit>" on the 297 noised test digits,
  t = 0 / 200 / 400 / 600 / 800 (``sdg.digits_eval.zero_shot_accuracy``, the probe of ``bench/bench_sdg.py``);
- language guidance: judged digit accuracy of samples guided by "a handwritten <digit>" (``--per_class`` per digit,
  DDPM ``--steps`` steps, the paper's 100), per text weight;
- content (semantic) and style guidance from test references (one per sample, digits balanced): judged digit and
  colour agreement with the reference.

Every CLIP sees the same prompts, references and sampling seeds; 95 % Wilson intervals. Each result is appended to
``--out`` (JSON lines) as soon as it exists, so an interrupted run keeps what it measured::

    OMP_NUM_THREADS=1 python bench/bench_sdg_clip.py --clips shipped=ckpt/tiny/sdg/clip new=outputs/clip_run/clip \
        --text_weights 100 300 1000 3000 --out sdg_clip.jsonl
    python bench/bench_sdg_clip.py --report sdg_clip.jsonl     # writes bench/results.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


REPO = Path(__file__).resolve().parent.parent
CKPT = REPO / "ckpt" / "tiny" / "sdg"
SECTION = "sdg: noise-aware CLIP variants, probe vs guided accuracy"


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k / n."""
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / denom
    return (centre - half, centre + half)


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
    unet, flags = load_diffusion_model(CKPT)
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
                k = round(scores["digit_accuracy"] * n)
                emit({"clip": label, "kind": kind, "weight": w, "digit_correct": k, "n": n,
                      "seconds": round(time.time() - start)})
            else:
                imgs = run_loaded(unet, flags, bundle, ["x"] * n, text_weight=0.0, image_weight=w,
                                  image_loss="semantic" if kind == "content" else "style", references=refs,
                                  respacing=str(args.steps), seed=0)
                scores = judged(imgs, ref_targets)
                emit({"clip": label, "kind": kind, "weight": w, "digit_correct": round(scores["digit_accuracy"] * n),
                      "color_correct": round(scores["color_accuracy"] * n), "n": n,
                      "seconds": round(time.time() - start)})
    return 0


def report(args) -> int:
    rows_in = [json.loads(line) for p in args.report for line in Path(p).read_text().splitlines() if line.strip()]
    command = "OMP_NUM_THREADS=1 python bench/bench_sdg_clip.py " + " ".join(args.command_note)
    rows = []
    for r in rows_in:
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

        write_records([{**row, "command": command, "section": SECTION} for row in rows], replace_section=SECTION)
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
    args = parser.parse_args(argv)
    return report(args) if args.report is not None else measure(args)


if __name__ == "__main__":
    sys.exit(main())
