"""``scripts/sample.py --method sdg``: the prompts are SDG's language guidance on a frozen unconditional model.

    python scripts/sample.py --method sdg --prompt "a handwritten seven" --num_images 8 --sampler ddpm
    python scripts/sample.py --method sdg --prompt "a digit" --text_weight 0 --image_weight 1000 \\
        --data_dir data/digits/test/images/00007.png --sampler ddpm

Method flags keep SDG's names (``--text_weight --image_weight --image_loss --data_dir --clip_path``).
``--checkpoint``: an SDG folder (``unet/`` with ``adm_flags.json``, and usually ``clip/``, the
noise-aware CLIP; default ``ckpt/tiny/sdg``). Each prompt is one sample's instruction: the DDPM mean is shifted by
``Sigma * grad_x [w_text cos(E'(x_t, t), T(prompt)) + w_img F_img(x_t, x'_t, t)]`` at every step (sdg/METHOD.md).
``--num_inference_steps N`` respaces guided-diffusion style (``"N"``); ``--sampler ddpm`` is SDG's sampler (learned variance),
``ddim`` applies the same gradient as a score shift. ``--guidance_scale`` / ``--negative_prompt`` (classifier-free
guidance) do not apply: the model is unconditional.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from common.errors import UserError
from common.methods import (
    SHARED_FIELDS,
    Generation,
    MethodSpec,
    SamplingSettings,
    add_settings_arguments,
    setting,
    shared,
)


DEFAULT_CHECKPOINT = "ckpt/tiny/sdg"
REPO = Path(__file__).resolve().parent.parent
# Tuned on the shipped tiny checkpoint (bench/results.md, sdg sections: weight sweeps; 1000 and 3000 tie). The useful
# range depends on the encoder's gradient scale: ~300-3000 here (tiny conv tower, 32 px), 160 for SDG's RN50x16 at
# 256 px.
DEFAULT_TEXT_WEIGHT = 1000.0
DEFAULT_EVAL_STEPS = 50
CHUNK = 30


@dataclass
class SDGSettings(SamplingSettings):
    # SDG samples with its ADM DDPM (learned variance), and classifier-free guidance does not apply.
    sampler: str = shared("sampler", "ddpm")
    guidance_scale: float = shared("guidance_scale", 1.0)
    text_weight: float = setting(DEFAULT_TEXT_WEIGHT, "language guidance weight (0: prompts are only labels; tuned "
                                                      "for --sampler ddpm, SDG's sampler; ddim applies it as a score "
                                                      "shift)", low=0.0, label="language weight")
    image_weight: float = setting(0.0, "image guidance weight (needs a reference)", low=0.0, label="image weight")
    image_loss: str = setting("semantic", "image guidance: content cosine (semantic) or Gram-matrix style",
                              choices=("semantic", "style"), label="image score")
    data_dir: Optional[str] = setting(None, "reference image, or a folder of them (cycled over the samples)",
                                      kind="image", label="reference image (for the image score)")
    clip_path: Optional[str] = setting(None, "noise-aware CLIP folder (default: <checkpoint>/clip)", kind="path")
    style_gram: str = setting("per_sample", "Gram matrices per sample or over the batch",
                              choices=("per_sample", "batch"), page=False)
    timestep_respacing: Optional[str] = setting(None, 'guided-diffusion respacing string ("100", "ddim50", '
                                                      '"10,20"); default: --num_inference_steps', page=False)

    def needs_prompt(self) -> bool:
        return bool(self.text_weight)


def add_arguments(group) -> None:
    """The method's own flags (those of :class:`SDGSettings` beyond the shared ones)."""
    add_settings_arguments(group, SDGSettings, skip=SHARED_FIELDS)


def _references(spec: str, size: int, n: int) -> torch.Tensor:
    from sdg.data import list_reference_images, load_reference

    path = Path(spec)
    if not path.exists():
        raise UserError(f"--data_dir {path} does not exist: pass a reference image or a folder of them")
    files = [path] if path.is_file() else list_reference_images(path)
    refs = [load_reference(f, size) for f in files]
    return torch.cat([refs[i % len(refs)] for i in range(n)])


# The guidance phase peaks at the activations the CLIP forward kept plus the gradients the backward pass holds while
# it frees them block by block: measured over a guidance call at batches 128 and 256, 0.91x the counted activations for
# the tiny ViT tower and 1.03x for the tiny ResNet one (some kept tensors share storage), so a 10 % margin.
BACKWARD_PEAK = 1.1
IMAGE_COPIES = 3  # every sample's output in [0, 1], the list of chunks, their concatenation


def plan_memory(unet, clip, batch: int, *, guided: bool, max_memory_gb: Optional[float] = None,
                fixed_chunk: bool = False, chunk: int = CHUNK, what: str = "--num_images"):
    """How SDG samples ``batch`` images within ``max_memory_gb`` (default: the machine's memory), or one UserError
    naming the estimate, the budget and the fix, before anything is sampled (``common.memory.plan``).

    Samples are drawn ``chunk`` at a time. Each step is the UNet forward on the chunk (pixel space: factor 1, no
    VAE; no gradients) and then, when a guidance weight is set, the noise-aware CLIP forward with the activations
    kept for the gradient with respect to x_t and its backward pass (``common.memory.saved_activation_bytes`` of
    the CLIP on a batch of one, times the chunk). The frugal path is smaller chunks (the plan's micro-batch): every
    sample has its own generators, so the images do not change; ``fixed_chunk`` (the batch-mixing style Gram, which
    couples the samples of a chunk) forbids it. The chunk's attention is chunked where SDPA would hold scores."""
    from common import memory

    param = next(unet.parameters())
    size = int(unet.config.sample_size)
    chunk = min(batch, chunk)
    dtype_bytes = torch.finfo(param.dtype).bits // 8
    request = memory.Request(chunk, size, size, guided=False, dtype_bytes=dtype_bytes, device=str(param.device))
    per_sample = 0
    if guided and clip is not None:
        per_sample = memory.saved_activation_bytes(clip, torch.zeros(1, 3, size, size, dtype=param.dtype),
                                                    torch.zeros(1, dtype=torch.long))
    images = 4 * IMAGE_COPIES * batch * 3 * size * size

    def step_bytes(attention_chunk: Optional[int], micro: Optional[int]) -> int:
        rows = micro or chunk
        forward = memory.unet_step_bytes(unet.config, request, 1, attention_chunk, rows)
        return images + max(forward, int(BACKWARD_PEAK * per_sample * rows))

    return memory.plan(unet, None, request, memory.budget_bytes(max_memory_gb, str(param.device)),
                       extra_models=(clip,), what=what, step_bytes=step_bytes, split=not fixed_chunk,
                       size_text=f"{batch} x {size}x{size} pixels, {chunk} per pass")


class SDGPipeline:
    """The unconditional ADM model, loaded once; the noise-aware CLIP loaded on the first run that guides."""

    plans_memory = True  # fits settings.max_memory_gb itself (plan_memory), so entry scripts skip their rough bound

    def __init__(self, checkpoint, device="cpu", dtype=torch.float32):
        from sdg.checkpoint import load_diffusion_model

        self.checkpoint, self.device = Path(checkpoint), device
        self.unet, self.flags = load_diffusion_model(self.checkpoint, device=device)
        self._clips: dict = {}

    def clip_path(self, settings: SDGSettings) -> Optional[Path]:
        if settings.clip_path:
            return Path(settings.clip_path)
        candidate = self.checkpoint / "clip"
        return candidate if candidate.is_dir() else None

    def clip(self, path: Optional[Path]):
        from sdg.checkpoint import load_noise_aware_clip_folder

        if path is None:
            return None
        if path not in self._clips:
            self._clips.clear()
            self._clips[path] = load_noise_aware_clip_folder(path, self.device)
        return self._clips[path]

    def __call__(self, settings: SDGSettings, *, generator=None, callback=None) -> Generation:
        """Sample i guided by ``settings.prompts[i]``, with its own generators seeded ``seed + i`` (``seed``:
        ``settings.seed``, or ``generator``'s initial seed)."""
        size = self.unet.config.sample_size
        if settings.resolution is not None and settings.resolution != size:
            raise UserError(f"--resolution {settings.resolution}: this pixel-space model only makes {size} px images")
        prompts = settings.prompts
        references = _references(settings.data_dir, size, len(prompts)) if settings.data_dir else None
        needs_clip = bool(settings.text_weight) or bool(settings.image_weight)
        clip_path = self.clip_path(settings)
        if needs_clip and clip_path is None:
            raise UserError(f"a guidance weight is non-zero but {self.checkpoint} has no clip/ folder: pass "
                            "--clip_path (a noise-aware CLIP) or set the weights to 0")
        seed = generator.initial_seed() if generator is not None else settings.seed
        bundle = self.clip(clip_path) if needs_clip else None
        memory_plan = plan_memory(self.unet, bundle.clip if bundle else None, len(prompts), guided=needs_clip,
                                  max_memory_gb=settings.max_memory_gb,
                                  fixed_chunk=settings.style_gram == "batch" and bool(settings.image_weight))
        images = run_loaded(
            self.unet, self.flags, bundle, prompts, memory_plan=memory_plan,
            text_weight=settings.text_weight, image_weight=settings.image_weight, image_loss=settings.image_loss,
            references=references, respacing=settings.timestep_respacing or str(settings.num_inference_steps),
            sampler=settings.sampler, eta=settings.eta, style_gram=settings.style_gram, seed=seed,
            device=self.device, progress=callback or False)
        return Generation(images, extras={"memory_plan": memory_plan.describe()})


def load(checkpoint, device="cpu", dtype=torch.float32) -> SDGPipeline:
    folder = Path(checkpoint)
    if not folder.is_dir():
        raise UserError(f"checkpoint folder {folder} does not exist: pass --checkpoint (an SDG folder with unet/ "
                        "and clip/), or train the tiny one (ckpt/tiny/sdg/README.md)")
    return SDGPipeline(folder, device, dtype)


def run(model_folder, prompts: list[str], *, clip_path=None, device="cpu", **options) -> torch.Tensor:
    """SDG samples ``[N, 3, S, S]`` in [0, 1]: sample i guided by ``prompts[i]`` (and ``references[i]``).

    Loads the model of ``model_folder`` (and the noise-aware CLIP at ``clip_path`` when a guidance weight is
    non-zero), then :func:`run_loaded` with ``options`` (its keyword arguments: weights, references, respacing,
    sampler, seed, ``guide`` ...). Each sample's noise comes from its own generator (``seed + i``), so an image does not
    depend on the chunking or on the other prompts.
    """
    from sdg.checkpoint import load_diffusion_model, load_noise_aware_clip_folder

    unet, flags = load_diffusion_model(model_folder, device=device)
    bundle = None
    if options.get("text_weight", DEFAULT_TEXT_WEIGHT) or options.get("image_weight", 0.0):
        if clip_path is None:
            raise UserError(f"a guidance weight is non-zero but {model_folder} has no clip/ folder: pass "
                            "--clip_path (a noise-aware CLIP) or set the weights to 0")
        bundle = load_noise_aware_clip_folder(clip_path, device)
    return run_loaded(unet, flags, bundle, prompts, device=device, **options)


def run_loaded(
    unet,
    flags,
    bundle,
    prompts: list[str],
    *,
    text_weight: float = DEFAULT_TEXT_WEIGHT,
    image_weight: float = 0.0,
    image_loss: str = "semantic",
    references: Optional[torch.Tensor] = None,
    respacing: str = str(DEFAULT_EVAL_STEPS),
    sampler: str = "ddpm",
    eta: float = 0.0,
    style_gram: str = "per_sample",
    seed: int = 0,
    device="cpu",
    progress=False,
    guide=None,
    memory_plan=None,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """SDG samples ``[N, 3, S, S]`` in [0, 1] from a loaded model ``(unet, flags)`` and noise-aware CLIP ``bundle``
    (None: no guidance). Samples are drawn in chunks with a generator per sample (``seed + i``); ``guide`` replaces
    the noise-aware CLIP by another encoder with the same interface (the plain-CLIP ablation of the benchmark).
    ``chunk``: samples per pass; ``memory_plan`` (:func:`plan_memory` for that chunk): its micro-batch, when set,
    replaces the chunk; its attention chunking applies."""
    from sdg.adm import noise_schedule
    from sdg.pipeline import sample_sdg

    schedule = noise_schedule(flags)
    size = unet.config.sample_size
    if image_weight and references is None:
        raise UserError("--image_weight is non-zero but no --data_dir reference image was given")
    if references is not None and references.shape[-1] != size:
        raise UserError(f"reference images are {references.shape[-1]} px but the model makes {size} px")
    clip = guide if guide is not None else (bundle.clip if bundle else None)
    text = bundle.encode_text(prompts) if bundle is not None and text_weight else None
    chunk = (memory_plan.micro_batch if memory_plan is not None else None) or chunk
    out = []
    for start in range(0, len(prompts), chunk):
        idx = list(range(start, min(start + chunk, len(prompts))))
        gens = [torch.Generator().manual_seed(seed + i) for i in idx]
        guide_gens = [torch.Generator().manual_seed(seed + 7919 + i) for i in idx]
        with memory_plan.applied(unet, split=False) if memory_plan is not None else contextlib.nullcontext():
            x = sample_sdg(
                unet, schedule, respacing, batch_size=len(idx), clip=clip,
                text_embedding=None if text is None else text[idx],
                reference=None if references is None else references[idx].to(device),
                text_weight=text_weight, content_weight=image_weight if image_loss == "semantic" else 0.0,
                style_weight=image_weight if image_loss == "style" else 0.0, style_gram=style_gram,
                generator=gens, guidance_generator=guide_gens, device=device, progress=progress,
                sampler=sampler, eta=eta,
            )
        out.append(((x.clamp(-1, 1) + 1) / 2).cpu())
    return torch.cat(out)


def write_judged(output_dir: Path, images: torch.Tensor, rows: list[dict]) -> dict:
    """Write ``images/NNNN.png`` + ``metadata.jsonl`` (file_name, text, digit, color) + grid and judge them."""
    from common.judge import write_judged_folder

    return write_judged_folder(output_dir, images, rows)


def evaluate_digits(output_dir: Path, n: int = 60, seed: int = 0) -> dict:
    """Language guidance on the shipped tiny checkpoint: each of ``evaluation_prompts(n)`` ("a red handwritten
    seven", ...) guides one sample (DDPM, 50 respaced steps, weight DEFAULT_TEXT_WEIGHT); images + metadata.jsonl
    are written to ``output_dir`` and judged. Also returns ``unguided_digit_accuracy``: the same seeds without
    guidance (the chance level the guidance has to beat)."""
    from common.digits import evaluation_prompts
    from common.judge import judge_images

    start = time.time()
    folder = REPO / DEFAULT_CHECKPOINT
    rows = evaluation_prompts(n)
    prompts = [r["text"] for r in rows]
    images = run(folder, prompts, text_weight=DEFAULT_TEXT_WEIGHT, clip_path=folder / "clip", seed=seed)
    scores = write_judged(Path(output_dir), images, rows)
    plain = run(folder, prompts, text_weight=0.0, seed=seed)
    unguided = judge_images([_uint8(im) for im in plain], [(r["digit"], r["color"]) for r in rows])
    scores.update({"method": "sdg", "text_weight": DEFAULT_TEXT_WEIGHT, "steps": DEFAULT_EVAL_STEPS,
                   "unguided_digit_accuracy": unguided["digit_accuracy"],
                   "unguided_color_accuracy": unguided["color_accuracy"],
                   "seconds": round(time.time() - start, 1)})
    return scores


def _uint8(image: torch.Tensor):
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


METHOD = MethodSpec(
    name="sdg", label="SDG", settings=SDGSettings, load=load, default_checkpoint=DEFAULT_CHECKPOINT,
    description=__doc__.split("\n\n")[0], evaluate_digits=evaluate_digits,
)
