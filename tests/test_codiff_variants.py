"""Fixed-weight comparisons (one member alone, the equal-weight average), member/checkpoint files, evaluation helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from codiff.collaborate import CollaborativeDenoiser, InfluenceRecorder
from codiff.tiny import tiny_collaboration
from codiff.variants import FixedWeightDenoiser, variant_weights
from common.errors import UserError


@pytest.fixture(scope="module")
def setup():
    model = tiny_collaboration(("mask", "text"), seed=5, zero_init=False, logit_scale=0.6)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([900, 500, 20])
    conds = {"mask": torch.randn(3, 2, 32, generator=g), "text": torch.randn(3, 77, 32, generator=g)}
    nulls = {"mask": torch.randn(1, 2, 32, generator=g), "text": torch.randn(1, 77, 32, generator=g)}
    return model, x, t, conds, nulls


def _unet(model, name, x, t, c):
    return model.unets[name](x, t, encoder_hidden_states=c).sample


def test_one_member_alone_is_that_member_and_runs_only_it(setup):
    model, x, t, conds, _ = setup
    calls = []
    hook = model.unets["mask"].register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            eps = FixedWeightDenoiser(model, conds, {"text": 1.0})(x, t)
    finally:
        hook.remove()
    assert not calls
    torch.testing.assert_close(eps, _unet(model, "text", x, t, conds["text"]).detach(), rtol=0, atol=1e-6)


def test_the_average_is_the_zero_init_collaboration(setup):
    model, x, t, conds, _ = setup
    fresh = tiny_collaboration(("mask", "text"), seed=5, zero_init=True)  # same members, zero-init diffusers
    with torch.no_grad():
        average = FixedWeightDenoiser(model, conds, {"mask": 1, "text": 1})(x, t)
        collaborative = CollaborativeDenoiser(fresh, conds)(x, t)
        manual = 0.5 * _unet(model, "mask", x, t, conds["mask"]) + 0.5 * _unet(model, "text", x, t, conds["text"])
    torch.testing.assert_close(average, manual, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(collaborative, average, rtol=1e-5, atol=1e-6)


def test_fixed_weights_with_cfg_per_member_and_recorded_maps(setup):
    model, x, t, conds, nulls = setup
    den = FixedWeightDenoiser(model, conds, {"mask": 0.25, "text": 0.75}, uncond=nulls,
                              guidance_scales={"mask": 3.0, "text": 2.0})
    recorder = InfluenceRecorder(den)
    with torch.no_grad():
        eps = den(x, t)
        recorder(0, 900, x, x)
        expected = 0.0
        for name, w, g in (("mask", 0.25, 3.0), ("text", 0.75, 2.0)):
            e_u = _unet(model, name, x, t, nulls[name].expand(3, -1, -1))
            e_c = _unet(model, name, x, t, conds[name])
            expected = expected + w * (e_u + g * (e_c - e_u))
    torch.testing.assert_close(eps, expected, rtol=1e-5, atol=1e-5)
    maps = recorder.influence
    assert maps.shape == (1, 3, 2, 8, 8)
    assert torch.all(maps[:, :, 0] == 0.25) and torch.all(maps[:, :, 1] == 0.75)


def test_variant_names_and_bad_weights(setup):
    model, _, _, conds, _ = setup
    kinds = {"mask": "mask", "text": "text"}
    assert variant_weights("collaborative", model.modalities, kinds) is None
    assert variant_weights("average", model.modalities, kinds) == {"mask": 0.5, "text": 0.5}
    assert variant_weights("mask_only", model.modalities, kinds) == {"mask": 1.0}
    with pytest.raises(UserError, match="needs a text member"):
        variant_weights("text_only", ("mask",), {"mask": "mask"})
    with pytest.raises(UserError, match="unknown variant"):
        variant_weights("median", model.modalities, kinds)
    with pytest.raises(UserError, match="no 'depth' uni-modal model"):
        FixedWeightDenoiser(model, conds, {"depth": 1.0})
    with pytest.raises(UserError, match="all be zero"):
        FixedWeightDenoiser(model, conds, {"mask": 0.0})
    with pytest.raises(UserError, match="unconditional tokens"):
        FixedWeightDenoiser(model, conds, {"text": 1.0}, guidance_scales={"text": 2.0})


def test_checkpoint_round_trip_and_relative_paths(tmp_path):
    """save_member / save_checkpoint reference towers by relative path: the tree can move and still loads."""
    import shutil

    from codiff.checkpoint import load_collaboration, save_checkpoint, save_member
    from codiff.conditions import MaskEncoder, MaskFormat
    from codiff.data import LDM_SCHEDULER_CONFIG
    from common.tiny import make_tiny_sd_folder

    root = tmp_path / "a"
    sd = make_tiny_sd_folder(root / "sd", seed=1)
    model = tiny_collaboration(("mask", "text"), seed=9, zero_init=False, logit_scale=0.5)
    fmt = MaskFormat.from_config({"classes": "digits", "grid": 16, "image_size": 32})
    scheduler = json.loads((sd / "scheduler" / "scheduler_config.json").read_text())
    save_member(root / "mask", "mask", model.unets["mask"], scheduler_config=scheduler, vae_path=sd / "vae",
                mask_encoder=MaskEncoder(fmt, 32))
    save_checkpoint(root / "ckpt", {"mask": root / "mask", "text": sd}, model.dynamic, vae_path=sd / "vae",
                    scheduler_config=scheduler, sampling={"ddim_steps": 7})
    shutil.move(str(root), str(tmp_path / "moved"))
    collab = load_collaboration(tmp_path / "moved" / "ckpt")
    assert collab.sampling == {"ddim_steps": 7} and collab.mask_format.grid == 16
    for name in ("mask", "text"):
        for (k, v), (_, w) in zip(collab.model.diffusers[name].state_dict().items(),
                                  model.diffusers[name].state_dict().items()):
            assert torch.equal(v, w), k
    assert torch.equal(collab.model.unets["mask"].conv_in.weight, model.unets["mask"].conv_in.weight)
    only_text = load_collaboration(tmp_path / "moved" / "ckpt", modalities=["text"])
    assert only_text.modalities == ("text",)
    with pytest.raises(UserError, match="no 'depth' modality"):
        load_collaboration(tmp_path / "moved" / "ckpt", modalities=["depth"])
    # a member on another schedule cannot join
    index = json.loads((tmp_path / "moved" / "ckpt" / "codiff.json").read_text())
    meta_path = tmp_path / "moved" / "mask" / "codiff_member.json"
    meta = json.loads(meta_path.read_text())
    meta["scheduler"] = LDM_SCHEDULER_CONFIG
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="different noise schedules"):
        load_collaboration(tmp_path / "moved" / "ckpt")
    assert index["members"]["text"] == "../sd"


def test_mask_scores_and_paired_masks(tmp_path):
    from codiff.evaluation import mask_scores, paired_masks
    from common.digits import build_digits

    ids = torch.zeros(32, 32, dtype=torch.long)
    ids[4:28, 10:20] = 1
    perfect = Image.fromarray((ids.numpy()[..., None] * np.array([0, 255, 0])).astype(np.uint8))
    scores = mask_scores([perfect], [ids])
    assert scores["stroke_iou"] == 1.0 and scores["mask_miou"] == 1.0
    half = ids.clone()
    half[4:16] = 0
    dim = Image.fromarray((half.numpy()[..., None] * np.array([0, 0, 200])).astype(np.uint8))
    assert mask_scores([dim], [ids])["stroke_iou"] == pytest.approx(0.5)
    root = build_digits(tmp_path / "digits")
    first = paired_masks([3, 3, 7], root)
    other = paired_masks([3, 3, 7], root, offset=1)
    assert [m.digit for m in first] == [3, 3, 7] and [m.digit for m in other] == [3, 3, 7]
    assert first[0].index != first[1].index and other[0].index == first[1].index
    assert first[0].ids.shape == (32, 32) and set(first[0].ids.unique().tolist()) <= {0, 1}


def test_spatial_mask_member_concatenates_pooled_class_maps():
    from codiff.conditions import MaskEncoder, MaskFormat
    from codiff.spatial import SpatialMaskUNet
    from common.tiny import tiny_unet2d_condition

    fmt = MaskFormat.from_config({"classes": "digits", "grid": 16, "image_size": 32})
    encoder = MaskEncoder(fmt, 32)
    member = SpatialMaskUNet(tiny_unet2d_condition(0, in_channels=6), encoder).eval()
    assert (member.config.in_channels, member.config.cross_attention_dim) == (4, 256)
    ids = torch.zeros(2, 32, 32, dtype=torch.long)
    ids[0, :, :16] = 1  # left half stroke
    onehot = encoder.one_hot(ids)
    maps = member.spatial(onehot, (8, 8))
    assert maps.shape == (2, 2, 8, 8)
    assert torch.all(maps[0, 1, :, :4] == 1) and torch.all(maps[0, 1, :, 4:] == 0) and torch.all(maps[1, 0] == 1)
    torch.testing.assert_close(maps.sum(1), torch.ones(2, 8, 8))
    assert torch.all(member.spatial(encoder.null_one_hot(2), (8, 8)) == 0)  # the null mask: no layout at all
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    with torch.no_grad():
        out = member(x, t, encoder_hidden_states=onehot)[0]
        ref = member.unet(torch.cat([x, maps], 1), t, encoder_hidden_states=encoder(onehot)).sample
    torch.testing.assert_close(out, ref)
    with pytest.raises(UserError, match="one-hot class tokens"):
        member(x, t, encoder_hidden_states=torch.randn(2, 2, 32))


def test_sample_default_reweights_the_learned_maps_and_fixed_weightings_ignore_it(monkeypatch):
    """`scripts/sample.py --method codiff` samples as the release does (re-weighted learned maps) unless told
    otherwise; a fixed weighting has no maps to re-weight, so the default does not turn it into an error."""
    import types

    import codiff.sample_cli as cli
    from codiff.collaborate import ReleasedReweighting

    calls = []

    class FakePipeline:
        def memory_plan(self, batch, **kwargs):  # the budget check before sampling: nothing to plan for a fake
            return None

        def __call__(self, conds, **kwargs):
            calls.append(kwargs)
            return types.SimpleNamespace(images=torch.zeros(1, 3, 32, 32))

    collab = types.SimpleNamespace(
        image_size=32, modalities=("mask", "text"),
        members={"mask": types.SimpleNamespace(kind="mask"), "text": types.SimpleNamespace(kind="text")},
        modality_of_kind=lambda kind: kind, pipeline=FakePipeline, null_conditions=lambda n: {})
    monkeypatch.setattr(cli, "masks_for_prompts", lambda prompts, c, path=None: [torch.zeros(32, 32, dtype=torch.long)])

    def run(**overrides):
        settings = cli.CoDiffSettings(prompts=["a red seven"], guidance_scale=1.0, **overrides)
        settings.check()
        cli.generate_collaboration(collab, settings)
        return calls[-1]

    default = run()
    assert isinstance(default["reweighting"], ReleasedReweighting) and not default["reweighting"].is_identity
    assert default["weights"] is None
    assert run(released_reweighting=False)["reweighting"] is None
    average = run(weighting="average")
    assert average["reweighting"] is None and average["weights"] == {"mask": 0.5, "text": 0.5}
