"""Generate images with any method of the lab: one entry point, the same flags, the same outputs.

    python scripts/sample.py --prompt "a red handwritten seven" --num_images 8            # shipped tiny baseline
    python scripts/sample.py --method baseline --pretrained_model_name_or_path PATH/TO/SD --resolution 512 \\
        --prompt "a photo of a cat" --steps 50 --guidance_scale 7.5 --sampler ddim --seed 0

Writes ``<output_dir>/images/NNNN.png``, ``grid.png``, ``metadata.jsonl`` (file_name, text: the judge's input) and
``settings.json``; the folder appears only when everything is written. With the DDIM sampler on a diffusers Stable
Diffusion folder, ``--seed S`` gives the same images as ``StableDiffusionPipeline(..., generator=
torch.Generator().manual_seed(S))`` for the same prompts, steps and guidance scale (all images in one batch).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import limits  # noqa: E402
from common.errors import UserError, cli_entry  # noqa: E402
from common.limits import add_memory_argument  # noqa: E402


REPO = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINTS = {"baseline": REPO / "ckpt" / "tiny" / "baseline"}
# A method plugs in with a module defining ``add_arguments(parser)`` (its own flags, in an argument group),
# ``generate(args, prompts) -> [N, 3, H, W] tensor in [0, 1]`` and ``DEFAULT_CHECKPOINT`` (a path under the repo);
# optionally ``SAMPLE_DEFAULTS`` ({"sampler": "ddpm", ...}): its own defaults for the shared flags, since one default
# cannot fit all (SDG's guidance is tuned for its DDPM sampler; CoDiff's release samples DDIM with eta 1).
METHOD_MODULES = {
    "baseline": None,
    "contextdiff": "contextdiff.sample_cli",
    "shifted": "shifted.sample_cli",
    "codiff": "codiff.sample_cli",
    "sdg": "sdg.sample_cli",
    "versatile": "versatile.sample_cli",
}
METHODS = tuple(METHOD_MODULES)


def method_module(name: str):
    import importlib

    module = METHOD_MODULES[name]
    if module is None:
        return None
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name == module:
            raise UserError(f"method {name!r} has no sampling entry yet ({module}): see its issue") from None
        raise


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", default="baseline", choices=METHODS, help="which method generates")
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="a local diffusers pipeline folder (default: the method's tiny checkpoint in ckpt/tiny/)")
    p.add_argument("--prompt", action="append", default=None, help="a prompt; repeat the flag for several")
    p.add_argument("--prompt_file", default=None, help="a text file with one prompt per line")
    p.add_argument("--num_images", type=int, default=None,
                   help="images in total (prompts are cycled); default: one per prompt")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--negative_prompt", default="", help="the unconditional prompt for CFG")
    p.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"),
                   help="default ddim; a method may set its own (sdg: ddpm; see --method NAME --help)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default="outputs/samples")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    add_memory_argument(p)
    return p


def parse_args(argv=None):
    """Two passes: ``--method`` first, so the chosen method can add its own flags."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default="baseline", choices=METHODS)
    known, _ = pre.parse_known_args(argv)
    parser = build_parser()
    module = method_module(known.method)
    if module is not None:
        module.add_arguments(parser.add_argument_group(f"{known.method} options"))
        parser.set_defaults(**getattr(module, "SAMPLE_DEFAULTS", {}))  # explicit flags still win
    return parser.parse_args(argv), module


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
    n = len(prompts) if args.num_images is None else limits.count(args.num_images, "--num_images")
    return [prompts[i % len(prompts)] for i in range(n)]


def check_args(args) -> None:
    """The shared flags, bounded (common.limits): a method's own flags are checked by its module."""
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    limits.steps(args.steps)
    limits.check_namespace(args)  # every float flag finite (guidance, eta, the methods' weights), seeds in range
    limits.finite(args.eta, "--eta", 0.0, 1.0)
    if args.num_images is not None:
        limits.count(args.num_images, "--num_images")
    if args.resolution is not None and args.resolution < 8:
        raise UserError(f"--resolution must be >= 8 pixels, got {args.resolution}")
    # All images are sampled in one batch (see the module docstring), so the batch is --num_images.
    limits.check_memory(args, batch=args.num_images or 1, height=args.resolution)


def generate_baseline(args, prompts):
    import torch

    from common.pipeline import LatentTextToImage

    folder = args.pretrained_model_name_or_path or str(DEFAULT_CHECKPOINTS["baseline"])
    if not os.path.isdir(folder):
        raise UserError(f"checkpoint folder {folder} does not exist: pass --pretrained_model_name_or_path, or run "
                        "`make tiny-checkpoints` to train the shipped tiny models")
    pipe = LatentTextToImage.from_pretrained(folder, device=args.device)
    out = pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
               negative_prompt=args.negative_prompt, sampler=args.sampler, eta=args.eta,
               height=args.resolution, width=args.resolution,
               generator=torch.Generator().manual_seed(args.seed), progress=not args.no_progress)
    return out.images


def generate_images(args, module, prompts):
    """``[N, 3, H, W]`` in [0, 1] for parsed ``args`` (:func:`parse_args`): the one generation step of :func:`main`,
    shared with ``scripts/app.py`` so that the same settings give the same images in the browser."""
    if module is None:
        return generate_baseline(args, prompts)
    if args.pretrained_model_name_or_path is None:
        args.pretrained_model_name_or_path = str(REPO / module.DEFAULT_CHECKPOINT)
    return module.generate(args, prompts)


def write_outputs(images, prompts, args) -> Path:
    from common.io import atomic_write_dir, save_image_grid, to_pil

    out = Path(args.output_dir)
    with atomic_write_dir(out) as tmp:
        (tmp / "images").mkdir()
        with open(tmp / "metadata.jsonl", "w") as meta:
            for i, (image, prompt) in enumerate(zip(images, prompts)):
                name = f"images/{i:04d}.png"
                to_pil(image, value_range=(0, 1)).save(tmp / name)
                meta.write(json.dumps({"file_name": name, "text": prompt}) + "\n")
        save_image_grid(images, tmp / "grid.png", nrow=min(8, len(prompts)), value_range=(0, 1))
        settings = {k: v for k, v in vars(args).items()}
        (tmp / "settings.json").write_text(json.dumps(settings, indent=2))
    return out


@cli_entry
def main(argv=None) -> int:
    from common.io import check_output_dir

    args, module = parse_args(argv)
    check_args(args)
    prompts = read_prompts(args)
    check_output_dir(args.output_dir)  # before generating: a folder we may not write is refused up front
    images = generate_images(args, module, prompts)
    out = write_outputs(images, prompts, args)
    print(f"wrote {len(prompts)} images, grid.png and metadata.jsonl to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
