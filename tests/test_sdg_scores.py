"""SDG's guidance energies: gradients (finite differences), ascent, reference noising, per-sample style Grams."""

import pytest
import torch

from common.errors import UserError
from common.schedule import NoiseSchedule
from sdg.scores import SemanticGuidance, gram_batch, gram_per_sample, noise_reference
from sdg.tiny import tiny_noise_aware_clip


SCHEDULE = NoiseSchedule.named("linear", 1000)
ENERGIES = {
    "text": dict(text_weight=2.0),
    "content": dict(content_weight=3.0),
    "style-per-sample": dict(style_weight=1.0),
    "style-batch": dict(style_weight=1.0, style_gram="batch"),
    "all-combined": dict(text_weight=2.0, content_weight=3.0, style_weight=1e-3),
}


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1


@pytest.fixture(scope="module")
def clip64():
    """A ResNet noise-aware CLIP in float64 with non-zero FiLM (so t matters), eval mode."""
    clip, _ = tiny_noise_aware_clip("resnet", film_init="default")
    return clip.double()


@pytest.fixture(scope="module")
def vit64():
    clip, _ = tiny_noise_aware_clip("vit", film_init="default")
    return clip.double()


def guidance_for(clip, weights, seed=5):
    gen = torch.Generator().manual_seed(seed)
    text = rand(clip.visual.output_dim, seed=11)
    guide = SemanticGuidance(clip, SCHEDULE, text_embedding=text, reference=rand(1, 3, 32, 32, seed=12),
                             generator=gen, **weights)
    return guide, gen


@pytest.mark.parametrize("tower, name", [("resnet", name) for name in ENERGIES] + [("vit", "all-combined")])
def test_guidance_gradient_matches_finite_differences(request, tower, name):
    clip = request.getfixturevalue("clip64" if tower == "resnet" else "vit64")
    guide, gen = guidance_for(clip, ENERGIES[name])
    x, t = rand(2, 3, 32, 32, seed=1), torch.tensor([300, 700])
    gen.manual_seed(5)
    grad = guide(x, t)
    directions = [grad / grad.norm()] + [d / d.norm() for d in (rand(*x.shape, seed=s) for s in (2, 3))]

    def central(v, h):
        with torch.no_grad():
            gen.manual_seed(5)  # the same reference noise as the gradient saw
            plus = guide.total_energy(x + h * v, t)
            gen.manual_seed(5)
            minus = guide.total_energy(x - h * v, t)
        return float((plus - minus) / (2 * h))

    for v in directions:
        # Central differences in float64 with a small step: ReLU kinks make larger steps non-smooth.
        fd = central(v, 1e-4)
        analytic = float((grad * v).sum())
        assert abs(fd - analytic) <= 1e-5 * abs(analytic) + 1e-6 * float(grad.norm()), (fd, analytic)


@pytest.mark.parametrize("name", ["text", "content", "style-per-sample"])
def test_a_small_step_along_the_gradient_raises_the_score(clip64, name):
    guide, gen = guidance_for(clip64, ENERGIES[name])
    for case in range(6):
        x = rand(2, 3, 32, 32, seed=100 + case)
        t = torch.randint(0, 1000, (2,), generator=torch.Generator().manual_seed(case))
        gen.manual_seed(case)
        grad = guide(x, t)
        with torch.no_grad():
            gen.manual_seed(case)
            before = guide.total_energy(x, t)
            gen.manual_seed(case)
            after = guide.total_energy(x + 1e-2 * grad / grad.norm(), t)
        assert after > before


def test_per_sample_style_does_not_mix_the_batch_and_the_released_one_does(clip64):
    x, t = rand(3, 3, 32, 32, seed=1), torch.tensor([400, 400, 400])
    x_changed = x.clone()
    x_changed[1] = rand(3, 32, 32, seed=9)
    grads = {}
    for gram in ("per_sample", "batch"):
        guide, gen = guidance_for(clip64, dict(style_weight=1.0, style_gram=gram))
        gen.manual_seed(0)
        g1 = guide(x, t)
        gen.manual_seed(0)
        g2 = guide(x_changed, t)
        grads[gram] = (g1, g2)
    g1, g2 = grads["per_sample"]
    torch.testing.assert_close(g1[0], g2[0], rtol=1e-10, atol=0)  # sample 0 ignores sample 1 ...
    torch.testing.assert_close(g1[2], g2[2], rtol=1e-10, atol=0)
    g1, g2 = grads["batch"]
    assert (g1[0] - g2[0]).abs().max() > 1e-3 * g1[0].abs().max()  # ... unless the Gram mixes the batch


def test_gram_matrices():
    h = rand(3, 4, 5, 5, seed=3)
    per_sample, batch = gram_per_sample(h), gram_batch(h)
    assert per_sample.shape == (3, 4, 4) and batch.shape == (12, 12)  # the released Gram is (B C) x (B C)
    torch.testing.assert_close(per_sample[1], h[1].reshape(4, 25) @ h[1].reshape(4, 25).T / 100)
    torch.testing.assert_close(batch[4:8, 4:8], per_sample[1] / 3)  # diagonal blocks: own Gram / B
    assert batch[0:4, 4:8].abs().max() > 0  # off-diagonal blocks couple samples 0 and 1
    torch.testing.assert_close(gram_per_sample(h[:1])[0], gram_batch(h[:1]))  # B = 1: the same Gram
    half = gram_per_sample(h.half())
    assert half.dtype == torch.float32  # fp16 features are promoted (the released code only ran under autocast)


def test_style_modes_agree_for_a_single_sample(clip64):
    x, t = rand(1, 3, 32, 32, seed=4), torch.tensor([250])
    values = []
    for gram in ("per_sample", "batch"):
        guide, gen = guidance_for(clip64, dict(style_weight=1.0, style_gram=gram))
        with torch.no_grad():
            values.append(guide.total_energy(x, t))
    torch.testing.assert_close(values[0], values[1], rtol=1e-12, atol=0)


def test_reference_is_noised_with_the_full_schedule_at_the_original_t():
    ref = rand(1, 3, 8, 8, seed=2)
    t = torch.tensor([999, 989, 10])
    noisy = noise_reference(ref, t, SCHEDULE, torch.Generator().manual_seed(7))
    noise = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    abar = SCHEDULE.alphas_cumprod[t].reshape(3, 1, 1, 1)
    torch.testing.assert_close(noisy, abar.sqrt() * ref + (1 - abar).sqrt() * noise)
    assert not torch.equal(noisy[0], noisy[1])  # fresh noise per sample
    with pytest.raises(UserError, match="reference images for a batch of 3"):
        noise_reference(rand(2, 3, 8, 8), t, SCHEDULE)


def test_one_encoder_pass_per_guidance_call_whatever_the_number_of_terms(clip64):
    calls = []

    def counting_clip(x, t):
        calls.append(bool(x.requires_grad))
        return clip64(x, t)

    counting_clip.image_size = 32
    guide = SemanticGuidance(counting_clip, SCHEDULE, text_embedding=rand(16), reference=rand(1, 3, 32, 32),
                             text_weight=1.0, content_weight=1.0, style_weight=1e-3,
                             generator=torch.Generator().manual_seed(0))
    x, t = rand(2, 3, 32, 32, seed=1), torch.tensor([5, 5])
    guide(x, t)
    guide(x, t)
    assert sorted(calls) == [False, False, True, True]  # per call: one on x_t (with grad), one on the reference


def test_zero_weights_touch_nothing():
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    guide = SemanticGuidance(None, SCHEDULE, generator=gen)  # no CLIP needed when nothing is guided
    x = rand(2, 3, 8, 8)
    assert not guide.active and torch.equal(guide(x, torch.tensor([1, 2])), torch.zeros_like(x))
    assert torch.equal(gen.get_state(), state)


def test_bad_guidance_input_is_one_line_user_error(clip64):
    cases = [
        (dict(clip=None, text_weight=160.0, text_embedding=rand(16)), "no noise-aware CLIP"),
        (dict(clip=clip64, text_weight=1.0), "no text"),
        (dict(clip=clip64, content_weight=1.0), "no reference image"),
        (dict(clip=clip64, style_weight=1.0, reference=rand(1, 3, 32, 32), style_gram="mixed"), "Gram mode"),
    ]
    for kwargs, message in cases:
        clip = kwargs.pop("clip")
        with pytest.raises(UserError, match=message) as err:
            SemanticGuidance(clip, SCHEDULE, **kwargs)
        assert "\n" not in str(err.value)
    wrong_text = SemanticGuidance(clip64, SCHEDULE, text_embedding=rand(64), text_weight=1.0)
    with pytest.raises(UserError, match="64 dimensions but the noise-aware CLIP embeds images in 16"):
        wrong_text(rand(1, 3, 32, 32), torch.tensor([3]))
