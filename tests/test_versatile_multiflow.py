"""Versatile Diffusion's multi-flow diffuser: layer sharing, routing, gradients, mixing, sizes."""

from __future__ import annotations

import functools

import pytest
import torch

from common.denoisers import CFGDenoiser
from common.errors import UserError
from versatile.config import DiffuserConfig, VersatileConfig
from versatile.multiflow import (
    FLOWS,
    GROUPS,
    Context,
    build_diffuser,
    count_parameters,
    flow_parameter_count,
    layer_plan,
    resolve_flow,
)
from versatile.tiny import tiny_config, tiny_diffuser


B = 2
TEXT_TOKENS, IMAGE_TOKENS = 7, 17  # tiny stand-ins for CLIP's 77 text / 257 image tokens


@pytest.fixture(scope="module")
def model():
    return tiny_diffuser(seed=0, zero_init=False)  # random everywhere: zero-init would make many checks vacuous


@pytest.fixture(scope="module")
def inputs(model):
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(B, cfg.image_latent_channels, 8, 8, generator=g),
        "text_latent": torch.randn(B, cfg.text_latent_dim, generator=g),
        "text": torch.randn(B, TEXT_TOKENS, cfg.context_dim, generator=g),
        "image_ctx": torch.randn(B, IMAGE_TOKENS, cfg.context_dim, generator=g),
        "t": torch.tensor([17, 901]),
    }


def run_flow(model, inputs, flow, text_ratio=None):
    flow = resolve_flow(flow)
    x = inputs["image"] if flow.xtype == "image" else inputs["text_latent"]
    kwargs = {"text": inputs["text"] if "text" in flow.ctypes else None,
              "image": inputs["image_ctx"] if "image" in flow.ctypes else None}
    if flow.name == "dual":
        kwargs["text_ratio"] = 0.3 if text_ratio is None else text_ratio
    return model.apply_flow(x, inputs["t"], flow.name, **kwargs)


def group_of_module(model):
    """id(module) -> group name, for every submodule of every group."""
    owner = {}
    for group, root in model.group_modules().items():
        for module in root.modules():
            owner[id(module)] = group
    return owner


# ------------------------------------------------------------------------------------------------ structure


def test_layer_sequence_counts_full_and_tiny():
    full = "".join(s.op for s in layer_plan(DiffuserConfig()))
    assert (full.count("d"), full.count("c"), full.count("S"), full.count("L")) == (30, 16, 12, 12)
    tiny = "".join(s.op for s in layer_plan(tiny_config().diffuser))
    # stem + 1 res + down + 1 res | res res | 2 x (res) + up + 2 x (res) + head; attention at level 0 and the middle
    assert (tiny.count("d"), tiny.count("c"), tiny.count("S"), tiny.count("L")) == (12, 4, 4, 4)


def test_data_and_context_sets_follow_one_sequence(model):
    plan = model.plan
    data_roles = [s.role for s in plan if s.op == "d"]
    for xtype, layers in model.data.items():
        assert len(layers.layers) == model.sequence.count("d")
        assert [type(m).__name__ for m in layers.layers][0] in ("Conv2d", "LinearMultiDim"), xtype
    assert data_roles[0] == "stem" and data_roles[-1] == "head"
    widths = [s.cin for s in plan if s.op == "c"]
    for ctype, layers in model.context.items():
        assert [layer.config.in_channels for layer in layers.layers] == widths, ctype


def test_full_size_parameter_counts_on_meta_match_spec():
    config = VersatileConfig.load("paper").diffuser
    assert config == DiffuserConfig()  # paper.yaml is the released four-flow model
    model = build_diffuser(config, device="meta")
    assert next(model.parameters()).is_meta
    counts = count_parameters(model)
    assert counts == {
        "global": 2_050_560,
        "data_image": 590_231_044,
        "data_text": 1_439_558_528,
        "ctx_image": 267_239_360,
        "ctx_text": 267_239_360,
        "total": 2_566_318_852,
    }
    assert flow_parameter_count(model, "t2i") == flow_parameter_count(model, "iv") == 859_520_964  # = SD v1 UNet
    assert flow_parameter_count(model, "i2t") == flow_parameter_count(model, "tv") == 1_708_848_448
    # one transformer = 20 C^2 + 1557 C at C = 320 / 640 / 1280 (5 / 5 / 6 of them)
    assert counts["ctx_text"] == sum(n * (20 * c * c + 1557 * c) for n, c in ((5, 320), (5, 640), (6, 1280)))


def test_groups_partition_the_parameters_once(model):
    groups = model.parameter_groups()
    ids = [id(p) for params in groups.values() for p in params]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert set(groups) == set(GROUPS)


# ------------------------------------------------------------------------------------------------ routing


def called_modules(model, fn):
    """Run ``fn`` with a forward hook on every submodule; return the list of (group, module id) called."""
    owner = group_of_module(model)
    calls, handles = [], []
    for module in model.modules():
        if id(module) in owner:
            handles.append(module.register_forward_hook(
                lambda m, args, out: calls.append((owner[id(m)], id(m)))))
    try:
        fn()
    finally:
        for handle in handles:
            handle.remove()
    return calls


@pytest.mark.parametrize("flow", list(FLOWS))
def test_flow_runs_only_its_layers(model, inputs, flow):
    spec = FLOWS[flow]
    with torch.no_grad():
        calls = called_modules(model, lambda: run_flow(model, inputs, flow))
    assert {group for group, _ in calls} == set(spec.groups)
    # every active data / context layer runs exactly once per forward (no extra pass, no layer skipped) ...
    top = {id(m) for g in spec.groups for m in getattr(model.group_modules()[g], "layers", [])}
    counts = {}
    for _, module_id in calls:
        if module_id in top:
            counts[module_id] = counts.get(module_id, 0) + 1
    assert set(counts) == top and set(counts.values()) == {1}
    # ... and the global layers are the same module object in every flow.
    assert any(module_id == id(model.global_layers) for _, module_id in calls)


def test_global_layers_are_one_object_for_all_flows(model, inputs):
    from diffusers.models.embeddings import TimestepEmbedding

    per_flow = []
    for flow in FLOWS:
        with torch.no_grad():
            calls = called_modules(model, lambda flow=flow: run_flow(model, inputs, flow))
        per_flow.append({module_id for group, module_id in calls if group == "global"})
    assert all(ids == per_flow[0] for ids in per_flow)
    assert {id(model.global_layers), id(model.global_layers.time_embedding)} <= per_flow[0]
    assert sum(isinstance(m, TimestepEmbedding) for m in model.modules()) == 1  # one copy, not one per data type


@pytest.mark.parametrize("flow", list(FLOWS))
def test_backward_reaches_only_the_flow_groups(inputs, flow):
    model = tiny_diffuser(seed=1, zero_init=False).train()
    run_flow(model, inputs, flow).square().mean().backward()
    for group, params in model.parameter_groups().items():
        grads = [p.grad for p in params]
        if group in FLOWS[flow].groups:
            assert all(g is not None for g in grads), group
            assert any(bool(g.abs().sum() > 0) for g in grads), group
        else:
            assert all(g is None for g in grads), f"{flow} leaked gradient into {group}"


def test_shapes_and_text_hidden_state(model, inputs):
    with torch.no_grad():
        assert run_flow(model, inputs, "t2i").shape == inputs["image"].shape
        assert run_flow(model, inputs, "iv").shape == inputs["image"].shape
        assert run_flow(model, inputs, "dual").shape == inputs["image"].shape
        seen = []
        handle = model.context["text"].layers[0].register_forward_pre_hook(
            lambda m, args, kwargs: seen.append(tuple(args[0].shape)), with_kwargs=True)
        try:
            assert run_flow(model, inputs, "tv").shape == inputs["text_latent"].shape
        finally:
            handle.remove()
    assert seen == [(B, model.config.model_channels, model.config.second_dim, 1)]  # [B, C, 4, 1]: 4 pseudo-tokens


def test_zero_init_model_outputs_exactly_zero(inputs):
    model = tiny_diffuser(seed=0)  # zero_init=True as in [R]: ResBlock out layers, heads and proj_out start at 0
    with torch.no_grad():
        for flow in FLOWS:
            assert torch.count_nonzero(run_flow(model, inputs, flow)) == 0, flow


# ------------------------------------------------------------------------------------------------ dual guidance


def test_dual_at_ratio_one_and_zero_is_exactly_the_pure_flow(model, inputs):
    with torch.no_grad():
        assert torch.equal(run_flow(model, inputs, "dual", text_ratio=1.0), run_flow(model, inputs, "t2i"))
        assert torch.equal(run_flow(model, inputs, "dual", text_ratio=0.0), run_flow(model, inputs, "iv"))
        mid = run_flow(model, inputs, "dual", text_ratio=0.5)
    assert not torch.allclose(mid, run_flow(model, inputs, "t2i"))


def test_mixing_weights_are_normalised_and_linear_per_slot(model, inputs):
    x, t = inputs["image"], inputs["t"]
    c_t, c_i = inputs["text"], inputs["image_ctx"]
    with torch.no_grad():
        a = model(x, t, [Context("text", c_t, 2.0), Context("image", c_i, 2.0)], "image")
        b = model(x, t, [Context("text", c_t, 0.5), Context("image", c_i, 0.5)], "image")
        assert torch.equal(a, b)
        h = torch.randn(B, model.config.model_channels, 8, 8)
        r = 0.3
        mixed = model.context_slot(0, h, [Context("text", c_t, r), Context("image", c_i, 1 - r)])
        t_text = model.context["text"].layers[0](h, encoder_hidden_states=c_t, return_dict=False)[0]
        t_image = model.context["image"].layers[0](h, encoder_hidden_states=c_i, return_dict=False)[0]
    torch.testing.assert_close(mixed, h + r * (t_text - h) + (1 - r) * (t_image - h), rtol=0, atol=1e-6)


def test_dual_through_cfg_matches_pure_flows_at_the_limits(model, inputs):
    x, t = inputs["image"], inputs["t"]
    u_text, u_image = torch.zeros_like(inputs["text"]), torch.zeros_like(inputs["image_ctx"])
    cond = {"text": inputs["text"], "image": inputs["image_ctx"]}
    uncond = {"text": u_text, "image": u_image}

    def cfg(flow, keys, ratio=None):
        fn = functools.partial(model.apply_flow, flow=flow, text_ratio=ratio)
        return CFGDenoiser(fn, {k: cond[k] for k in keys}, {k: uncond[k] for k in keys}, 7.5)(x, t)

    with torch.no_grad():
        assert torch.equal(cfg("dual", ("text", "image"), 1.0), cfg("t2i", ("text",)))
        assert torch.equal(cfg("dual", ("text", "image"), 0.0), cfg("iv", ("image",)))
        # scale 1 is the conditional prediction itself
        one = CFGDenoiser(functools.partial(model.apply_flow, flow="t2i"), {"text": cond["text"]},
                          {"text": u_text}, 1.0)(x, t)
        assert torch.equal(one, model.apply_flow(x, t, "t2i", text=cond["text"]))


def test_gradient_checkpointing_changes_nothing(inputs):
    plain = tiny_diffuser(seed=2, zero_init=False).train()
    ckpt = tiny_diffuser(seed=2, zero_init=False).train()
    ckpt.enable_gradient_checkpointing()
    for m in (plain, ckpt):
        run_flow(m, inputs, "dual").square().mean().backward()
    torch.testing.assert_close(run_flow(plain, inputs, "i2t"), run_flow(ckpt, inputs, "i2t"))
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ bad input


def one_line_error(fn) -> str:
    with pytest.raises(UserError) as err:
        fn()
    message = str(err.value)
    assert "\n" not in message and message
    return message


def test_bad_inputs_are_one_line_user_errors(model, inputs):
    x, t, c_t, c_i = inputs["image"], inputs["t"], inputs["text"], inputs["image_ctx"]
    assert "unknown flow" in one_line_error(lambda: model.apply_flow(x, t, "sketch-to-image", text=c_t))
    assert "takes no image" in one_line_error(lambda: model.apply_flow(x, t, "t2i", text=c_t, image=c_i))
    assert "takes no image" in one_line_error(
        lambda: model.apply_flow(inputs["text_latent"], t, "tv", text=c_t, image=c_i))
    assert "needs a text" in one_line_error(lambda: model.apply_flow(x, t, "t2i"))
    for ratio in (-0.1, 1.5, float("nan")):
        assert "outside [0, 1]" in one_line_error(
            lambda ratio=ratio: model.apply_flow(x, t, "dual", text=c_t, image=c_i, text_ratio=ratio))
    assert "only applies to the dual" in one_line_error(lambda: model.apply_flow(x, t, "t2i", text=c_t, text_ratio=0.5))
    assert "text latents" in one_line_error(lambda: model.apply_flow(x, t, "tv", text=c_t))  # image latent, text flow
    assert "image latents" in one_line_error(lambda: model.apply_flow(inputs["text_latent"], t, "iv", image=c_i))
    assert "context must be" in one_line_error(lambda: model.apply_flow(x, t, "t2i", text=c_t[..., :5]))
    assert ">= 0" in one_line_error(lambda: model(x, t, [Context("text", c_t, -1.0)], "image"))
    assert "sum to 0" in one_line_error(lambda: model(x, t, [Context("text", c_t, 0.0)], "image"))
    with pytest.raises(UserError):
        DiffuserConfig(channel_mult=(1, 2), attention_levels=(True,)).validate()
