"""``scripts/sample.py --method versatile``: the image-output flows of Versatile Diffusion behind the common flags.

    python scripts/sample.py --method versatile --prompt "a red handwritten seven" --num_images 4          # t2i
    python scripts/sample.py --method versatile --flow i2i --image IMG.png --prompt "a red seven"          # iv
    python scripts/sample.py --method versatile --flow dual --image IMG.png --prompt "a blue digit" --mix_ratio 0.3

Text-to-image by default. ``--flow i2i`` (= ``iv``) conditions on ``--image`` only; the prompts ``scripts/sample.py``
requires then only label the outputs (``metadata.jsonl`` text, what the judge compares against). ``dual`` mixes the
prompt and the image inside every context layer with text weight ``--mix_ratio``. The text-output flows (i2t, t2t)
produce captions, not images: use ``scripts/versatile/sample.py``. Sampling is DDIM (``--steps``, ``--eta``) with
classifier-free guidance (``--guidance_scale``); the null text context is CLIP("") as in VD, so a non-empty
``--negative_prompt`` is refused rather than ignored.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from common.errors import UserError


REPO = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = "ckpt/tiny/versatile/pipeline"
# Same sampler settings as scripts/demo.py's baseline arm, so the judged numbers compare like for like.
EVAL_SAMPLING = {"steps": 25, "guidance_scale": 3.0}


def add_arguments(group) -> None:
    group.add_argument("--flow", default="t2i", help="t2i (default) | i2i (= iv) | dual: the image-output flows")
    group.add_argument("--image", action="append", default=None,
                       help="image file conditioning iv / dual (repeatable; cycled over the outputs)")
    group.add_argument("--mix_ratio", type=float, default=None, help="dual: text weight in [0, 1] (default 0.5)")
    group.add_argument("--uncond_image", default=None, help="null image context: zeros | grey | black")


def _check(args, prompts):
    from versatile.context import NULL_IMAGE_KINDS
    from versatile.flows_cli import check_flow_inputs, check_image_paths, parse_flow

    flow = parse_flow(getattr(args, "flow", "t2i"))
    if flow.xtype == "text":
        raise UserError(f"flow {flow.name} generates captions, not images: use scripts/versatile/sample.py "
                        f"--flow {args.flow}")
    images = getattr(args, "image", None) or []
    check_flow_inputs(flow, prompts, images, getattr(args, "mix_ratio", None), prompts_are_labels=True)
    if getattr(args, "negative_prompt", ""):
        raise UserError("--negative_prompt is not supported by versatile (its null text context is CLIP(\"\")): drop it")
    if getattr(args, "sampler", "ddim") != "ddim":
        raise UserError("versatile samples with DDIM only (VD's sampler): use --sampler ddim")
    kind = getattr(args, "uncond_image", None)
    if kind is not None and kind not in NULL_IMAGE_KINDS:
        raise UserError(f"--uncond_image {kind!r}: choose one of {', '.join(NULL_IMAGE_KINDS)}")
    return flow, check_image_paths(images)


def generate(args, prompts) -> torch.Tensor:
    """``[N, 3, H, W]`` in [0, 1], one image per prompt (``scripts/sample.py`` contract)."""
    from versatile.checkpoint import check_flow, load_pipeline
    from versatile.flows_cli import load_images

    flow, paths = _check(args, prompts)
    pipe, manifest = load_pipeline(args.pretrained_model_name_or_path, getattr(args, "device", "cpu"))
    check_flow(manifest, flow)
    n = len(prompts)
    kwargs = dict(guidance_scale=args.guidance_scale, num_inference_steps=args.steps, eta=args.eta,
                  generator=torch.Generator().manual_seed(args.seed), height=args.resolution, width=args.resolution,
                  uncond_image=getattr(args, "uncond_image", None), progress=not getattr(args, "no_progress", False))
    image = None
    if paths:
        size = pipe.sampling.resolution or int(pipe.image_vae.config.sample_size)
        loaded = load_images(paths, size)
        image = loaded[torch.arange(n) % len(paths)]
    if flow.name == "t2i":
        return pipe(flow, prompt=list(prompts), **kwargs).images
    if flow.name == "iv":
        return pipe(flow, image=image, **kwargs).images
    return pipe(flow, prompt=list(prompts), image=image, text_ratio=getattr(args, "mix_ratio", None), **kwargs).images


def sample_t2i(pipe, prompts, seed: int = 0, steps: int = EVAL_SAMPLING["steps"],
               guidance_scale: float = EVAL_SAMPLING["guidance_scale"], chunk: int = 64) -> torch.Tensor:
    """Text-to-image for many prompts in chunks; sample i always gets the noise of ``(seed, i // chunk)``."""
    out = []
    for start in range(0, len(prompts), chunk):
        part = list(prompts[start : start + chunk])
        gen = torch.Generator().manual_seed(seed * 1000 + start // chunk)
        out.append(pipe("t2i", prompt=part, guidance_scale=guidance_scale, num_inference_steps=steps,
                        generator=gen).images)
    return torch.cat(out)


def write_judged(images, rows, output_dir: Path, settings: dict) -> dict:
    """images + metadata.jsonl (file_name, text, digit, color) + grid + settings.json + scores.json, judged."""

    from common.judge import PER_IMAGE_KEYS, write_judged_folder

    settings_text = json.dumps(settings, indent=2)
    scores = write_judged_folder(output_dir, images, rows,
                                 extra_files={"settings.json": lambda path: path.write_text(settings_text)})
    return {k: v for k, v in scores.items() if k not in PER_IMAGE_KEYS}


def evaluate_digits(output_dir: Path, n: int = 60, seed: int = 0) -> dict:
    """Text-to-image of the shipped checkpoint on ``evaluation_prompts(n)`` (DDIM 25 steps, CFG 3, as the baseline
    in ``scripts/demo.py``): images + metadata.jsonl in ``output_dir``, judged; plus ``seconds``."""
    from common.digits import evaluation_prompts
    from versatile.checkpoint import check_flow, load_pipeline

    start = time.perf_counter()
    folder = REPO / DEFAULT_CHECKPOINT
    pipe, manifest = load_pipeline(folder)
    check_flow(manifest, "t2i")
    rows = evaluation_prompts(n)
    images = sample_t2i(pipe, [r["text"] for r in rows], seed=seed)
    settings = {"checkpoint": str(folder), "flow": "t2i", "seed": seed, **EVAL_SAMPLING, "sampler": "ddim", "eta": 0.0}
    scores = write_judged(images, rows, Path(output_dir), settings)
    scores["seconds"] = round(time.perf_counter() - start, 2)
    return scores
