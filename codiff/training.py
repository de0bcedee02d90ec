"""Training objectives: the uni-modal latent models and the dynamic diffusers, as ``loss(batch)`` for the trainer.

Both use the plain LDM eps objective (Ho et al. 2020 eq. 14, "L_simple"): ``t ~ U{0..T-1}``, ``eps ~ N(0, I)``,
``x_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps``, loss = mean ``(eps - prediction)^2``.

- :class:`UniModalObjective`: one conditional UNet ``eps_theta(x_t, t, c)`` plus its condition encoder (the mask's
  linear layer is trained jointly, METHOD.md "Members"); optional condition dropout for the CFG extension (non-paper).

Both are the shared trainer's ``loss_fn(batch, ctx)`` (``common.train``) and name their trainable and frozen
modules (``trainable_modules()`` / ``frozen_modules()``) for ``Trainer.fit``.
- :class:`DynamicDiffuserObjective`: the collaborative prediction ``sum_m I_m eps_m`` (METHOD.md, "Training the diffusers"); the uni-modal
  models, condition encoders and VAE are frozen, so only the dynamic diffusers learn.

A batch is a dict: ``latents [B, C, h, w]`` (already ``s * E(x)``) or ``pixel_values [B, 3, H, W]`` in [-1, 1]
(encoded here, posterior *sampled* as LDM does), plus one raw condition per modality under the key the
objective is given (e.g. ``{"text": "caption", "mask": "mask"}``: a list of prompts, class ids ``[B, H, W]``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch
from torch import nn

from codiff.batching import call_unet
from codiff.collaborate import CollaborativeDiffusion
from common.diffusion_loss import diffusion_mse
from common.errors import UserError
from common.process import q_sample_standard
from common.schedule import NoiseSchedule


ConditionEncoder = Callable[[Any], torch.Tensor]


def noise_batch(
    latents: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    t: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    noise_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_t, t, eps)`` for clean latents ``[B, C, h, w]``: uniform ``t`` and Gaussian ``eps`` unless given
    (plus ``noise_offset`` x a per-(sample, channel) Gaussian, ``--noise_offset``)."""
    batch = latents.shape[0]
    if t is None:
        t = torch.randint(0, schedule.num_train_timesteps, (batch,), generator=generator, device="cpu")
    t = t.to(latents.device).long()
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, device="cpu", dtype=latents.dtype)
        if noise_offset:
            shape = latents.shape[:2] + (1,) * (latents.ndim - 2)
            noise = noise + noise_offset * torch.randn(shape, generator=generator, device="cpu", dtype=latents.dtype)
    noise = noise.to(latents.device)
    return q_sample_standard(latents, schedule.abar(t, like=latents), noise), t, noise


def unimodal_loss(
    unet: nn.Module,
    latents: torch.Tensor,
    cond: torch.Tensor,
    schedule: NoiseSchedule,
    snr_gamma: Optional[float] = None,
    **noise_kwargs: Any,
) -> torch.Tensor:
    """``mean (eps - eps_theta(x_t, t, c))^2`` for one conditional UNet; ``cond`` tokens ``[B, L, D]``
    (Min-SNR weighted with ``snr_gamma``, ``common.diffusion_loss``)."""
    x_t, t, eps = noise_batch(latents, schedule, **noise_kwargs)
    return diffusion_mse(call_unet(unet, x_t, t, cond), eps, abar=schedule.abar(t, like=latents),
                         snr_gamma=snr_gamma, prediction_type="epsilon")


def collaborative_loss(
    model: CollaborativeDiffusion,
    latents: torch.Tensor,
    conds: Mapping[str, torch.Tensor],
    schedule: NoiseSchedule,
    *,
    dynamic: Optional[nn.Module] = None,
    snr_gamma: Optional[float] = None,
    **noise_kwargs: Any,
) -> torch.Tensor:
    """``mean (eps - sum_m I_m eps_m(x_t, t, c_m))^2``: gradients reach the diffusers through I_m only.

    The released re-weighting is never applied here: training sees the learned softmax maps alone.
    ``dynamic``: the (prepared) diffusers module to call instead of ``model.dynamic``.
    """
    x_t, t, eps = noise_batch(latents, schedule, **noise_kwargs)
    return diffusion_mse(model.predict(x_t, t, conds, dynamic=dynamic).eps, eps, abar=schedule.abar(t, like=latents),
                         snr_gamma=snr_gamma, prediction_type="epsilon")


class _LatentSource:
    """Clean latents from a batch: ``latents`` as given, or ``s * E(pixel_values).sample()`` with a frozen VAE."""

    def __init__(self, vae: Optional[nn.Module], scaling_factor: Optional[float], generator=None):
        self.vae = vae
        if vae is not None:
            vae.requires_grad_(False).eval()
        self.scaling_factor = scaling_factor if scaling_factor is not None else (
            float(vae.config.scaling_factor) if vae is not None else 1.0
        )
        self.generator = generator

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, Any]) -> torch.Tensor:
        if "latents" in batch:
            return batch["latents"]
        if "pixel_values" not in batch:
            raise UserError("a training batch needs 'latents' or 'pixel_values': check the dataset's collate function")
        if self.vae is None:
            raise UserError("the batch holds pixel_values but no VAE was given to encode them: pass vae=...")
        pixels = batch["pixel_values"].to(device=self.vae.device, dtype=self.vae.dtype)
        return self.scaling_factor * self.vae.encode(pixels).latent_dist.sample(self.generator)


def _batch_value(batch: Mapping[str, Any], key: str, modality: str) -> Any:
    if key not in batch:
        raise UserError(f"the batch has no {key!r} entry for the {modality!r} condition (keys: {', '.join(batch)}): "
                        "fix condition_keys or the dataset")
    return batch[key]


def _tokens(output: Any) -> torch.Tensor:
    """Token states from an encoder's output: a tensor (``MaskEncoder``) or ``[0]`` of a tuple / transformers output."""
    return output if isinstance(output, torch.Tensor) else output[0]


def _prepared(ctx: Any, name: str, default: nn.Module) -> nn.Module:
    """The trainer's prepared (DDP-wrapped) module when a ``StepContext`` is given, else our own."""
    models = getattr(ctx, "models", None) or {}
    return models.get(name, default)


class UniModalObjective:
    """``loss_fn(batch, ctx=None)`` of one uni-modal latent model (text-to-image or mask-to-image).

    ``prepare`` turns the raw batch condition into the encoder's input without parameters (``MaskEncoder.one_hot``,
    ``TextConditioner.tokenize``); ``cond_encoder`` maps that to tokens ``[B, L, D]`` (the mask's Linear, a text
    encoder). ``train_encoder``: train it jointly (the paper's mask Linear and from-scratch text transformer) or
    keep it frozen (a pre-trained CLIP). ``cond_dropout`` replaces a sample's encoder input by ``null_input(B)``
    with that probability (the empty prompt, the all-zero one-hot mask), which CFG needs later (non-paper).

    With the shared trainer: ``trainer.fit(obj.trainable_modules(), obj, data, frozen=obj.frozen_modules())``; the
    loss then calls the trainer's prepared modules (``ctx.models``), so DDP synchronises their gradients.
    """

    def __init__(
        self,
        unet: nn.Module,
        cond_encoder: nn.Module,
        prepare: ConditionEncoder,
        schedule: NoiseSchedule,
        condition_key: str,
        *,
        train_encoder: bool = False,
        vae: Optional[nn.Module] = None,
        scaling_factor: Optional[float] = None,
        cond_dropout: float = 0.0,
        null_input: Optional[Callable[[int], torch.Tensor]] = None,
        generator: Optional[torch.Generator] = None,
        snr_gamma: Optional[float] = None,
        noise_offset: float = 0.0,
    ):
        if not 0.0 <= cond_dropout < 1.0:
            raise UserError(f"cond_dropout must lie in [0, 1), got {cond_dropout}")
        if cond_dropout > 0 and null_input is None:
            raise UserError("cond_dropout needs the null condition: pass null_input (e.g. mask_encoder.null_one_hot)")
        self.unet, self.cond_encoder, self.prepare = unet, cond_encoder, prepare
        self.schedule, self.condition_key, self.train_encoder = schedule, condition_key, train_encoder
        if not train_encoder:
            cond_encoder.requires_grad_(False).eval()
        self.vae = vae
        self.latents = _LatentSource(vae, scaling_factor, generator)
        self.cond_dropout, self.null_input, self.generator = cond_dropout, null_input, generator
        self.snr_gamma, self.noise_offset = snr_gamma, noise_offset

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, **({"cond_encoder": self.cond_encoder} if self.train_encoder else {})}

    def frozen_modules(self) -> dict[str, nn.Module]:
        frozen = {} if self.train_encoder else {"cond_encoder": self.cond_encoder}
        return {**frozen, **({"vae": self.vae} if self.vae is not None else {})}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.trainable_modules().values() for p in m.parameters() if p.requires_grad]

    def __call__(self, batch: Mapping[str, Any], ctx: Any = None) -> torch.Tensor:
        latents = self.latents(batch)
        inputs = self.prepare(_batch_value(batch, self.condition_key, self.condition_key)).to(latents.device)
        if self.cond_dropout > 0:
            drop = torch.rand(inputs.shape[0], generator=self.generator) < self.cond_dropout
            null = self.null_input(inputs.shape[0]).to(inputs)
            inputs = torch.where(drop.to(inputs.device).view(-1, *[1] * (inputs.ndim - 1)), null, inputs)
        encoder = _prepared(ctx, "cond_encoder", self.cond_encoder)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_encoder):
            cond = _tokens(encoder(inputs))
        unet = _prepared(ctx, "unet", self.unet)
        return unimodal_loss(unet, latents, cond.to(latents.device), self.schedule, generator=self.generator,
                             snr_gamma=self.snr_gamma, noise_offset=self.noise_offset)


    @torch.no_grad()
    def sample_images(self, raw: Any, vae: nn.Module, *, models: Optional[Mapping[str, nn.Module]] = None,
                      steps: int = 25, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] from the member as it stands: DDIM ``steps`` (eta 0), no guidance.

        ``raw`` is what a batch holds under the condition key (prompts, class-id masks ``[B, H, W]``, or cached text
        states); ``models``: the trainer's modules (EMA weights when it keeps them), default the objective's own.
        This is what the trainer's validation shows of a lone member.
        """
        from common.denoisers import UNetDenoiser
        from common.samplers import sample
        from common.schedule import make_plan

        models = models or {}
        unet = models.get("unet", self.unet)
        encoder = models.get("cond_encoder", self.cond_encoder)
        device = next(unet.parameters()).device
        cond = _tokens(encoder(self.prepare(raw).to(device)))
        size = int(unet.config.sample_size)
        shape = (cond.shape[0], int(unet.config.in_channels), size, size)
        latents = sample("ddim", UNetDenoiser(unet, encoder_hidden_states=cond), self.schedule,
                         make_plan(self.schedule, steps), shape, generator=generator, device=device, progress=False)
        scaling = self.latents.scaling_factor if self.vae is not None else float(vae.config.scaling_factor)
        images = vae.decode(latents.to(vae.dtype) / scaling).sample
        return ((images.float() + 1) / 2).clamp(0, 1)


class DynamicDiffuserObjective:
    """``loss_fn(batch, ctx=None)`` for the dynamic diffusers of a :class:`CollaborativeDiffusion` (METHOD.md, "Training the diffusers").

    ``encoders``: modality -> frozen raw-condition encoder (``MaskEncoder.encode_ids``, a ``TextConditioner``);
    ``condition_keys``: modality -> batch key (default: the modality name). Encoders and VAE run without gradients.
    With the shared trainer: ``trainer.fit(obj.trainable_modules(), obj, data, frozen=obj.frozen_modules())``; the
    prepared ``ctx.models["dynamic"]`` then computes the logits.
    """

    def __init__(
        self,
        model: CollaborativeDiffusion,
        schedule: NoiseSchedule,
        encoders: Mapping[str, ConditionEncoder],
        *,
        condition_keys: Optional[Mapping[str, str]] = None,
        vae: Optional[nn.Module] = None,
        scaling_factor: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        snr_gamma: Optional[float] = None,
        noise_offset: float = 0.0,
    ):
        model.check_known(encoders)
        missing = [n for n in model.modalities if n not in encoders]
        if missing:
            raise UserError(f"no condition encoder for modality {missing[0]!r}: give one per modality")
        self.model, self.schedule, self.encoders = model, schedule, dict(encoders)
        self.condition_keys = {n: (condition_keys or {}).get(n, n) for n in model.modalities}
        self.vae = vae
        self.latents = _LatentSource(vae, scaling_factor, generator)
        self.generator = generator
        self.snr_gamma, self.noise_offset = snr_gamma, noise_offset

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"dynamic": self.model.dynamic}

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"unets": self.model.unets, **({"vae": self.vae} if self.vae is not None else {})}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.model.trainable_parameters()

    def encode(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {n: self.encoders[n](_batch_value(batch, key, n)) for n, key in self.condition_keys.items()}

    def __call__(self, batch: Mapping[str, Any], ctx: Any = None) -> torch.Tensor:
        latents = self.latents(batch)
        conds = {n: c.to(latents.device) for n, c in self.encode(batch).items()}
        return collaborative_loss(self.model, latents, conds, self.schedule, generator=self.generator,
                                  dynamic=_prepared(ctx, "dynamic", self.model.dynamic), snr_gamma=self.snr_gamma,
                                  noise_offset=self.noise_offset)
