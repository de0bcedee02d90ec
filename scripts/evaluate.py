"""Score generated images: the digits judge, FID/KID, CLIP similarity, mask agreement, frame consistency.

    python scripts/evaluate.py judge --images outputs/samples            # digit / colour accuracy (digits world)
    python scripts/evaluate.py fid GEN_DIR REF_DIR --inception_weights pt_inception-2015-12-05-6726825d.pth
    python scripts/evaluate.py clip-score GEN_DIR --clip ViT-B-32-quickgelu=ViT-B-32.pt
    python scripts/evaluate.py mask GEN_DIR MASK_DIR --num_classes 2

Every subcommand prints a table and writes a JSON report (``--out``; ``judge`` also takes ``--output``).
"""

import argparse
from pathlib import Path

from common.errors import cli_entry  # noqa: E402


def run_judge(args) -> dict:
    """``judge``: digit / colour accuracy of digits-world images against their prompts (``common.judge``)."""
    from common.eval_cli import format_table, write_json_atomic
    from common.judge import judge_folder

    scores = judge_folder(args.images, args.metadata)
    out = write_json_atomic(args.out or Path(args.images) / "scores.json", scores)
    rows = [(name, scores[name]) for name in ("digit_accuracy", "color_accuracy", "both_accuracy", "count",
                                             "judge_heldout_digit_accuracy")]
    print(format_table([(name, "n/a" if value is None else value) for name, value in rows]))
    print(f"wrote {out}")
    return scores


def add_judge(subparsers) -> None:
    judge = subparsers.add_parser("judge", help="digit and colour accuracy of digits-world images against their "
                                                "prompts")
    judge.add_argument("--images", required=True,
                       help="folder with the images and metadata.jsonl or prompts.jsonl (file_name, text)")
    judge.add_argument("--metadata", default=None, help="a jsonl file elsewhere (file_name paths relative to it)")
    judge.add_argument("--out", "--output", dest="out", default=None,
                       help="JSON report (default: <images>/scores.json)")
    judge.set_defaults(func=run_judge)


# One entry per subcommand: a function adding its parser (which sets ``func``). Add a metric by adding a line.
SUBCOMMANDS = (add_judge,)


def build_parser() -> argparse.ArgumentParser:
    from common.eval_cli import register_metric_subcommands

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    register_metric_subcommands(sub)
    return parser


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
