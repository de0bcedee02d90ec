"""ADM's hybrid loss for the frozen model SDG guides (Improved DDPM eq. 16): terms, oracle, stop-gradient, scaling."""

import math

import pytest
import torch

from common.process import posterior_coefficients, q_sample_standard
from sdg.adm import noise_schedule
from sdg.tiny import tiny_adm_flags, tiny_adm_unet
from sdg.training import (
    HybridLoss,
    discretized_gaussian_log_likelihood,
    hybrid_terms,
    normal_kl,
)


SCHEDULE = noise_schedule(tiny_adm_flags())


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_normal_kl_matches_torch_distributions():
    m1, m2 = torch.randn(50, generator=gen(0), dtype=torch.float64), torch.randn(50, generator=gen(1), dtype=torch.float64)
    lv1, lv2 = torch.randn(50, generator=gen(2), dtype=torch.float64), torch.randn(50, generator=gen(3), dtype=torch.float64)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                                 torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)


def test_discretized_likelihood_is_a_distribution_over_the_256_levels():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in [(0.3, math.log(0.05)), (-0.97, math.log(0.2)), (0.0, math.log(1e-3))]:
        logp = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean),
                                                   torch.full_like(levels, log_scale))
        assert abs(float(logp.exp().sum()) - 1.0) < 1e-9  # adjacent bins share edges: the CDF telescopes


def test_terms_against_an_independent_posterior_oracle():
    """vb at t > 0 = KL(q(x_{t-1}|x_t,x0) || N(mu_theta, Sigma_theta)) / log 2 per dim, built from the core's
    posterior_coefficients and the learned-range rule; t = 0 is the decoder NLL."""
    x0 = torch.rand(3, 3, 8, 8, generator=gen(0), dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen(1), dtype=torch.float64)
    out = torch.randn(3, 6, 8, 8, generator=gen(2), dtype=torch.float64)
    t = torch.tensor([0, 1, 617])
    x_t = q_sample_standard(x0, SCHEDULE.abar(t, like=x0), noise)
    terms = hybrid_terms(out, x0, x_t, t, noise, SCHEDULE)
    abar = torch.cumprod(1 - SCHEDULE.betas, 0)  # ADM's float64 product
    eps, v = out.chunk(2, dim=1)
    torch.testing.assert_close(terms["mse"], ((eps - noise) ** 2).flatten(1).mean(1))
    for i, step in enumerate(t.tolist()):
        a, ap = float(abar[step]), float(abar[step - 1]) if step > 0 else 1.0
        c1, c2, var = posterior_coefficients(a, ap)
        var_clipped = var if step > 0 else posterior_coefficients(float(abar[1]), float(abar[0]))[2]
        beta = 1 - a / ap
        x0_hat = (x_t[i] - math.sqrt(1 - a) * eps[i]) / math.sqrt(a)
        mu = c1 * x0_hat + c2 * x_t[i]
        log_var = (v[i] + 1) / 2 * math.log(beta) + (1 - v[i]) / 2 * math.log(var_clipped)
        if step == 0:
            ll = discretized_gaussian_log_likelihood(x0[i], mu, 0.5 * log_var)
            expected = -ll.mean() / math.log(2)
        else:
            true_mu = c1 * x0[i] + c2 * x_t[i]
            expected = normal_kl(true_mu, torch.full_like(mu, math.log(var)), mu, log_var).mean() / math.log(2)
        assert abs(float(terms["vb"][i]) - float(expected)) < 1e-9 * max(1.0, abs(float(expected)))


def test_vb_is_zero_for_the_true_posterior():
    """eps_hat = the true noise and v = -1 (Sigma = beta~_t): the model IS the posterior, KL = 0 for t >= 1."""
    x0 = torch.rand(4, 3, 8, 8, generator=gen(3)) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen(4))
    t = torch.tensor([1, 10, 500, 999])
    x_t = q_sample_standard(x0, SCHEDULE.abar(t, like=x0), noise)
    out = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    terms = hybrid_terms(out, x0, x_t, t, noise, SCHEDULE)
    assert terms["mse"].abs().max() == 0
    assert terms["vb"].abs().max() < 1e-5


def test_vlb_term_trains_only_the_variance_and_lambda_scales_it():
    x0 = torch.rand(2, 3, 8, 8, generator=gen(5)) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen(6))
    t = torch.tensor([0, 300])
    x_t = q_sample_standard(x0, SCHEDULE.abar(t, like=x0), noise)
    out = torch.randn(2, 6, 8, 8, generator=gen(7)).requires_grad_(True)
    terms = hybrid_terms(out, x0, x_t, t, noise, SCHEDULE)
    (grad,) = torch.autograd.grad(terms["vb"].sum(), out)
    assert grad[:, :3].abs().max() == 0 and grad[:, 3:].abs().max() > 0  # stop-gradient on the mean

    unet = tiny_adm_unet(attention_resolutions="")
    torch.manual_seed(0)
    full = HybridLoss(unet, SCHEDULE)(x0)
    torch.manual_seed(0)
    simple = HybridLoss(unet, SCHEDULE, lambda_vlb=0.0)(x0)
    assert full.logs["mse"] == simple.logs["mse"]
    expected = simple.loss + 1e-3 * 1000 * full.logs["vb_bpd"]  # lambda * T * L_t, averaged over the batch
    torch.testing.assert_close(full.loss, expected)


def test_hybrid_loss_refuses_a_fixed_variance_model():
    from common.errors import UserError

    with pytest.raises(UserError, match="learn_sigma"):
        HybridLoss(tiny_adm_unet(learn_sigma=False), SCHEDULE)
