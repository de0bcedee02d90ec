"""SDG sampling on the core's DDPM sampler: parity with an independent ADM loop, exact mean shift, plumbing."""

import functools
import math

import pytest
import torch

from common.denoisers import UNetDenoiser
from common.errors import UserError
from common.samplers import sample_ddpm
from common.schedule import SamplingPlan, make_plan
from sdg.adm import noise_schedule
from sdg.pipeline import encode_text, sample_sdg, sdg_denoiser
from sdg.scores import SemanticGuidance, cosine
from sdg.tiny import tiny_adm_flags, tiny_adm_unet, tiny_noise_aware_clip


SCHEDULE = noise_schedule(tiny_adm_flags())
SHAPE = (2, 3, 32, 32)


@pytest.fixture(scope="module")
def models():
    """float64 tiny ADM UNet (learn_sigma) + noise-aware ResNet CLIP with non-zero FiLM, and its open_clip model."""
    clip, clip_model = tiny_noise_aware_clip("resnet", film_init="default")
    return tiny_adm_unet().double(), clip.double(), clip_model


def gen(seed):
    return torch.Generator().manual_seed(seed)


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from open_clip import get_tokenizer

    return get_tokenizer("RN50")  # OpenAI's BPE, shipped with open_clip


def text_embedding(clip_model):
    return encode_text(clip_model, _tokenizer(), "a red handwritten seven").double()


def reference():
    return torch.rand(1, 3, 32, 32, generator=gen(9), dtype=torch.float64) * 2 - 1


def test_zero_weights_reproduce_unguided_sampling_bit_for_bit(models):
    unet, clip, clip_model = models
    guidance_gen = gen(4)
    state = guidance_gen.get_state()
    guided = sample_sdg(unet, SCHEDULE, "4", batch_size=2, clip=clip, text_embedding=text_embedding(clip_model),
                        reference=reference(), text_weight=0.0, content_weight=0.0, style_weight=0.0,
                        generator=gen(0), guidance_generator=guidance_gen, dtype=torch.float64)
    plain = sample_ddpm(UNetDenoiser(unet, "eps", learned_variance=True), SCHEDULE, make_plan(SCHEDULE, "4"), SHAPE,
                        generator=gen(0), variance_type="learned_range", clip_x0=1.0, dtype=torch.float64,
                        progress=False)
    assert torch.equal(guided, plain)
    assert torch.equal(guidance_gen.get_state(), state)  # the reference-noise stream was never touched


def adm_reference_sample(unet, schedule, kept, x_T, noise_gen, guidance):
    """guided-diffusion's p_sample_loop with cond_fn, written from the respaced chain, float64."""
    abar_full = schedule.alphas_cumprod
    kept = sorted(kept)
    abar = torch.stack([abar_full[s] for s in kept])
    abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    beta = 1 - abar / abar_prev
    post_var = beta * (1 - abar_prev) / (1 - abar)
    log_var_clipped = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    x = x_T
    for k in reversed(range(len(kept))):
        t = torch.full((x.shape[0],), kept[k], dtype=torch.long)
        eps, v = unet(x, t).sample.chunk(2, dim=1)
        x0 = (x / abar[k].sqrt() - (1 / abar[k] - 1).sqrt() * eps).clamp(-1, 1)
        mean = (beta[k] * abar_prev[k].sqrt() / (1 - abar[k])) * x0 + (
            (1 - abar_prev[k]) * (1 - beta[k]).sqrt() / (1 - abar[k])) * x
        frac = (v + 1) / 2
        log_var = frac * beta[k].log() + (1 - frac) * log_var_clipped[k]
        mean = mean + log_var.exp() * guidance(x, t)
        if k > 0:
            mean = mean + (0.5 * log_var).exp() * torch.randn(x.shape, generator=noise_gen, dtype=x.dtype)
        x = mean
    return x


def test_guided_sampling_matches_an_independent_adm_loop(models):
    unet, clip, clip_model = models
    text = text_embedding(clip_model)
    kwargs = dict(text_embedding=text, reference=reference(), text_weight=50.0, content_weight=20.0)
    ours = sample_sdg(unet, SCHEDULE, "3", batch_size=2, clip=clip, generator=gen(0), guidance_generator=gen(1),
                      dtype=torch.float64, **kwargs)
    kept = make_plan(SCHEDULE, "3").timesteps
    results = []
    for guidance in (SemanticGuidance(clip, SCHEDULE, generator=gen(1), **kwargs), lambda x, t: torch.zeros_like(x)):
        noise_gen = gen(0)  # the sampler's stream: x_T, then one z per step
        x_T = torch.randn(SHAPE, generator=noise_gen, dtype=torch.float64)
        results.append(adm_reference_sample(unet, SCHEDULE, kept, x_T, noise_gen, guidance))
    reference_x0, unguided = results
    assert (ours - unguided).abs().max() > 1e-6  # guidance did something ...
    torch.testing.assert_close(ours, reference_x0, rtol=1e-10, atol=1e-10)  # ... and exactly what ADM does


def learned_sigma(v, kept, k):
    """Sigma of the learned range (sdg/METHOD.md §1 step 3) at respaced index k (kept ascending), from the model's
    variance output v."""
    abar = [float(SCHEDULE.alphas_cumprod[s]) for s in kept]

    def step(j):
        prev = abar[j - 1] if j > 0 else 1.0
        beta = 1 - abar[j] / prev
        return beta, beta * (1 - prev) / (1 - abar[j])

    beta, _ = step(k)
    low = step(k)[1] if k > 0 else step(1)[1]  # ADM's clipped log-variance: the last step borrows beta~_1
    frac = (v + 1) / 2
    return torch.exp(frac * math.log(beta) + (1 - frac) * math.log(low))


@pytest.mark.parametrize("index", [1, 3], ids=["t=666", "t=0-last"])
def test_mean_shift_is_variance_times_weight_times_gradient(models, index):
    unet, clip, clip_model = models
    plan = make_plan(SCHEDULE, "4")
    t_k = plan.timesteps[index]
    weight = 300.0
    sdg = SemanticGuidance(clip, SCHEDULE, text_embedding=text_embedding(clip_model), text_weight=weight)

    def only_at_step_k(x, t):  # guidance at one step only: everything before is identical in both runs
        return sdg(x, t) if int(t[0]) == t_k else torch.zeros_like(x)

    runs = {}
    for name, guidance in (("guided", only_at_step_k), ("plain", None)):
        seen = []
        final = sample_ddpm(sdg_denoiser(unet), SCHEDULE, plan, SHAPE, generator=gen(0), guidance=guidance,
                            variance_type="learned_range", clip_x0=1.0, dtype=torch.float64, progress=False,
                            callback=lambda i, t, x, x0, seen=seen: seen.append(x.clone()))
        runs[name] = seen + [final]
    x_k = runs["guided"][index]
    assert torch.equal(x_k, runs["plain"][index])
    t = torch.full((2,), t_k)
    with torch.no_grad():
        v = unet(x_k, t).sample[:, 3:]
    expected = learned_sigma(v, sorted(plan.timesteps), len(plan) - 1 - index) * sdg(x_k, t)
    shift = runs["guided"][index + 1] - runs["plain"][index + 1]  # the same z was added to both means
    assert expected.abs().max() > 1e-6
    torch.testing.assert_close(shift, expected, rtol=1e-9, atol=1e-14)


def test_network_and_energies_see_original_timesteps(models):
    unet, clip, clip_model = models
    seen_unet, seen_clip = [], []
    handle = unet.register_forward_pre_hook(lambda module, args: seen_unet.append(args[1].tolist()))

    class SpyClip:
        image_size = 32

        def __call__(self, x, t):
            seen_clip.append(t.tolist())
            return clip(x, t)

    try:
        sample_sdg(unet, SCHEDULE, "5", batch_size=2, clip=SpyClip(), text_embedding=text_embedding(clip_model),
                   text_weight=1.0, generator=gen(0), dtype=torch.float64)
    finally:
        handle.remove()
    expected = [[t, t] for t in (999, 749, 500, 250, 0)]  # guided-diffusion's "5": round(k * 999 / 4)
    assert seen_unet == expected and seen_clip == expected  # guidance runs at the last step too (t = 0)


@pytest.mark.parametrize("t_k, t_prev", [(999, 888), (555, 444)])
def test_one_guided_step_raises_the_target_similarity(models, t_k, t_prev):
    unet, clip, clip_model = models
    text = text_embedding(clip_model)
    x_t = torch.randn(SHAPE, generator=gen(t_k), dtype=torch.float64)
    scores = []
    for weight in (0.0, 100.0, 1000.0):
        x_prev = sample_sdg(unet, SCHEDULE, SamplingPlan((t_k,), (t_prev,)), x_T=x_t, clip=clip,
                            text_embedding=text, text_weight=weight, generator=gen(1), dtype=torch.float64)
        with torch.no_grad():
            scores.append(cosine(clip.embed(x_prev, t_prev), text))
    assert bool((scores[1] > scores[0]).all()) and bool((scores[2] > scores[1]).all())


def test_sampling_runs_the_models_in_eval_mode_and_restores_their_modes(models):
    unet, clip, clip_model = models
    kwargs = dict(batch_size=2, clip=clip, text_embedding=text_embedding(clip_model), text_weight=100.0,
                  generator=gen(0), dtype=torch.float64)
    expected = sample_sdg(unet, SCHEDULE, "2", **kwargs)
    clip.train()  # BatchNorm on batch statistics would change (and mix) the guidance gradients
    try:
        kwargs["generator"] = gen(0)
        assert torch.equal(sample_sdg(unet, SCHEDULE, "2", **kwargs), expected)
        assert clip.training and not unet.training
    finally:
        clip.eval()


def test_bad_input_is_a_one_line_user_error(models):
    unet, clip, clip_model = models
    cases = [
        (dict(text_weight=160.0, text_embedding=text_embedding(clip_model)), "no noise-aware CLIP"),
        (dict(clip=clip, content_weight=100.0), "no reference image"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message) as err:
            sample_sdg(unet, SCHEDULE, "2", batch_size=1, **kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="learn_sigma"):
        sample_sdg(tiny_adm_unet(learn_sigma=False), SCHEDULE, "2")
    small_clip, _ = tiny_noise_aware_clip("vit", image_size=16)
    with pytest.raises(UserError, match="16 px images but the UNet makes 32 px"):
        sample_sdg(unet.float(), SCHEDULE, "2", clip=small_clip, text_embedding=torch.zeros(64), text_weight=1.0)
    unet.double()
