"""``scripts/sample.py --method versatile``: the image-output flows of Versatile Diffusion behind the common flags.

    python scripts/sample.py --method versatile --prompt "a red handwritten seven" --num_images 4          # t2i
    python scripts/sample.py --method versatile --flow i2i --image IMG.png --prompt "a red seven"          # iv
    python scripts/sample.py --method versatile --flow dual --image IMG.png --prompt "a blue digit" --mix_ratio 0.3

Text-to-image by default. ``--flow i2i`` (= ``iv``) conditions on ``--image`` only; the prompts ``scripts/sample.py``
requires then only label the outputs (``metadata.jsonl`` text, what the judge compares against). ``dual`` mixes the
prompt and the image inside every context layer with text weight ``--mix_ratio``. The text-output flows (i2t, t2t)
produce captions, not images: use ``scripts/versatile/sample.py``. Sampling is DDIM (``--num_inference_steps``, ``--eta``) with
classifier-free guidance (``--guidance_scale``); the null text context is CLIP("") as in VD, so a non-empty
``--negative_prompt`` is refused rather than ignored.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from common.errors import UserError
from common.methods import SHARED_FIELDS, Generation, MethodSpec, SamplingSettings, add_settings_arguments, setting
from versatile.context import NULL_IMAGE_KINDS
from versatile.multiflow import FLOW_CHOICES


REPO = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = "ckpt/tiny/versatile/pipeline"
# Same sampler settings as scripts/demo.py's baseline arm, so the judged numbers compare like for like.
EVAL_SAMPLING = {"steps": 25, "guidance_scale": 3.0}


@dataclass
class VersatileSettings(SamplingSettings):
    flow: str = setting("t2i", "t2i (default) | i2i (= iv) | dual: the image-output flows; i2t | tv give captions "
                               "(on the page; scripts/versatile/sample.py on the command line)",
                        choices=FLOW_CHOICES)
    image: list = setting([], "image file conditioning iv / i2t / dual (repeatable; cycled over the outputs)",
                          kind="images", label="image (iv, i2t, dual)")
    mix_ratio: Optional[float] = setting(None, "dual: text weight in [0, 1] (default 0.5)", low=0.0, high=1.0,
                                         label="mix ratio (dual: the text weight)")
    uncond_image: Optional[str] = setting(None, "null image context", choices=NULL_IMAGE_KINDS, page=False)

    def check_inputs(self):
        """``(flow, image paths)``, every input checked before anything loads."""
        from versatile.flows_cli import check_flow_inputs, check_image_paths, parse_flow

        super().check()
        flow = parse_flow(self.flow)
        check_flow_inputs(flow, self.prompts if flow.name != "i2t" else [], self.image, self.mix_ratio,
                          prompts_are_labels=True)
        if self.negative_prompt:
            raise UserError("--negative_prompt is not supported by versatile (its null text context is CLIP(\"\")): "
                            "drop it")
        if self.sampler != "ddim":
            raise UserError("versatile samples with DDIM only (VD's sampler): use --sampler ddim")
        return flow, check_image_paths(self.image)

    def check(self) -> None:
        self.check_inputs()

    def needs_prompt(self) -> bool:
        return self.flow not in ("iv", "i2i", "i2t")

    def makes_images(self) -> bool:
        return self.flow not in ("i2t", "tv", "t2t")


def add_arguments(group) -> None:
    """The method's own flags (those of :class:`VersatileSettings` beyond the shared ones)."""
    add_settings_arguments(group, VersatileSettings, skip=SHARED_FIELDS)


class VersatilePipeline:
    plans_memory = True  # image flows fit settings.max_memory_gb themselves (common.memory)

    def __init__(self, pipe, manifest):
        self.pipe, self.manifest = pipe, manifest

    def __call__(self, settings: VersatileSettings, *, generator=None, callback=None) -> Generation:
        """One output per entry of ``settings.prompts`` (images, or captions for i2t / tv); the images of iv /
        i2t / dual are cycled over them."""
        from versatile.checkpoint import check_flow
        from versatile.flows_cli import load_images

        flow, paths = settings.check_inputs()
        check_flow(self.manifest, flow)
        pipe, prompts, n = self.pipe, list(settings.prompts), len(settings.prompts)
        generator = generator if generator is not None else torch.Generator().manual_seed(settings.seed)
        kwargs = dict(guidance_scale=settings.guidance_scale, num_inference_steps=settings.num_inference_steps,
                      eta=settings.eta, generator=generator, uncond_image=settings.uncond_image,
                      progress=callback or False, max_memory_gb=settings.max_memory_gb)
        image = None
        if paths:
            size = pipe.sampling.resolution or int(pipe.image_vae.config.sample_size)
            loaded = load_images(paths, size)
            image = loaded[torch.arange(n) % len(paths)]
        if flow.xtype == "text":
            out = pipe(flow, prompt=prompts if "text" in flow.ctypes else None, image=image, **kwargs)
            return Generation(None, texts=list(out.texts))
        kwargs.update(height=settings.resolution, width=settings.resolution)
        if flow.name == "t2i":
            out = pipe(flow, prompt=prompts, **kwargs)
        elif flow.name == "iv":
            out = pipe(flow, image=image, **kwargs)
        else:
            out = pipe(flow, prompt=prompts, image=image, text_ratio=settings.mix_ratio, **kwargs)
        return Generation(out.images, extras={"memory_plan": out.memory_plan.describe()})


def load(checkpoint, device="cpu", dtype=torch.float32) -> VersatilePipeline:
    from versatile.checkpoint import load_pipeline

    return VersatilePipeline(*load_pipeline(checkpoint, device))


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


METHOD = MethodSpec(
    name="versatile", label="Versatile Diffusion", settings=VersatileSettings, load=load,
    default_checkpoint=DEFAULT_CHECKPOINT, description=__doc__.split("\n\n")[0], evaluate_digits=evaluate_digits,
)
