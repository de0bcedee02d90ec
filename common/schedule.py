"""Noise schedules and the choice of timesteps to sample with: the one source of truth for beta/alpha.

Everything is computed in float64. A *sampling plan* is the list of original timesteps the network sees
(descending) together with the timestep each step moves to; it covers both conventions users meet:

- diffusers' spacings (``leading``, ``trailing``, ``linspace`` plus ``steps_offset``), matching
  ``DDPMScheduler`` / ``DDIMScheduler.set_timesteps`` exactly, including DDIM's ``t - T // N`` previous step;
- guided-diffusion's respacing strings (``"100"``, ``"ddim50"``, ``"10,20,30"``), where the kept steps form a
  shorter Markov chain whose betas are ``1 - abar_t / abar_prev`` (Nichol & Dhariwal 2021, ``respace.py``).

In both, "DDIM with 50 steps" is a view of the same trained schedule, never a copy of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from common.errors import UserError


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")


def make_betas(
    name: str, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """Betas of a named schedule, float64, shape ``[num_train_timesteps]``.

    ``linear`` and ``scaled_linear`` follow diffusers (the latter is Stable Diffusion's); ``squaredcos_cap_v2``
    is the cosine schedule of Nichol & Dhariwal (2021), eq. 17, with betas capped at 0.999.
    """
    if num_train_timesteps < 1:
        raise UserError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if name == "linear":
        # diffusers builds these in float32; round through float32 so our schedule is the same numbers.
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32).double()
    if name == "scaled_linear":
        root = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32)
        return (root**2).double()
    if name == "squaredcos_cap_v2":

        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [
            min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), 0.999)
            for i in range(num_train_timesteps)
        ]
        return torch.tensor(betas, dtype=torch.float32).double()
    raise UserError(f"unknown beta schedule {name!r}: choose one of {', '.join(BETA_SCHEDULES)}")


@dataclass(frozen=True)
class NoiseSchedule:
    """A trained diffusion's Gaussian schedule: ``betas`` and the cumulative ``alphas_cumprod`` (float64)."""

    betas: torch.Tensor

    def __post_init__(self):
        betas = self.betas.detach().double().cpu()
        if betas.ndim != 1 or len(betas) == 0:
            raise UserError("betas must be a non-empty 1-D tensor")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise UserError("every beta must lie in (0, 1)")
        object.__setattr__(self, "betas", betas)
        # float32 cumprod as diffusers does, kept in float64: the oracle tests compare against diffusers.
        abar = torch.cumprod(1.0 - betas.float(), dim=0).double()
        object.__setattr__(self, "alphas_cumprod", abar)

    alphas_cumprod: torch.Tensor = field(init=False, repr=False)

    @classmethod
    def named(
        cls, name: str = "linear", num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
    ) -> NoiseSchedule:
        return cls(make_betas(name, num_train_timesteps, beta_start, beta_end))

    @classmethod
    def from_config(cls, config: dict) -> NoiseSchedule:
        """Build from a diffusers scheduler config (``scheduler_config.json``) or a dict with the same keys."""
        if config.get("trained_betas") is not None:
            return cls(torch.tensor(config["trained_betas"], dtype=torch.float64))
        return cls.named(
            config.get("beta_schedule", "linear"),
            int(config.get("num_train_timesteps", 1000)),
            float(config.get("beta_start", 1e-4)),
            float(config.get("beta_end", 0.02)),
        )

    @property
    def num_train_timesteps(self) -> int:
        return len(self.betas)

    def snr(self, t: torch.Tensor | int) -> torch.Tensor:
        """Signal-to-noise ratio ``abar_t / (1 - abar_t)`` (float64)."""
        abar = self.alphas_cumprod[t]
        return abar / (1.0 - abar)

    def abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``abar_t`` for a batch of timesteps, shaped ``[B, 1, ..., 1]`` to broadcast against ``like``."""
        a = self.alphas_cumprod.to(t.device)[t.long()].to(like.dtype)
        return a.reshape(-1, *([1] * (like.ndim - 1)))


# ----------------------------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class SamplingPlan:
    """Which original timesteps to visit (descending) and where each step lands.

    ``prev_timesteps[i] == -1`` means the step lands on clean data, whose ``abar`` is ``final_alpha_cumprod``
    (1.0, or ``abar_0`` for diffusers' ``set_alpha_to_one=False``).
    """

    timesteps: tuple[int, ...]
    prev_timesteps: tuple[int, ...]
    final_alpha_cumprod: float = 1.0

    def __len__(self) -> int:
        return len(self.timesteps)

    def alphas(self, schedule: NoiseSchedule) -> tuple[list[float], list[float]]:
        """``(abar_t, abar_prev)`` per step as Python floats (float64 precision)."""
        abar = schedule.alphas_cumprod
        cur = [float(abar[t]) for t in self.timesteps]
        prev = [float(abar[p]) if p >= 0 else float(self.final_alpha_cumprod) for p in self.prev_timesteps]
        return cur, prev


def diffusers_timesteps(
    num_train_timesteps: int, num_inference_steps: int, spacing: str = "leading", steps_offset: int = 0
) -> list[int]:
    """Descending timesteps exactly as diffusers' ``DDPMScheduler``/``DDIMScheduler.set_timesteps`` choose them."""
    T, N = num_train_timesteps, int(num_inference_steps)
    if N < 1:
        raise UserError(f"the number of sampling steps must be >= 1, got {N}")
    if N > T:
        raise UserError(f"{N} sampling steps is more than the model's {T} training steps: use at most {T}")
    if spacing == "leading":
        ratio = T // N
        steps = [i * ratio + steps_offset for i in range(N)]
    elif spacing == "trailing":
        ratio = T / N
        steps = [int(round(T - i * ratio)) - 1 for i in range(N)]
        steps.reverse()
    elif spacing == "linspace":
        steps = [int(round(float(v))) for v in torch.linspace(0, T - 1, N, dtype=torch.float64)]
    else:
        raise UserError(f"unknown timestep spacing {spacing!r}: choose one of {', '.join(SPACINGS)}")
    return sorted(steps, reverse=True)


def space_timesteps(num_train_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
    """Kept timesteps (ascending) for a guided-diffusion respacing string.

    ``"100"``: 100 steps spread evenly with fractional stride (rounded). ``"10,20,30"``: the schedule cut into
    three equal sections with 10, 20 and 30 steps. ``"ddim50"``: the integer stride giving exactly 50 steps,
    starting at 0 (the DDIM paper's choice). ``"fast27"``: GLIDE's 27-step preset ``"10,10,3,2,2"``.
    """
    T = num_train_timesteps
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec == "fast27":
            spec = "10,10,3,2,2"
        if spec.startswith("ddim"):
            try:
                wanted = int(spec[4:])
            except ValueError:
                raise UserError(f"bad respacing {section_counts!r}: write ddimN with an integer N") from None
            for stride in range(1, T):
                if len(range(0, T, stride)) == wanted:
                    return list(range(0, T, stride))
            raise UserError(f"respacing {section_counts!r}: no integer stride gives exactly {wanted} of {T} steps")
        try:
            counts = [int(part) for part in spec.split(",")]
        except ValueError:
            raise UserError(
                f"bad respacing {section_counts!r}: use a step count like '100', a list like '10,20,30' or 'ddim50'"
            ) from None
    else:
        counts = [int(c) for c in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise UserError(f"bad respacing {section_counts!r}: every section needs at least one step")
    base, extra = divmod(T, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if count > size:
            raise UserError(f"respacing {section_counts!r}: cannot take {count} steps from a section of {size}")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        kept.extend(start + round(k * stride) for k in range(count))
        start += size
    return sorted(set(kept))


def make_plan(
    schedule: NoiseSchedule,
    steps: int | str,
    *,
    spacing: str = "leading",
    steps_offset: int = 0,
    prev_rule: str = "next",
    final_alpha_cumprod: float = 1.0,
) -> SamplingPlan:
    """The sampling plan for ``steps``: an int uses diffusers' ``spacing``; a string is a respacing spec.

    ``prev_rule="stride"`` reproduces ``DDIMScheduler``'s previous step ``t - T // N`` (it differs from the next
    listed timestep only for ``linspace`` spacing); ``"next"`` moves to the next listed timestep (DDPM, respacing).
    """
    T = schedule.num_train_timesteps
    if isinstance(steps, str):
        timesteps = sorted(space_timesteps(T, steps), reverse=True)
    else:
        timesteps = diffusers_timesteps(T, steps, spacing, steps_offset)
    if prev_rule == "next":
        prev = timesteps[1:] + [-1]
    elif prev_rule == "stride":
        ratio = T // len(timesteps)
        prev = [t - ratio for t in timesteps]
    else:
        raise UserError(f"unknown prev_rule {prev_rule!r}: choose 'next' or 'stride'")
    prev = [p if p >= 0 else -1 for p in prev]
    if max(timesteps) >= T or min(timesteps) < 0:
        raise UserError(f"timesteps {min(timesteps)}..{max(timesteps)} fall outside the schedule's 0..{T - 1}")
    return SamplingPlan(tuple(timesteps), tuple(prev), float(final_alpha_cumprod))


def plan_like_diffusers(
    schedule: NoiseSchedule, scheduler_config: dict, num_inference_steps: int, sampler: str
) -> SamplingPlan:
    """The plan a diffusers ``DDIMScheduler`` / ``DDPMScheduler`` with ``scheduler_config`` would follow."""
    if sampler not in ("ddim", "ddpm"):
        raise UserError(f"unknown sampler {sampler!r}: choose ddim or ddpm")
    final = 1.0
    if sampler == "ddim" and not scheduler_config.get("set_alpha_to_one", True):
        final = float(schedule.alphas_cumprod[0])
    return make_plan(
        schedule,
        int(num_inference_steps),
        spacing=scheduler_config.get("timestep_spacing", "leading"),
        steps_offset=int(scheduler_config.get("steps_offset", 0)),
        prev_rule="stride" if sampler == "ddim" else "next",
        final_alpha_cumprod=final,
    )
