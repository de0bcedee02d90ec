"""``scripts/sample.py --method shifted``: text -> shifted-diffusion prior -> CLIP image embedding -> image.

    python scripts/sample.py --method shifted --prompt "a red handwritten seven" --guidance_scale 3

The checkpoint folder (``--checkpoint``, default ``ckpt/tiny/shifted``) holds ``shifted.json``
(the CLIP and text-state folders), ``prior/`` (+ its bank), ``prior_baseline/`` and ``decoder/`` (see its README).
The common flags drive the decoder (``--num_inference_steps``, ``--guidance_scale``, ``--sampler``, ``--eta``, ``--resolution``);
``--negative_prompt`` makes the decoder's negative the prior's embedding of that text instead of the null embedding
the decoder was fine-tuned with. The prior's own flags are below (defaults: the reference demo's 8 respaced DDPM
steps on the consistent process).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import UserError
from common.methods import SHARED_FIELDS, Generation, MethodSpec, SamplingSettings, add_settings_arguments, setting


DEFAULT_CHECKPOINT = "ckpt/tiny/shifted"
# The settings evaluate_digits (the cross-method table, scripts/demo.py) uses with the shipped checkpoint.
EVAL_PRIOR = dict(steps="8", sampler="ddpm")
EVAL_DECODER = dict(num_inference_steps=25, guidance_scale=3.0, sampler="ddim")  # scripts/demo.py's baseline


@dataclass
class ShiftedSettings(SamplingSettings):
    """The shared settings drive the decoder; the ``prior_*`` ones the prior (defaults: the reference demo)."""

    prior_respacing: str = setting("8", "prior sampling steps: a respacing string ('8' = the reference demo, "
                                        "'ddim25', ...)", label="prior steps (respacing)")
    prior_sampler: str = setting("ddpm", "prior sampler", choices=("ddpm", "ddim"))
    prior_eta: float = setting(0.0, "prior DDIM eta", low=0.0, high=1.0)
    prior_guidance: float = setting(1.0, "prior classifier-free guidance on x0 (1 = the reference's effective "
                                         "value)", low=0.0, high=100.0)
    guide_half: bool = setting(False, "released quirk: guide only the first half of the embedding dimensions",
                               page=False)
    prior_noise: str = setting("data_std", "zero = the released demo (bank std never loaded: x_T = mu, no noise)",
                               choices=("data_std", "zero"), page=False)
    posterior_component: str = setting("text", "pred_x0 = the released demo (posterior mean shifted by the "
                                               "component nearest x0_hat)", choices=("text", "pred_x0"), page=False)
    clip_denoised: bool = setting(False, "clamp x0_hat to mu +- 3 sigma", page=False)
    prior_variant: str = setting("shifted", "the shifted prior, or the unshifted (plain DDPM) baseline prior of the "
                                            "same size", choices=("shifted", "baseline"))

    def check(self) -> None:
        from shifted.cli import check_respacing

        super().check()
        check_respacing(self.prior_respacing)

    def prior_kwargs(self) -> dict:
        return dict(steps=self.prior_respacing, sampler=self.prior_sampler, eta=self.prior_eta,
                    guidance_scale=self.prior_guidance, guide_half=self.guide_half, prior_noise=self.prior_noise,
                    posterior_component=self.posterior_component, clip_denoised=self.clip_denoised)

    def decoder_kwargs(self) -> dict:
        return dict(num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                    sampler=self.sampler, eta=self.eta, resolution=self.resolution)


def add_arguments(group) -> None:
    """The method's own flags (those of :class:`ShiftedSettings` beyond the shared ones)."""
    add_settings_arguments(group, ShiftedSettings, skip=SHARED_FIELDS)


class ShiftedPipeline:
    """A checkpoint folder; the system (prior variant + decoder) is loaded on the first call that asks for it."""

    plans_memory = True  # the decoder fits settings.max_memory_gb itself (common.memory), checked before the prior

    def __init__(self, checkpoint, device="cpu", dtype=torch.float32):
        self.checkpoint, self.device, self.dtype = checkpoint, device, dtype
        self._systems: dict = {}

    def system(self, prior_variant: str):
        from shifted.system import load_system

        if prior_variant not in self._systems:
            self._systems.clear()
            self._systems[prior_variant] = load_system(self.checkpoint, prior_variant=prior_variant,
                                                       device=self.device)
        return self._systems[prior_variant]

    def __call__(self, settings: ShiftedSettings, *, generator=None, callback=None) -> Generation:
        """Images for ``settings.prompts``; the prior and the decoder are both seeded with ``settings.seed`` (or
        with ``generator``'s initial seed)."""
        from shifted.system import text_to_image

        seed = generator.initial_seed() if generator is not None else settings.seed
        system = self.system(settings.prior_variant)
        # Refused here, before the prior samples anything, when the decoder cannot fit the budget.
        system.decoder.memory_plan(len(settings.prompts), settings.resolution, settings.guidance_scale,
                                   settings.max_memory_gb)
        record: dict = {}
        images, embeddings = text_to_image(
            system, settings.prompts, seed=seed, prior_kwargs=settings.prior_kwargs(),
            decoder_kwargs=dict(settings.decoder_kwargs(), progress=callback or False,
                                max_memory_gb=settings.max_memory_gb, record=record),
            negative_prompt=settings.negative_prompt)
        return Generation(images, extras={"embeddings": embeddings, **record})


def load(checkpoint, device="cpu", dtype=torch.float32) -> ShiftedPipeline:
    if not Path(checkpoint).is_dir():
        raise UserError(f"checkpoint folder {checkpoint} does not exist: pass --checkpoint (a folder laid out like "
                        "ckpt/tiny/shifted, see its README)")
    return ShiftedPipeline(checkpoint, device, dtype)


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


METHOD = MethodSpec(
    name="shifted", label="Shifted Diffusion", settings=ShiftedSettings, load=load,
    default_checkpoint=DEFAULT_CHECKPOINT, description=__doc__.split("\n\n")[0], evaluate_digits=evaluate_digits,
)
