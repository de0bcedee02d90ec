"""Versatile Diffusion's flows on the core samplers (paper §3, Fig. 2).

Every flow is the same three steps: encode the condition(s) with CLIP (``versatile.context``), run DDIM
(``common.samplers.sample_ddim``) on the multi-flow diffuser routed to the flow's data / context layers, with
classifier-free guidance as a denoiser wrapper (``common.denoisers.CFGDenoiser``, one batched ``[uncond; cond]``
forward), then decode the latent with the flow's VAE:

| flow | context (uncond) | latent | decoded by |
|---|---|---|---|
| ``t2i`` text-to-image | CLIP text (CLIP("")) | ``[B, 4, h, w]`` | image VAE -> images in [0, 1] |
| ``iv`` image variation | CLIP image (zeros / grey / black) | ``[B, 4, h, w]`` | image VAE |
| ``i2t`` image-to-text | CLIP image (black by default) | ``[B, D]`` | Optimus -> strings |
| ``tv`` text variation | CLIP text (CLIP("")) | ``[B, D]`` | Optimus |
| ``dual`` dual-guided | text and image, mixed in every context layer | ``[B, 4, h, w]`` | image VAE |

Sampler defaults ([R]): SD's scaled-linear betas 0.00085..0.012 over 1000 steps, DDIM 50 steps with
``leading`` spacing, ``steps_offset=1`` and ``set_alpha_to_one=False`` (timesteps 981, 961, ..., 1; the last step
lands on abar_0), eta 0, guidance scale 7.5.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch

from common import memory
from common.denoisers import CFGDenoiser, FunctionDenoiser
from common.errors import UserError
from common.latents import decode_latents, encode_images, vae_scale_factor
from common.samplers import Generator, sample_ddim
from common.schedule import NoiseSchedule, SamplingPlan, plan_like_diffusers
from versatile.config import SamplingConfig
from versatile.context import DEFAULT_NULL_IMAGE, NULL_IMAGE_KINDS, ContextEncoders, ImageInput, images_to_tensor
from versatile.multiflow import Flow, MultiFlowDiffuser, check_ratio, resolve_flow


def diffuser_unet_config(config) -> dict:
    """The ``UNet2DConditionModel`` config keys :func:`common.memory.unet_step_bytes` reads, for the multi-flow
    diffuser's image path (SD's UNet layout: the data layers' ResBlocks, a context set's transformers)."""
    return {
        "block_out_channels": [config.model_channels * m for m in config.channel_mult],
        "layers_per_block": config.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.attention_levels],
        "num_attention_heads": config.num_heads,
        "in_channels": config.image_latent_channels,
    }


def _count(condition) -> int:
    """How many conditions a prompt / image argument holds (0 for None): a string or one image is one."""
    if condition is None:
        return 0
    if isinstance(condition, str):
        return 1
    if isinstance(condition, torch.Tensor):
        return int(condition.shape[0]) if condition.ndim == 4 else 1
    return len(condition) if isinstance(condition, (list, tuple)) else 1


def vd_schedule(sampling: Optional[SamplingConfig] = None) -> NoiseSchedule:
    """LDM's "linear" betas = diffusers' ``scaled_linear``."""
    s = sampling or SamplingConfig()
    return NoiseSchedule.named("scaled_linear", s.num_train_timesteps, s.beta_start, s.beta_end)


def vd_scheduler_config(sampling: Optional[SamplingConfig] = None) -> dict:
    """The diffusers ``DDIMScheduler`` config VD samples with ([R] ``ddim.py``; [D] conversion with ``--scheduler_type ddim``)."""
    s = sampling or SamplingConfig()
    return {
        "num_train_timesteps": s.num_train_timesteps, "beta_start": s.beta_start, "beta_end": s.beta_end,
        "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
        "timestep_spacing": "leading", "prediction_type": "epsilon",
    }


def vd_plan(steps: int, sampling: Optional[SamplingConfig] = None) -> SamplingPlan:
    """DDIM timesteps of VD: ``range(0, 1000, 1000 // steps) + 1`` descending; final abar_prev = abar_0."""
    return plan_like_diffusers(vd_schedule(sampling), vd_scheduler_config(sampling), steps, "ddim")


@dataclass
class VersatileOutput:
    """``images`` ``[B, 3, H, W]`` in [0, 1] for image flows, ``texts`` (B strings) for text flows."""

    flow: str
    latents: torch.Tensor
    images: Optional[torch.Tensor] = None
    texts: Optional[list[str]] = None
    memory_plan: Optional[memory.MemoryPlan] = None  # image flows: how it ran within the memory budget


class VersatilePipeline:
    """Multi-flow diffuser + image VAE (diffusers ``AutoencoderKL``) + Optimus text VAE + CLIP context encoders."""

    def __init__(
        self,
        diffuser: MultiFlowDiffuser,
        image_vae,
        text_vae,
        contexts: ContextEncoders,
        sampling: Optional[SamplingConfig] = None,
        uncond_image: Optional[str] = None,
    ):
        self.diffuser, self.image_vae, self.text_vae, self.contexts = diffuser, image_vae, text_vae, contexts
        self.sampling = (sampling or SamplingConfig()).validate()
        self.schedule = vd_schedule(self.sampling)
        if uncond_image is not None and uncond_image not in NULL_IMAGE_KINDS:
            raise UserError(f"uncond_image {uncond_image!r}: choose one of {', '.join(NULL_IMAGE_KINDS)}")
        self.uncond_image = uncond_image
        if contexts.dim != diffuser.config.context_dim:
            raise UserError(f"CLIP projection width {contexts.dim} != the diffuser's context_dim "
                            f"{diffuser.config.context_dim}: use matching models")
        if text_vae is not None and text_vae.latent_dim != diffuser.config.text_latent_dim:
            raise UserError(f"text VAE latent {text_vae.latent_dim} != the diffuser's text_latent_dim "
                            f"{diffuser.config.text_latent_dim}: use matching models")

    @property
    def device(self) -> torch.device:
        return next(self.diffuser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.diffuser.parameters()).dtype

    @property
    def image_scale_factor(self) -> int:
        """Pixels per latent cell of the image VAE (8 for SD's kl-f8)."""
        return vae_scale_factor(self.image_vae)

    # ---------------------------------------------------------------- latents

    @torch.no_grad()
    def encode_images(self, images: ImageInput, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Images in [0, 1] -> scaled image latents ``[B, 4, h, w]`` (a posterior sample times 0.18215)."""
        return encode_images(self.image_vae, images_to_tensor(images).to(self.device, self.dtype),
                             self.sampling.image_scaling_factor, sample=True, generator=generator)

    @torch.no_grad()
    def decode_images(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images ``[B, 3, H, W]`` in [0, 1] ([R] autokl.decode clamps to [0, 1])."""
        return decode_latents(self.image_vae, latents, self.sampling.image_scaling_factor)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Sentences -> diffusion text latents ``[B, D]``: Optimus means times ``optimus_scaling_factor`` (1 in VD)."""
        vae = self._require_text_vae()
        return vae.encode(texts) * vae.config.optimus_scaling_factor

    @torch.no_grad()
    def decode_texts(self, latents: torch.Tensor, **kwargs) -> list[str]:
        """Diffusion text latents ``[B, D]`` -> sentences (``OptimusVAE.decode`` keyword arguments)."""
        vae = self._require_text_vae()
        return vae.decode(latents / vae.config.optimus_scaling_factor, **kwargs)

    # ---------------------------------------------------------------- sampling

    @torch.no_grad()
    def __call__(
        self,
        flow: Union[str, Flow],
        prompt: Union[str, Sequence[str], None] = None,
        image: Optional[ImageInput] = None,
        *,
        text_ratio: Optional[float] = None,
        guidance_scale: Optional[float] = None,
        num_inference_steps: Optional[int] = None,
        eta: Optional[float] = None,
        num_samples: int = 1,
        generator: Generator = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        uncond_image: Optional[str] = None,
        latents: Optional[torch.Tensor] = None,
        text_temperature: Optional[float] = None,
        text_max_length: Optional[int] = None,
        merge_duplicates: bool = True,
        callback: Optional[Callable] = None,
        progress: bool = False,
        max_memory_gb: Optional[float] = None,
    ) -> VersatileOutput:
        """Run a flow end to end (paper Fig. 2). ``prompt`` for text-conditioned flows, ``image`` for image ones.

        ``num_samples`` samples per condition (conditions repeat-interleaved); ``text_ratio`` (dual only, in [0, 1])
        weighs the text context against the image context; ``uncond_image`` overrides the per-flow null image
        (zeros for iv / dual, black for i2t). ``latents``: the initial noise ``x_T``. ``max_memory_gb``: the
        budget (default: the machine's memory) image flows fit by :meth:`memory_plan`, or are refused before x_T.
        """
        flow = resolve_flow(flow)
        s = self.sampling
        if flow.xtype == "text":
            self._require_text_vae()  # fail before sampling, not after
        ratio = self._flow_ratio(flow, text_ratio)
        scale = s.scale if guidance_scale is None else float(guidance_scale)
        memory_plan = None
        if flow.xtype == "image":  # text latents are [B, D] vectors: nothing grows with a resolution
            # Planned from the counts of the conditions, before they are encoded and before x_T exists.
            planned = max(_count(prompt), _count(image), 1) * max(int(num_samples), 1)
            shape = self._latent_shape(flow, planned, height, width)
            memory_plan = self.memory_plan(flow, planned, shape[-2] * self.image_scale_factor,
                                           shape[-1] * self.image_scale_factor, scale, max_memory_gb)
        cond = self._encode_conditions(flow, prompt, image, num_samples)
        batch = next(iter(cond.values())).shape[0]
        model = functools.partial(self.diffuser.apply_flow, flow=flow.name, text_ratio=ratio)
        if scale == 1.0:  # no guidance: the conditional branch alone, no unconditional pass
            denoiser = FunctionDenoiser(lambda x, t: model(x, t, **cond), "eps")
        else:
            uncond = {kind: self._null(kind, flow, batch, uncond_image) for kind in cond}
            denoiser = CFGDenoiser(model, cond, uncond, scale)
        shape = self._latent_shape(flow, batch, height, width)
        if memory_plan is not None and batch != planned:  # conditions that broadcast otherwise than counted
            memory_plan = self.memory_plan(flow, batch, shape[-2] * self.image_scale_factor,
                                           shape[-1] * self.image_scale_factor, scale, max_memory_gb)
        if memory_plan is not None and memory_plan.micro_batch:
            split = memory.split_forward(model, memory_plan.micro_batch)
            denoiser = (FunctionDenoiser(lambda x, t: split(x, t, **cond), "eps") if scale == 1.0 else
                        CFGDenoiser(split, cond, uncond, scale))
        plan = vd_plan(s.steps if num_inference_steps is None else int(num_inference_steps), s)
        with memory_plan.applied(self.diffuser, split=False) if memory_plan else contextlib.nullcontext():
            z = sample_ddim(
                denoiser, self.schedule, plan, shape, x_T=latents, generator=generator,
                eta=s.eta if eta is None else float(eta), callback=callback, device=self.device, dtype=self.dtype,
                progress=progress,
            )
        if flow.xtype == "image":
            with memory_plan.applied(self.image_vae, split=False):
                images = decode_latents(self.image_vae, z, self.sampling.image_scaling_factor, mode=memory_plan.vae)
            return VersatileOutput(flow.name, z, images=images, memory_plan=memory_plan)
        texts = self.decode_texts(
            z, temperature=s.text_temperature if text_temperature is None else float(text_temperature),
            max_length=s.text_max_len if text_max_length is None else int(text_max_length),
            generator=generator if isinstance(generator, torch.Generator) else None,
            merge_duplicates=merge_duplicates,
        )
        return VersatileOutput(flow.name, z, texts=texts)

    def text_to_image(self, prompt, **kwargs) -> VersatileOutput:
        return self("t2i", prompt=prompt, **kwargs)

    def image_variation(self, image, **kwargs) -> VersatileOutput:
        return self("iv", image=image, **kwargs)

    def image_to_text(self, image, **kwargs) -> VersatileOutput:
        return self("i2t", image=image, **kwargs)

    def text_variation(self, prompt, **kwargs) -> VersatileOutput:
        return self("tv", prompt=prompt, **kwargs)

    def dual_guided(self, prompt, image, text_ratio: Optional[float] = None, **kwargs) -> VersatileOutput:
        return self("dual", prompt=prompt, image=image, text_ratio=text_ratio, **kwargs)

    def memory_plan(self, flow: Union[str, Flow], batch: int, height: int, width: int,
                    guidance_scale: Optional[float] = None, max_memory_gb: Optional[float] = None
                    ) -> memory.MemoryPlan:
        """The fastest way to run an image flow within ``max_memory_gb`` (``common.memory.plan``: VAE slicing /
        tiling, attention chunks, then the diffuser in micro-batches); a one-line UserError naming the estimate, the
        budget and the fix when none fits. The diffuser's image data layers with one context set are SD's UNet, so
        its step is :func:`common.memory.unet_step_bytes` of the equivalent UNet config; the dual flow runs a second
        transformer at every context slot and keeps the running mixture, two more hidden states there."""
        flow = resolve_flow(flow)
        scale = self.sampling.scale if guidance_scale is None else float(guidance_scale)
        request = memory.Request(batch, height, width, guided=scale != 1.0,
                                 dtype_bytes=torch.finfo(self.dtype).bits // 8, device=str(self.device))
        unet_config = diffuser_unet_config(self.diffuser.config)
        factor = self.image_scale_factor

        def step_bytes(chunk: Optional[int], micro: Optional[int]) -> int:
            needed = memory.unet_step_bytes(unet_config, request, factor, chunk, micro)
            if len(flow.ctypes) > 1:
                rows = micro or batch * (2 if request.guided else 1)
                cells = (height // factor) * (width // factor)
                levels = zip(unet_config["block_out_channels"], unet_config["down_block_types"])
                needed += 2 * request.dtype_bytes * rows * max(
                    [(cells >> (2 * i)) * w for i, (w, kind) in enumerate(levels) if "CrossAttn" in kind] or [0])
            return needed

        models = (self.diffuser, self.image_vae, self.contexts, self.text_vae)
        return memory.plan(self.diffuser, self.image_vae, request, memory.budget_bytes(max_memory_gb, str(self.device)),
                           extra_models=models[2:], what="--resolution/--num_images", step_bytes=step_bytes)

    # ---------------------------------------------------------------- helpers

    def _flow_ratio(self, flow: Flow, text_ratio: Optional[float]) -> Optional[float]:
        if flow.name == "dual":
            return check_ratio(self.sampling.text_ratio if text_ratio is None else text_ratio)
        if text_ratio is not None:
            raise UserError(f"text_ratio only applies to the dual flow, not {flow.name}: drop it")
        return None

    def _encode_conditions(self, flow: Flow, prompt, image, num_samples: int) -> dict[str, torch.Tensor]:
        given = {"text": prompt, "image": image}
        for kind, value in given.items():
            if value is None and kind in flow.ctypes:
                raise UserError(f"flow {flow.name} ({flow.description}) needs {'a prompt' if kind == 'text' else 'an image'}")
            if value is not None and kind not in flow.ctypes:
                what = "a prompt" if kind == "text" else "an image"
                raise UserError(f"flow {flow.name} ({flow.description}) takes no {kind} input, but {what} was given: "
                                f"drop it, or pick a flow conditioned on {kind}")
        if num_samples < 1:
            raise UserError(f"num_samples must be >= 1, got {num_samples}")
        cond = {}
        if prompt is not None:
            cond["text"] = self.contexts.text([prompt] if isinstance(prompt, str) else list(prompt))
        if image is not None:
            cond["image"] = self.contexts.image(image)
        batch = max(v.shape[0] for v in cond.values())
        if any(v.shape[0] not in (1, batch) for v in cond.values()):
            counts = " and ".join(f"{v.shape[0]} {'prompts' if k == 'text' else 'images'}" for k, v in cond.items())
            raise UserError(f"got {counts}: give as many prompts as images, or just one of either")
        cond = {kind: tokens.expand(batch, -1, -1) for kind, tokens in cond.items()}
        dtype = self.dtype
        return {k: v.repeat_interleave(num_samples, dim=0).to(self.device, dtype) for k, v in cond.items()}

    def _null(self, kind: str, flow: Flow, batch: int, override: Optional[str]) -> torch.Tensor:
        image_kind = override or self.uncond_image or DEFAULT_NULL_IMAGE.get(flow.name, "zeros")
        return self.contexts.null(kind, batch, image_kind).to(self.device, self.dtype)

    def _latent_shape(self, flow: Flow, batch: int, height: Optional[int], width: Optional[int]) -> tuple[int, ...]:
        cfg = self.diffuser.config
        if flow.xtype == "text":
            if height is not None or width is not None:
                raise UserError(f"flow {flow.name} generates text: height and width do not apply")
            return (batch, cfg.text_latent_dim)
        f = self.image_scale_factor
        default = self.sampling.resolution or int(self.image_vae.config.sample_size)
        height, width = height or default, width or default
        multiple = f * 2 ** (len(cfg.channel_mult) - 1)
        if height % multiple or width % multiple:
            raise UserError(f"image size {height}x{width} must be a multiple of {multiple} (VAE factor x UNet downsampling)")
        return (batch, cfg.image_latent_channels, height // f, width // f)

    def _require_text_vae(self):
        if self.text_vae is None:
            raise UserError("this pipeline has no text VAE: text flows (i2t, tv) need one")
        return self.text_vae
