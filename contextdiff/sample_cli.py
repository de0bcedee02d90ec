"""``scripts/sample.py --method contextdiff``: sample a ContextDiff checkpoint, and judge it on the digits world.

    python scripts/sample.py --method contextdiff --prompt "a red handwritten seven" --guidance_scale 3
    python scripts/sample.py --method contextdiff --checkpoint ckpt/tiny/baseline \\
        --adapter_path outputs/contextdiff/stage1 --prompt "a blue handwritten one"      # SD folder + stage-1 adapter
    python scripts/sample.py --method contextdiff ... --t5_model_name_or_path PATH/TO/T5  # override the adapter's T5
    python scripts/sample.py --method contextdiff --no_shift ...                       # ablation: no shift

Per step (METHOD.md, "CFG + shift"): classifier-free guidance is evaluated ONCE (one batched ``[uncond; cond]`` UNet call), the
guided output becomes the guided x0_hat, and the shift ``k_t r_phi(x0_hat, c)`` is evaluated once on it, with the
conditional text. ``--checkpoint`` is a ContextDiff checkpoint folder (``contextdiff.checkpoint``);
a plain Stable Diffusion folder works with ``--adapter_path`` (a stage-1 output) or ``--no_shift``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from common.errors import UserError
from common.latents import vae_scale_factor
from common.methods import SHARED_FIELDS, Generation, MethodSpec, SamplingSettings, add_settings_arguments, setting
from contextdiff.checkpoint import ContextDiffModel, load_contextdiff


REPO = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = "ckpt/tiny/contextdiff"
# The digits-world judging protocol: scripts/demo.py's for the baseline (25 DDIM steps, CFG 3), so the numbers compare;
# configs/contextdiff/sample_tiny.yaml holds the same values.
EVAL_SAMPLING = dict(steps=25, guidance_scale=3.0, sampler="ddim", eta=0.0)
EVAL_CHUNK = 120  # images per generate call; x_T is drawn for all images at once (chunking only changes rounding)


@dataclass
class ContextDiffSettings(SamplingSettings):
    adapter_path: Optional[str] = setting(
        None, "a stage-1 adapter (train_adapter.py output_dir or its adapter/) to use with a plain Stable Diffusion "
        "folder, or instead of the checkpoint's own", kind="path")
    no_shift: bool = setting(False, "ablation: sample without the contextual shift (the adapter is not run)",
                             label="no contextual shift (ablation)")
    k_schedule: Optional[str] = setting(None, "k_t schedule (default: the one the checkpoint was trained with)",
                                        choices=("quadratic", "prior", "none"), label="k_t schedule")
    k_scale: Optional[float] = setting(None, "multiplies k_t (default: the checkpoint's)", low=0.0)
    t5_model_name_or_path: Optional[str] = setting(
        None, "a local T5 encoder folder (with its tokenizer) for an adapter that reads T5 states (default: the "
        "checkpoint's t5/, or the T5 recorded with the adapter)", kind="path")
    t5_max_length: Optional[int] = setting(None, "T5 tokens per prompt (default: the checkpoint's / adapter's, "
                                                 "else 77)", low=1)


def add_arguments(group) -> None:
    """The method's own flags (those of :class:`ContextDiffSettings` beyond the shared ones)."""
    add_settings_arguments(group, ContextDiffSettings, skip=SHARED_FIELDS)


class ContextDiffPipeline:
    """A checkpoint folder; the model is loaded on the first call with the settings' adapter / T5 choice and kept
    for later calls with the same choice."""

    plans_memory = True  # fits settings.max_memory_gb itself (common.memory), so entry scripts skip their rough bound

    def __init__(self, checkpoint, device="cpu", dtype=torch.float32):
        self.checkpoint, self.device, self.dtype = checkpoint, device, dtype
        self._models: dict = {}

    def model(self, settings: ContextDiffSettings) -> ContextDiffModel:
        key = (settings.adapter_path, settings.no_shift, settings.t5_model_name_or_path, settings.t5_max_length)
        if key not in self._models:
            self._models.clear()
            self._models[key] = load_contextdiff(
                self.checkpoint, settings.adapter_path, require_adapter=not settings.no_shift, dtype=self.dtype,
                device=self.device, t5_path=settings.t5_model_name_or_path, t5_max_length=settings.t5_max_length)
        model = self._models[key]
        changes = {}
        if settings.k_schedule:
            changes["k_schedule"] = settings.k_schedule
        if settings.k_scale is not None:
            changes["k_scale"] = settings.k_scale
        return dataclasses.replace(model, **changes) if changes else model

    def __call__(self, settings: ContextDiffSettings, *, generator=None, callback=None) -> Generation:
        """Images for ``settings.prompts`` in one batch (x_T drawn from ``generator``, default ``settings.seed``)."""
        extras: dict = {}
        images = sample(self.model(settings), settings.prompts, steps=settings.num_inference_steps,
                        guidance_scale=settings.guidance_scale, sampler=settings.sampler, eta=settings.eta,
                        seed=settings.seed, negative_prompt=settings.negative_prompt, resolution=settings.resolution,
                        no_shift=settings.no_shift, progress=callback or False, generator=generator,
                        max_memory_gb=settings.max_memory_gb, record=extras)
        return Generation(images, extras=extras)


def load(checkpoint, device="cpu", dtype=torch.float32) -> ContextDiffPipeline:
    if not Path(checkpoint).is_dir():
        raise UserError(f"checkpoint folder {checkpoint} does not exist: pass --checkpoint (a ContextDiff "
                        "checkpoint, or a Stable Diffusion folder with --adapter_path / --no_shift)")
    return ContextDiffPipeline(checkpoint, device, dtype)


def sample(
    model: ContextDiffModel, prompts: Sequence[str], *, steps: int, guidance_scale: float, sampler: str = "ddim",
    eta: float = 0.0, seed: int = 0, negative_prompt: str = "", resolution: Optional[int] = None,
    no_shift: bool = False, progress=False, chunk: Optional[int] = None, generator=None,
    max_memory_gb: Optional[float] = None, record: Optional[dict] = None,
) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` in [0, 1]. ``chunk``: generate in pieces of this many prompts with x_T drawn for all
    N at once (``randn((N, C, h, w), Generator().manual_seed(seed))``, as one batch would): with DDIM eta = 0 the
    images do not depend on the chunking (up to float rounding of other batch sizes); DDPM / eta > 0 draw their
    step noise per chunk. ``generator``: instead of the seed. ``max_memory_gb``: the memory budget of each chunk
    (:mod:`common.memory`); ``record``, when given, receives the memory plan taken (``record["memory_plan"]``)."""
    from contextdiff.pipeline import generate, plan_memory

    unet = model.unet
    factor = vae_scale_factor(model.vae)
    side = (resolution or unet.config.sample_size * factor) // factor
    # refused here, before x_T of the whole request is allocated, when even the most frugal path cannot fit
    plan_memory(unet, model.vae, (model.text_encoder, model.adapter), min(chunk or len(prompts), len(prompts)),
                side * factor, side * factor, guidance_scale, max_memory_gb)
    generator = generator if generator is not None else torch.Generator().manual_seed(seed)
    x_T = torch.randn((len(prompts), unet.config.in_channels, side, side), generator=generator)
    chunk = chunk or len(prompts)
    images = []
    for start in range(0, len(prompts), chunk):
        out = generate(**model.generate_kwargs(), prompts=list(prompts[start:start + chunk]), steps=steps,
                       guidance_scale=guidance_scale, sampler=sampler, eta=eta, generator=generator,
                       negative_prompt=negative_prompt, latents=x_T[start:start + chunk].to(model.unet.device),
                       height=resolution, width=resolution, no_shift=no_shift, progress=progress,
                       max_memory_gb=max_memory_gb)
        images.append(out.images.cpu())
        if record is not None:
            record["memory_plan"] = out.memory_plan.describe()
    return torch.cat(images)


def write_judged(images: torch.Tensor, rows: Sequence[dict], output_dir: Path, extra: Optional[dict] = None) -> dict:
    """Images, ``metadata.jsonl`` (file_name, text, digit, color) and ``grid.png``, judged; ``scores.json`` holds the
    summary and ``extra``."""
    from common.judge import write_judged_folder

    return write_judged_folder(output_dir, images, rows, extra)


def judge_checkpoint(
    checkpoint, output_dir, n: int = 60, seed: int = 0, *, adapter_path=None, no_shift: bool = False,
    steps: int = EVAL_SAMPLING["steps"], guidance_scale: float = EVAL_SAMPLING["guidance_scale"],
) -> dict:
    """Sample ``evaluation_prompts(n)`` (every (digit, colour) pair evenly) from a checkpoint and judge them.

    A plain Stable Diffusion folder with ``no_shift=True`` runs the identical code path minus the shift, which is how
    the baseline arm of a comparison is judged. Returns the judge's scores (with the per-image predictions) plus
    ``seconds`` (sampling + judging)."""
    from common.digits import evaluation_prompts

    start = time.perf_counter()
    model = load_contextdiff(checkpoint, adapter_path, require_adapter=not no_shift)
    rows = evaluation_prompts(n)
    images = sample(model, [r["text"] for r in rows], steps=steps, guidance_scale=guidance_scale, seed=seed,
                    no_shift=no_shift, chunk=EVAL_CHUNK)
    settings = {"checkpoint": str(checkpoint), "seed": seed, "steps": steps, "guidance_scale": guidance_scale,
                "sampler": "ddim", "eta": 0.0, "no_shift": no_shift}
    scores = write_judged(images, rows, Path(output_dir), {"settings": settings})
    scores["seconds"] = round(time.perf_counter() - start, 2)
    return scores


def evaluate_digits(output_dir: Path, n: int = 60, seed: int = 0) -> dict:
    """The shipped tiny checkpoint on ``evaluation_prompts(n)`` (25 DDIM steps, CFG 3, as the demo's baseline): images + metadata.jsonl in
    ``output_dir``, judged. Adds the method metric ``no_shift_*``: the same model and seeds sampled without the
    shift (the adapter's share of the result)."""
    from common.judge import PER_IMAGE_KEYS

    output_dir = Path(output_dir)
    start = time.perf_counter()
    scores = judge_checkpoint(REPO / DEFAULT_CHECKPOINT, output_dir, n, seed)
    ablation = judge_checkpoint(REPO / DEFAULT_CHECKPOINT, output_dir / "no_shift", n, seed, no_shift=True)
    scores = {k: v for k, v in scores.items() if k not in PER_IMAGE_KEYS}
    for key in ("digit_accuracy", "color_accuracy", "both_accuracy"):
        scores[f"no_shift_{key}"] = ablation[key]
    scores["seconds"] = round(time.perf_counter() - start, 2)
    return scores


METHOD = MethodSpec(
    name="contextdiff", label="ContextDiff", settings=ContextDiffSettings, load=load,
    default_checkpoint=DEFAULT_CHECKPOINT, description=__doc__.split("\n\n")[0], evaluate_digits=evaluate_digits,
)
