import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from common.errors import UserError
from common.schedule import NoiseSchedule, make_plan, plan_like_diffusers, space_timesteps


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_betas_and_alphas_match_diffusers(name):
    ours = NoiseSchedule.named(name, 1000, 0.00085, 0.012)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=name, beta_start=0.00085, beta_end=0.012)
    assert torch.equal(ours.betas.float(), ref.betas)
    assert torch.equal(ours.alphas_cumprod.float(), ref.alphas_cumprod)


def test_snr_is_abar_over_one_minus_abar():
    s = NoiseSchedule.named("linear")
    t = torch.tensor([0, 10, 500, 999])
    abar = s.alphas_cumprod[t]
    assert torch.allclose(s.snr(t), abar / (1 - abar), rtol=0, atol=0)
    assert bool((s.snr(torch.arange(999)) > s.snr(torch.arange(1, 1000))).all())  # strictly decreasing


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("steps", [1, 7, 50, 1000])
def test_timesteps_match_diffusers(spacing, steps_offset, steps):
    s = NoiseSchedule.named("linear")
    for cls, sampler in ((DDPMScheduler, "ddpm"), (DDIMScheduler, "ddim")):
        ref = cls(timestep_spacing=spacing, steps_offset=steps_offset)
        ref.set_timesteps(steps)
        if int(ref.timesteps.max()) >= 1000:  # diffusers would index past its own schedule later; we refuse now
            with pytest.raises(UserError, match="outside the schedule"):
                plan_like_diffusers(s, dict(ref.config), steps, sampler)
            continue
        plan = plan_like_diffusers(s, dict(ref.config), steps, sampler)
        assert list(plan.timesteps) == ref.timesteps.tolist()


def test_respacing_100_is_guided_diffusions_set():
    kept = space_timesteps(1000, "100")
    # guided-diffusion: one section, fractional stride 999/99, indices rounded
    assert kept == sorted({round(k * 999 / 99) for k in range(100)})
    assert kept[:7] == [0, 10, 20, 30, 40, 50, 61] and kept[-3:] == [979, 989, 999]
    assert len(kept) == 100


def test_respacing_sections_and_ddim_strings():
    kept = space_timesteps(1000, "10,20,30")
    assert len(kept) == 60
    # three sections of 334, 333, 333 steps, each spanned end to end
    assert kept[0] == 0 and 333 in kept and 334 in kept and 666 in kept and 667 in kept and kept[-1] == 999
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    assert len(space_timesteps(1000, "fast27")) == 27
    # Shifted Diffusion's released respacing: "8" keeps these
    assert space_timesteps(1000, "8") == [0, 143, 285, 428, 571, 714, 856, 999]


def test_respaced_plan_chain_reproduces_abar():
    s = NoiseSchedule.named("linear")
    plan = make_plan(s, "100")
    abars, prevs = plan.alphas(s)
    betas = 1 - np.array(abars) / np.array(prevs)
    # prod(1 - beta') over the kept chain reproduces abar at every kept step
    chain = np.cumprod((1 - betas)[::-1])[::-1]
    assert np.allclose(chain, abars, rtol=1e-12)
    assert plan.prev_timesteps[-1] == -1 and plan.timesteps[-1] == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(name="cosine"), "unknown beta schedule"),
        (dict(steps=1001), "more than the model's 1000 training steps"),
        (dict(steps=0), "must be >= 1"),
        (dict(spacing="middle"), "unknown timestep spacing"),
        (dict(steps="ten"), "bad respacing"),
        (dict(steps="ddim999"), "no integer stride"),
        (dict(steps="2000"), "cannot take 2000 steps"),
    ],
)
def test_bad_input_is_one_clear_line(kwargs, match):
    name = kwargs.pop("name", "linear")
    steps = kwargs.pop("steps", 10)
    with pytest.raises(UserError, match=match) as err:
        make_plan(NoiseSchedule.named(name), steps, **kwargs)
    assert "\n" not in str(err.value)
