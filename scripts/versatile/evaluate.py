"""Judge every flow of a Versatile Diffusion folder on the digits world (and the baseline beside it).

    python scripts/versatile/evaluate.py --n 120 --record        # the shipped ckpt/tiny/versatile/pipeline

- **t2i**: ``evaluation_prompts(n)`` (every (digit, colour) pair evenly), judged digit / colour accuracy
  (``common.judge``); the baseline (``ckpt/tiny/baseline``) on the same prompts, seed and sampler settings.
- **iv** (image variation): the first ``n`` test images as sources, one variation each; the judge must find the
  source's digit and colour in the variation (the sources' own score is the ceiling).
- **i2t** (image-to-text): a caption per test image; its digit and colour words (``common.judge.parse_prompt``)
  must match the image's labels. Greedy decoding (temperature 0) and VD's sampling (temperature 1).
- **tv** (text variation): the test captions as sources; the variation's parsed digit / colour must match the
  source's; also how often it is a verbatim copy.
- **dual**: text and image that disagree (text asks for another digit and colour than the image shows); at text
  ratio 0 / 0.5 / 1 the share of outputs whose judged digit / colour follows the text vs the image.

Writes images, captions and ``scores.json`` under ``--output_dir``; ``--record`` also writes the numbers to
``bench/results.md`` (``bench/records.py``) with this command line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


REPO = Path(__file__).resolve().parent.parent.parent

from common.errors import UserError, cli_entry  # noqa: E402
from common.methods import add_flag  # noqa: E402


SECTION = "versatile: digits quality"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="ckpt/tiny/versatile/pipeline")
    p.add_argument("--baseline", default="ckpt/tiny/baseline", help="SD folder for the t2i comparison ('' to skip)")
    p.add_argument("--data_dir", default="data/digits/test", help="labelled images + captions (metadata.jsonl)")
    p.add_argument("--n", type=int, default=120, help="prompts / sources per flow")
    add_flag(p, "--num_inference_steps", "--steps", dest="steps", type=int, default=25,
             help="DDIM steps (scripts/demo.py's baseline uses 25)")
    add_flag(p, "--guidance_scale", "--scale", type=float, default=3.0,
             help="CFG scale (scripts/demo.py's baseline uses 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flows", default="t2i,iv,i2t,tv,dual", help="comma list of flows to evaluate")
    p.add_argument("--output_dir", default="outputs/versatile/eval")
    p.add_argument("--record", action="store_true", help="write the numbers to bench/results.md")
    return p


def read_labelled(folder: Path, n: int):
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "digit" in r and "color" in r][:n]
    if not rows:
        raise UserError(f"{folder}/metadata.jsonl has no rows with digit and color labels")
    from versatile.flows_cli import load_images

    images = load_images([folder / r["file_name"] for r in rows], 32)
    return rows, images


def chunks(n: int, size: int = 60):
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def judge(images, targets):
    from common.io import to_pil
    from common.judge import judge_images

    scores = judge_images([to_pil(im, value_range=(0, 1)) for im in images], targets)
    return {k: scores[k] for k in ("digit_accuracy", "color_accuracy", "both_accuracy", "count")}, scores


def save_images(folder: Path, images, rows):
    from common.io import write_image_folder

    write_image_folder(folder, images, rows)


def text_scores(texts, targets):
    from common.judge import parse_prompt

    parsed = [parse_prompt(t) for t in texts]
    d = sum(p[0] == t[0] for p, t in zip(parsed, targets)) / len(texts)
    c = sum(p[1] == t[1] for p, t in zip(parsed, targets)) / len(texts)
    both = sum(p == tuple(t) for p, t in zip(parsed, targets)) / len(texts)
    return {"digit_accuracy": d, "color_accuracy": c, "both_accuracy": both, "count": len(texts)}


@cli_entry
def main(argv=None) -> int:
    from common.digits import COLORS, evaluation_prompts
    from versatile.checkpoint import check_flow, load_pipeline
    from versatile.sample_cli import sample_t2i

    args = build_parser().parse_args(argv)
    flows = [f.strip() for f in args.flows.split(",") if f.strip()]
    out = Path(args.output_dir)
    pipe, manifest = load_pipeline(REPO / args.checkpoint if not Path(args.checkpoint).is_absolute()
                                   else args.checkpoint)
    for flow in flows:
        check_flow(manifest, flow)
    kw = dict(guidance_scale=args.guidance_scale, num_inference_steps=args.steps)
    results, records = {}, []
    settings = f"n={args.n}, DDIM {args.steps} steps, CFG {args.guidance_scale}, seed {args.seed}"

    def record(name, value, unit="", target=""):
        records.append({"name": name, "value": round(value, 4) if isinstance(value, float) else value, "unit": unit,
                        "target": target})

    rows, sources = read_labelled(REPO / args.data_dir if not Path(args.data_dir).is_absolute()
                                  else Path(args.data_dir), args.n)
    targets = [(r["digit"], r["color"]) for r in rows]
    if "t2i" in flows:
        start = time.perf_counter()
        prompts = evaluation_prompts(args.n)
        images = sample_t2i(pipe, [p["text"] for p in prompts], seed=args.seed, steps=args.steps,
                            guidance_scale=args.guidance_scale)
        save_images(out / "t2i", images, prompts)
        results["t2i"], _ = judge(images, [(p["digit"], p["color"]) for p in prompts])
        results["t2i"]["seconds"] = round(time.perf_counter() - start, 1)
        if args.baseline:
            from common.pipeline import LatentTextToImage

            base = LatentTextToImage.from_pretrained(str(REPO / args.baseline))
            bimgs = torch.cat([base([p["text"] for p in prompts[a:b]], num_inference_steps=args.steps,
                                    guidance_scale=args.guidance_scale, progress=False,
                                    generator=torch.Generator().manual_seed(args.seed * 1000 + a // 60)).images
                               for a, b in chunks(len(prompts))])
            save_images(out / "baseline_t2i", bimgs, prompts)
            results["baseline_t2i"], _ = judge(bimgs, [(p["digit"], p["color"]) for p in prompts])
        for key, label in (("t2i", "versatile t2i"), ("baseline_t2i", "baseline (same prompts, seeds, sampler)")):
            if key in results:
                for what in ("digit", "color", "both"):
                    record(f"{label}: judged {what} accuracy ({settings})", results[key][f"{what}_accuracy"])
    if "iv" in flows:
        results["iv_sources"], _ = judge(sources, targets)
        images = torch.cat([pipe("iv", image=sources[a:b], generator=torch.Generator().manual_seed(args.seed + a),
                                 **kw).images for a, b in chunks(len(rows))])
        save_images(out / "iv", images, [{"text": r["text"], "digit": r["digit"], "color": r["color"],
                                          "source": r["file_name"]} for r in rows])
        results["iv"], _ = judge(images, targets)
        for what in ("digit", "color", "both"):
            record(f"versatile iv: variation keeps the source's {what} (judged; {settings})",
                   results["iv"][f"{what}_accuracy"])
            record(f"versatile iv: judge on the source images themselves, {what} (ceiling)",
                   results["iv_sources"][f"{what}_accuracy"])
    if "i2t" in flows:
        for name, temperature in (("greedy", 0.0), ("sampled", 1.0)):
            texts = []
            for a, b in chunks(len(rows)):
                texts += pipe("i2t", image=sources[a:b], text_temperature=temperature,
                              generator=torch.Generator().manual_seed(args.seed + a), **kw).texts
            results[f"i2t_{name}"] = text_scores(texts, targets)
            results[f"i2t_{name}"]["examples"] = [[r["file_name"], r["text"], t] for r, t in zip(rows[:8], texts)]
            (out / f"i2t_{name}.jsonl").parent.mkdir(parents=True, exist_ok=True)
            (out / f"i2t_{name}.jsonl").write_text("".join(json.dumps({"source": r["file_name"], "label": r["text"],
                                                                      "caption": t}) + "\n" for r, t in zip(rows, texts)))
            for what in ("digit", "color", "both"):
                record(f"versatile i2t ({name}, temperature {temperature:g}): caption's {what} word matches the image "
                       f"({settings})", results[f"i2t_{name}"][f"{what}_accuracy"])
    if "tv" in flows:
        captions = [r["text"] for r in rows]
        for name, temperature in (("greedy", 0.0), ("sampled", 1.0)):
            texts = []
            for a, b in chunks(len(rows)):
                texts += pipe("tv", prompt=captions[a:b], text_temperature=temperature,
                              generator=torch.Generator().manual_seed(args.seed + a), **kw).texts
            scores = text_scores(texts, targets)
            scores["verbatim_copies"] = sum(c.lower().split() == t.split() for c, t in zip(captions, texts)) / len(texts)
            scores["examples"] = [[c, t] for c, t in zip(captions[:8], texts)]
            results[f"tv_{name}"] = scores
            (out / f"tv_{name}.jsonl").write_text("".join(json.dumps({"source": c, "variation": t}) + "\n"
                                                          for c, t in zip(captions, texts)))
            for what in ("digit", "color", "both"):
                record(f"versatile tv ({name}, temperature {temperature:g}): variation keeps the source caption's "
                       f"{what} ({settings})", scores[f"{what}_accuracy"])
            record(f"versatile tv ({name}): verbatim copies of the source caption", scores["verbatim_copies"])
    if "dual" in flows:
        names = list(COLORS)
        # the text asks for digit + 5 and the colour three hues on: each output reads as text-like or image-like
        asked = [((d + 5) % 10, names[(names.index(c) + 3) % len(names)]) for d, c in targets]
        from common.digits import caption

        texts = [caption(d, c) for d, c in asked]
        for ratio in (0.0, 0.5, 1.0):
            images = torch.cat([pipe("dual", prompt=texts[a:b], image=sources[a:b], text_ratio=ratio,
                                     generator=torch.Generator().manual_seed(args.seed + a), **kw).images
                                for a, b in chunks(len(rows))])
            save_images(out / f"dual_{ratio:g}", images, [{"text": t, "source": r["file_name"]}
                                                         for t, r in zip(texts, rows)])
            _, raw = judge(images, asked)
            pd, pc = raw["predicted_digits"], raw["predicted_colors"]
            scores = {
                "digit_follows_text": sum(p == a[0] for p, a in zip(pd, asked)) / len(rows),
                "digit_follows_image": sum(p == s[0] for p, s in zip(pd, targets)) / len(rows),
                "color_follows_text": sum(p == a[1] for p, a in zip(pc, asked)) / len(rows),
                "color_follows_image": sum(p == s[1] for p, s in zip(pc, targets)) / len(rows),
            }
            results[f"dual_{ratio:g}"] = scores
            for key, value in scores.items():
                record(f"versatile dual, text ratio {ratio:g}: {key.replace('_', ' ')} (text and image disagree; "
                       f"{settings})", value)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scores.json").write_text(json.dumps(results, indent=2))
    for key, value in results.items():
        print(key, json.dumps({k: v for k, v in value.items() if k != "examples"}))
    if args.record:
        from common.bench_records import write_records

        command = "OMP_NUM_THREADS=1 python scripts/versatile/evaluate.py " + " ".join(argv or sys.argv[1:])
        for r in records:
            r.update({"command": command.strip(), "section": SECTION})
        write_records(records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
