"""``scripts/sample.py --method shifted``: text -> shifted-diffusion prior -> CLIP image embedding -> image.

    python scripts/sample.py --method shifted --prompt "a red handwritten seven" --guidance_scale 3

The checkpoint folder (``--pretrained_model_name_or_path``, default ``ckpt/tiny/shifted``) holds ``shifted.json``
(the CLIP and text-state folders), ``prior/`` (+ its bank), ``prior_baseline/`` and ``decoder/`` (see its README).
The common flags drive the decoder (``--steps``, ``--guidance_scale``, ``--sampler``, ``--eta``, ``--resolution``);
``--negative_prompt`` makes the decoder's negative the prior's embedding of that text instead of the null embedding
the decoder was fine-tuned with. The prior's own flags are below (defaults: the reference demo's 8 respaced DDPM
steps on the consistent process).
"""

from __future__ import annotations

import time
from pathlib import Path


DEFAULT_CHECKPOINT = "ckpt/tiny/shifted"
# The settings evaluate_digits (the cross-method table, scripts/demo.py) uses with the shipped checkpoint.
EVAL_PRIOR = dict(steps="8", sampler="ddpm")
EVAL_DECODER = dict(num_inference_steps=25, guidance_scale=3.0, sampler="ddim")  # scripts/demo.py's baseline


def add_arguments(group) -> None:
    from shifted.cli import add_prior_sampling_args

    add_prior_sampling_args(group, prefix="prior_")
    group.add_argument("--prior_variant", default="shifted", choices=("shifted", "baseline"),
                       help="the shifted prior, or the unshifted (plain DDPM) baseline prior of the same size")


def _decoder_kwargs(args) -> dict:
    return dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale, sampler=args.sampler,
                eta=args.eta, resolution=args.resolution, progress=not args.no_progress)


def generate(args, prompts):
    """Images ``[N, 3, H, W]`` in [0, 1] for ``prompts`` (the prior and the decoder both seeded with --seed)."""
    from shifted.cli import prior_sampling_kwargs
    from shifted.system import load_system, text_to_image

    prior_kwargs = prior_sampling_kwargs(args, prefix="prior_")
    system = load_system(args.pretrained_model_name_or_path, prior_variant=args.prior_variant, device=args.device)
    images, _ = text_to_image(system, prompts, seed=args.seed, prior_kwargs=prior_kwargs,
                              decoder_kwargs=_decoder_kwargs(args), negative_prompt=args.negative_prompt)
    return images


def evaluate_digits(output_dir: Path, n: int = 60, seed: int = 0, checkpoint=None, prior_variant: str = "shifted",
                    prior_kwargs=None, decoder_kwargs=None) -> dict:
    """Generate ``evaluation_prompts(n)`` with the shipped checkpoint, write images + metadata.jsonl, judge them.

    Returns the judge's scores plus ``seconds`` (load + generate), ``prior_seconds`` / ``decoder_seconds`` and the
    settings used. ``checkpoint`` / ``prior_variant`` / ``*_kwargs`` exist for the benchmark's comparisons.
    """
    import torch

    from common.digits import evaluation_prompts
    from common.io import write_image_folder
    from common.judge import judge_folder
    from shifted.cli import REPO
    from shifted.system import load_system, prompt_embeddings

    prior_kwargs = dict(EVAL_PRIOR, **(prior_kwargs or {}))
    decoder_kwargs = dict(EVAL_DECODER, **(decoder_kwargs or {}))
    start = time.perf_counter()
    system = load_system(checkpoint or REPO / DEFAULT_CHECKPOINT, prior_variant=prior_variant)
    rows = evaluation_prompts(n)
    texts = [r["text"] for r in rows]
    t0 = time.perf_counter()
    embeddings = prompt_embeddings(system, texts, seed, **prior_kwargs)
    t1 = time.perf_counter()
    images = system.decoder(embeddings, generator=torch.Generator().manual_seed(seed), **decoder_kwargs)
    t2 = time.perf_counter()
    write_image_folder(output_dir, images.cpu(), rows)
    seconds = time.perf_counter() - start
    scores = judge_folder(output_dir)
    scores.update(seconds=seconds, prior_seconds=t1 - t0, decoder_seconds=t2 - t1, prior_variant=prior_variant,
                  prior_settings=prior_kwargs, decoder_settings=decoder_kwargs)
    return scores
