"""Generate images with any registered method of the lab: one entry point, the same flags, the same outputs.

    python scripts/sample.py --prompt "a red handwritten seven" --num_images 8            # shipped tiny baseline
    python scripts/sample.py --method baseline --checkpoint PATH/TO/SD --resolution 512 \\
        --prompt "a photo of a cat" --num_inference_steps 50 --guidance_scale 7.5 --sampler ddim --seed 0
    python scripts/sample.py --method codiff --help                                       # a method's own flags

Writes ``<output_dir>/images/NNNN.png``, ``grid.png``, ``metadata.jsonl`` (file_name, text: the judge's input) and
``settings.json``; the folder appears only when everything is written. The methods and their flags come from the
registry (``common.methods``): each method's settings dataclass is its flags, with its own defaults. Old flag
spellings (``--pretrained_model_name_or_path``, ``--steps``, ``--scale``) still work and print a warning.

This module is the command itself; ``scripts/sample.py`` (and method shortcuts such as ``scripts/contextdiff/
sample.py``) are its entry points.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import limits, methods
from common.errors import UserError, cli_entry


# The output folders' manifest names the entry point users run, so a folder written by earlier versions (when the
# command lived in scripts/sample.py) stays this command's own to rewrite.
WRITER = "scripts/sample.py"
OLD_CHECKPOINT_FLAGS = ("--pretrained_model_name_or_path", "--model_dir", "--model_path")


def build_parser(spec: methods.MethodSpec | None = None) -> argparse.ArgumentParser:
    """The flags: ``--method``, prompts, checkpoint and run options, then the chosen method's settings."""
    spec = spec or methods.get("baseline")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", default="baseline", choices=methods.names(),
                   help="which method generates (--method NAME --help lists its own flags)")
    p.add_argument("--checkpoint", default=None,
                   help="the method's checkpoint folder (default: its tiny checkpoint in ckpt/tiny/)")
    for old in OLD_CHECKPOINT_FLAGS:
        methods.add_old_spelling(p, old, "--checkpoint", "checkpoint")
    p.add_argument("--prompt", action="append", default=None, help="a prompt; repeat the flag for several")
    p.add_argument("--prompt_file", default=None, help="a text file with one prompt per line")
    p.add_argument("--num_images", type=int, default=None,
                   help="images in total (prompts are cycled); default: one per prompt")
    p.add_argument("--output_dir", default="outputs/samples")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the denoiser (one graph per run's shape; the first step pays the compile "
                        "time, tens of seconds on a CPU); without a compiler: one note, then eager")
    limits.add_memory_argument(p)
    group = p.add_argument_group(f"{spec.name} settings", spec.description)
    methods.add_settings_arguments(group, spec.settings)
    return p


def parse_args(argv=None):
    """Two passes: ``--method`` first, so that the chosen method's settings become the flags."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default="baseline", choices=methods.names())
    known, _ = pre.parse_known_args(argv)
    spec = methods.get(known.method)
    return build_parser(spec).parse_args(argv), spec


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise UserError(f"prompt file {path} does not exist: pass a text file with one prompt per line")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UserError("no prompt given: pass --prompt TEXT (repeatable) or --prompt_file FILE")
    if any(not p.strip() for p in prompts):
        raise UserError("an empty prompt was given: write the text to generate, or use --guidance_scale 1 with a "
                        "real prompt")
    n = args.num_images or len(prompts)
    if n < 1:
        raise UserError(f"--num_images must be >= 1, got {n}")
    return [prompts[i % len(prompts)] for i in range(n)]


def settings_of(args, spec: methods.MethodSpec):
    """The method's settings object for parsed flags, checked (one-line UserError if wrong)."""
    limits.check_namespace(args)  # every float flag finite (guidance, eta, the methods' weights), seeds in range
    if args.num_images is not None:
        limits.count(args.num_images, "--num_images")
    settings = methods.settings_from_args(spec.settings, args, prompts=read_prompts(args))
    settings.check()
    if not settings.makes_images():
        raise UserError(f"{spec.name} with these settings generates captions, not images: use the method's own "
                        "script (e.g. scripts/versatile/sample.py)")
    return settings


def write_outputs(images, prompts, out: Path, record: dict) -> Path:
    """Images, grid, ``metadata.jsonl`` and ``settings.json``, all or nothing.

    Every image carries what made it: its ``metadata.jsonl`` row and its PNG text chunk ("parameters") hold the
    prompt, the seed of the batch it was sampled in, its index in that batch and the full settings, so one image
    file alone says how to reproduce it (rerun the settings; the image is row ``batch_index``).
    """
    from PIL.PngImagePlugin import PngInfo

    from common.io import atomic_write_dir, save_image_grid, to_pil

    out = Path(out)
    with atomic_write_dir(out, writer=WRITER) as tmp:
        (tmp / "images").mkdir()
        with open(tmp / "metadata.jsonl", "w") as meta:
            for i, (image, prompt) in enumerate(zip(images, prompts)):
                name = f"images/{i:04d}.png"
                row = {"file_name": name, "text": prompt, "seed": record.get("seed"), "batch_index": i}
                info = PngInfo()
                info.add_text("parameters", json.dumps({**row, "settings": record}))
                to_pil(image, value_range=(0, 1)).save(tmp / name, pnginfo=info)
                meta.write(json.dumps(row) + "\n")
        save_image_grid(images, tmp / "grid.png", nrow=min(8, len(prompts)), value_range=(0, 1))
        (tmp / "settings.json").write_text(json.dumps(record, indent=2))
    return out


@cli_entry
def main(argv=None) -> int:
    from common.io import check_output_dir

    args, spec = parse_args(argv)
    settings = settings_of(args, spec)
    check_output_dir(args.output_dir, writer=WRITER)  # before generating: a folder we may not write is refused up front
    checkpoint = args.checkpoint or str(spec.checkpoint_path())
    pipeline = spec.load(checkpoint, args.device)
    if not getattr(pipeline, "plans_memory", False):
        # All images are sampled in one batch, so the batch is the number of prompts. A pipeline that plans its
        # memory from its models' widths refuses what cannot fit itself, before sampling.
        limits.check_memory(args, batch=len(settings.prompts), height=getattr(settings, "resolution", None))
    from common.compile import compiling, default_options

    with compiling(default_options(freeze=True) if args.compile else None):  # weights are fixed while sampling
        result = pipeline(settings, callback=None if args.no_progress else methods.TerminalProgress())
    record = {"method": spec.name, "checkpoint": checkpoint, "device": args.device, "output_dir": args.output_dir,
              **methods.settings_dict(settings), "compile": bool(args.compile)}
    if "memory_plan" in result.extras:  # tiling changes pixels within its blending: say how the images were made
        record["memory_plan"] = result.extras["memory_plan"]
    out = write_outputs(result.images, settings.prompts, Path(args.output_dir), record)
    print(f"wrote {len(settings.prompts)} images, grid.png and metadata.jsonl to {out}")
    return 0
