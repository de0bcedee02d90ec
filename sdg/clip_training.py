"""Self-supervised fine-tuning of the noise-aware CLIP (METHOD.md §4, SDG's ``clip_finetune_noise_nolabel.py``).

No captions: for a batch of clean images x_0, draw t, noise ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` with
the full training schedule, and pull the student embedding ``e_i = E'(x_t^i, t_i)`` towards the FROZEN pretrained
CLIP embedding ``c_i = E(x_0^i)`` of the same clean image, against the other images of the batch (symmetric InfoNCE,
fixed logit scale 100, the two directions summed)::

    L = CE(100 * e_hat c_hat^T, I) + CE(100 * c_hat e_hat^T, I)          (rows L2-normalised, CE averaged over i)

Since c lives in CLIP's joint image-text space, the frozen text tower still scores the student's embedding: that is
what makes language guidance possible on caption-free datasets.

``NoisyClipLoss(student, teacher, schedule)`` is the ``loss_fn(batch, ctx) -> tensor`` of the shared trainer
(``common.train.Trainer.fit({"clip": student}, loss, data, frozen={"teacher": teacher})``); the trainable parameters
are chosen with ``student.set_finetune_mode("all" | "last")``.

Two ways to reach SDG's sharp logit scale 100 from a CLIP that learned a softer one (a fixed 100 collapses the
fine-tune of a tiny CLIP whose own temperature is 18.5): a warm-up (``logit_scale_start`` -> ``logit_scale``,
geometrically over ``logit_scale_warmup_steps``), or a learned temperature (:class:`LearnedLogitScale`, CLIP's own
parametrisation ``exp(log_scale)`` capped at 100, trained with the student as ``{"temperature": ...}``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError
from common.process import q_sample_standard
from common.samplers import randn
from common.schedule import NoiseSchedule
from sdg.noisy_clip import NoiseAwareCLIP


T_SAMPLERS = ("uniform", "linear", "half")
CLIP_MAX_LOGIT_SCALE = 100.0  # CLIP clamps its learned temperature here (Radford et al. 2021, section 2.5)
Batch = Union[torch.Tensor, Mapping[str, torch.Tensor]]


def contrastive_loss(
    student: torch.Tensor, teacher: torch.Tensor, logit_scale: Union[float, torch.Tensor] = 100.0
) -> torch.Tensor:
    """Symmetric InfoNCE of ``[B, D]`` student and teacher embeddings (normalised here), directions summed -> scalar.

    Positives are the pairs (i, i); the fixed ``logit_scale`` is SDG's 100 (CLIP's trained temperature at its cap). A
    0-dim tensor (a learned temperature) gets gradients through the loss.
    """
    s = F.normalize(student.float(), dim=-1)
    c = F.normalize(teacher.float(), dim=-1)
    logits = logit_scale * s @ c.T
    labels = torch.arange(s.shape[0], device=s.device)
    return F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)


def sample_timesteps(
    n: int, num_train_timesteps: int, kind: str = "uniform", generator: Optional[torch.Generator] = None,
    device=None,
) -> torch.Tensor:
    """Training timesteps ``[n]`` (SDG's ``--schedule_sampler``): ``uniform`` over 0..T-1, ``linear`` with weights
    ``linspace(1, 10)`` (noisier t more often), ``half`` uniform over 0..T/2-1."""
    T = num_train_timesteps
    gen_device = generator.device if generator is not None else "cpu"
    if kind == "uniform":
        t = torch.randint(0, T, (n,), generator=generator, device=gen_device)
    elif kind == "half":
        t = torch.randint(0, T // 2, (n,), generator=generator, device=gen_device)
    elif kind == "linear":
        weights = torch.linspace(1.0, 10.0, T, device=gen_device)
        t = torch.multinomial(weights / weights.sum(), n, replacement=True, generator=generator)
    else:
        raise UserError(f"unknown timestep sampler {kind!r}: choose one of {', '.join(T_SAMPLERS)}")
    return t.to(device)


def warmed_logit_scale(step: int, start: float, end: float, warmup_steps: int) -> float:
    """The logit scale at optimizer ``step``: ``start`` at 0, ``end`` from ``warmup_steps`` on, geometric between
    (equal ratios per step, since the scale acts multiplicatively on the logits)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return float(end)
    frac = max(0, step) / warmup_steps
    return float(math.exp(math.log(start) + frac * (math.log(end) - math.log(start))))


class LearnedLogitScale(nn.Module):
    """CLIP's learned temperature: ``forward() = exp(log_scale)``, capped at ``max_scale`` (100, as CLIP).

    The cap is a clamp of the value, as in open_clip's training loop, so the gradient stops while it is at the cap.
    """

    def __init__(self, init: float, max_scale: float = CLIP_MAX_LOGIT_SCALE):
        super().__init__()
        if not 0 < init <= max_scale:
            raise UserError(f"the initial logit scale must be in (0, {max_scale}], got {init}")
        self.log_scale = nn.Parameter(torch.tensor(math.log(init)))
        self.max_scale = float(max_scale)

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale)


class NoisyClipLoss:
    """``loss(batch) -> scalar``: contrastive distillation of the frozen CLIP into the noise-aware student.

    Args:
        student: the ``NoiseAwareCLIP`` being trained.
        teacher: the frozen pretrained image tower, ``[B, 3, H, W]`` CLIP-normalised -> ``[B, D]`` (e.g. a deep copy
            of ``model.visual`` taken before wrapping); set to eval and frozen here.
        schedule: the diffusion model's training schedule (noising at t, 0..T-1).
        t_sampler: ``uniform`` | ``linear`` | ``half``; ``noised=False`` trains on clean images at t = 0.
        logit_scale: the InfoNCE scale (reached after the warm-up, if any).
        logit_scale_start, logit_scale_warmup_steps: with ``warmup_steps > 0`` the scale goes geometrically from
            ``logit_scale_start`` at step 0 to ``logit_scale`` at ``warmup_steps`` (the trainer's step, ``ctx.step``).
        temperature: a :class:`LearnedLogitScale` trained with the student (pass it to the trainer as
            ``models["temperature"]``); replaces the fixed scale.
        generator: draws t and the noise. Leave it ``None`` under the shared trainer: the global RNG it then uses
            is checkpointed with the run, so ``--resume_from_checkpoint`` stays exact.
        student_key, teacher_key: names of the two modules in the trainer's ``ctx.models`` (the student must be
            called through its prepared, possibly DDP-wrapped, module for gradients to synchronise).

    ``batch``: images ``[B, 3, S, S]`` in [-1, 1], or a mapping with ``pixel_values`` (same) and optionally
    ``teacher_pixel_values`` (the clean image already prepared for the teacher, e.g. CLIP's 384-px preprocessing,
    the released data pipeline never defined the teacher's input); without it the teacher sees the student's clean
    image, CLIP-normalised.
    """

    def __init__(
        self,
        student: NoiseAwareCLIP,
        teacher: Callable[[torch.Tensor], torch.Tensor],
        schedule: NoiseSchedule,
        *,
        t_sampler: str = "uniform",
        noised: bool = True,
        logit_scale: float = 100.0,
        logit_scale_start: Optional[float] = None,
        logit_scale_warmup_steps: int = 0,
        temperature: Optional[LearnedLogitScale] = None,
        generator: Optional[torch.Generator] = None,
        student_key: str = "clip",
        teacher_key: str = "teacher",
        temperature_key: str = "temperature",
    ):
        if t_sampler not in T_SAMPLERS:
            raise UserError(f"unknown timestep sampler {t_sampler!r}: choose one of {', '.join(T_SAMPLERS)}")
        if temperature is not None and logit_scale_warmup_steps > 0:
            raise UserError("a learned temperature and a logit-scale warm-up exclude each other: choose one")
        if logit_scale_warmup_steps > 0 and not (logit_scale_start or 0) > 0:
            raise UserError(f"a logit-scale warm-up needs a start scale > 0, got {logit_scale_start}")
        if isinstance(teacher, torch.nn.Module):
            teacher.eval().requires_grad_(False)
        self.student, self.teacher, self.schedule = student, teacher, schedule
        self.t_sampler, self.noised, self.logit_scale, self.generator = t_sampler, noised, logit_scale, generator
        self.logit_scale_start, self.logit_scale_warmup_steps = logit_scale_start, int(logit_scale_warmup_steps)
        self.temperature = temperature
        self.student_key, self.teacher_key, self.temperature_key = student_key, teacher_key, temperature_key

    def current_logit_scale(self, ctx=None) -> Union[float, torch.Tensor]:
        """The scale of this batch: the learned temperature (a tensor with gradient), the warmed-up value at the
        trainer's step, or the fixed ``logit_scale``."""
        if self.temperature is not None:
            models = getattr(ctx, "models", None) or {}
            return models.get(self.temperature_key, self.temperature)()
        if self.logit_scale_warmup_steps > 0:
            step = int(getattr(ctx, "step", 0) or 0)
            return warmed_logit_scale(step, self.logit_scale_start, self.logit_scale, self.logit_scale_warmup_steps)
        return self.logit_scale

    def _images(self, batch: Batch) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if torch.is_tensor(batch):
            return batch, None
        if "pixel_values" not in batch:
            raise UserError(f"the noisy-CLIP loss needs batch['pixel_values'], got keys {sorted(batch)}")
        return batch["pixel_values"], batch.get("teacher_pixel_values")

    def __call__(self, batch: Batch, ctx=None) -> torch.Tensor:
        """The loss of one batch; ``ctx`` is the trainer's ``StepContext`` (its prepared modules are used)."""
        models = getattr(ctx, "models", None) or {}
        student = models.get(self.student_key, self.student)
        teacher = models.get(self.teacher_key, self.teacher)
        x0, teacher_input = self._images(batch)
        n = x0.shape[0]
        if n < 2:
            raise UserError("the contrastive loss needs at least 2 images per batch (the others are the negatives)")
        if self.noised:
            t = sample_timesteps(n, self.schedule.num_train_timesteps, self.t_sampler, self.generator, x0.device)
            noise = randn(x0.shape, self.generator, device=x0.device, dtype=x0.dtype)
            x_t = q_sample_standard(x0, self.schedule.abar(t, like=x0), noise)
        else:
            t = torch.zeros(n, dtype=torch.long, device=x0.device)
            x_t = x0
        with torch.no_grad():
            clean = teacher_input if teacher_input is not None else self.student.preprocess(x0)
            weight = next(iter(teacher.parameters()), None) if isinstance(teacher, torch.nn.Module) else None
            target = teacher(clean if weight is None else clean.to(weight.dtype))  # frozen may be fp16 / bf16
        return contrastive_loss(student(x_t, t).embedding, target, self.current_logit_scale(ctx))
