"""The cross-method table on digits: every shipped method next to the baseline, same judge, prompts and seed.

    python bench/cross_method.py [--num_prompts 60 --seed 0]       # what `make bench` runs

Generates the 60 (digit, colour) evaluation prompts with the baseline and each method whose tiny checkpoint is in
``ckpt/tiny/`` (each registered method's ``evaluate_digits``, ``common.methods``), judges them, writes records to bench/results.json /
results.md (digit, colour, both accuracy, seconds), and draws ``bench/cross_method.png``: one row of samples per
method beside bars of its scores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent

METRICS = ("digit_accuracy", "color_accuracy", "both_accuracy")


def draw_table(rows: dict[str, dict], folders: dict[str, Path], path: Path, per_row: int = 10) -> None:
    """One line per method: its first ``per_row`` samples (one per digit) and three score bars."""
    from PIL import Image, ImageDraw

    cell, label_w, bar_w = 40, 110, 240
    height = cell * len(rows) + 30
    canvas = Image.new("RGB", (label_w + per_row * cell + bar_w + 20, height), "white")
    draw = ImageDraw.Draw(canvas)
    colors = {"digit_accuracy": (70, 110, 200), "color_accuracy": (220, 120, 40), "both_accuracy": (60, 160, 80)}
    x_bar = label_w + per_row * cell + 10
    for j, metric in enumerate(METRICS):
        draw.rectangle([x_bar + j * 80, 6, x_bar + j * 80 + 10, 16], fill=colors[metric])
        draw.text((x_bar + j * 80 + 14, 4), metric.split("_")[0], fill="black")
    for i, (name, scores) in enumerate(rows.items()):
        y = 30 + i * cell
        draw.text((4, y + cell // 2 - 6), name, fill="black")
        images = sorted((folders[name] / "images").glob("*.png"))[:per_row]
        for k, image_path in enumerate(images):
            with Image.open(image_path) as im:
                canvas.paste(im.convert("RGB").resize((cell - 4, cell - 4)), (label_w + k * cell, y + 2))
        for j, metric in enumerate(METRICS):
            value = scores.get(metric) or 0.0
            top = y + 4 + j * 11
            draw.rectangle([x_bar, top, x_bar + int(value * (bar_w - 50)), top + 8], fill=colors[metric])
            draw.text((x_bar + int(value * (bar_w - 50)) + 4, top - 2), f"{value:.2f}", fill="black")
    canvas.save(path)


def main(argv=None):
    from records import write_records  # bench/records.py: this script's folder is on the path when it runs

    from common import methods
    from common.digits import build_digits

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_prompts", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default="outputs/cross_method")
    p.add_argument("--methods", nargs="*", default=None,
                   help="default: every registered method with a digits protocol and a shipped checkpoint")
    args = p.parse_args(argv)
    build_digits(REPO / "data" / "digits")
    out = Path(args.output_dir)
    start = time.perf_counter()
    names = ["baseline", *(n for n in (args.methods or methods.names()) if n != "baseline")]
    rows, folders = {}, {}
    for name in names:
        spec = methods.get(name)
        if spec.evaluate_digits is None or not spec.checkpoint_path().exists():
            continue
        rows[name] = spec.evaluate_digits(out / name, n=args.num_prompts, seed=args.seed)
        folders[name] = out / name
    total = time.perf_counter() - start
    command = "python bench/cross_method.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = "cross-method table on digits"
    records = []
    for name, scores in rows.items():
        for metric in METRICS:
            if scores.get(metric) is not None:
                records.append(dict(name=f"{name}: {metric.replace('_', ' ')} ({args.num_prompts} prompts, seed "
                                         f"{args.seed})", value=round(scores[metric], 4), unit="acc", target="",
                                    command=command, section=section))
        if "seconds" in scores:
            records.append(dict(name=f"{name}: seconds to generate and judge {args.num_prompts} images",
                                value=round(scores["seconds"], 1), unit="s", target="", command=command,
                                section=section))
    records.append(dict(name="cross-method table: total wall time", value=round(total, 1), unit="s", target="",
                        command=command, section=section))
    write_records(records)
    draw_table(rows, folders, REPO / "bench" / "cross_method.png")
    for name, scores in rows.items():
        print(f"{name:<12} " + "  ".join(f"{m.split('_')[0]} {scores.get(m) or 0:.3f}" for m in METRICS))
    print(f"table in bench/results.md, picture in bench/cross_method.png ({total:.0f} s)")


if __name__ == "__main__":
    main()
