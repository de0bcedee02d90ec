"""The baseline as a registered method: plain latent text-to-image (``common.pipeline.LatentTextToImage``).

    python scripts/sample.py --method baseline --checkpoint PATH/TO/SD --resolution 512 \\
        --prompt "a photo of a cat" --num_inference_steps 50 --guidance_scale 7.5 --sampler ddim --seed 0

``--checkpoint`` is a diffusers Stable Diffusion folder (default: the shipped tiny one). With DDIM, ``--seed S`` gives
the images of ``StableDiffusionPipeline(..., generator=torch.Generator().manual_seed(S))`` for the same prompts, steps
and guidance scale (all images in one batch).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import UserError
from common.methods import Generation, MethodSpec, SamplingSettings


DEFAULT_CHECKPOINT = "ckpt/tiny/baseline"
# The digits-world judging protocol every method's evaluate_digits matches: 25 DDIM steps, CFG 3.
EVAL_SAMPLING = dict(num_inference_steps=25, guidance_scale=3.0)


@dataclass
class BaselineSettings(SamplingSettings):
    """The shared settings only."""


class BaselinePipeline:
    plans_memory = True  # fits settings.max_memory_gb itself (common.memory), so entry scripts skip their rough bound

    def __init__(self, pipe):
        self.pipe = pipe

    def __call__(self, settings: BaselineSettings, *, generator=None, callback=None) -> Generation:
        generator = generator if generator is not None else torch.Generator().manual_seed(settings.seed)
        out = self.pipe(settings.prompts, num_inference_steps=settings.num_inference_steps,
                        guidance_scale=settings.guidance_scale, negative_prompt=settings.negative_prompt,
                        sampler=settings.sampler, eta=settings.eta, height=settings.resolution,
                        width=settings.resolution, generator=generator, progress=callback or False,
                        max_memory_gb=settings.max_memory_gb)
        return Generation(out.images, extras={"memory_plan": out.memory_plan.describe()})


def load(checkpoint, device="cpu", dtype=torch.float32) -> BaselinePipeline:
    from common.pipeline import LatentTextToImage

    if not os.path.isdir(checkpoint):
        raise UserError(f"checkpoint folder {checkpoint} does not exist: pass --checkpoint, or run "
                        "`make tiny-checkpoints` to train the shipped tiny models")
    return BaselinePipeline(LatentTextToImage.from_pretrained(str(checkpoint), dtype=dtype, device=device))


def evaluate_digits(output_dir: Path, n: int = 60, seed: int = 0) -> dict:
    """The shipped tiny checkpoint on ``evaluation_prompts(n)`` (25 DDIM steps, CFG 3): images + metadata.jsonl +
    grid in ``output_dir``, judged; plus ``seconds``."""
    from common.digits import evaluation_prompts
    from common.io import write_image_folder
    from common.judge import judge_folder
    from common.methods import REPO

    folder = REPO / DEFAULT_CHECKPOINT
    if not folder.is_dir():
        raise UserError(f"{folder} is missing: run `make tiny-checkpoints` to train the shipped tiny models")
    start = time.perf_counter()
    rows = evaluation_prompts(n)
    pipe = load(folder)
    settings = BaselineSettings(prompts=[r["text"] for r in rows], seed=seed, **EVAL_SAMPLING)
    images = pipe(settings).images
    write_image_folder(output_dir, images, rows)
    scores = judge_folder(output_dir)
    scores["seconds"] = round(time.perf_counter() - start, 2)
    return scores


METHOD = MethodSpec(
    name="baseline", label="Baseline (latent text-to-image)", settings=BaselineSettings, load=load,
    default_checkpoint=DEFAULT_CHECKPOINT, description=__doc__.split("\n\n")[0], evaluate_digits=evaluate_digits,
)
