"""Configs build the models they describe (paper sizes on the meta device); generate flags are real booleans."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from codiff.cli import generate_parser, reweighting_from_args
from codiff.config import build_models, load_config, main
from common.errors import UserError


CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "codiff"


def test_paper_config_has_the_papers_sizes_on_meta(capsys):
    config = load_config(CONFIGS / "paper.yaml")
    counts = build_models(config, device="meta").parameter_counts()
    # uni-modal UNet ~403.6M, dynamic diffuser ~13.1M, Linear(1024, 640), 32-layer text encoder 166.6M.
    assert round(counts["unet[text]"] / 1e6, 1) == 403.6 and counts["unet[mask]"] == counts["unet[text]"]
    assert round(counts["dynamic_diffuser[mask]"] / 1e6, 1) == 13.1
    assert counts["encoder[mask]"] == 1024 * 640 + 640
    assert round(counts["encoder[text]"] / 1e6, 1) == 166.6
    assert counts["trainable (dynamic diffusers)"] == 2 * counts["dynamic_diffuser[mask]"]
    main([str(CONFIGS / "paper.yaml")])
    printed = capsys.readouterr().out
    assert "unet[mask]" in printed and "403.624M" in printed


def test_tiny_config_matches_the_shared_tiny_unet_and_runs():
    from common.tiny import tiny_unet2d_condition_config

    config = load_config(CONFIGS / "tiny.yaml")
    for section in config["modalities"].values():
        assert {k: tuple(v) if isinstance(v, list) else v for k, v in section["unet"].items()} == \
            tiny_unet2d_condition_config()
    models = build_models(config, with_encoders=True)
    collab = models.collaboration
    assert collab.modalities == ("mask", "text")
    assert models.encoders["mask"].fmt.class_names == ("background", "stroke")
    x = torch.randn(1, 4, 8, 8)
    out = collab.predict(x, torch.tensor([500]), {"mask": torch.randn(1, 2, 32), "text": torch.randn(1, 77, 32)})
    torch.testing.assert_close(out.influence, torch.full_like(out.influence, 0.5))  # zero-initialised diffusers


def test_bad_config_is_a_user_error(tmp_path):
    (tmp_path / "c.yaml").write_text("name: x\n")
    with pytest.raises(UserError, match="no 'modalities' section"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("modalities: {depth: {kind: depth, unet: {}}}\n")
    with pytest.raises(UserError, match="modality 'depth' needs kind"):
        load_config(tmp_path / "d.yaml")


def test_generate_flags_are_real_booleans_and_reweighting_is_opt_in():
    parser = generate_parser()
    args = parser.parse_args([])
    assert (args.save_z, args.return_influence_function, args.display_x_inter, args.save_mixed) == (False,) * 4
    assert reweighting_from_args(args) is None  # plain softmax by default
    args = parser.parse_args(["--save_z", "--display_x_inter", "--no-save_mixed", "--released_reweighting"])
    assert args.save_z and args.display_x_inter and not args.save_mixed
    rw = reweighting_from_args(args)
    assert (rw.schedule, rw.scale_factor) == ("cosine_decay", 2.0)
    tuned = reweighting_from_args(parser.parse_args(["--released_reweighting", "--mask_schedule", "linear_decay"]))
    assert (tuned.schedule, tuned.scale_factor) == ("linear_decay", 2.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["--save_z", "False"])  # the released type=bool would have switched it ON
