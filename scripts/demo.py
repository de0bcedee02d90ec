"""The lab's main job on the embedded default: build the digits world, generate with every shipped method, judge.

    python scripts/demo.py --output_dir outputs/demo          # what `make demo` runs

For the baseline and each method whose tiny checkpoint is in ``ckpt/tiny/``: generate the 60 (digit, colour)
evaluation prompts, write the images, a grid and ``metadata.jsonl`` under ``<output_dir>/<method>/``, score them with
the independent judge, and print one table; ``<output_dir>/scores.json`` holds every number. With ContextDiff
selected, one text-guided video edit of the embedded moving-digit clip ("a red handwritten seven" -> "a blue
handwritten seven", ``scripts/contextdiff/edit_video.py``) goes to ``<output_dir>/contextdiff_video/``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import methods
from common.errors import UserError, cli_entry


REPO = Path(__file__).resolve().parent.parent


def evaluate_contextdiff_video(output_dir: Path, seed: int) -> dict:
    """One ContextDiff video edit of the embedded clip: GIF/MP4, strip and settings in ``output_dir``;
    returns its scores (judge on the edited frames, frame consistency, structure kept) and the time taken."""
    from contextdiff import video_cli as script
    args = script.build_parser().parse_args([
        "--video", "embedded:7:red", "--target_prompt", "a blue handwritten seven", "--n_frames", "8",
        "--num_inference_steps", "25", "--train_steps", "60", "--guidance_scale", "3", "--seed", str(seed),
        "--display_scale", "4", "--output_dir", str(output_dir)])
    settings = script.run(args)
    return {**settings["scores"], "seconds": settings["seconds"], "edit": "a red handwritten seven -> a blue "
            "handwritten seven (8 frames)"}


def demo_methods() -> list[str]:
    """Every registered method except the baseline (which the demo always runs first)."""
    return [name for name in methods.names() if name != "baseline"]


def available_methods(names) -> dict:
    """The registered methods among ``names`` that have a digits protocol and whose tiny checkpoint is shipped."""
    found = {}
    for name in names:
        try:
            spec = methods.get(name)
        except ModuleNotFoundError:
            continue
        if spec.evaluate_digits is not None and spec.checkpoint_path().exists():
            found[name] = spec
    return found


@cli_entry
def main(argv=None) -> int:
    from common.digits import build_digits
    from common.eval_cli import write_json_atomic
    from common.judge import real_test_scores, summary_line

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--data_dir", default="data/digits", help="where the digits dataset is built")
    parser.add_argument("--num_prompts", type=int, default=60, help="evaluation prompts (60 = every pair once)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="*", default=demo_methods(), choices=demo_methods(),
                        help="the methods to run besides the baseline (default: every registered one)")
    args = parser.parse_args(argv)
    if args.num_prompts < 1:
        raise UserError(f"--num_prompts must be >= 1, got {args.num_prompts}")
    from common.io import claim_output_dir

    out = claim_output_dir(args.output_dir)  # new, empty or an earlier demo's: never a folder of the user's
    data = build_digits(args.data_dir)
    print(f"digits dataset: {data}")
    results = {"judge on real held-out digits": real_test_scores()}
    print(summary_line(results["judge on real held-out digits"], "judge ceiling (real test digits)   "))
    results["baseline"] = methods.get("baseline").evaluate_digits(out / "baseline", n=args.num_prompts, seed=args.seed)
    print(summary_line(results["baseline"], "baseline                           "))
    for name, spec in available_methods(args.methods).items():
        scores = spec.evaluate_digits(out / name, n=args.num_prompts, seed=args.seed)
        results[name] = scores
        print(summary_line(scores, f"{name:<35}"))
    if "contextdiff" in args.methods and (REPO / "ckpt" / "tiny" / "contextdiff").is_dir():
        video = evaluate_contextdiff_video(out / "contextdiff_video", args.seed)
        results["contextdiff video edit"] = video
        print(f"{'contextdiff video edit, red->blue':<35}digit {100 * video['digit_accuracy']:.1f}%  colour "
              f"{100 * video['color_accuracy']:.1f}%  frame consistency {video['frame_consistency']:.3f}  "
              f"stroke IoU with the source {video['stroke_iou']:.3f}  ({video['seconds']:.1f} s)")
    for scores in results.values():
        scores.pop("predicted_digits", None)
        scores.pop("predicted_colors", None)
    write_json_atomic(out / "scores.json", results)
    print(f"images, grids and metadata under {out}/<method>/; all scores in {out / 'scores.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
