"""ContextDiff's ELBO objective and the time-aware relational net.

The oracle for the objective is a Gaussian toy with a closed form: data ``x0 ~ N(0, s^2)`` per dimension, a
"relational net" ``r = lam * x0`` (an affine component of x0, what the shipped adapter learned) and the optimal
denoiser ``x0_hat = E[x0 | x_t]``. Then ``Var(x0 | x_t)`` is known in closed form, and so are the simple loss and
every term of the bound. The point of the ELBO objective is the property the simple loss lacks: an r that only
raises the signal-to-noise ratio of x_t must not lower it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from common.errors import UserError
from common.process import LevelMean, Shift, q_sample, shifted_posterior
from common.samplers import invert_ddim, sample_ddim, sample_ddpm
from common.schedule import NoiseSchedule, make_plan
from contextdiff.adapter import tiny_adapter
from contextdiff.process import (
    ContextLossConfig,
    ShiftedEpsToX0,
    contextual_k,
    contextual_loss,
    contextual_shift,
    is_time_aware,
)


SCHED = NoiseSchedule.named("linear")  # 1e-4 .. 0.02, T = 1000
S2 = 1.0  # data variance of the toy
LAMBDAS = (0.0, 0.5, 1.0, 2.0, -0.5)


# ----------------------------------------------------------------------------------------------- the toy


def _toy_arrays():
    abar = SCHED.alphas_cumprod.double().numpy()
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    beta = 1 - abar / abar_prev
    k = np.sqrt(abar) * (1 - np.sqrt(abar))
    k_prev = np.sqrt(abar_prev) * (1 - np.sqrt(abar_prev))
    c1 = np.sqrt(abar_prev) * beta / (1 - abar)
    c2 = np.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar)
    var = beta * (1 - abar_prev) / (1 - abar)
    var[0] = var[1]
    return abar, k, k_prev, c1, c2, var


def closed_form(lam: float) -> tuple[float, float]:
    """``(simple, elbo)`` of the toy with the optimal denoiser, in float64, written from the definitions.

    ``x_t = a_t x0 + sqrt(1 - abar) eps`` with ``a_t = sqrt(abar) + k_t lam``, so ``Var(x0 | x_t) = s^2 (1 - abar) /
    (a_t^2 s^2 + 1 - abar)``. simple: the mean over t of ``abar / (1 - abar) Var`` (the shifted-eps MSE of the
    optimal g). ELBO: ``sum_t (c1 + (k_{t-1} - c2 k_t) lam)^2 Var / (2 var_t)`` plus the KL of x_T to N(0, 1).
    """
    abar, k, k_prev, c1, c2, var = _toy_arrays()
    a = np.sqrt(abar) + k * lam
    post = S2 * (1 - abar) / (a**2 * S2 + (1 - abar))
    simple = float(np.mean(abar / (1 - abar) * post))
    steps = float(np.sum((c1 + (k_prev - c2 * k) * lam) ** 2 * post / (2 * var)))
    prior = 0.5 * ((1 - abar[-1]) + a[-1] ** 2 * S2 - 1 - np.log(1 - abar[-1]))
    return simple, steps + float(prior)


class AffineAdapter(nn.Module):
    """``r = lam * x0``: a bias that is nothing but an affine component of the image."""

    def __init__(self, lam: float):
        super().__init__()
        self.lam = lam
        self.config = type("C", (), {"text_sources": ("clip",), "time_aware": False})()

    def forward(self, x0, text, masks=None, abar=None):
        return self.lam * x0


class OptimalDenoiser(nn.Module):
    """The posterior mean of the toy, emitted in the requested parameterisation."""

    def __init__(self, lam: float, parameterization: str):
        super().__init__()
        self.lam, self.parameterization = lam, parameterization

    def forward(self, x_t, t, encoder_hidden_states=None, return_dict=False):
        abar = SCHED.abar(t, like=x_t).double()
        a = abar.sqrt() + contextual_k()(abar) * self.lam
        x0_hat = a * S2 / (a**2 * S2 + (1 - abar)) * x_t.double()
        if self.parameterization == "x0":
            out = x0_hat
        else:  # shifted eps g = (x_t - sqrt(abar) x0_hat) / sqrt(1 - abar)
            out = (x_t.double() - abar.sqrt() * x0_hat) / (1 - abar).sqrt()
        return (out.to(x_t.dtype),)


def monte_carlo(lam: float, objective: str, parameterization: str = "shifted_eps", dims: int = 2048) -> float:
    """The project's ``contextual_loss`` on the toy: every timestep once, ``dims`` independent dimensions each.

    The same x0 and noise for every lam (common random numbers), so differences between lams are sharp.
    """
    g = torch.Generator().manual_seed(0)
    t = torch.arange(SCHED.num_train_timesteps)
    x0 = (S2**0.5) * torch.randn(len(t), 1, 1, dims, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    batch = {"latents": x0, "encoder_hidden_states": torch.zeros(len(t), 1, 1, dtype=torch.float64)}
    config = ContextLossConfig(stage=1, parameterization=parameterization, objective=objective)
    out = contextual_loss(batch, OptimalDenoiser(lam, parameterization), AffineAdapter(lam), SCHED, config,
                          timesteps=t, noise=noise)
    return float(out.loss)


@pytest.fixture(scope="module")
def toy_losses():
    return {(lam, obj): monte_carlo(lam, obj) for lam in LAMBDAS for obj in ("simple", "elbo")}


@pytest.mark.parametrize("lam", LAMBDAS)
def test_objectives_match_the_closed_form(toy_losses, lam):
    simple, elbo = closed_form(lam)
    assert toy_losses[(lam, "simple")] == pytest.approx(simple, rel=0.02)
    assert toy_losses[(lam, "elbo")] == pytest.approx(elbo, rel=0.01)


def test_simple_loss_rewards_an_r_that_only_raises_snr(toy_losses):
    """The failure the ELBO objective fixes: the simple loss falls as r gains an affine component of x0."""
    values = [closed_form(lam)[0] for lam in (0.0, 0.5, 1.0, 2.0)]
    assert values == sorted(values, reverse=True) and values[-1] < 0.8 * values[0]
    mc = [toy_losses[(lam, "simple")] for lam in (0.0, 0.5, 1.0, 2.0)]
    assert mc == sorted(mc, reverse=True)


def test_elbo_does_not_decrease_when_r_gains_an_affine_component_of_x0(toy_losses):
    base = toy_losses[(0.0, "elbo")]
    for lam in LAMBDAS[1:]:
        assert closed_form(lam)[1] > closed_form(0.0)[1]
        assert toy_losses[(lam, "elbo")] > base, lam


def test_elbo_is_the_same_for_both_parameterisations():
    """x0_hat is what the bound reads; the optimal x0 and shifted-eps outputs give the same x0_hat."""
    a = monte_carlo(1.0, "elbo", "shifted_eps", dims=64)
    b = monte_carlo(1.0, "elbo", "x0", dims=64)
    assert a == pytest.approx(b, rel=1e-9)


def test_elbo_refuses_the_separate_r_term_and_p2():
    with pytest.raises(UserError, match="elbo"):
        ContextLossConfig(objective="elbo", lambda_r=10.0)
    with pytest.raises(UserError, match="elbo"):
        ContextLossConfig(objective="elbo", p2_gamma=1.0)
    with pytest.raises(UserError, match="objective"):
        ContextLossConfig(objective="vlb")


def test_elbo_trains_a_real_adapter_and_unet_in_both_stages():
    """Gradients reach the adapter (stage 1, UNet frozen) and the UNet (stage 2) and are finite."""
    from common.tiny import tiny_unet2d_condition as tiny_unet

    torch.manual_seed(0)
    unet = tiny_unet()
    adapter = tiny_adapter(seed=1, head_std=0.05)
    batch = {"latents": torch.randn(4, 4, 8, 8), "encoder_hidden_states": torch.randn(4, 77, 32)}
    for stage in (1, 2):
        config = ContextLossConfig(stage=stage, objective="elbo", freeze_unet=stage == 1)
        adapter.zero_grad(set_to_none=True)
        unet.zero_grad(set_to_none=True)
        adapter.requires_grad_(stage == 1)
        unet.requires_grad_(stage == 2)
        out = contextual_loss(batch, unet, adapter, SCHED, config, generator=torch.Generator().manual_seed(stage))
        out.loss.backward()
        trained = adapter if stage == 1 else unet
        grads = [p.grad for p in trained.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g_).all() for g_ in grads)
        assert sum(float(g_.abs().sum()) for g_ in grads) > 0
        assert torch.isfinite(out.loss) and "elbo" in out.logs


# ------------------------------------------------------------------------------------------ time-aware r


@pytest.fixture(scope="module")
def timed():
    """A float64 time-aware adapter whose level embedding and head are nonzero (r depends on t)."""
    adapter = tiny_adapter(seed=4, head_std=0.3, dim=16, depth=1, heads=2, text_dims=(8,), time_aware=True).double()
    with torch.no_grad():
        nn.init.normal_(adapter.level_embed[-1].weight, std=0.5, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    text = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    return adapter, x0, text


def test_fresh_time_aware_net_equals_the_t_free_net():
    plain = tiny_adapter(seed=2, head_std=0.2)
    timed_net = tiny_adapter(seed=2, head_std=0.2, time_aware=True)
    timed_net.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():  # the head draws differ only through RNG order; give both the same head
        timed_net.proj_out.load_state_dict(plain.proj_out.state_dict())
    x0, text = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32)
    for abar in (0.999, 0.5, 0.01):
        assert torch.equal(timed_net(x0, text, abar=abar), plain(x0, text))
    assert is_time_aware(timed_net) and not is_time_aware(plain)
    with pytest.raises(UserError, match="time-aware"):
        timed_net(x0, text)


def test_time_aware_r_depends_on_the_level(timed):
    adapter, x0, text = timed
    r_a, r_b = adapter(x0, text, abar=0.9), adapter(x0, text, abar=0.1)
    assert (r_a - r_b).abs().max() > 1e-3
    per_row = adapter(x0, text, abar=torch.tensor([0.9, 0.1], dtype=torch.float64))
    assert torch.allclose(per_row[0], r_a[0]) and torch.allclose(per_row[1], r_b[1])


def test_level_mean_posterior_is_the_direct_formula(timed):
    """q(x_{t-1} | x_t, x0) with m_t = r_phi(x0, c, t): mean c1 x0 + c2 x_t + k_{t-1} r_{t-1} - c2 k_t r_t."""
    adapter, x0, text = timed
    shift = contextual_shift(adapter, text)
    assert shift.mean_depends_on_level
    k = contextual_k()
    abar, abar_prev = float(SCHED.alphas_cumprod[400]), float(SCHED.alphas_cumprod[399])
    m = shift.resolve_mean(x0)
    assert isinstance(m, LevelMean)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x_t = q_sample(x0, abar, eps, shift, m=m)
    r_t, r_prev = adapter(x0, text, abar=abar), adapter(x0, text, abar=abar_prev)
    assert torch.allclose(x_t, abar**0.5 * x0 + k(abar) * r_t + (1 - abar) ** 0.5 * eps, atol=1e-12)
    mean, _ = shifted_posterior(x0, x_t, abar, abar_prev, shift, m)
    beta = 1 - abar / abar_prev
    c1 = abar_prev**0.5 * beta / (1 - abar)
    c2 = (1 - beta) ** 0.5 * (1 - abar_prev) / (1 - abar)
    direct = c1 * x0 + c2 * x_t + k(abar_prev) * r_prev - c2 * k(abar) * r_t
    assert torch.allclose(mean, direct, atol=1e-12)


def test_level_mean_sampling_step_uses_both_levels(timed):
    """One DDIM step with a time-aware shift: whiten with r at t, un-whiten with r at t-1 (direct formula)."""
    adapter, x0, text = timed
    shift = contextual_shift(adapter, text)
    plan = make_plan(SCHED, 1, spacing="leading")  # one step from t to clean data would hide the t-1 level
    plan = type(plan)(timesteps=(600,), prev_timesteps=(300,))
    x_T = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x0_fixed = 0.3 * x0

    def denoiser(x, t):
        return x0_fixed

    denoiser.prediction_type = "x0"
    out = sample_ddim(denoiser, SCHED, plan, x_T=x_T, eta=0.0, shift=shift, progress=False)
    k = contextual_k()
    a, ap = float(SCHED.alphas_cumprod[600]), float(SCHED.alphas_cumprod[300])
    r_t, r_p = adapter(x0_fixed, text, abar=a), adapter(x0_fixed, text, abar=ap)
    eps_hat = (x_T - k(a) * r_t - a**0.5 * x0_fixed) / (1 - a) ** 0.5
    direct = ap**0.5 * x0_fixed + k(ap) * r_p + (1 - ap) ** 0.5 * eps_hat
    assert torch.allclose(out, direct, atol=1e-12)


def test_zero_time_aware_shift_is_plain_ddpm_bit_for_bit():
    """A fresh (zero-head) time-aware adapter shifts nothing: DDPM and DDIM equal the unshifted samplers."""
    adapter = tiny_adapter(seed=0, time_aware=True)
    text = torch.randn(2, 7, 32)
    unet_like = ShiftedEpsToX0(lambda x, t: 0.1 * x + 0.01 * t.float().view(-1, 1, 1, 1), SCHED)
    plan = make_plan(SCHED, 6, spacing="leading")
    for sampler in (sample_ddpm, sample_ddim):
        kw = {"generator": torch.Generator().manual_seed(3), "progress": False}
        shifted = sampler(unet_like, SCHED, plan, (2, 4, 8, 8), shift=contextual_shift(adapter, text), **kw)
        kw["generator"] = torch.Generator().manual_seed(3)
        plain = sampler(unet_like, SCHED, plan, (2, 4, 8, 8), shift=Shift(k="quadratic", mean=lambda x: 0 * x), **kw)
        assert torch.equal(shifted, plain)


def test_time_aware_inversion_round_trip(timed):
    adapter, x0, text = timed
    shift = contextual_shift(adapter, text)

    def denoiser(x, t):  # a smooth x0 predictor, so the fixed-point inversion converges
        return 0.5 * x

    denoiser.prediction_type = "x0"
    plan = make_plan(SCHED, 10, spacing="leading")
    x_T = invert_ddim(denoiser, SCHED, plan, x0, shift=shift, fixed_point_iters=20, progress=False)
    back = sample_ddim(denoiser, SCHED, plan, x_T=x_T, eta=0.0, shift=shift, progress=False)
    assert (back - x0).abs().max() < 1e-5
    unshifted = invert_ddim(denoiser, SCHED, plan, x0, fixed_point_iters=20, progress=False)
    wrong = sample_ddim(denoiser, SCHED, plan, x_T=unshifted, eta=0.0, shift=shift, progress=False)
    assert (wrong - x0).abs().max() > 1e-3  # the level means matter: inverting without them does not round-trip


def test_time_aware_elbo_trains_the_level_embedding():
    torch.manual_seed(0)
    from common.tiny import tiny_unet2d_condition as tiny_unet

    unet = tiny_unet().requires_grad_(False)
    adapter = tiny_adapter(seed=1, head_std=0.05, time_aware=True)
    batch = {"latents": torch.randn(4, 4, 8, 8), "encoder_hidden_states": torch.randn(4, 77, 32)}
    config = ContextLossConfig(stage=1, objective="elbo", freeze_unet=True)
    contextual_loss(batch, unet, adapter, SCHED, config, generator=torch.Generator().manual_seed(0)).loss.backward()
    assert float(adapter.level_embed[-1].weight.grad.abs().sum()) > 0
    with pytest.raises(UserError, match="time-aware"):
        contextual_loss(batch, unet, adapter, SCHED, ContextLossConfig(stage=1, lambda_r=1.0, freeze_unet=True))


# ------------------------------------------------------------------------------------------ the scripts


def test_scripts_train_and_sample_a_time_aware_adapter_with_the_elbo(tmp_path):
    """Stage 1 and stage 2 with ``--objective elbo --adapter_time_aware`` through the real command lines, then
    sampling the checkpoint: the adapter records its level input, the provenance its objective."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from tiny_data import write_captioned_images

    from common.tiny import make_tiny_sd_folder

    repo = Path(__file__).resolve().parent.parent
    sd = make_tiny_sd_folder(tmp_path / "tiny-sd")
    data = write_captioned_images(tmp_path / "train")
    fast = ["--max_train_steps", "2", "--train_batch_size", "4", "--report_to", "none", "--learning_rate", "1e-3"]

    def run(script: str, *argv: str) -> None:
        done = subprocess.run([sys.executable, str(repo / "scripts" / "contextdiff" / script), *argv],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]

    common = ["--pretrained_model_name_or_path", str(sd), "--train_data_dir", str(data), "--objective", "elbo"]
    run("train_adapter.py", *common, "--output_dir", str(tmp_path / "s1"), "--adapter_config",
        str(repo / "configs" / "contextdiff" / "tiny.yaml"), "--adapter_time_aware", *fast)
    config = json.loads((tmp_path / "s1" / "adapter" / "config.json").read_text())
    process = json.loads((tmp_path / "s1" / "adapter" / "process.json").read_text())
    assert config["time_aware"] is True and process["provenance"]["objective"] == "elbo"
    ckpt = tmp_path / "ckpt"
    run("finetune_diffusion.py", *common, "--adapter_path", str(tmp_path / "s1"), "--output_dir",
        str(tmp_path / "s2"), "--checkpoint_dir", str(ckpt), *fast)
    run("sample.py", "--checkpoint", str(ckpt), "--prompt", "a red handwritten seven", "--num_inference_steps",
        "3", "--seed", "1", "--output_dir", str(tmp_path / "samples"), "--no_progress")
    assert len(list((tmp_path / "samples" / "images").glob("*.png"))) == 1
