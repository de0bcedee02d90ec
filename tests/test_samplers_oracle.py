"""Oracle tests: our samplers against diffusers' schedulers, and ADM's learned variance against float64 maths."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from common.denoisers import FunctionDenoiser
from common.samplers import sample_ddim, sample_ddpm
from common.schedule import NoiseSchedule, make_plan, plan_like_diffusers


SHAPE = (2, 3, 6, 6)


def make_model(alphas_cumprod, ptype="eps"):
    """A smooth stand-in for a trained network: the ideal denoiser of N(0, 0.5^2) data plus a non-linear term.

    Near-ideal predictions keep samples at data scale, so a tolerance of 1e-5 is meaningful in float32.
    """

    def model(x, t):
        a = alphas_cumprod.to(x.dtype)[t.long()].view(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * x / (0.25 * a + 1 - a) + 0.05 * torch.sin(3 * x + t.view(-1, 1, 1, 1) / 100)
        if ptype == "eps":
            return eps
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    return model


def run_diffusers(scheduler, steps, seed, **step_kwargs):
    ptype = {"epsilon": "eps", "v_prediction": "v"}[scheduler.config.prediction_type]
    toy_model = make_model(scheduler.alphas_cumprod.double(), ptype)
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=gen)
    trajectory = []
    for t in scheduler.timesteps:
        trajectory.append(x)
        x = scheduler.step(toy_model(x, t.expand(SHAPE[0])), t, x, generator=gen, **step_kwargs).prev_sample
    return x, trajectory


def run_ours(sampler, config, steps, seed, ptype, kind, **kwargs):
    schedule = NoiseSchedule.from_config(config)
    plan = plan_like_diffusers(schedule, config, steps, kind)
    toy_model = make_model(schedule.alphas_cumprod, ptype)
    trajectory = []
    out = sampler(
        FunctionDenoiser(toy_model, ptype), schedule, plan, SHAPE, generator=torch.Generator().manual_seed(seed),
        callback=lambda i, t, x, x0: trajectory.append(x), progress=False, **kwargs,
    )
    return out, trajectory


def assert_trajectories_match(ours, ref, tol=1e-5):
    (x_ours, traj_ours), (x_ref, traj_ref) = ours, ref
    assert len(traj_ours) == len(traj_ref)
    for a, b in zip(traj_ours, traj_ref):
        assert (a - b).abs().max().item() <= tol
    assert (x_ours - x_ref).abs().max().item() <= tol


SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]
PTYPES = [("epsilon", "eps"), ("v_prediction", "v")]


@pytest.mark.parametrize("beta_schedule", SCHEDULES)
@pytest.mark.parametrize("diffusers_ptype,ptype", PTYPES)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_matches_diffusers(beta_schedule, diffusers_ptype, ptype, variance_type):
    ref = DDPMScheduler(beta_schedule=beta_schedule, prediction_type=diffusers_ptype, clip_sample=False,
                        variance_type=variance_type)
    config = dict(ref.config)
    ours = run_ours(sample_ddpm, config, 50, 0, ptype, "ddpm", variance_type=variance_type)
    assert_trajectories_match(ours, run_diffusers(ref, 50, 0))


def test_ddpm_full_1000_steps_with_clipping_matches_diffusers():
    ref = DDPMScheduler(beta_schedule="linear", clip_sample=True)
    ours = run_ours(sample_ddpm, dict(ref.config), 1000, 3, "eps", "ddpm", clip_x0=1.0)
    assert_trajectories_match(ours, run_diffusers(ref, 1000, 3))


@pytest.mark.parametrize("beta_schedule", SCHEDULES)
@pytest.mark.parametrize("diffusers_ptype,ptype", PTYPES)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers(beta_schedule, diffusers_ptype, ptype, eta):
    ref = DDIMScheduler(beta_schedule=beta_schedule, prediction_type=diffusers_ptype, clip_sample=False)
    ours = run_ours(sample_ddim, dict(ref.config), 50, 1, ptype, "ddim", eta=eta)
    assert_trajectories_match(ours, run_diffusers(ref, 50, 1, eta=eta))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_stable_diffusion_settings_match_diffusers(spacing, eta):
    # Stable Diffusion's scheduler: scaled_linear 0.00085..0.012, steps_offset=1, set_alpha_to_one=False.
    ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                        set_alpha_to_one=False, steps_offset=1, timestep_spacing=spacing)
    ours = run_ours(sample_ddim, dict(ref.config), 30, 2, "eps", "ddim", eta=eta)
    assert_trajectories_match(ours, run_diffusers(ref, 30, 2, eta=eta))


def test_ddim_with_clipping_matches_diffusers_clipped_model_output():
    ref = DDIMScheduler(beta_schedule="linear", clip_sample=True)
    ours = run_ours(sample_ddim, dict(ref.config), 20, 4, "eps", "ddim", clip_x0=1.0, eta=0.5)
    assert_trajectories_match(ours, run_diffusers(ref, 20, 4, eta=0.5, use_clipped_model_output=True))


# ----------------------------------------------------------------- ADM learned-range variance (float64 reference)


def adm_reference_loop(abar_full, kept, x_T, model, noises):
    """guided-diffusion's SpacedDiffusion + p_sample with LEARNED_RANGE, eps prediction, float64 numpy."""
    alphas_cumprod = abar_full[kept]
    last = 1.0
    betas = []
    for a in alphas_cumprod:
        betas.append(1 - a / last)
        last = a
    betas = np.array(betas)
    acp = np.cumprod(1 - betas)
    acp_prev = np.append(1.0, acp[:-1])
    post_var = betas * (1 - acp_prev) / (1 - acp)
    post_log_clipped = np.log(np.append(post_var[1], post_var[1:]))
    c1 = betas * np.sqrt(acp_prev) / (1 - acp)
    c2 = (1 - acp_prev) * np.sqrt(1 - betas) / (1 - acp)
    x = x_T
    noise_iter = iter(noises)
    for k in reversed(range(len(kept))):
        out = model(torch.from_numpy(x), torch.full((x.shape[0],), kept[k])).numpy()
        eps, v = np.split(out, 2, axis=1)
        x0 = np.sqrt(1 / acp[k]) * x - np.sqrt(1 / acp[k] - 1) * eps
        x0 = np.clip(x0, -1, 1)
        mean = c1[k] * x0 + c2[k] * x
        frac = (v + 1) / 2
        log_var = frac * np.log(betas[k]) + (1 - frac) * post_log_clipped[k]
        x = mean + (np.exp(0.5 * log_var) * next(noise_iter) if k > 0 else 0.0)
    return x


def learned_model(x, t):
    eps = make_model(NoiseSchedule.named("linear").alphas_cumprod)(x, t)
    v = torch.tanh(0.5 * x - 0.3)  # variance interpolant in [-1, 1]
    return torch.cat([eps, v], dim=1)


@pytest.mark.parametrize("respacing", ["100", "ddim25", "10,5,3"])
def test_learned_range_ddpm_matches_float64_adm(respacing):
    schedule = NoiseSchedule.named("linear")
    plan = make_plan(schedule, respacing)
    gen = torch.Generator().manual_seed(5)
    x_T = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    noises = [torch.randn(SHAPE, generator=gen, dtype=torch.float64).numpy() for _ in range(len(plan) - 1)]
    kept = np.array(sorted(plan.timesteps))
    ref = adm_reference_loop(schedule.alphas_cumprod.numpy(), kept, x_T.numpy(), learned_model, noises)
    gen = torch.Generator().manual_seed(5)
    torch.randn(SHAPE, generator=gen, dtype=torch.float64)  # skip x_T, which we pass explicitly
    ours = sample_ddpm(
        FunctionDenoiser(learned_model, "eps", learned_variance=True), schedule, plan, x_T=x_T, generator=gen,
        variance_type="learned_range", clip_x0=1.0, dtype=torch.float64, progress=False,
    )
    assert np.abs(ours.numpy() - ref).max() < 1e-10
    assert math.isfinite(float(ours.abs().max()))
