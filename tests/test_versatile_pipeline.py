"""Versatile Diffusion flows end to end on tiny random weights, the sampler settings, and training pieces."""

from __future__ import annotations

import pytest
import torch

from common.errors import UserError
from versatile.multiflow import FLOWS
from versatile.pipeline import vd_plan, vd_schedule
from versatile.tiny import tiny_diffuser, tiny_pipeline
from versatile.training import FlowSampler, check_multipliers, drop_context, flow_loss, multiflow_loss, param_groups


STEPS = 2


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=0, zero_init=False)


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ flows


@pytest.mark.parametrize("flow", ["t2i", "iv", "dual"])
def test_image_flows_return_images(pipe, images, flow):
    kwargs = {"prompt": ["a red seven", "a blue one"] if flow != "iv" else None,
              "image": images if flow != "t2i" else None}
    out = pipe(flow, num_inference_steps=STEPS, generator=gen(), **kwargs)
    assert out.texts is None and out.images.shape == (2, 3, 32, 32)
    assert float(out.images.min()) >= 0 and float(out.images.max()) <= 1
    assert out.latents.shape == (2, 4, 8, 8)
    again = pipe(flow, num_inference_steps=STEPS, generator=gen(), **kwargs)
    assert torch.equal(out.images, again.images)  # eta = 0 and a fixed generator: deterministic


@pytest.mark.parametrize("flow", ["i2t", "tv"])
def test_text_flows_decode_through_the_text_vae(pipe, images, flow):
    kwargs = {"image": images} if flow == "i2t" else {"prompt": ["a red seven", "a blue one"]}
    out = pipe(flow, num_inference_steps=STEPS, generator=gen(), text_temperature=0, merge_duplicates=False, **kwargs)
    assert out.images is None and out.latents.shape == (2, pipe.diffuser.config.text_latent_dim)
    assert isinstance(out.texts, list) and len(out.texts) == 2 and all(isinstance(t, str) for t in out.texts)
    assert out.texts == pipe.text_vae.decode(out.latents, temperature=0)  # the sampled latent, decoded by Optimus


def test_num_samples_and_broadcast(pipe, images):
    out = pipe("dual", prompt="a red seven", image=images, num_inference_steps=STEPS, generator=gen())
    assert out.images.shape[0] == 2  # one prompt broadcast over two images
    out = pipe("t2i", prompt="a red seven", num_samples=3, num_inference_steps=STEPS, generator=gen())
    assert out.images.shape[0] == 3 and not torch.equal(out.images[0], out.images[1])


def test_dual_pipeline_limits_equal_single_flows(pipe, images):
    prompt = ["a red seven", "a blue one"]
    kw = dict(num_inference_steps=STEPS, generator=None)
    x_T = torch.randn(2, 4, 8, 8, generator=gen(3))
    t2i = pipe("t2i", prompt=prompt, latents=x_T, **kw)
    iv = pipe("iv", image=images, latents=x_T, **kw)
    # the uncond image of dual and iv is the same default (zeros), and the text uncond is CLIP("") in both
    assert torch.equal(pipe("dual", prompt=prompt, image=images, text_ratio=1.0, latents=x_T, **kw).latents, t2i.latents)
    assert torch.equal(pipe("dual", prompt=prompt, image=images, text_ratio=0.0, latents=x_T, **kw).latents, iv.latents)


def test_guidance_scale_one_skips_the_unconditional_branch(pipe):
    calls = []
    handle = pipe.diffuser.global_layers.register_forward_hook(lambda m, a, o: calls.append(o.shape[0]))
    try:
        pipe("tv", prompt=["a red seven"], guidance_scale=1.0, num_inference_steps=STEPS, generator=gen())
        pipe("tv", prompt=["a red seven"], guidance_scale=7.5, num_inference_steps=STEPS, generator=gen())
    finally:
        handle.remove()
    assert calls == [1] * STEPS + [2] * STEPS  # CFG doubles the batch as [uncond; cond]


def test_unconditional_image_defaults_per_flow(pipe, images):
    kw = dict(image=images[:1], num_inference_steps=STEPS, latents=torch.randn(1, 16, generator=gen(4)))
    default = pipe("i2t", **kw).latents
    assert torch.equal(default, pipe("i2t", uncond_image="black", **kw).latents)  # [R] app.py: CLIP(black) for I2T
    assert not torch.allclose(default, pipe("i2t", uncond_image="zeros", **kw).latents)
    kw["latents"] = torch.randn(1, 4, 8, 8, generator=gen(4))
    assert torch.equal(pipe("iv", **kw).latents, pipe("iv", uncond_image="zeros", **kw).latents)  # zeros for IV


def test_vd_sampler_settings():
    plan = vd_plan(50)
    assert plan.timesteps == tuple(range(981, 0, -20))  # range(0, 1000, 20) + 1, descending
    schedule = vd_schedule()
    assert plan.final_alpha_cumprod == pytest.approx(float(schedule.alphas_cumprod[0]))  # not 1
    ldm = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # LDM "linear" betas
    torch.testing.assert_close(schedule.betas, ldm, rtol=1e-6, atol=1e-9)


def test_pipeline_bad_inputs(pipe, images):
    def one_line(fn, match):
        with pytest.raises(UserError, match=match) as err:
            fn()
        assert "\n" not in str(err.value)

    one_line(lambda: pipe("sketch", prompt="x"), "unknown flow")
    one_line(lambda: pipe("t2i", prompt="x", image=images), "takes no image input")
    one_line(lambda: pipe("tv", prompt="x", image=images), "takes no image input")
    one_line(lambda: pipe("iv", prompt="x", image=images), "takes no text input")
    one_line(lambda: pipe("i2t"), "needs an image")
    one_line(lambda: pipe("dual", prompt="x", image=images, text_ratio=1.5), r"outside \[0, 1\]")
    one_line(lambda: pipe("t2i", prompt="x", text_ratio=0.5), "only applies to the dual")
    one_line(lambda: pipe("t2i", prompt="x", height=36), "multiple of 8")
    one_line(lambda: pipe("dual", prompt=["a", "b", "c"], image=images), "3 prompts and 2 images")
    one_line(lambda: pipe("iv", image=images, uncond_image="white"), "zeros, grey, black")


# ------------------------------------------------------------------------------------------------ training


def tiny_batches(model, n: int = 2):
    cfg, g = model.config, gen(5)
    text = torch.randn(n, 7, cfg.context_dim, generator=g)
    image = torch.randn(n, 17, cfg.context_dim, generator=g)
    img_x0 = torch.randn(n, 4, 8, 8, generator=g)
    txt_x0 = torch.randn(n, cfg.text_latent_dim, generator=g)
    t = torch.tensor([5, 800])
    return {
        "t2i": {"x0": img_x0, "text": text, "t": t},
        "iv": {"x0": img_x0, "image": image, "t": t},
        "i2t": {"x0": txt_x0, "image": image, "t": t},
        "tv": {"x0": txt_x0, "text": text, "t": t},
    }


def test_flow_losses_and_algorithm_1_accumulation():
    model = tiny_diffuser(seed=4, zero_init=False).train()
    batches = tiny_batches(model)
    singles = {}
    for flow, batch in batches.items():
        model.zero_grad(set_to_none=True)
        loss = flow_loss(model, {**batch, "noise": torch.ones_like(batch["x0"])}, flow)
        assert torch.isfinite(loss) and loss.ndim == 0
        loss.backward()
        singles[flow] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    total, logs = multiflow_loss(model, {f: {**b, "noise": torch.ones_like(b["x0"])} for f, b in batches.items()})
    total.backward()
    assert set(logs) == {f"loss_{f}" for f in batches}
    for name, p in model.named_parameters():
        expected = sum(s[name] for s in singles.values() if name in s)
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6)  # every flow touches the global layers


def test_param_groups_carry_lr_multipliers_into_the_optimizer():
    model = tiny_diffuser(seed=0)
    groups = param_groups(model, 1e-4, {"data_image": 0.2, "global": 0.1, "ctx_text": 0.0})
    optimizer = torch.optim.AdamW(groups)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == pytest.approx({"global": 1e-5, "data_image": 2e-5, "data_text": 1e-4, "ctx_image": 1e-4})
    frozen = {id(p) for p in model.context["text"].parameters()}
    assert not frozen & {id(p) for g in optimizer.param_groups for p in g["params"]}  # multiplier 0 = not optimised
    with pytest.raises(UserError, match="unknown parameter group"):
        check_multipliers({"data_audio": 1.0})
    with pytest.raises(UserError, match=">= 0"):
        param_groups(model, 1e-4, {"global": -1})


def test_drop_context_replaces_exactly_the_sampled_rows():
    tokens = torch.randn(64, 3, 4)
    null = torch.zeros(1, 3, 4)
    out, dropped = drop_context(tokens, null, 0.3, gen(11))
    expected = torch.rand(64, generator=gen(11)) < 0.3
    assert torch.equal(dropped, expected) and 0 < int(dropped.sum()) < 64
    assert torch.count_nonzero(out[dropped]) == 0 and torch.equal(out[~dropped], tokens[~dropped])
    with pytest.raises(UserError, match="null_contexts"):
        model = tiny_diffuser(seed=0)
        flow_loss(model, tiny_batches(model)["t2i"], "t2i", cond_drop=0.1)


def test_flow_sampler():
    assert FlowSampler(["t2i", "i2i", "i2t", "t2t"])(7) == ("t2i", "iv", "i2t", "tv")
    one = FlowSampler(list(FLOWS)[:4], mode="one", weights=[1, 0, 1, 0], seed=3)
    draws = [one(step) for step in range(40)]
    assert draws == [one(step) for step in range(40)]  # a pure function of (seed, step): exact resume
    assert {d[0] for d in draws} == {"t2i", "i2t"}
    with pytest.raises(UserError):
        FlowSampler(["t2i"], mode="sometimes")
