"""The relational network r_phi(x0, c): shapes, zero init, what it reads, save/load, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.errors import UserError
from common.tiny import t5_tokenizer, tiny_t5_encoder
from contextdiff.adapter import RelationalNet, load_adapter, tiny_adapter
from contextdiff.config import build_adapter, load_config, parameter_counts
from contextdiff.pipeline import encode_t5


CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "contextdiff"


def _inputs(b: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 77, 32, generator=g)


def test_zero_init_gives_exactly_zero_with_the_latent_shape():
    x0, text = _inputs()
    with torch.no_grad():
        r = tiny_adapter()(x0, text)
    assert r.shape == x0.shape and r.dtype == x0.dtype
    assert not r.any()  # bit-exact zero: the contextualized model starts as the plain one


def test_output_reads_image_position_and_text_and_is_batch_equivariant():
    """Off zero init, r changes with the image alone and the text alone (the released video adapter did not),
    is not the same for every patch, and permuting the batch permutes the output."""
    adapter = tiny_adapter(seed=1, head_std=0.1)
    x0, text = _inputs()
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        r = adapter(x0, text)
        assert (adapter(x0.roll(1, dims=0), text) - r).abs().amax(dim=(1, 2, 3)).min() > 1e-3
        assert (adapter(x0, text.roll(1, dims=0)) - r).abs().amax(dim=(1, 2, 3)).min() > 1e-3
        torch.testing.assert_close(adapter(x0[perm], text[perm]), r[perm], rtol=1e-5, atol=1e-6)
        # a constant latent still gives a spatially varying r: every token knows its position
        flat = adapter(torch.ones(1, 4, 8, 8), text[:1])
    assert flat.std(dim=(2, 3)).min() > 1e-4


def test_clip_and_t5_sources_with_padding_mask():
    """An adapter reading CLIP and T5 tokens: T5 padding is masked (changing what sits in padded slots changes
    nothing), real T5 tokens matter."""
    adapter = tiny_adapter(seed=2, head_std=0.1, text_sources=("clip", "t5"), text_dims=(32, 32))
    x0, clip_states = _inputs(b=2)
    t5_states, mask = encode_t5(tiny_t5_encoder(), t5_tokenizer(), ["a red seven", "a blue handwritten one"], 16)
    assert mask.shape == (2, 16) and mask.any(dim=1).all() and not mask.all()
    with torch.no_grad():
        r = adapter(x0, [clip_states, t5_states], [None, mask])
        noisy_pad = torch.where(mask[..., None], t5_states, torch.randn_like(t5_states))
        torch.testing.assert_close(adapter(x0, [clip_states, noisy_pad], [None, mask]), r, rtol=1e-5, atol=1e-6)
        other = adapter(x0, [clip_states, t5_states.flip(0)], [None, mask.flip(0)])
    assert (other - r).abs().max() > 1e-3
    with pytest.raises(UserError, match="2 text inputs"):
        adapter(x0, clip_states)


def test_save_load_round_trip(tmp_path):
    """save_pretrained writes safetensors + config.json; load_adapter restores identical weights and outputs."""
    adapter = tiny_adapter(seed=3, head_std=0.1)
    adapter.save_pretrained(tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    loaded = load_adapter(tmp_path / "adapter", latent_channels=4, text_dims=[32])
    assert list(loaded.config.text_sources) == ["clip"] and list(loaded.config.text_dims) == [32]
    for (name, a), (_, b) in zip(adapter.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    x0, text = _inputs()
    with torch.no_grad():
        assert torch.equal(adapter(x0, text), loaded(x0, text))


def _assert_one_line(err, *needles):
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_checkpoint_that_does_not_fit_the_model_is_a_one_line_user_error(tmp_path):
    """A checkpoint for other latents (8 channels) or another text encoder (768-d) is refused from its config,
    before any weight loads; so is a folder holding something else, and a missing folder."""
    tiny_adapter(latent_channels=8).save_pretrained(tmp_path / "ch8")
    tiny_adapter(text_dims=(768,)).save_pretrained(tmp_path / "w768")
    with pytest.raises(UserError) as err:
        load_adapter(tmp_path / "ch8", latent_channels=4, text_dims=[32])
    _assert_one_line(err, "8-channel", "4")
    with pytest.raises(UserError) as err:
        load_adapter(tmp_path / "w768", latent_channels=4, text_dims=[32])
    _assert_one_line(err, "768", "32")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(UserError) as err:
        load_adapter(tmp_path / "other")
    _assert_one_line(err, "UNet2DConditionModel")
    with pytest.raises(UserError) as err:
        load_adapter(tmp_path / "missing")
    _assert_one_line(err, "missing")


def test_bad_runtime_inputs_and_configs_are_one_line_user_errors():
    adapter = tiny_adapter()
    x0, text = _inputs()
    cases = [
        (lambda: adapter(torch.randn(3, 3, 8, 8), text), "4"),
        (lambda: adapter(x0, torch.randn(3, 77, 768)), "32"),
        (lambda: adapter(torch.randn(3, 4, 7, 7), text), "patch"),
        (lambda: adapter.check_compatible(latent_channels=16), "16"),
        (lambda: adapter.check_compatible(4, text_dims=[1024]), "1024"),
        (lambda: RelationalNet(text_sources=("clip", "bert"), text_dims=(8, 8)), "bert"),
        (lambda: RelationalNet(text_sources=("clip",), text_dims=(8, 8)), "text_dims"),
    ]
    for call, needle in cases:
        with pytest.raises(UserError) as err:
            call()
        _assert_one_line(err, needle)


def test_configs_build_and_paper_scale_parameter_counts(tmp_path):
    """paper.yaml builds SD-2.1-base scale on the meta device (no memory): the UNet, VAE and OpenCLIP-H text tower
    have their published sizes; the adapter is ~2 % of the UNet. tiny.yaml's adapter is the tiny builder's."""
    paper = parameter_counts(load_config(CONFIGS / "paper.yaml"), device="meta")
    assert paper == {"adapter": 17_348_624, "unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}
    tiny_cfg = load_config(CONFIGS / "tiny.yaml")
    tiny, reference = build_adapter(tiny_cfg), tiny_adapter()
    assert {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in tiny.config.items() if not k.startswith("_")} \
        == {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in reference.config.items() if not k.startswith("_")}
    assert sum(p.numel() for p in tiny.parameters()) == 137_168
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "tiny.yaml").read_text().replace("  text_dims: [32]", "  text_dims: [768]"))
    with pytest.raises(UserError) as err:
        load_config(bad)
    _assert_one_line(err, "hidden_size")


def test_r_bound_soft_clips_r_and_round_trips(tmp_path):
    """``r_bound = b``: r = b tanh(raw / b), elementwise within (-b, b); zero-init stays exactly zero; unset = the
    paper's unbounded r; the bound is saved with the config."""
    x0, text = _inputs()
    with torch.no_grad():
        raw = tiny_adapter(seed=1, head_std=1.0)(x0, text)
        bounded_model = tiny_adapter(seed=1, head_std=1.0, r_bound=0.5)
        bounded = bounded_model(x0, text)
        assert not tiny_adapter(r_bound=0.5)(x0, text).any()
    assert raw.abs().max() > 1.0  # the test would not show the bound otherwise
    assert bounded.abs().max() <= 0.5  # (tanh saturates to exactly 1 in float32 far out)
    assert torch.allclose(bounded, 0.5 * torch.tanh(raw / 0.5), atol=1e-6)
    bounded_model.save_pretrained(tmp_path / "a", safe_serialization=True)
    reloaded = load_adapter(tmp_path / "a")
    assert reloaded.config.r_bound == 0.5
    with torch.no_grad():
        assert torch.equal(reloaded(x0, text), bounded)
    with pytest.raises(UserError, match="r_bound must be > 0"):
        tiny_adapter(r_bound=0.0)
