"""Properties of the generalised shifted process and of the samplers' hooks."""

import math

import pytest
import torch

from common.denoisers import CFGDenoiser, FunctionDenoiser
from common.errors import UserError
from common.process import (
    Shift,
    k_schedule,
    p2_weight,
    posterior_coefficients,
    q_sample,
    shifted_posterior,
    velocity,
    x0_eps_from_output,
)
from common.samplers import invert_ddim, randn, sample_ddim, sample_ddpm
from common.schedule import NoiseSchedule, make_plan


SCHED = NoiseSchedule.named("linear")
SHAPE = (3, 2, 4, 4)


def smooth_eps_model(x, t):
    a = SCHED.alphas_cumprod.to(x.dtype)[t].view(-1, 1, 1, 1)
    return (1 - a).sqrt() * x / (0.25 * a + 1 - a) + 0.05 * torch.sin(2 * x)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_zero_shift_reduces_to_plain_ddpm_bit_for_bit(sampler):
    plan = make_plan(SCHED, 20)
    den = FunctionDenoiser(smooth_eps_model, "eps")
    run = sample_ddpm if sampler == "ddpm" else sample_ddim
    kwargs = {} if sampler == "ddpm" else {"eta": 1.0}
    plain = run(den, SCHED, plan, SHAPE, generator=torch.Generator().manual_seed(0), progress=False, **kwargs)
    for k in ("prior", "quadratic"):
        shift = Shift(k=k, mean=torch.zeros(SHAPE[1:]), scale=torch.ones(SHAPE[1:]))
        shifted = run(den, SCHED, plan, SHAPE, generator=torch.Generator().manual_seed(0), shift=shift,
                      progress=False, **kwargs)
        assert torch.equal(plain, shifted)


def test_x0_dependent_zero_shift_reduces_to_ddpm_bit_for_bit():
    plan = make_plan(SCHED, 10)

    def x0_model(x, t):
        a = SCHED.alphas_cumprod.to(x.dtype)[t].view(-1, 1, 1, 1)
        return x0_eps_from_output(smooth_eps_model(x, t), x, a, "eps")[0]

    den = FunctionDenoiser(x0_model, "x0")
    plain = sample_ddim(den, SCHED, plan, SHAPE, generator=torch.Generator().manual_seed(1), progress=False)
    shift = Shift(k="quadratic", mean=lambda x0: torch.zeros_like(x0))
    shifted = sample_ddim(den, SCHED, plan, SHAPE, generator=torch.Generator().manual_seed(1), shift=shift,
                          progress=False)
    assert torch.equal(plain, shifted)


def test_x0_dependent_shift_needs_x0_prediction():
    shift = Shift(k="quadratic", mean=lambda x0: x0)
    with pytest.raises(UserError, match="x0-predicting denoiser"):
        sample_ddim(FunctionDenoiser(smooth_eps_model, "eps"), SCHED, make_plan(SCHED, 5), SHAPE, shift=shift)


def test_unknown_k_schedule_is_a_clear_error():
    with pytest.raises(UserError, match="unknown k_t schedule 'cubic'"):
        k_schedule("cubic")


@pytest.mark.parametrize("t,t_prev", [(999, 998), (500, 499), (1, 0), (640, 600), (100, -1)])
def test_posterior_matches_contextdiff_and_shifted_closed_forms(t, t_prev):
    """The whitening route equals ContextDiff's and Shifted Diffusion's posteriors (their METHOD.md), float64."""
    g = torch.Generator().manual_seed(0)
    x0, xt, r = (torch.randn(4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    S = torch.rand(8, generator=g, dtype=torch.float64) + 0.5
    abar = float(SCHED.alphas_cumprod[t])
    abar_prev = float(SCHED.alphas_cumprod[t_prev]) if t_prev >= 0 else 1.0
    c1, c2, var = posterior_coefficients(abar, abar_prev)
    # ContextDiff: mean = c1 x0 + c2 x_t + (k_prev - c2 k_t) r, variance var (S = 1)
    kq = k_schedule("quadratic")
    mean, variance = shifted_posterior(x0, xt, abar, abar_prev, Shift("quadratic"), r)
    expected = c1 * x0 + c2 * xt + (kq(abar_prev) - c2 * kq(abar)) * r
    assert torch.allclose(mean, expected, atol=1e-12)
    assert torch.allclose(variance, torch.full_like(variance, var), atol=1e-15)
    # eps form of the same mean: (x_t - beta/sqrt(1-abar) eps)/sqrt(alpha) + (k_prev - k_t/sqrt(alpha)) r
    alpha = abar / abar_prev
    eps = (xt - math.sqrt(abar) * x0 - kq(abar) * r) / math.sqrt(1 - abar)
    eps_form = (xt - (1 - alpha) / math.sqrt(1 - abar) * eps) / math.sqrt(alpha) + (
        kq(abar_prev) - kq(abar) / math.sqrt(alpha)) * r
    assert torch.allclose(mean, eps_form, atol=1e-10)
    # Shifted Diffusion: k = 1 - sqrt(abar): mean = c1 x0 + c2 x_t + (1 - c1 - c2) mu, variance var * S^2
    mean, variance = shifted_posterior(x0, xt, abar, abar_prev, Shift("prior", scale=S), r)
    assert torch.allclose(mean, c1 * x0 + c2 * xt + (1 - c1 - c2) * r, atol=1e-12)
    assert torch.allclose(variance, var * S**2 * torch.ones_like(variance), atol=1e-15)


def test_whitening_turns_shifted_marginal_into_standard_ddpm():
    g = torch.Generator().manual_seed(1)
    x0, m, noise = (torch.randn(5, 6, generator=g, dtype=torch.float64) for _ in range(3))
    S = torch.rand(6, generator=g, dtype=torch.float64) + 0.2
    shift = Shift("prior", mean=m, scale=S)
    for t in (0, 250, 999):
        abar = float(SCHED.alphas_cumprod[t])
        xt = q_sample(x0, abar, noise, shift)
        direct = math.sqrt(abar) * x0 + (1 - math.sqrt(abar)) * m + math.sqrt(1 - abar) * S * noise
        assert torch.allclose(xt, direct, atol=1e-12)
        y = shift.whiten(xt, abar, m)
        assert torch.allclose(y, math.sqrt(abar) * x0 / S + math.sqrt(1 - abar) * noise, atol=1e-12)
        assert torch.allclose(shift.unwhiten(y, abar, m), xt, atol=1e-12)


@pytest.mark.parametrize("k", ["prior", "quadratic"])
def test_shifted_forward_chain_terminal_marginal_matches_closed_form(k):
    """Run the one-step kernel x_t = sqrt(alpha) x_{t-1} + (k_t - sqrt(alpha) k_{t-1}) m + sqrt(beta) S eps
    for all 1000 steps (float64, Monte Carlo) and compare with N(sqrt(abar) x0 + k_T m, (1 - abar) S^2)."""
    g = torch.Generator().manual_seed(2)
    n, d = 20000, 3
    x0 = torch.tensor([0.7, -0.4, 0.1], dtype=torch.float64)
    m = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    S = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    kf = k_schedule(k)
    x = x0.expand(n, d).clone()
    abar_prev = 1.0
    for t in range(1000):
        beta = float(SCHED.betas[t])
        alpha = 1 - beta
        abar = abar_prev * alpha
        x = math.sqrt(alpha) * x + (kf(abar) - math.sqrt(alpha) * kf(abar_prev)) * m + math.sqrt(beta) * S * torch.randn(
            n, d, generator=g, dtype=torch.float64)
        abar_prev = abar
    abar_T = float(SCHED.alphas_cumprod[-1])
    assert abs(abar_T - abar_prev) < 1e-6
    mean = math.sqrt(abar_T) * x0 + kf(abar_T) * m
    std = math.sqrt(1 - abar_T) * S
    se = std / math.sqrt(n)
    assert bool(((x.mean(0) - mean).abs() < 5 * se).all())
    assert bool(((x.std(0) / std - 1).abs() < 0.03).all())


@pytest.mark.parametrize("ptype", ["x0", "eps", "v"])
@pytest.mark.parametrize("with_shift", [False, True])
def test_ddim_with_true_x0_oracle_recovers_x0_from_any_noise(ptype, with_shift):
    g = torch.Generator().manual_seed(3)
    target = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    m = torch.randn(SHAPE[1:], generator=g, dtype=torch.float64)
    S = torch.rand(SHAPE[1:], generator=g, dtype=torch.float64) + 0.5
    shift = Shift("prior", mean=m, scale=S) if with_shift else None

    def oracle(x, t):
        a = float(SCHED.alphas_cumprod[int(t[0])])
        y = x if shift is None else shift.whiten(x, a, m)
        y0 = target if shift is None else shift.whiten(target, 1.0, m)
        eps = (y - math.sqrt(a) * y0) / math.sqrt(1 - a)
        return {"x0": target, "eps": eps, "v": velocity(y0, eps, a)}[ptype]

    for seed in range(3):
        out = sample_ddim(FunctionDenoiser(oracle, ptype), SCHED, make_plan(SCHED, 7), SHAPE,
                          generator=torch.Generator().manual_seed(seed), dtype=torch.float64, shift=shift,
                          progress=False)
        assert torch.allclose(out, target, atol=1e-8)


def test_ddim_inversion_then_sampling_returns_the_start_latent():
    plan = make_plan(SCHED, 50)
    den = FunctionDenoiser(smooth_eps_model, "eps")
    x0 = 0.5 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x_T, trajectory = invert_ddim(den, SCHED, plan, x0, return_trajectory=True, progress=False)
    assert len(trajectory) == len(plan) + 1 and torch.equal(trajectory[0], x0)
    assert x_T.std() > 2 * x0.std()  # really went to noise
    back = sample_ddim(den, SCHED, plan, x_T=x_T, dtype=torch.float64, progress=False)
    first_order = (back - x0).abs().max()
    assert first_order < 0.1  # the usual one-pass inversion: close, but only to first order
    x_T = invert_ddim(den, SCHED, plan, x0, fixed_point_iters=5, progress=False)
    back = sample_ddim(den, SCHED, plan, x_T=x_T, dtype=torch.float64, progress=False)
    assert (back - x0).abs().max() < 1e-3 < first_order
    # a shifted process inverts through the same whitening
    shift = Shift("quadratic", mean=0.3 * torch.ones(SHAPE[1:], dtype=torch.float64))
    x_T = invert_ddim(den, SCHED, plan, x0, shift=shift, fixed_point_iters=5, progress=False)
    back = sample_ddim(den, SCHED, plan, x_T=x_T, dtype=torch.float64, shift=shift, progress=False)
    assert (back - x0).abs().max() < 1e-3


def test_ddpm_guidance_shifts_the_mean_by_variance_times_gradient():
    plan = make_plan(SCHED, 10)
    den = FunctionDenoiser(smooth_eps_model, "eps")
    grad = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    seen = []
    kw = dict(x_T=torch.ones(SHAPE, dtype=torch.float64), dtype=torch.float64, progress=False,
              variance_type="fixed_small")
    one_step = type(plan)(plan.timesteps[:1], plan.prev_timesteps[:1])
    base = sample_ddpm(den, SCHED, one_step, generator=torch.Generator().manual_seed(6), **kw)
    guided = sample_ddpm(den, SCHED, one_step, generator=torch.Generator().manual_seed(6),
                         guidance=lambda x, t: seen.append(t) or grad, **kw)
    _, _, var = posterior_coefficients(float(SCHED.alphas_cumprod[plan.timesteps[0]]),
                                       float(SCHED.alphas_cumprod[plan.prev_timesteps[0]]))
    assert torch.allclose(guided - base, var * grad, atol=1e-12)
    assert int(seen[0][0]) == plan.timesteps[0]
    # a zero gradient reproduces unguided sampling bit for bit
    full = sample_ddpm(den, SCHED, plan, SHAPE, generator=torch.Generator().manual_seed(7), progress=False)
    zero = sample_ddpm(den, SCHED, plan, SHAPE, generator=torch.Generator().manual_seed(7), progress=False,
                       guidance=lambda x, t: torch.zeros_like(x))
    assert torch.equal(full, zero)


def test_cfg_is_one_batched_forward_and_reduces_to_cond_at_scale_one():
    calls = []

    def model(x, t, ctx):
        calls.append(x.shape[0])
        return x * ctx.view(-1, 1, 1, 1)

    cond, uncond = {"ctx": torch.full((3,), 2.0)}, {"ctx": torch.full((3,), 0.5)}
    x = torch.randn(SHAPE)
    t = torch.zeros(3, dtype=torch.long)
    out = CFGDenoiser(model, cond, uncond, 7.5)(x, t)
    assert calls == [6]
    assert torch.allclose(out, 0.5 * x + 7.5 * (2.0 * x - 0.5 * x))
    assert torch.allclose(CFGDenoiser(model, cond, uncond, 1.0)(x, t), 2.0 * x)


def test_per_sample_generators_make_images_independent_of_the_batch():
    plan = make_plan(SCHED, 5)
    den = FunctionDenoiser(smooth_eps_model, "eps")
    gens = [torch.Generator().manual_seed(s) for s in (10, 11, 12)]
    batch = sample_ddim(den, SCHED, plan, SHAPE, generator=gens, eta=1.0, progress=False)
    alone = sample_ddim(den, SCHED, plan, (1, *SHAPE[1:]), generator=[torch.Generator().manual_seed(11)], eta=1.0,
                        progress=False)
    assert torch.allclose(batch[1:2], alone, atol=1e-6)
    assert not torch.allclose(batch[0], batch[1])
    assert randn((2, 3), [torch.Generator().manual_seed(0)] * 2).shape == (2, 3)


def test_p2_weight_with_k_and_gamma_one_is_one_minus_abar():
    abar = SCHED.alphas_cumprod
    assert torch.allclose(p2_weight(abar), 1 - abar, atol=1e-12)
