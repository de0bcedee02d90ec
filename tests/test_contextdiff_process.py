"""ContextDiff's contextualized process on the core's shift hook: the maths of contextdiff/METHOD.md with a real adapter's r.

Float64 where exactness matters. The oracles are the paper's direct formulas, written out here
independently of ``common.process`` (which computes everything by whitening around the standard posterior).
"""

from __future__ import annotations

import math

import pytest
import torch

from common.denoisers import FunctionDenoiser
from common.errors import UserError
from common.process import Shift, q_sample, shifted_posterior
from common.samplers import invert_ddim, randn, sample_ddim, sample_ddpm
from common.schedule import NoiseSchedule, SamplingPlan, make_plan
from contextdiff.adapter import tiny_adapter
from contextdiff.process import contextual_k, contextual_shift


SCHED = NoiseSchedule.named("linear")  # the paper's linear 1e-4 .. 0.02, T = 1000
ABAR = SCHED.alphas_cumprod  # float64, [T]


def _abar(t: int) -> float:
    return 1.0 if t < 0 else float(ABAR[t])


@pytest.fixture(scope="module")
def adapter64():
    """A float64 adapter with a nonzero head (r != 0), 8-d text, on [B, 4, 4, 4] latents."""
    return tiny_adapter(seed=3, head_std=0.3, dim=16, depth=1, heads=2, text_dims=(8,)).double()


@pytest.fixture(scope="module")
def data(adapter64):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)
    text = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        r = adapter64(x0, text)
    assert r.abs().mean() > 0.1  # the tests below are about a real, nonzero shift
    return x0, text, r


def test_k_schedules_values_and_unknown_name():
    """The k_t numbers of METHOD.md for the linear schedule; k_0 = 0 for every schedule; unknown name -> one-line UserError."""
    kq, kp = contextual_k("quadratic"), contextual_k("prior")
    ks = torch.stack([kq(a) for a in ABAR])
    assert kq(1.0) == 0.0 and kp(1.0) == 0.0 and contextual_k("none")(0.3) == 0.0
    assert abs(float(ks[0]) - 5.0e-5) < 1e-6
    assert abs(float(ks[-1]) - 6.3e-3) < 1e-4  # ~0 at T: sampling may start from N(0, I)
    assert abs(float(ks.max()) - 0.25) < 1e-4 and abs(int(ks.argmax()) - 367) <= 2
    assert float(kp(float(ABAR[-1]))) > 0.99  # prior shift: x_T is centred on r, not N(0, I)
    assert contextual_k("quadratic", 2.0)(0.25) == pytest.approx(0.5)
    with pytest.raises(UserError) as err:
        contextual_k("cubic")
    assert "cubic" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("k", ["quadratic", "prior"])
def test_marginal_is_the_chained_one_step_kernel(k, data):
    """Chaining q(x_t | x_{t-1}) = N(sqrt(a_t) x_{t-1} + (k_t - sqrt(a_t) k_{t-1}) r, b_t) from x0 gives the core's
    forward marginal N(sqrt(abar_t) x0 + k_t r, 1 - abar_t) at every t."""
    x0, _, r = data
    kf = contextual_k(k)
    mean, var = x0.clone(), 0.0
    checks = {0, 17, 367, 640, 999}
    for t in range(1000):
        alpha = _abar(t) / _abar(t - 1)  # the schedule's abar is a float32 cumprod: its own alphas define the chain
        mean = math.sqrt(alpha) * mean + (kf(_abar(t)) - math.sqrt(alpha) * kf(_abar(t - 1))) * r
        var = alpha * var + (1.0 - alpha)
        if t in checks:
            core_mean = q_sample(x0, _abar(t), torch.zeros_like(x0), Shift(k), m=r)
            torch.testing.assert_close(mean, core_mean, rtol=0, atol=1e-12)
            assert var == pytest.approx(1.0 - _abar(t), rel=1e-12)


@pytest.mark.parametrize("t", [1, 5, 250, 600, 999])
def test_posterior_equals_paper_forms_and_gaussian_conditioning(t, data):
    """The core's shifted posterior = paper's x0 form = eps form = exact conditioning of (x_{t-1}, x_t)."""
    x0, _, r = data
    k = contextual_k("quadratic")
    a, ap = _abar(t), _abar(t - 1)
    alpha, beta = a / ap, 1 - a / ap
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
    x_t = math.sqrt(a) * x0 + k(a) * r + math.sqrt(1 - a) * eps
    mean, var = shifted_posterior(x0, x_t, a, ap, Shift("quadratic"), r)

    c1, c2 = math.sqrt(ap) * beta / (1 - a), math.sqrt(alpha) * (1 - ap) / (1 - a)
    x0_form = c1 * x0 + c2 * x_t + (k(ap) - c2 * k(a)) * r
    eps_form = (x_t - beta / math.sqrt(1 - a) * eps) / math.sqrt(alpha) + (k(ap) - k(a) / math.sqrt(alpha)) * r
    # Joint Gaussian: x_{t-1} ~ N(mu_p, 1 - ap), x_t = sqrt(alpha) x_{t-1} + (k_t - sqrt(alpha) k_{t-1}) r + sqrt(beta) z.
    mu_p, mu_t = math.sqrt(ap) * x0 + k(ap) * r, math.sqrt(a) * x0 + k(a) * r
    cov, var_t = math.sqrt(alpha) * (1 - ap), alpha * (1 - ap) + beta
    cond_mean = mu_p + cov / var_t * (x_t - mu_t)
    cond_var = (1 - ap) - cov**2 / var_t
    for other in (x0_form, eps_form, cond_mean):
        torch.testing.assert_close(mean, other, rtol=0, atol=1e-10)
    torch.testing.assert_close(var, torch.full_like(var, beta * (1 - ap) / (1 - a)), rtol=1e-12, atol=1e-15)
    assert cond_var == pytest.approx(beta * (1 - ap) / (1 - a), rel=1e-9, abs=1e-15)


def _oracle(x_star: torch.Tensor) -> FunctionDenoiser:
    """The ideal x0 predictor for data = a point mass at x_star."""
    return FunctionDenoiser(lambda x, t: x_star.expand_as(x).clone(), "x0")


@pytest.mark.parametrize("t", [2, 400, 999])
def test_ddpm_step_is_the_posterior_and_equals_ddim_eta1(t, data, adapter64):
    """With x0_hat = x0 one DDPM step has mean mu_tilde(x_t, x0, r_hat) and variance beta_tilde;
    a DDIM step with s = t - 1 and eta = 1 is the same step (same noise draw)."""
    x0, text, r = data
    shift = contextual_shift(adapter64, text, k="quadratic")
    plan = SamplingPlan((t,), (t - 1,))
    a, ap = _abar(t), _abar(t - 1)
    x_t = math.sqrt(a) * x0 + contextual_k("quadratic")(a) * r + math.sqrt(1 - a) * torch.randn_like(x0)
    run = dict(x_T=x_t, shift=shift, dtype=torch.float64, progress=False)
    ddpm = sample_ddpm(_oracle(x0), SCHED, plan, generator=torch.Generator().manual_seed(1), **run)
    ddim = sample_ddim(_oracle(x0), SCHED, plan, generator=torch.Generator().manual_seed(1), eta=1.0, **run)
    z = randn(x0.shape, torch.Generator().manual_seed(1), dtype=torch.float64)
    mean, var = shifted_posterior(x0, x_t, a, ap, Shift("quadratic"), r)
    torch.testing.assert_close(ddpm, mean + var.sqrt() * z, rtol=0, atol=1e-12)
    torch.testing.assert_close(ddim, ddpm, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", ["quadratic", "prior"])
def test_ddim_eta0_keeps_the_marginal_family_exactly(k, data, adapter64):
    """Closed form: with x0_hat = x0, eta = 0 DDIM maps sqrt(abar_t) x0 + k_t r + sqrt(1 - abar_t) eps to
    sqrt(abar_s) x0 + k_s r + sqrt(1 - abar_s) eps at every (strided) level s: the same eps, the shifted marginal."""
    x0, text, r = data
    kf = contextual_k(k)
    plan = SamplingPlan((900, 700, 420, 130), (700, 420, 130, 40))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x_T = math.sqrt(_abar(900)) * x0 + kf(_abar(900)) * r + math.sqrt(1 - _abar(900)) * eps
    seen = []
    out = sample_ddim(_oracle(x0), SCHED, plan, x_T=x_T, shift=contextual_shift(adapter64, text, k=k),
                      dtype=torch.float64, progress=False, callback=lambda i, t, x, x0h: seen.append((t, x)))
    for t, x in seen[1:] + [(40, out)]:
        a = _abar(t)
        torch.testing.assert_close(x, math.sqrt(a) * x0 + kf(a) * r + math.sqrt(1 - a) * eps, rtol=0, atol=1e-12)


def test_ddim_eta_positive_marginal_monte_carlo(data):
    """Monte Carlo: eta = 0.7 DDIM from the shifted marginal at t lands on N(sqrt(abar_s) x0 + k_s r,
    1 - abar_s) at s (mean within 5 standard errors, variance within 5 %)."""
    x0, _, r = data
    x0, r = x0[0, 0].reshape(1, -1), r[0, 0].reshape(1, -1)  # 16 coordinates, 20k samples each
    n, k = 20000, contextual_k("quadratic")
    shift = Shift("quadratic", mean=lambda x0_hat: r.expand_as(x0_hat))
    plan = SamplingPlan((800, 500), (500, 150))
    g = torch.Generator().manual_seed(11)
    x_T = math.sqrt(_abar(800)) * x0 + k(_abar(800)) * r + math.sqrt(1 - _abar(800)) * torch.randn(
        n, 16, generator=g, dtype=torch.float64)
    out = sample_ddim(_oracle(x0), SCHED, plan, x_T=x_T, shift=shift, eta=0.7, generator=g, dtype=torch.float64,
                      progress=False)
    a = _abar(150)
    want_mean, want_var = math.sqrt(a) * x0 + k(a) * r, 1 - a
    assert (out.mean(0) - want_mean[0]).abs().max() < 5 * math.sqrt(want_var / n)
    assert (out.var(0) / want_var - 1).abs().max() < 0.05


@pytest.mark.parametrize("k", ["quadratic", "prior"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim0", "ddim05"])
def test_oracle_sampler_ends_on_the_point_mass(k, sampler, data, adapter64):
    """Data = a point mass x*, x0_hat = x*: every sampler ends on x* for any r and k (the shift cancels)."""
    x_star, text, _ = data
    plan = make_plan(SCHED, 10)
    run = dict(shape=x_star.shape, shift=contextual_shift(adapter64, text, k=k), dtype=torch.float64,
               generator=torch.Generator().manual_seed(2), progress=False)
    if sampler == "ddpm":
        out = sample_ddpm(_oracle(x_star), SCHED, plan, **run)
    else:
        out = sample_ddim(_oracle(x_star), SCHED, plan, eta=0.0 if sampler == "ddim0" else 0.5, **run)
    torch.testing.assert_close(out, x_star, rtol=0, atol=1e-10)


def test_inversion_round_trip_with_the_shift(data, adapter64):
    """eta = 0 contextualized DDIM inversion then sampling returns x0 (a smooth nonlinear denoiser, the
    implicit step solved by fixed-point iteration); inverting WITHOUT the shift (the released video code)
    and sampling with it does not."""
    x0, text, _ = data
    den = FunctionDenoiser(lambda x, t: 0.8 * x + 0.1 * torch.tanh(x), "x0")
    shift = contextual_shift(adapter64, text, k="quadratic")
    plan = make_plan(SCHED, 10)
    run = dict(fixed_point_iters=50, progress=False)
    x_T = invert_ddim(den, SCHED, plan, x0, shift=shift, **run)
    back = sample_ddim(den, SCHED, plan, x_T=x_T, shift=shift, dtype=torch.float64, progress=False)
    torch.testing.assert_close(back, x0, rtol=0, atol=1e-9)
    x_T_plain = invert_ddim(den, SCHED, plan, x0, **run)
    wrong = sample_ddim(den, SCHED, plan, x_T=x_T_plain, shift=shift, dtype=torch.float64, progress=False)
    assert (wrong - x0).abs().max() > 0.1
