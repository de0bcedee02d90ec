"""Shifted Diffusion's process on the core: reduction, marginals, released formulas, oracles."""

import math

import pytest
import torch

from common.denoisers import FunctionDenoiser
from common.process import p2_weight, posterior_coefficients, q_sample, shifted_posterior
from common.schedule import NoiseSchedule, make_plan
from shifted.bank import GaussianBank
from shifted.pipeline import sample_shifted
from shifted.process import ZERO_NOISE_SCALE, bank_shift, sampling_shift


SCHED = NoiseSchedule.named("linear", 1000, 1e-4, 0.02)
ABAR = SCHED.alphas_cumprod
D = 6
EIGHT = (999, 856, 714, 571, 428, 285, 143, 0)


def make_bank(size=3, dim=D, seed=0, std_scale=5.0):
    g = torch.Generator().manual_seed(seed)
    mean = 2.0 * torch.randn(size, dim, generator=g, dtype=torch.float64)
    std = 0.1 + 0.4 * torch.rand(size, dim, generator=g, dtype=torch.float64)
    return GaussianBank(mean, std, std_scale)


def wiggly_x0(x, t):
    """A smooth, non-linear stand-in network x0_hat(x_t, t) (any function will do for formula checks)."""
    return 0.7 * torch.tanh(x) + 0.3 * torch.sin(x + t.to(x.dtype).unsqueeze(-1) / 300.0)


def test_respacing_8_is_the_demo_set_with_its_betas_and_original_timesteps():
    plan = make_plan(SCHED, "8")
    assert plan.timesteps == EIGHT
    abars, prevs = plan.alphas(SCHED)
    betas = [1 - a / p for a, p in zip(abars, prevs)]
    expected = (0.932, 0.895, 0.844, 0.765, 0.645, 0.463, 0.197, 1e-4)  # largest t first
    assert betas == pytest.approx(expected, abs=1.5e-3) and betas[-1] == pytest.approx(1e-4, rel=1e-3)
    assert [float(a) for a in abars] == [float(ABAR[t]) for t in EIGHT]  # respaced abar = original abar
    seen = []
    sample_shifted(FunctionDenoiser(lambda x, t: seen.append(t.tolist()) or x, "x0"), SCHED, None, None, 2, D,
                   steps="8")
    assert [s[0] for s in seen] == list(EIGHT) and all(len(set(s)) == 1 for s in seen)


def test_standard_bank_reduces_to_plain_ddpm_and_matches_diffusers():
    """mu = 0, S = 1 (K = 1, s = 1): bit-identical to the unshifted core and equal to diffusers' DDPMScheduler
    (prediction_type='sample', fixed_large, custom timesteps) on the 8-step respaced chain."""
    from diffusers import DDPMScheduler

    bank = GaussianBank.standard(D)
    idx = torch.zeros(4, dtype=torch.long)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, D, generator=g), torch.randn(4, D, generator=g)
    abar = float(ABAR[500])
    assert torch.equal(q_sample(x0, abar, noise, bank_shift(bank, idx)), q_sample(x0, abar, noise))
    den = FunctionDenoiser(wiggly_x0, "x0")
    kw = dict(steps="8", sampler="ddpm", variance_type="fixed_large")
    ours = sample_shifted(den, SCHED, bank, idx, 4, D, generator=torch.Generator().manual_seed(2), **kw)
    plain = sample_shifted(den, SCHED, None, None, 4, D, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(ours, plain)

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                          prediction_type="sample", variance_type="fixed_large", clip_sample=False)
    sched.set_timesteps(timesteps=list(EIGHT))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, D, generator=gen)
    for t in sched.timesteps:
        x = sched.step(wiggly_x0(x, torch.full((4,), int(t))), t, x, generator=gen).prev_sample
    assert torch.allclose(ours, x, atol=1e-5, rtol=1e-5)
    ddim_ours = sample_shifted(den, SCHED, bank, idx, 4, D, steps="8", sampler="ddim", eta=1.0,
                               generator=torch.Generator().manual_seed(3))
    ddim_plain = sample_shifted(den, SCHED, None, None, 4, D, steps="8", sampler="ddim", eta=1.0,
                                generator=torch.Generator().manual_seed(3))
    assert torch.equal(ddim_ours, ddim_plain)


def test_terminal_marginal_of_the_per_step_chain_is_the_bank_gaussian():
    """1000 one-step transitions x_t = sqrt(alpha) x_{t-1} + (1 - sqrt(alpha)) mu + sqrt(beta) S eps,
    Monte Carlo in float64, vs the closed form N(sqrt(abar_T) x0 + (1 - sqrt(abar_T)) mu, (1 - abar_T) S^2)."""
    bank = make_bank(size=2, dim=4, seed=3)
    n = 6000
    idx = torch.arange(2).repeat_interleave(n)  # half the rows in each component
    mu, S = bank.gather(idx)
    mu, S = mu.double(), S.double()
    x0 = torch.tensor([0.7, -0.4, 0.1, 1.2], dtype=torch.float64).expand(2 * n, 4)
    g = torch.Generator().manual_seed(4)
    x = x0.clone()
    for beta in SCHED.betas.tolist():
        a = math.sqrt(1 - beta)
        x = a * x + (1 - a) * mu + math.sqrt(beta) * S * torch.randn(x.shape, generator=g, dtype=torch.float64)
    abar_T = float(ABAR[-1])
    closed = q_sample(x0, abar_T, torch.randn(x.shape, generator=g, dtype=torch.float64), bank_shift(bank, idx))
    mean = math.sqrt(abar_T) * x0 + (1 - math.sqrt(abar_T)) * mu
    std = math.sqrt(1 - abar_T) * S
    for sample in (x, closed):
        for half in (slice(0, n), slice(n, 2 * n)):
            se = std[half][0] / math.sqrt(n)
            assert bool(((sample[half].mean(0) - mean[half][0]).abs() < 4 * se).all())
            assert bool(((sample[half].std(0) / std[half][0] - 1).abs() < 0.035).all())
    # the terminal distribution is (to 0.6 % of x0) the bank Gaussian N(mu_k, S_k^2) itself
    assert math.sqrt(abar_T) < 0.0065


@pytest.mark.parametrize("t,t_prev", [(999, 856), (500, 499), (143, 0), (1, 0), (0, -1)])
def test_posterior_equals_the_released_direct_formula_float64(t, t_prev):
    """Whitened posterior == released c1 x0 + c2 x_t + (c3 - c2 (1 - sqrt(alpha))) mu, variance beta~ S^2."""
    bank = make_bank()
    g = torch.Generator().manual_seed(5)
    idx = torch.tensor([0, 2, 1, 2])
    x0, xt = (torch.randn(4, D, generator=g, dtype=torch.float64) for _ in range(2))
    mu, S = (v.double() for v in bank.gather(idx))
    a = float(ABAR[t])
    ap = float(ABAR[t_prev]) if t_prev >= 0 else 1.0
    alpha = a / ap
    beta = 1 - alpha
    c1 = beta * math.sqrt(ap) / (1 - a)
    c2 = math.sqrt(alpha) * (1 - ap) / (1 - a)
    c3 = beta * (1 - math.sqrt(ap)) / (1 - a)
    released_mean = c1 * x0 + c2 * xt + (c3 - c2 * (1 - math.sqrt(alpha))) * mu
    released_var = beta * (1 - ap) / (1 - a) * S**2
    shift, _ = sampling_shift(bank, idx, dtype=torch.float64)
    mean, var = shifted_posterior(x0, xt, a, ap, shift, mu)
    assert torch.allclose(mean, released_mean, atol=1e-12, rtol=0)
    assert torch.allclose(var, released_var, atol=1e-15, rtol=0)
    assert abs((1 - c1 - c2) - (c3 - c2 * (1 - math.sqrt(alpha)))) < 1e-12
    assert posterior_coefficients(a, ap)[:2] == pytest.approx((c1, c2), abs=1e-15)


def released_ddpm(fn, bank, idx, z, timesteps, *, zero_std=False, mu_from_x0=None):
    """The released sampler written out directly in float64: respaced betas, fixed-large variance,
    x_T = mu + S z_0, mean c1 x0 + c2 x_t + (c3 - c2 (1 - sqrt(alpha))) mu, noise sqrt(beta) S z_i for t > 0."""
    mu, S = (v.double() for v in bank.gather(idx))
    if zero_std:
        S = torch.zeros_like(S)
    x = mu + S * z[0]
    kept = sorted(timesteps)
    for i in reversed(range(len(kept))):
        t = kept[i]
        a = float(ABAR[t])
        ap = float(ABAR[kept[i - 1]]) if i > 0 else 1.0
        alpha, beta = a / ap, 1 - a / ap
        x0 = fn(x, torch.full((len(x),), t))
        c1, c2 = beta * math.sqrt(ap) / (1 - a), math.sqrt(alpha) * (1 - ap) / (1 - a)
        c3 = beta * (1 - math.sqrt(ap)) / (1 - a)
        m = mu if mu_from_x0 is None else mu_from_x0(x0)
        x = c1 * x0 + c2 * x + (c3 - c2 * (1 - math.sqrt(alpha))) * m
        if t > 0:
            x = x + math.sqrt(beta) * S * z[len(kept) - i]
    return x


@pytest.mark.parametrize("variant", ["consistent", "zero_std", "pred_x0_component", "released_demo"])
def test_eight_step_ddpm_trajectory_equals_the_released_sampler(variant):
    bank = make_bank(size=4, seed=6)
    idx = torch.tensor([0, 3, 1, 1, 2])
    fn = wiggly_x0
    zero = variant in ("zero_std", "released_demo")
    pred = variant in ("pred_x0_component", "released_demo")
    gen = torch.Generator().manual_seed(7)
    z = [torch.randn(5, D, generator=gen, dtype=torch.float64) for _ in range(8)]
    expected = released_ddpm(fn, bank, idx, z, EIGHT, zero_std=zero,
                              mu_from_x0=(lambda x0: bank.mean.double()[bank.select(x0)]) if pred else None)
    ours = sample_shifted(FunctionDenoiser(fn, "x0"), SCHED, bank, idx, 5, D, steps="8", sampler="ddpm",
                          prior_noise="zero" if zero else "data_std",
                          posterior_component="pred_x0" if pred else "text",
                          generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert torch.allclose(ours, expected, atol=1e-9, rtol=0)
    if zero:  # the released demo is deterministic: another seed gives the same embeddings
        again = sample_shifted(FunctionDenoiser(fn, "x0"), SCHED, bank, idx, 5, D, steps="8", prior_noise="zero",
                               posterior_component="pred_x0" if pred else "text",
                               generator=torch.Generator().manual_seed(99), dtype=torch.float64)
        assert torch.allclose(again, ours, atol=1e-9)
        assert ZERO_NOISE_SCALE * 5 < 1e-9


def test_ddim_with_eta_equals_the_direct_shifted_ddim_formula():
    """eps = (x_t - mu - sqrt(abar)(x0 - mu)) / (sqrt(1 - abar) S); x' = mu + sqrt(abar')(x0 - mu)
    + sqrt(1 - abar' - eta_t^2) S eps + eta_t S z, float64, shared noise."""
    bank = make_bank(size=3, seed=8)
    idx = torch.tensor([2, 0, 1])
    eta = 0.6
    gen = torch.Generator().manual_seed(9)
    z = [torch.randn(3, D, generator=gen, dtype=torch.float64) for _ in range(9)]
    mu, S = (v.double() for v in bank.gather(idx))
    x = mu + S * z[0]
    steps = list(EIGHT)
    for i, t in enumerate(steps):
        a = float(ABAR[t])
        ap = float(ABAR[steps[i + 1]]) if i + 1 < len(steps) else 1.0
        x0 = wiggly_x0(x, torch.full((3,), t))
        eps = (x - mu - math.sqrt(a) * (x0 - mu)) / (math.sqrt(1 - a) * S)
        eta_t = eta * math.sqrt((1 - ap) / (1 - a)) * math.sqrt(1 - a / ap)
        x = mu + math.sqrt(ap) * (x0 - mu) + math.sqrt(max(1 - ap - eta_t**2, 0.0)) * S * eps + eta_t * S * z[i + 1]
    ours = sample_shifted(FunctionDenoiser(wiggly_x0, "x0"), SCHED, bank, idx, 3, D, steps="8", sampler="ddim",
                          eta=eta, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    assert torch.allclose(ours, x, atol=1e-9, rtol=0)


@pytest.mark.parametrize("sampler,steps", [("ddim", "8"), ("ddim", "ddim50"), ("ddpm", "8"), ("ddpm", 25)])
def test_true_x0_oracle_recovers_x0_from_any_start(sampler, steps):
    """A denoiser that always returns the true x0: DDIM (eta 0) maps ANY x_T onto x0; so does DDPM (its last step
    onto clean data has c1 = 1, c2 = 0 and no noise)."""
    bank = make_bank(size=3, seed=10)
    idx = torch.tensor([1, 0, 2, 2])
    target = torch.randn(4, D, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    oracle = FunctionDenoiser(lambda x, t: target, "x0")
    for seed in range(3):
        out = sample_shifted(oracle, SCHED, bank, idx, 4, D, steps=steps, sampler=sampler,
                             generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert torch.allclose(out, target, atol=1e-9, rtol=0)


@pytest.mark.parametrize("sampler,steps,n", [("ddpm", "1000", 6000), ("ddim", "ddim50", 20000)])
def test_bayes_optimal_denoiser_on_gaussian_data_samples_the_data(sampler, steps, n):
    """x0 ~ N(m, diag v) with the bank mean mu != m: the exact E[x0 | x_t] plugged into the shifted sampler returns
    samples with mean m and variance v. 1000 ancestral steps are close to exact; 50 DDIM steps
    shrink the variance by a discretisation factor that the same linear recursion predicts exactly."""
    d = 3
    m = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    v = torch.tensor([0.04, 0.25, 0.01], dtype=torch.float64)
    bank = GaussianBank(torch.tensor([[3.0, 1.0, -1.0]]), torch.tensor([[0.1, 0.2, 0.05]]), std_scale=5.0)
    idx = torch.zeros(n, dtype=torch.long)
    mu, S = (x.double() for x in bank.gather(idx[:1]))

    def posterior_mean(x, t):
        a = ABAR.to(x.dtype)[t].unsqueeze(-1)
        gain = a.sqrt() * v / (a * v + (1 - a) * S**2)
        return m + gain * (x - a.sqrt() * m - (1 - a.sqrt()) * mu)

    out = sample_shifted(FunctionDenoiser(posterior_mean, "x0"), SCHED, bank, idx, n, d, steps=steps,
                         sampler=sampler, variance_type="fixed_small", generator=torch.Generator().manual_seed(12),
                         dtype=torch.float64)
    expected_mean, expected_var = m.clone(), v.clone()
    if sampler == "ddim":  # in whitened coordinates a DDIM step on Gaussian data is affine in y: propagate E, Var
        vw, mw = (v / S**2)[0], (m / S)[0]
        abars, prevs = make_plan(SCHED, steps).alphas(SCHED)
        mean_y, var_y = math.sqrt(abars[0]) * (mu / S)[0], torch.ones_like(vw)  # x_T = mu + S z, whitened
        for a, ap in zip(abars, prevs):
            gain = math.sqrt(a) * vw / (a * vw + 1 - a)
            keep = math.sqrt((1 - ap) / (1 - a))
            mean_x0 = mw + gain * (mean_y - math.sqrt(a) * mw)
            mean_y = math.sqrt(ap) * mean_x0 + keep * (mean_y - math.sqrt(a) * mean_x0)
            var_y = var_y * (math.sqrt(ap) * gain + keep * (1 - math.sqrt(a) * gain)) ** 2
        expected_mean, expected_var = S[0] * mean_y, S[0] ** 2 * var_y
        assert bool((expected_var < 0.95 * v).all())  # 50 steps really shrink the variance: a sharp check
    se = (expected_var / n).sqrt()
    assert bool(((out.mean(0) - expected_mean).abs() < 4 * se).all()), (out.mean(0), expected_mean)
    assert bool(((out.var(0) / expected_var - 1).abs() < 4 * math.sqrt(2 / n) + 0.01).all()), (out.var(0), v)


def test_sampling_shift_flags_and_p2_weight():
    bank = make_bank()
    idx = torch.tensor([0, 1])
    shift, mean = sampling_shift(bank, idx, prior_noise="zero", dtype=torch.float64)
    assert torch.equal(mean, bank.mean.double()[idx]) and bool((shift.scale == ZERO_NOISE_SCALE).all())
    shift, _ = sampling_shift(bank, idx, posterior_component="pred_x0")
    assert shift.mean_depends_on_x0
    near = bank.mean[2:3] * 3.0  # a rescaled copy of mean 2 is nearest (cosine) to component 2
    assert torch.equal(shift.resolve_mean(near), bank.mean[2:3])
    assert torch.allclose(torch.as_tensor(p2_weight(ABAR, 1.0, 1.0)), 1 - ABAR, atol=1e-12)
