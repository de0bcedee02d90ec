"""Collaborative Diffusion: influence maps, the collaborative eps, batching, re-weighting, CFG and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from codiff.batching import call_unet
from codiff.collaborate import CollaborativeDenoiser, CollaborativeDiffusion, ReleasedReweighting
from codiff.dynamic import combine, influence_maps
from codiff.tiny import tiny_collaboration, tiny_diffuser
from common.denoisers import CFGDenoiser
from common.errors import UserError
from common.samplers import sample_ddim
from common.schedule import NoiseSchedule, make_plan


B = 2


def _inputs(seed: int = 0, lengths=(("mask", 2), ("text", 77), ("sketch", 5))):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, 8, 8, generator=g)
    t = torch.tensor([17, 803])
    conds = {name: torch.randn(B, n, 32, generator=g) for name, n in lengths}
    return x, t, conds


@pytest.fixture(scope="module")
def random_pair() -> CollaborativeDiffusion:
    """Two modalities whose diffusers give non-uniform maps."""
    return tiny_collaboration(("mask", "text"), seed=3, zero_init=False, logit_scale=0.5)


def test_one_modality_has_influence_one_and_returns_that_models_eps():
    model = tiny_collaboration(("text",), seed=1, zero_init=False, logit_scale=2.0)
    x, t, conds = _inputs()
    out = model.predict(x, t, {"text": conds["text"]})
    assert torch.equal(out.influence, torch.ones_like(out.influence))
    assert out.logits.abs().max() > 0.1  # the maps are one although the diffuser is far from zero
    assert torch.equal(out.eps, call_unet(model.unets["text"], x, t, conds["text"]))


@pytest.mark.parametrize("modalities", [("mask", "text"), ("mask", "text", "sketch")])
def test_influence_maps_are_a_partition_of_unity(modalities):
    model = tiny_collaboration(modalities, seed=5, zero_init=False, logit_scale=1.0)
    x, t, conds = _inputs()
    out = model.predict(x, t, {n: conds[n] for n in modalities})
    assert out.influence.shape == (B, len(modalities), 8, 8)
    assert (out.influence >= 0).all() and (out.influence <= 1).all()
    torch.testing.assert_close(out.influence.sum(1), torch.ones(B, 8, 8), atol=1e-6, rtol=0)
    assert out.influence.std() > 0.05  # genuinely spatially varying, not the uniform 1/M
    # The eps is the influence-weighted sum of the members, which differ from each other.
    manual = sum(out.influence[:, m : m + 1] * out.member_eps[m] for m in range(len(modalities)))
    torch.testing.assert_close(out.eps, manual, atol=1e-6, rtol=0)
    assert not torch.allclose(out.member_eps[0], out.member_eps[1])


def test_zero_initialised_diffusers_give_the_plain_average():
    model = tiny_collaboration(("mask", "text", "sketch"), seed=7)
    x, t, conds = _inputs()
    out = model.predict(x, t, conds)
    assert torch.equal(out.logits, torch.zeros_like(out.logits))
    torch.testing.assert_close(out.influence, torch.full_like(out.influence, 1 / 3))
    members = [call_unet(model.unets[n], x, t, conds[n]) for n in ("mask", "text", "sketch")]
    torch.testing.assert_close(out.eps, sum(members) / 3, atol=1e-6, rtol=0)


def test_identical_experts_give_that_expert_for_any_maps():
    shared = tiny_collaboration(("a",), seed=11).unets["a"]
    model = CollaborativeDiffusion(
        {"a": shared, "b": shared}, {"a": tiny_diffuser(1, False, 1.0), "b": tiny_diffuser(2, False, 1.0)}
    )
    x, t, conds = _inputs(lengths=(("a", 4), ("b", 4)))
    conds["b"] = conds["a"]
    out = model.predict(x, t, conds)
    assert out.influence.std() > 0.05
    torch.testing.assert_close(out.eps, call_unet(shared, x, t, conds["a"]), atol=1e-5, rtol=0)


def test_batched_step_equals_unbatched_and_uses_fewer_forwards():
    """One UNet shared by two modalities plus CFG branches: 4 UNet forwards unbatched, 1 batched."""
    shared = tiny_collaboration(("a",), seed=13).unets["a"]
    diffusers = {"a": tiny_diffuser(3, False, 0.7), "b": tiny_diffuser(4, False, 0.7)}
    x, t, conds = _inputs(lengths=(("a", 6), ("b", 6)))
    null = {"a": torch.zeros(1, 6, 32), "b": torch.zeros(1, 6, 32)}
    scales = {"a": 3.0, "b": 1.5}
    results, calls = [], []
    for batched in (False, True):
        model = CollaborativeDiffusion({"a": shared, "b": shared}, diffusers, batch_members=batched)
        count = []
        handle = shared.register_forward_hook(lambda *_, count=count: count.append(1))
        results.append(model.predict(x, t, conds, uncond=null, guidance_scales=scales))
        handle.remove()
        calls.append(len(count))
    assert calls == [4, 1]
    torch.testing.assert_close(results[1].eps, results[0].eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[1].influence, results[0].influence, atol=1e-6, rtol=0)


def test_per_modality_cfg_matches_the_formula(random_pair):
    x, t, conds = _inputs()
    conds = {n: conds[n] for n in ("mask", "text")}
    null = {"text": torch.zeros(1, 77, 32)}
    out = random_pair.predict(x, t, conds, uncond=null, guidance_scales={"text": 4.0})
    e_u = call_unet(random_pair.unets["text"], x, t, null["text"].expand(B, -1, -1))
    e_c = call_unet(random_pair.unets["text"], x, t, conds["text"])
    torch.testing.assert_close(out.member_eps[1], e_u + 4.0 * (e_c - e_u), atol=1e-5, rtol=1e-5)
    # The mask branch is unguided and the maps depend on the conditional tokens only.
    plain = random_pair.predict(x, t, conds)
    torch.testing.assert_close(out.member_eps[0], plain.member_eps[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.influence, plain.influence)


def test_core_cfg_wrapper_composes_with_the_collaboration(random_pair):
    x, t, conds = _inputs()
    conds = {n: conds[n] for n in ("mask", "text")}
    null = {n: torch.zeros_like(c) for n, c in conds.items()}
    cfg = CFGDenoiser(random_pair, conds, null, scale=2.5)
    e_c = random_pair.predict(x, t, conds).eps
    e_u = random_pair.predict(x, t, null).eps
    torch.testing.assert_close(cfg(x, t), e_u + 2.5 * (e_c - e_u), atol=1e-5, rtol=1e-5)
    schedule = NoiseSchedule.named("scaled_linear", 1000, 0.0015, 0.0195)
    x_T = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sample = sample_ddim(cfg, schedule, make_plan(schedule, 3), x_T=x_T, progress=False)
    assert sample.shape == x_T.shape and torch.isfinite(sample).all()


def test_denoiser_runs_on_core_ddim_and_keeps_the_last_maps(random_pair):
    _, _, conds = _inputs()
    denoiser = CollaborativeDenoiser(random_pair, {n: conds[n][:1] for n in ("mask", "text")})
    assert denoiser.prediction_type == "eps" and denoiser.learned_variance is False
    schedule = NoiseSchedule.named("scaled_linear", 1000, 0.0015, 0.0195)
    seen = []
    sample_ddim(denoiser, schedule, make_plan(schedule, 4), shape=(B, 4, 8, 8), progress=False,
                generator=torch.Generator().manual_seed(0), callback=lambda i, t, x, x0: seen.append(denoiser.last))
    assert len(seen) == 4 and all(s.influence.shape == (B, 2, 8, 8) for s in seen)
    assert not torch.equal(seen[0].influence, seen[-1].influence)  # the maps vary over time


# ------------------------------------------------------------------------------------- released re-weighting


def test_released_schedule_values_and_closed_form():
    rw = ReleasedReweighting.released()
    s = rw.schedule_scale(torch.tensor([981, 500, 1]))
    assert s[0] > 0.998 and s[1].item() == pytest.approx(0.5, abs=1e-12) and s[2] < 1e-4
    g = torch.Generator().manual_seed(0)
    maps = influence_maps(torch.randn(3, 2, 4, 4, generator=g))
    t = torch.tensor([981, 500, 101])  # per-sample t, not t[0]
    out = rw(maps, t, ("mask", "text"))
    sm = rw.schedule_scale(t).view(-1, 1, 1).float() * maps[:, 0]
    torch.testing.assert_close(out[:, 0], 2 * sm / (1 + sm))
    torch.testing.assert_close(out[:, 1], (1 - sm) / (1 + sm))
    torch.testing.assert_close(out.sum(1), torch.ones(3, 4, 4))


def test_reweighting_identity_cases_and_three_modalities():
    g = torch.Generator().manual_seed(1)
    maps = influence_maps(torch.randn(2, 3, 4, 4, generator=g))
    t = torch.tensor([700, 300])
    assert torch.equal(ReleasedReweighting(("mask",), 1.0, "none")(maps, t, ("mask", "text", "sketch")), maps)
    one = torch.ones(2, 1, 4, 4)
    assert torch.equal(ReleasedReweighting.released()(one, t, ("mask",)), one)
    # The release with a sketch branch: mask and sketch both scaled, text takes the rest (compose_modules.py).
    rw = ReleasedReweighting(("mask", "sketch"), 2.0, "linear_decay")
    out = rw(maps, t, ("mask", "text", "sketch"))
    s = (t.float() / 1000).view(-1, 1, 1)
    m, sk = maps[:, 0] * s, maps[:, 2] * s
    text = 1 - m - sk
    total = 2 * m + 2 * sk + text
    torch.testing.assert_close(out, torch.stack([2 * m / total, text / total, 2 * sk / total], 1))
    with pytest.raises(UserError, match="mask schedule"):
        ReleasedReweighting(schedule="cosine")


def test_reweighting_is_applied_by_the_denoiser_only(random_pair):
    x, t, conds = _inputs()
    conds = {n: conds[n] for n in ("mask", "text")}
    rw = ReleasedReweighting.released()
    den = CollaborativeDenoiser(random_pair, conds, reweighting=rw)
    eps = den(x, t)
    plain = random_pair.predict(x, t, conds)
    expected = rw(plain.influence, t, ("mask", "text"))
    torch.testing.assert_close(den.last.influence, expected)
    torch.testing.assert_close(eps, combine(plain.member_eps, expected), atol=1e-6, rtol=0)
    assert not torch.allclose(eps, plain.eps)


def test_influence_softmax_is_stable_in_half_precision():
    logits = torch.tensor([[[[30.0]], [[30.001]]]], dtype=torch.float16)
    maps = influence_maps(logits)
    assert maps.dtype == torch.float16 and math.isclose(float(maps.float().sum()), 1.0, abs_tol=1e-3)


# -------------------------------------------------------------------------------------------------- bad input


def test_condition_without_its_model_is_a_clear_error(random_pair):
    x, t, conds = _inputs()
    with pytest.raises(UserError, match="'sketch' condition was given but no 'sketch' uni-modal model"):
        random_pair.predict(x, t, conds)
    with pytest.raises(UserError, match="no 'text' condition"):
        random_pair.predict(x, t, {"mask": conds["mask"]})
    with pytest.raises(UserError, match="no dynamic diffuser for modality 'text'"):
        CollaborativeDiffusion(dict(random_pair.unets), {"mask": random_pair.diffusers["mask"]})
    with pytest.raises(UserError, match="batch 3"):
        random_pair.predict(x, t, {"mask": conds["mask"], "text": conds["text"].repeat(2, 1, 1)[:3]})
    with pytest.raises(UserError, match="needs its unconditional tokens"):
        CollaborativeDenoiser(random_pair, conds, guidance_scales={"text": 3.0})


def test_gradient_guidance_composes_and_reaches_x_t_through_the_frozen_members():
    """SDG-style guidance on a collaboration: the hook's gradient shifts the DDIM eps; d eps / d x_t exists."""
    from common.guidance import energy_guidance

    model = tiny_collaboration(("mask", "text"), seed=9)
    x, t, conds = _inputs()
    conds = {n: conds[n] for n in ("mask", "text")}
    x = x.requires_grad_(True)
    (grad,) = torch.autograd.grad(model.predict(x, t, conds).eps.square().sum(), x)
    assert grad.abs().sum() > 0  # zero-init diffusers: this gradient flows through the frozen uni-modal models
    schedule = NoiseSchedule.named("scaled_linear", 1000, 0.0015, 0.0195)
    denoiser = CollaborativeDenoiser(model, conds)
    x_T = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = sample_ddim(denoiser, schedule, make_plan(schedule, 3), x_T=x_T, progress=False)
    runs = [
        sample_ddim(denoiser, schedule, make_plan(schedule, 3), x_T=x_T, progress=False,
                    guidance=energy_guidance([(w, lambda z, _t: -z.square().flatten(1).sum(1))]))
        for w in (0.0, 0.05)
    ]
    assert torch.equal(runs[0], plain)  # a zero-weight hook is the unguided sampler bit for bit
    assert torch.isfinite(runs[1]).all() and not torch.allclose(runs[1], plain)
