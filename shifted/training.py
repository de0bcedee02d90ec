"""The Shifted Diffusion prior's training objective for the shared trainer (equations in METHOD.md, "Objective")."""

from __future__ import annotations

from typing import Optional

import torch

from common.errors import UserError
from common.process import p2_weight, q_sample
from shifted.bank import GaussianBank
from shifted.pipeline import check_prior_bank
from shifted.prior import ShiftedPrior
from shifted.process import bank_shift


class PriorObjective:
    """The prior's training loss for the shared trainer: ``Trainer.fit(obj.models, obj, dataset)`` (METHOD.md, "Objective").

    ``batch``: ``image_emb [B, D]`` (x0, raw CLIP image embeddings), ``text_emb [B, D]`` (CLIP text embeddings)
    and ``text_states [B, L, d]``. Per sample: ``k = k(text_emb)`` (never from a dropped embedding),
    ``t ~ U{0..T-1}``, ``x_t`` from the shifted marginal, the text states zeroed with
    ``empty_text_prob`` (reference ``--empty_t5_prob`` 0.1) and the CLIP text embedding with ``empty_clip_prob``
    (0.0), and ``loss = mean_b w_t mean_d (x0 - x0_hat)^2`` with the P2 weight ``w_t = 1 / (k + SNR_t)^gamma``
    (``= 1 - abar_t`` at the defaults), or, with ``snr_gamma``, the Min-SNR weight ``min(SNR_t, snr_gamma)`` of an
    x0 target instead. ``bank=None`` trains the baseline (plain DDPM, no bank token).
    ``select_mode`` / ``select_samples``: the bank's component choice (``mean``: reference ``use_mean=True``;
    ``sample``: ``use_mean=False`` with ``sample_num`` draws per component).

    Called as ``objective(batch, ctx)`` by ``common.train.Trainer`` it runs ``ctx.models["prior"]`` (the prepared,
    possibly DDP-wrapped module); randomness comes from ``generator`` or else the global RNG the trainer scopes.
    The bank stays float32 on the batch's device whatever the mixed-precision dtype (fp32 diffusion math).
    """

    def __init__(
        self,
        prior: ShiftedPrior,
        bank: Optional[GaussianBank],
        *,
        empty_text_prob: float = 0.1,
        empty_clip_prob: float = 0.0,
        p2_gamma: float = 1.0,
        p2_k: float = 1.0,
        select_mode: str = "mean",
        select_samples: int = 1,
        snr_gamma: Optional[float] = None,
    ):
        check_prior_bank(prior, bank)
        for name, p in (("empty_text_prob", empty_text_prob), ("empty_clip_prob", empty_clip_prob)):
            if not 0.0 <= p <= 1.0:
                raise UserError(f"{name} must lie in [0, 1], got {p}")
        self.prior, self.bank = prior, bank
        self.schedule = prior.noise_schedule()
        self.empty_text_prob, self.empty_clip_prob = empty_text_prob, empty_clip_prob
        self.p2_gamma, self.p2_k = p2_gamma, p2_k
        self.select_mode, self.select_samples = select_mode, int(select_samples)
        self.snr_gamma = snr_gamma

    @property
    def models(self) -> dict[str, torch.nn.Module]:
        """The trainable modules by name (the bank is statistics, not trained)."""
        return {"prior": self.prior}

    def _keep(self, batch_size: int, prob: float, generator, device) -> torch.Tensor:
        return (torch.rand(batch_size, generator=generator) >= prob).to(device)

    def __call__(self, batch: dict, ctx=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        prior = ctx.models["prior"] if ctx is not None else self.prior
        x0 = batch["image_emb"].float()
        text_emb = batch["text_emb"].float().to(x0.device)
        text_states = batch["text_states"].to(x0.device)
        b, device = x0.shape[0], x0.device
        if self.bank is not None and self.bank.mean.device != device:
            self.bank.to(device)
        t = torch.randint(0, self.schedule.num_train_timesteps, (b,), generator=generator).to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        abar = self.schedule.abar(t, like=x0)
        bank_index = None
        if self.bank is not None:
            bank_index = self.bank.select(
                text_emb, self.select_mode, self.select_samples, generator if self.select_mode == "sample" else None
            ).to(device)
            x_t = q_sample(x0, abar, noise, bank_shift(self.bank, bank_index))
        else:
            x_t = q_sample(x0, abar, noise)
        # CFG dropout multiplies by a mask (a new tensor): the caller's batch is never modified.
        keep_text = self._keep(b, self.empty_text_prob, generator, device).to(text_states.dtype)
        keep_clip = self._keep(b, self.empty_clip_prob, generator, device).to(text_emb.dtype)
        x0_hat = prior(x_t, t, text_emb * keep_clip[:, None], text_states * keep_text[:, None, None], bank_index)
        if self.snr_gamma is None:
            weight = p2_weight(abar, self.p2_gamma, self.p2_k)
        else:  # Min-SNR for an x0 target: min(SNR_t, gamma), in place of the P2 weight
            from common.diffusion_loss import min_snr_weights

            weight = min_snr_weights(abar, self.snr_gamma, "sample").to(device)[:, None]
        return (weight * (x0_hat.float() - x0).pow(2).mean(dim=1, keepdim=True)).mean()


def prior_loss(prior: ShiftedPrior, bank: Optional[GaussianBank], batch: dict, **kwargs) -> torch.Tensor:
    """One-off :class:`PriorObjective` call (kwargs: ``generator`` plus the objective's options)."""
    generator = kwargs.pop("generator", None)
    return PriorObjective(prior, bank, **kwargs)(batch, None, generator)


# ----------------------------------------------------------------------------------------------------- save/load
