"""Multi-modal editing of a real image (the paper's editing): Imagic per modality, then collaboration.

Imagic (Kawar et al. CVPR 2023), per uni-modal model, on the clean latent ``z_0 = s E(x)`` of the input image:

- stage A, :func:`optimize_embedding`: ``e_opt = argmin_e E_{t,eps} ||eps - eps_theta(x_t, t, e)||^2`` from
  ``e_tgt`` (the target condition's tokens), the model frozen (Adam, lr 1e-3, 500 steps in the release);
- stage B, :func:`finetune_unet`: the same loss over the UNet's weights with ``e_opt`` fixed (Adam, lr 1e-6,
  1000 steps), on a copy, so the collaboration's original model is untouched;
- stage C, :func:`interpolate_embedding`: ``e(alpha) = alpha e_tgt + (1 - alpha) e_opt``.

Collaboration (:func:`collaborative_edit`): the fine-tuned UNets replace the originals in their
branches, the dynamic diffusers are kept as trained, and every modality gets its interpolated embedding.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from codiff.collaborate import CollaborativeDiffusion
from codiff.training import unimodal_loss
from common.errors import UserError
from common.schedule import NoiseSchedule


@dataclass
class ImagicResult:
    """One modality's edit: target and optimised embeddings ``[1, L, D]`` and the fine-tuned UNet."""

    e_tgt: torch.Tensor
    e_opt: torch.Tensor
    unet: nn.Module
    losses_a: list[float] = field(default_factory=list)
    losses_b: list[float] = field(default_factory=list)


def _check_latents(latents: torch.Tensor, embedding: torch.Tensor) -> None:
    if latents.ndim != 4:
        raise UserError(f"Imagic needs the input image's latent [1, C, h, w], got shape {tuple(latents.shape)}")
    if embedding.ndim != 3 or embedding.shape[0] != latents.shape[0]:
        raise UserError(f"the embedding must be [B, L, D] with the latent's batch, got {tuple(embedding.shape)}")


def optimize_embedding(
    unet: nn.Module,
    latents: torch.Tensor,
    e_tgt: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int = 500,
    lr: float = 1e-3,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, list[float]]:
    """Imagic stage A: optimise the condition tokens so the frozen model reconstructs ``latents``.

    ``latents [1, C, h, w]``, ``e_tgt [1, L, D]`` -> ``(e_opt [1, L, D], per-step losses)``. The UNet's weights
    are not touched (their ``requires_grad`` is switched off for the duration and restored).
    """
    _check_latents(latents, e_tgt)
    flags = [p.requires_grad for p in unet.parameters()]
    unet.requires_grad_(False)
    embedding = e_tgt.detach().clone().float().requires_grad_(True)
    optimizer = torch.optim.Adam([embedding], lr=lr)
    losses = []
    try:
        for _ in range(steps):
            loss = unimodal_loss(unet, latents, embedding.to(latents.dtype), schedule, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        for p, flag in zip(unet.parameters(), flags):
            p.requires_grad_(flag)
    return embedding.detach().to(e_tgt.dtype), losses


def finetune_unet(
    unet: nn.Module,
    latents: torch.Tensor,
    e_opt: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int = 1000,
    lr: float = 1e-6,
    generator: Optional[torch.Generator] = None,
    inplace: bool = False,
) -> tuple[nn.Module, list[float]]:
    """Imagic stage B: fine-tune the UNet (a deep copy unless ``inplace``) to reconstruct ``latents`` at ``e_opt``.

    Returns ``(fine-tuned UNet in eval mode, per-step losses)``; ``e_opt`` is a constant here.
    """
    _check_latents(latents, e_opt)
    model = unet if inplace else copy.deepcopy(unet)
    model.requires_grad_(True).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    e_opt = e_opt.detach()
    losses = []
    for _ in range(steps):
        loss = unimodal_loss(model, latents, e_opt, schedule, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model.requires_grad_(False).eval(), losses


def interpolate_embedding(e_tgt: torch.Tensor, e_opt: torch.Tensor, alpha: float) -> torch.Tensor:
    """Imagic stage C: ``alpha e_tgt + (1 - alpha) e_opt`` (alpha 0 reconstructs, 1 is the target, > 1 extrapolates)."""
    if e_tgt.shape != e_opt.shape:
        raise UserError(f"target and optimised embeddings differ in shape: {tuple(e_tgt.shape)} vs {tuple(e_opt.shape)}")
    if alpha == 0.0:
        return e_opt.clone()
    if alpha == 1.0:
        return e_tgt.clone()
    return alpha * e_tgt + (1.0 - alpha) * e_opt


def imagic(
    unet: nn.Module,
    latents: torch.Tensor,
    e_tgt: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    stage1_steps: int = 500,
    stage1_lr: float = 1e-3,
    stage2_steps: int = 1000,
    stage2_lr: float = 1e-6,
    generator: Optional[torch.Generator] = None,
) -> ImagicResult:
    """Stages A and B for one modality (the released ``imagic_edit_{text,mask}.py`` defaults)."""
    e_opt, losses_a = optimize_embedding(unet, latents, e_tgt, schedule, steps=stage1_steps, lr=stage1_lr,
                                         generator=generator)
    tuned, losses_b = finetune_unet(unet, latents, e_opt, schedule, steps=stage2_steps, lr=stage2_lr,
                                    generator=generator)
    return ImagicResult(e_tgt.detach(), e_opt, tuned, losses_a, losses_b)


def collaborative_edit(model: CollaborativeDiffusion, edits: Mapping[str, ImagicResult]) -> CollaborativeDiffusion:
    """A collaboration whose edited modalities use their fine-tuned UNets; diffusers and other UNets are shared
    with ``model`` (same modules, not copies), as the released ``collaborative_edit.py`` loads them."""
    model.check_known(edits)
    unets = {name: (edits[name].unet if name in edits else model.unets[name]) for name in model.modalities}
    diffusers = {name: model.diffusers[name] for name in model.modalities}
    return CollaborativeDiffusion(
        unets, diffusers, confidence_input=model.confidence_input, batch_members=model.batch_members
    )


def edit_conditions(
    edits: Mapping[str, ImagicResult], alpha: float, others: Optional[Mapping[str, torch.Tensor]] = None
) -> dict[str, torch.Tensor]:
    """The conditions at one ``alpha`` (the same for every edited modality, as released): interpolated embeddings
    for the edited modalities, ``others`` (tokens) as given for the rest."""
    conds = dict(others or {})
    conds.update({name: interpolate_embedding(r.e_tgt, r.e_opt, alpha) for name, r in edits.items()})
    return conds


# ------------------------------------------------------------------------------------ the whole edit (Imagic per modality, then collaboration)


@dataclass
class EditOutput:
    """``collaborative[alpha]``: edited images ``[B, 3, H, W]`` in [0, 1] of the collaboration at each alpha;
    ``unimodal[name][alpha]``: each fine-tuned member alone (when asked); ``edits``: the Imagic results;
    ``input_latent``: ``z_0 [1, C, h, w]``; ``x_T``: the shared starting noise."""

    collaborative: dict
    unimodal: dict
    edits: dict
    input_latent: torch.Tensor
    x_T: torch.Tensor


def edit_image(
    collab,
    image: torch.Tensor,
    targets: Mapping[str, object],
    *,
    stage1_steps: int = 500,
    stage1_lr: float = 1e-3,
    stage2_steps: int = 1000,
    stage2_lr: float = 1e-6,
    alphas: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5),
    num_inference_steps: int = 50,
    eta: float = 1.0,
    batch_size: int = 1,
    seed: int = 0,
    sample_seed: int = 2,
    guidance_scale: float = 1.0,
    unimodal: bool = False,
    progress: bool = False,
) -> EditOutput:
    """Imagic per modality on ``image`` (``[1, 3, H, W]`` in [-1, 1]), then the collaborative edit at each alpha.

    ``collab``: a :class:`codiff.checkpoint.Collaboration`; ``targets``: modality -> raw target condition (a prompt, a
    class-id mask ``[H, W]``), one for every modality of the collaboration (the released editing tunes both). Every
    alpha starts from the same noise ``x_T`` (drawn from ``sample_seed``; the release's ``start_code`` was never
    used). ``guidance_scale`` != 1: per-member CFG with the null tokens (an extension).
    """
    edits, latent = imagic_members(collab, image, targets, stage1_steps=stage1_steps, stage1_lr=stage1_lr,
                                   stage2_steps=stage2_steps, stage2_lr=stage2_lr, seed=seed)
    return sample_edits(collab, edits, latent, alphas=alphas, num_inference_steps=num_inference_steps, eta=eta,
                        batch_size=batch_size, sample_seed=sample_seed, guidance_scale=guidance_scale,
                        unimodal=unimodal, progress=progress)


def imagic_members(
    collab,
    image: torch.Tensor,
    targets: Mapping[str, object],
    *,
    stage1_steps: int = 500,
    stage1_lr: float = 1e-3,
    stage2_steps: int = 1000,
    stage2_lr: float = 1e-6,
    seed: int = 0,
) -> tuple[dict[str, ImagicResult], torch.Tensor]:
    """Stages A and B for every member on the image's latent ``z_0 = s E(x)`` (posterior sampled, seeded):
    ``(modality -> ImagicResult, z_0 [1, C, h, w])``."""
    if image.ndim != 4 or image.shape[0] != 1 or image.shape[1] != 3:
        raise UserError(f"the input image must be one RGB image [1, 3, H, W], got shape {tuple(image.shape)}")
    size = collab.image_size
    if tuple(image.shape[-2:]) != (size, size):
        raise UserError(f"the input image is {image.shape[-1]}x{image.shape[-2]} but the model makes {size}x{size} "
                        "images: resize it first")
    collab.model.check_known(targets)
    missing = [n for n in collab.modalities if n not in targets]
    if missing:
        raise UserError(f"no target for the {missing[0]!r} modality: every member is edited (give its target)")
    device = next(collab.vae.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        posterior = collab.vae.encode(image.to(device=device, dtype=collab.vae.dtype)).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(device)
        latent = (posterior.mean + posterior.std * noise) * float(collab.vae.config.scaling_factor)
    edits = {}
    for name in collab.modalities:
        e_tgt = collab.members[name].encode(targets[name]).to(device)
        edits[name] = imagic(collab.model.unets[name], latent, e_tgt, collab.schedule, stage1_steps=stage1_steps,
                             stage1_lr=stage1_lr, stage2_steps=stage2_steps, stage2_lr=stage2_lr, generator=generator)
    return edits, latent


def sample_edits(
    collab,
    edits: Mapping[str, ImagicResult],
    latent: torch.Tensor,
    *,
    alphas: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5),
    num_inference_steps: int = 50,
    eta: float = 1.0,
    batch_size: int = 1,
    sample_seed: int = 2,
    guidance_scale: float = 1.0,
    unimodal: bool = False,
    progress: bool = False,
) -> EditOutput:
    """Stage C with collaboration: the fine-tuned members in their branches, the diffusers unchanged, the
    interpolated tokens at every alpha (and, with ``unimodal``, each fine-tuned member alone)."""
    from codiff.pipeline import CollaborativePipeline

    device = latent.device
    edited = collaborative_edit(collab.model, edits)
    pipe = CollaborativePipeline(edited, collab.vae, collab.schedule, {})
    x_T = torch.randn((batch_size, *pipe.latent_shape), generator=torch.Generator().manual_seed(sample_seed))
    uncond = scales = None
    if guidance_scale != 1.0:
        uncond = collab.null_conditions(1)
        scales = {n: guidance_scale for n in collab.modalities}
    out = EditOutput({}, {n: {} for n in collab.modalities} if unimodal else {}, dict(edits), latent, x_T)
    for alpha in alphas:
        conds = edit_conditions(edits, float(alpha))
        common = dict(batch_size=batch_size, num_inference_steps=num_inference_steps, eta=eta, x_T=x_T.to(device),
                      generator=torch.Generator().manual_seed(sample_seed + 1), uncond=uncond,
                      guidance_scales=scales, progress=progress)
        out.collaborative[float(alpha)] = pipe(conds, **common).images.cpu()
        if unimodal:
            for name in collab.modalities:
                out.unimodal[name][float(alpha)] = pipe(conds, weights={name: 1.0}, **common).images.cpu()
    return out
