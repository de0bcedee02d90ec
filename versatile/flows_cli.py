"""The Versatile Diffusion flows on the command line: ``scripts/versatile/sample.py`` (:func:`main`) and the input checks
that ``sample_cli`` shares.

Everything here validates user input BEFORE a model is loaded or a file is written, so bad input is one line and
exit 2 (``common.errors.UserError``) with nothing on disk.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from common import limits
from common.errors import UserError, cli_entry
from common.methods import add_flag
from versatile.multiflow import FLOW_ALIASES, FLOW_CHOICES, FLOWS, Flow
from versatile.sample_cli import DEFAULT_CHECKPOINT, REPO


DESCRIPTION = ("Run any flow of a Versatile Diffusion folder: text-to-image, image variation, image-to-text, "
               "text variation, dual.")


def parse_flow(name: str) -> Flow:
    """A flow from its CLI name (``t2i i2i/iv i2t t2t/tv dual``, plus [R0]'s long names)."""
    key = FLOW_ALIASES.get(str(name), str(name))
    if key not in FLOWS:
        raise UserError(f"unknown flow {name!r}: choose one of {', '.join(FLOW_CHOICES)}")
    return FLOWS[key]


def check_flow_inputs(flow: Flow, prompts: Sequence[str], images: Sequence[str], mix_ratio: Optional[float],
                      prompts_are_labels: bool = False) -> None:
    """The inputs a flow takes: prompts for text contexts, images for image contexts, a ratio for dual only.

    ``prompts_are_labels``: prompts are allowed (as output labels) for image-only flows (``scripts/sample.py``
    always has prompts).
    """
    needs_text, needs_image = "text" in flow.ctypes, "image" in flow.ctypes
    if needs_text and not prompts:
        raise UserError(f"flow {flow.name} ({flow.description}) needs a prompt: pass --prompt TEXT")
    if needs_image and not images:
        raise UserError(f"flow {flow.name} ({flow.description}) needs an image: pass --image PATH")
    if images and not needs_image:
        raise UserError(f"flow {flow.name} ({flow.description}) takes no image, but --image was given: drop it, or "
                        "use iv / i2t / dual")
    if prompts and not needs_text and not prompts_are_labels:
        raise UserError(f"flow {flow.name} ({flow.description}) takes no prompt, but --prompt was given: drop it, "
                        "or use t2i / tv / dual")
    if mix_ratio is not None:
        if flow.name != "dual":
            raise UserError(f"--mix_ratio only applies to the dual flow, not {flow.name}: drop it")
        if not 0.0 <= float(mix_ratio) <= 1.0:
            raise UserError(f"--mix_ratio {mix_ratio} is outside [0, 1]: 0 = image context only, 1 = text only")


def check_image_paths(images: Sequence[str]) -> list[Path]:
    paths = [Path(p) for p in images]
    for path in paths:
        if not path.is_file():
            raise UserError(f"image {path} does not exist: pass an existing image file")
    return paths


def load_images(paths: Sequence[Path], size: int) -> torch.Tensor:
    """RGB images in [0, 1], resized (bicubic) to ``size`` x ``size``: ``[N, 3, size, size]``."""
    import numpy as np
    from PIL import Image

    from common.io import load_image_rgb

    out = []
    for path in paths:
        try:
            image = load_image_rgb(path)
        except (OSError, ValueError):
            raise UserError(f"cannot read image {path}: pass a PNG / JPEG file") from None
        if image.size != (size, size):
            image = image.resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255.0)
    return torch.stack(out)


def check_positive(name: str, value, minimum=1) -> None:
    if value is not None and value < minimum:
        raise UserError(f"--{name} must be >= {minimum}, got {value}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument("--flow", default="t2i", help="t2i | i2i (iv) | i2t | t2t (tv) | dual")
    p.add_argument("--pretrained_model_name_or_path", "--checkpoint", dest="checkpoint", default=None,
                   help=f"a versatile folder (versatile.json + diffuser/); default {DEFAULT_CHECKPOINT}")
    p.add_argument("--prompt", action="append", default=None, help="a prompt (text context); repeatable")
    p.add_argument("--image", action="append", default=None, help="an image file (image context); repeatable")
    p.add_argument("--mix_ratio", type=float, default=None, help="dual only: text weight in [0, 1] (default 0.5)")
    p.add_argument("--num_samples", type=int, default=1, help="samples per prompt / image")
    add_flag(p, "--num_inference_steps", "--steps", dest="steps", type=int, default=None,
             help="DDIM steps (default: the folder's, 50)")
    add_flag(p, "--guidance_scale", "--scale", type=float, default=None,
             help="classifier-free guidance scale (default 7.5; 1 = off)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--uncond_image", default=None, help="null image context: zeros | grey | black "
                                                         "(default: the folder's, else zeros for iv/dual, black i2t)")
    p.add_argument("--text_temperature", type=float, default=None, help="text flows: Optimus sampling temperature "
                                                                         "(0 = greedy; default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default="outputs/versatile/samples")
    p.add_argument("--vae_model_path", default=None, help="override the folder's image VAE")
    p.add_argument("--clip_model_path", default=None, help="override the folder's open_clip CLIP")
    p.add_argument("--text_vae_path", default=None, help="override the folder's text VAE")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no_progress", action="store_true")
    limits.add_memory_argument(p)
    return p


def check_args(args):
    """Every flag checked before loading: returns ``(flow, image paths)``."""
    from versatile.context import NULL_IMAGE_KINDS

    flow = parse_flow(args.flow)
    prompts, images = args.prompt or [], args.image or []
    if any(not p.strip() for p in prompts):
        raise UserError("an empty prompt was given: write the text to condition on")
    check_flow_inputs(flow, prompts, images, args.mix_ratio)
    check_positive("num_samples", args.num_samples)
    check_positive("num_inference_steps", args.steps)
    if not 0.0 <= args.eta <= 1.0:
        raise UserError(f"--eta must lie in [0, 1], got {args.eta}")
    if args.guidance_scale is not None and args.guidance_scale < 0:
        raise UserError(f"--guidance_scale must be >= 0, got {args.guidance_scale}")
    if args.uncond_image is not None and args.uncond_image not in NULL_IMAGE_KINDS:
        raise UserError(f"--uncond_image {args.uncond_image!r}: choose one of {', '.join(NULL_IMAGE_KINDS)}")
    if args.text_temperature is not None and args.text_temperature < 0:
        raise UserError(f"--text_temperature must be >= 0, got {args.text_temperature}")
    if flow.name == "dual" and len(prompts) > 1 and len(images) > 1 and len(prompts) != len(images):
        raise UserError(f"dual: {len(prompts)} prompts and {len(images)} images: give as many of each, or one")
    return flow, check_image_paths(images)


def run_flow(pipe, flow, prompts, images, args):
    """The pipeline call; returns ``(VersatileOutput, sources)`` with one source description per output."""
    import torch

    kwargs = dict(guidance_scale=args.guidance_scale, num_inference_steps=args.steps, eta=args.eta,
                  num_samples=args.num_samples, generator=torch.Generator().manual_seed(args.seed),
                  uncond_image=args.uncond_image, progress=not args.no_progress)
    if flow.xtype == "text":
        kwargs["text_temperature"] = args.text_temperature
    prompt = list(prompts) if prompts else None
    image = None
    if images:
        size = pipe.sampling.resolution or int(pipe.image_vae.config.sample_size)
        image = load_images(images, size)
    if flow.name == "dual":
        out = pipe(flow, prompt=prompt, image=image, text_ratio=args.mix_ratio, **kwargs)
    else:
        out = pipe(flow, prompt=prompt, image=image, **kwargs)
    conditions = max(len(prompts), len(images))
    sources = []
    for c in range(conditions):
        source = {}
        if prompts:
            source["prompt"] = prompts[c % len(prompts)]
        if images:
            source["image"] = str(images[c % len(images)])
        sources += [source] * args.num_samples
    return out, sources


def write_outputs(out, sources, args, flow) -> Path:
    from common.io import atomic_write_dir, save_image_grid, to_pil

    folder = Path(args.output_dir)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    with atomic_write_dir(folder) as tmp:
        with open(tmp / "metadata.jsonl", "w") as meta:
            if out.images is not None:
                (tmp / "images").mkdir()
                for i, (image, source) in enumerate(zip(out.images, sources)):
                    name = f"images/{i:04d}.png"
                    to_pil(image, value_range=(0, 1)).save(tmp / name)
                    text = source.get("prompt", "")
                    meta.write(json.dumps({"file_name": name, "text": text, "flow": flow.name, "source": source})
                               + "\n")
                save_image_grid(out.images, tmp / "grid.png", nrow=min(8, len(sources)), value_range=(0, 1))
            else:
                for text, source in zip(out.texts, sources):
                    meta.write(json.dumps({"text": text, "flow": flow.name, "source": source}) + "\n")
        (tmp / "settings.json").write_text(json.dumps(settings, indent=2))
    return folder


@cli_entry
def main(argv=None) -> int:
    from common.io import check_output_dir
    from versatile.checkpoint import check_flow, load_pipeline

    args = limits.check_namespace(build_parser().parse_args(argv))
    flow, images = check_args(args)
    checkpoint = Path(args.checkpoint) if args.checkpoint else REPO / DEFAULT_CHECKPOINT
    pipe, manifest = load_pipeline(checkpoint, args.device, image_vae=args.vae_model_path,
                                   clip=args.clip_model_path, text_vae=args.text_vae_path)
    check_flow(manifest, flow)
    check_output_dir(args.output_dir)  # before sampling: a folder we may not write is refused up front
    size = pipe.sampling.resolution or int(pipe.image_vae.config.sample_size)
    batch = args.num_samples * max(1, len(args.prompt or []), len(images or []))
    limits.check_memory(args, batch=batch, height=size, what="--num_samples")
    out, sources = run_flow(pipe, flow, args.prompt or [], images, args)
    folder = write_outputs(out, sources, args, flow)
    if out.texts is not None:
        for text, source in zip(out.texts, sources):
            print(f"{json.dumps(source)} -> {text}")
    print(f"wrote {len(sources)} {flow.name} outputs to {folder}")
    return 0
