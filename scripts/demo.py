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
import importlib
import json
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common.errors import UserError, cli_entry  # noqa: E402


METHOD_MODULES = {
    "contextdiff": "contextdiff.sample_cli",
    "shifted": "shifted.sample_cli",
    "codiff": "codiff.sample_cli",
    "sdg": "sdg.sample_cli",
    "versatile": "versatile.sample_cli",
}


def evaluate_baseline(output_dir: Path, n: int, seed: int, steps: int = 25, guidance_scale: float = 3.0) -> dict:
    """The baseline on the digits evaluation prompts, judged."""
    import torch

    from common.digits import evaluation_prompts
    from common.io import atomic_write_dir, save_image_grid, to_pil
    from common.judge import judge_folder
    from common.pipeline import LatentTextToImage

    folder = REPO / "ckpt" / "tiny" / "baseline"
    if not folder.is_dir():
        raise UserError(f"{folder} is missing: run `make tiny-checkpoints` to train the shipped tiny models")
    start = time.perf_counter()
    prompts = evaluation_prompts(n)
    pipe = LatentTextToImage.from_pretrained(str(folder))
    images = pipe([p["text"] for p in prompts], num_inference_steps=steps, guidance_scale=guidance_scale,
                  generator=torch.Generator().manual_seed(seed), progress=True).images
    with atomic_write_dir(output_dir) as tmp:
        (tmp / "images").mkdir()
        with open(tmp / "metadata.jsonl", "w") as meta:
            for i, (image, p) in enumerate(zip(images, prompts)):
                to_pil(image, value_range=(0, 1)).save(tmp / f"images/{i:04d}.png")
                meta.write(json.dumps({"file_name": f"images/{i:04d}.png", **p}) + "\n")
        save_image_grid(images, tmp / "grid.png", nrow=10, value_range=(0, 1))
    scores = judge_folder(output_dir)
    scores["seconds"] = round(time.perf_counter() - start, 2)
    return scores


def evaluate_contextdiff_video(output_dir: Path, seed: int) -> dict:
    """One ContextDiff video edit of the embedded clip: GIF/MP4, strip and settings in ``output_dir``;
    returns its scores (judge on the edited frames, frame consistency, structure kept) and the time taken."""
    from contextdiff import video_cli as script
    args = script.build_parser().parse_args([
        "--video", "embedded:7:red", "--target_prompt", "a blue handwritten seven", "--n_frames", "8",
        "--steps", "25", "--train_steps", "60", "--guidance_scale", "3", "--seed", str(seed),
        "--display_scale", "4", "--output_dir", str(output_dir)])
    settings = script.run(args)
    return {**settings["scores"], "seconds": settings["seconds"], "edit": "a red handwritten seven -> a blue "
            "handwritten seven (8 frames)"}


def available_methods(names) -> dict:
    """The method modules that import and ship a tiny checkpoint."""
    found = {}
    for name in names:
        try:
            module = importlib.import_module(METHOD_MODULES[name])
        except ModuleNotFoundError:
            continue
        if hasattr(module, "evaluate_digits") and (REPO / module.DEFAULT_CHECKPOINT).exists():
            found[name] = module
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
    parser.add_argument("--methods", nargs="*", default=list(METHOD_MODULES), choices=list(METHOD_MODULES))
    args = parser.parse_args(argv)
    if args.num_prompts < 1:
        raise UserError(f"--num_prompts must be >= 1, got {args.num_prompts}")
    from common.io import claim_output_dir

    out = claim_output_dir(args.output_dir)  # new, empty or an earlier demo's: never a folder of the user's
    data = build_digits(args.data_dir)
    print(f"digits dataset: {data}")
    results = {"judge on real held-out digits": real_test_scores()}
    print(summary_line(results["judge on real held-out digits"], "judge ceiling (real test digits)   "))
    results["baseline"] = evaluate_baseline(out / "baseline", args.num_prompts, args.seed)
    print(summary_line(results["baseline"], "baseline                           "))
    for name, module in available_methods(args.methods).items():
        scores = module.evaluate_digits(out / name, n=args.num_prompts, seed=args.seed)
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
