"""Multi-modal generation with a collaboration on the core samplers, and the released ``generate.py``'s outputs.

Sampling is the core's DDIM (``common.samplers.sample_ddim``) over a :class:`~codiff.collaborate.CollaborativeDenoiser`
with LDM's timesteps (:func:`ldm_plan`: 981, 961, ..., 1 for 50 steps, the last step landing on ``abar_0``) and the
released ``eta = 1``. A :class:`~codiff.collaborate.InfluenceRecorder` callback keeps the influence maps and the x0
predictions of every step, which :func:`save_generation` writes as the released file set::

    {idx:06d}_x_0.png                       final image
    {idx:06d}_{modality}_influence_function.png   the maps over time, grey, 10 steps per row
    {idx:06d}_x_inter.png / _pred_x0.png    decoded latents after every step / decoded x0 predictions
    {idx:06d}_z_0.png                       the final latent, channels side by side
    {idx:06d}_mixed.png                     the image blended with the rendered mask (alpha 0.3)
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from PIL import Image
from torch import nn

from codiff.collaborate import CollaborativeDenoiser, CollaborativeDiffusion, InfluenceRecorder, ReleasedReweighting
from common import memory
from common.errors import UserError
from common.io import PathLike, atomic_write_file, make_image_grid, save_image_grid, to_pil
from common.latents import PLAIN, VaeMode, decode_latents, vae_scale_factor
from common.samplers import Generator, randn, sample
from common.schedule import NoiseSchedule, SamplingPlan, plan_like_diffusers


# LDM's DDIM as a diffusers scheduler config: uniform "leading" steps offset by one, last step onto abar_0.
LDM_DDIM_CONFIG = {"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False}


def ldm_schedule(num_train_timesteps: int = 1000) -> NoiseSchedule:
    """LDM's "linear" schedule, linear in sqrt(beta) from 0.0015 to 0.0195 (= diffusers ``scaled_linear``)."""
    return NoiseSchedule.named("scaled_linear", num_train_timesteps, 0.0015, 0.0195)


def ldm_plan(schedule: NoiseSchedule, steps: int, sampler: str = "ddim") -> SamplingPlan:
    """LDM's ``make_ddim_timesteps(uniform)`` (METHOD.md, "DDIM"): ``c = T // S``, timesteps ``{0, c, 2c, ...} + 1``."""
    return plan_like_diffusers(schedule, LDM_DDIM_CONFIG, steps, sampler)


def unet_config(net: nn.Module) -> Any:
    """The diffusers UNet config inside a member: its own, or that of the UNet a wrapper (the mask member that
    concatenates the mask to x_t) runs, which is what its activations follow."""
    while getattr(net.config, "block_out_channels", None) is None and hasattr(net, "unet"):
        net = net.unet
    return net.config


def safe_dirname(text: str, max_length: int = 80) -> str:
    """A folder name for a prompt: the released code used the raw text, which breaks on '/' or long prompts.

    Keeps letters, digits, ``-_.,`` and spaces (as ``_``); adds a short hash when anything was changed or cut, so
    distinct prompts never share a folder.
    """
    cleaned = re.sub(r"[^A-Za-z0-9\-_.,]+", "_", text.strip()).strip("._") or "empty"
    if cleaned != text or len(cleaned) > max_length:
        digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
        cleaned = f"{cleaned[: max_length - 9]}-{digest}"
    return cleaned


@dataclass
class CollaborativeGeneration:
    """Samples and, when recorded, their trajectories. ``images [B, 3, H, W]`` in [0, 1]; ``latents [B, C, h, w]``;
    ``influence [S, B, M, h, w]``; ``pred_x0`` / ``x_inter`` ``[S, B, C, h, w]`` latents (x_inter = the latent after
    each step, as the released sampler logs it); ``timesteps``: the S model timesteps; ``masks [B, H, W]``: the
    class-id masks a mask member was conditioned on (set by ``codiff.sample_cli.generate_collaboration``)."""

    images: torch.Tensor
    latents: torch.Tensor
    modalities: tuple[str, ...]
    timesteps: Optional[list[int]] = None
    influence: Optional[torch.Tensor] = None
    pred_x0: Optional[torch.Tensor] = None
    x_inter: Optional[torch.Tensor] = None
    masks: Optional[torch.Tensor] = None
    memory_plan: Optional[memory.MemoryPlan] = None  # how it ran within the memory budget


ConditionEncoder = Callable[[Any], torch.Tensor]


class CollaborativePipeline:
    """Conditions -> tokens -> collaborative sampling -> VAE decode.

    ``encoders``: modality name -> callable turning a raw condition (a prompt, a class-id mask ``[H, W]``) into tokens
    ``[1 or B, L, D]`` (:class:`~codiff.conditions.TextConditioner`, ``MaskEncoder.encode_ids``). A float tensor
    ``[B, L, D]`` given as a condition is taken as tokens already. ``scaling_factor``: latents are ``s * E(x)``
    (default: the VAE config's). ``latent_shape``: ``(C, h, w)`` of the latents (default: from the first UNet).
    """

    def __init__(
        self,
        model: CollaborativeDiffusion,
        vae: nn.Module,
        schedule: NoiseSchedule,
        encoders: Mapping[str, ConditionEncoder],
        *,
        scaling_factor: Optional[float] = None,
        latent_shape: Optional[tuple[int, int, int]] = None,
    ):
        self.model, self.vae, self.schedule = model, vae, schedule
        self.encoders = dict(encoders)
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else vae.config.scaling_factor)
        if latent_shape is None:
            config = self.model.unets[self.model.modalities[0]].config
            latent_shape = (config.in_channels, config.sample_size, config.sample_size)
        self.latent_shape = tuple(int(v) for v in latent_shape)

    @property
    def device(self) -> torch.device:
        return next(self.model.diffusers.parameters()).device

    @torch.no_grad()
    def encode_conditions(self, conditions: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Raw conditions -> tokens, by modality; a condition without a model is a :class:`UserError`."""
        self.model.check_known(conditions)
        tokens = {}
        for name, value in conditions.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim == 3:
                tokens[name] = value.to(self.device)
                continue
            if name not in self.encoders:
                raise UserError(f"no condition encoder for modality {name!r}: give its tokens [B, L, D] instead")
            tokens[name] = self.encoders[name](value).to(self.device)
        return tokens

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, mode: VaeMode = PLAIN) -> torch.Tensor:
        """``D(z / s)`` mapped to [0, 1]: ``[N, C, h, w] -> [N, 3, H, W]``."""
        return decode_latents(self.vae, latents, self.scaling_factor, mode=mode)

    def memory_plan(self, batch: int, *, guided: Sequence[str] = (), active: Optional[Sequence[str]] = None,
                    steps: int = 0, record: bool = False, max_memory_gb: Optional[float] = None,
                    what: str = "--num_images") -> memory.MemoryPlan:
        """The fastest way to sample ``batch`` images within ``max_memory_gb`` (default: the machine's memory):
        ``common.memory.plan`` over the collaboration's step, with the VAE sliced / tiled, attention in chunks and
        the member forwards in micro-batches as needed; a one-line UserError naming the estimate, the budget and the
        fix when none fits.

        One step runs every distinct member UNet in turn on the batch (times the calls batched into it: the CFG
        branch of each ``guided`` modality, the modalities sharing it), then the dynamic diffusers on ``x_t`` while
        the members' predictions are held; the peak is the largest of those forwards plus the held predictions.
        ``active``: the modalities that run (a fixed weighting may drop some; default all). ``record`` keeps every
        step's maps and latents (``steps`` of them) on the CPU."""
        names = list(self.model.modalities if active is None else active)
        param = next(self.model.diffusers.parameters())
        channels, h, w = self.latent_shape
        factor = vae_scale_factor(self.vae)
        dtype_bytes = torch.finfo(param.dtype).bits // 8
        request = memory.Request(batch, h * factor, w * factor, guided=bool(guided), dtype_bytes=dtype_bytes,
                                 device=str(param.device))
        calls: dict[int, list] = {}
        for name in names:
            unet = self.model.unets[name]
            calls.setdefault(id(unet), [unet, 0])[1] += 2 if name in guided else 1
        single = memory.Request(batch, request.height, request.width, guided=False, dtype_bytes=dtype_bytes,
                                device=request.device)
        held = dtype_bytes * batch * channels * h * w * (len(names) + len(guided))
        if record:  # influence maps, x_t and x0 of every step, float32 on the CPU
            held += 4 * steps * batch * (2 * channels + len(names)) * h * w

        def step_bytes(chunk: Optional[int], micro: Optional[int]) -> int:
            members = max(memory.unet_step_bytes(unet_config(unet), single, factor, chunk,
                                                 min(micro or n * batch, n * batch)) for unet, n in calls.values())
            diffusers = max(memory.unet_step_bytes(unet_config(self.model.diffusers[name]), single, factor, chunk,
                                                   min(micro or batch, batch)) for name in names)
            return held + max(members, diffusers)

        unets = {id(u): u for u in self.model.unets.values()}.values()
        return memory.plan(None, self.vae, request, memory.budget_bytes(max_memory_gb, str(param.device)),
                           weights=memory.weight_bytes(*unets, self.model.dynamic, self.vae), what=what,
                           step_bytes=step_bytes)

    @torch.no_grad()
    def __call__(
        self,
        conditions: Mapping[str, Any],
        *,
        batch_size: int = 1,
        num_inference_steps: int = 50,
        eta: float = 1.0,
        sampler: str = "ddim",
        generator: Generator = None,
        x_T: Optional[torch.Tensor] = None,
        reweighting: Optional[ReleasedReweighting] = None,
        uncond: Optional[Mapping[str, Any]] = None,
        guidance_scales: Optional[Mapping[str, float]] = None,
        record: bool = False,
        progress: bool = True,
        weights: Optional[Mapping[str, float]] = None,
        max_memory_gb: Optional[float] = None,
    ) -> CollaborativeGeneration:
        """Generate ``batch_size`` images for one set of conditions (released defaults: DDIM, 50 steps, eta 1).

        Conditions may also be batched (``batch_size`` prompts, ``[batch_size, H, W]`` masks). ``record``: keep
        influence maps, x0 predictions and intermediate latents of every step. ``weights``: fixed weights per
        modality instead of the learned maps (:class:`~codiff.variants.FixedWeightDenoiser`: one member alone, the
        equal-weight average); ``reweighting`` does not apply to them. ``max_memory_gb``: the budget (default: the
        machine's memory) :meth:`memory_plan` fits, or the request is refused before anything is encoded.
        """
        if sampler not in ("ddim", "ddpm"):
            raise UserError(f"unknown sampler {sampler!r}: choose ddim or ddpm")
        active = None if weights is None else [n for n, w in weights.items() if float(w) > 0]
        guided = [n for n, g in (guidance_scales or {}).items() if float(g) != 1.0 and n in (uncond or {})
                  and (active is None or n in active)]
        memory_plan = self.memory_plan(batch_size, guided=guided, active=active, steps=num_inference_steps,
                                       record=record, max_memory_gb=max_memory_gb)
        if weights is not None:
            from codiff.variants import FixedWeightDenoiser

            active = [n for n, w in weights.items() if float(w) > 0]
            tokens = self.encode_conditions({n: v for n, v in conditions.items() if n in active})
            null = None if uncond is None else self.encode_conditions({n: v for n, v in uncond.items() if n in active})
            denoiser = FixedWeightDenoiser(self.model, tokens, weights, uncond=null, guidance_scales=guidance_scales)
        else:
            tokens = self.encode_conditions(conditions)
            null = None if uncond is None else self.encode_conditions(uncond)
            denoiser = CollaborativeDenoiser(
                self.model, tokens, uncond=null, guidance_scales=guidance_scales, reweighting=reweighting
            )
        recorder = InfluenceRecorder(denoiser, keep_latents=True) if record else None
        plan = ldm_plan(self.schedule, num_inference_steps, sampler)
        shape = (batch_size, *self.latent_shape)
        if x_T is None:
            x_T = randn(shape, generator, self.device)
        kwargs = dict(x_T=x_T, generator=generator, callback=recorder, device=self.device, progress=progress)
        networks = {id(net): net for net in (*self.model.unets.values(), *self.model.diffusers.values())}
        with memory_plan.applied(*networks.values()):
            latents = sample(sampler, denoiser, self.schedule, plan, eta=eta, **kwargs)
        with memory_plan.applied(self.vae, split=False):
            images = self.decode(latents, memory_plan.vae)
        out = CollaborativeGeneration(images, latents, self.model.modalities, memory_plan=memory_plan)
        if recorder is not None:
            out.timesteps = recorder.timesteps
            out.influence = recorder.influence
            out.pred_x0 = recorder.pred_x0
            # The latent after step i is the input of step i + 1; the last one is the sample.
            out.x_inter = torch.cat([recorder.x_t[1:], latents.float().cpu()[None]])
        return out


# --------------------------------------------------------------------------------------------------- saving


def _save_pil(image: Image.Image, path: Path) -> None:
    with atomic_write_file(path) as tmp:
        image.save(tmp, format="PNG")


def latent_to_image(latent: torch.Tensor) -> Image.Image:
    """A latent ``[C, h, w]`` as its C channels side by side, each min-max normalised (the released ``(z + 40) * 4``
    shows unit-variance latents as flat grey)."""
    z = latent.float()
    low = z.amin(dim=(1, 2), keepdim=True)
    high = z.amax(dim=(1, 2), keepdim=True)
    channels = ((z - low) / (high - low).clamp_min(1e-8))[:, None]  # [C, 1, h, w]
    return make_image_grid(channels, nrow=z.shape[0], padding=1, value_range=(0.0, 1.0))


def save_generation(
    gen: CollaborativeGeneration,
    folder: PathLike,
    *,
    decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    mask_rgb: Optional[Image.Image] = None,
    save_z: bool = False,
    return_influence_function: bool = False,
    display_x_inter: bool = False,
    save_mixed: bool = False,
    start_index: int = 0,
    nrow: int = 10,
    map_upscale: int = 1,
) -> list[Path]:
    """Write the released output set (module docstring) for every sample of ``gen``; returns the paths written.

    ``decode``: latents -> images in [0, 1] (the pipeline's :meth:`~CollaborativePipeline.decode`), needed for
    ``display_x_inter``. ``map_upscale``: nearest upscaling of the latent-resolution influence maps (1 = the
    released 64x64 tiles). Every file is written atomically.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if (return_influence_function or display_x_inter) and gen.influence is None:
        raise UserError("influence maps / intermediates were not recorded: generate with record=True")
    if display_x_inter and decode is None:
        raise UserError("display_x_inter needs a decoder for the intermediate latents: pass decode=pipeline.decode")
    if save_mixed and mask_rgb is None:
        raise UserError("save_mixed needs the mask: pass mask_rgb (codiff.conditions.mask_to_rgb)")
    written: list[Path] = []
    for b in range(gen.images.shape[0]):
        stem = f"{start_index + b:06d}"
        image = to_pil(gen.images[b], value_range=(0.0, 1.0))
        path = folder / f"{stem}_x_0.png"
        _save_pil(image, path)
        written.append(path)
        if return_influence_function:
            for m, name in enumerate(gen.modalities):
                maps = gen.influence[:, b, m : m + 1]  # [S, 1, h, w]
                if map_upscale > 1:
                    maps = torch.nn.functional.interpolate(maps, scale_factor=map_upscale, mode="nearest")
                path = folder / f"{stem}_{name}_influence_function.png"
                save_image_grid(maps, path, nrow=nrow, value_range=(0.0, 1.0))
                written.append(path)
        if display_x_inter:
            for key in ("x_inter", "pred_x0"):
                path = folder / f"{stem}_{key}.png"
                save_image_grid(decode(getattr(gen, key)[:, b]), path, nrow=nrow, value_range=(0.0, 1.0))
                written.append(path)
        if save_z:
            path = folder / f"{stem}_z_0.png"
            _save_pil(latent_to_image(gen.latents[b].cpu()), path)
            written.append(path)
        if save_mixed:
            overlay = mask_rgb.convert("RGB").resize(image.size, Image.NEAREST)
            path = folder / f"{stem}_mixed.png"
            _save_pil(Image.blend(image, overlay, 0.3), path)
            written.append(path)
    return written
