"""Generation on the core DDIM with recorded influence maps, and the released script's output files."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from codiff.collaborate import ReleasedReweighting
from codiff.conditions import MaskEncoder, MaskFormat, mask_to_rgb
from codiff.pipeline import CollaborativePipeline, ldm_plan, ldm_schedule, safe_dirname, save_generation
from codiff.tiny import tiny_collaboration
from common.errors import UserError


STEPS = 4
DIGITS = MaskFormat.from_config({"classes": "digits", "grid": 16, "image_size": 32})


@pytest.fixture(scope="module")
def pipeline() -> CollaborativePipeline:
    from common.tiny import tiny_vae

    model = tiny_collaboration(("mask", "text"), seed=21, zero_init=False, logit_scale=0.7)
    mask_encoder = MaskEncoder(DIGITS, 32)
    prompts = {"a red seven": torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(5))}
    return CollaborativePipeline(
        model, tiny_vae(0), ldm_schedule(),
        {"mask": mask_encoder.encode_ids, "text": lambda prompt: prompts[prompt]},
    )


@pytest.fixture(scope="module")
def mask() -> torch.Tensor:
    ids = torch.zeros(32, 32, dtype=torch.long)
    ids[6:26, 14:18] = 1
    return ids


def test_ldm_plan_uses_the_released_ddim_timesteps():
    schedule = ldm_schedule()
    plan = ldm_plan(schedule, 50)
    assert plan.timesteps[:2] == (981, 961) and plan.timesteps[-1] == 1 and len(plan) == 50
    assert plan.prev_timesteps[0] == 961 and plan.prev_timesteps[-1] == -1
    assert plan.final_alpha_cumprod == float(schedule.alphas_cumprod[0])  # last step onto abar_0, not 1
    assert abs(float(schedule.betas[0]) - 0.0015) < 1e-9 and abs(float(schedule.betas[-1]) - 0.0195) < 1e-9


def test_generation_records_one_map_per_step_and_is_seeded(pipeline, mask):
    conds = {"mask": mask, "text": "a red seven"}
    runs = [
        pipeline(conds, batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                 record=True, progress=False)
        for _ in range(2)
    ]
    gen = runs[0]
    assert gen.images.shape == (2, 3, 32, 32) and 0 <= gen.images.min() and gen.images.max() <= 1
    assert gen.influence.shape == (STEPS, 2, 2, 8, 8)
    torch.testing.assert_close(gen.influence.sum(2), torch.ones(STEPS, 2, 8, 8))
    assert gen.pred_x0.shape == gen.x_inter.shape == (STEPS, 2, 4, 8, 8)
    assert torch.equal(gen.x_inter[-1], gen.latents)
    assert gen.timesteps == [751, 501, 251, 1]
    assert torch.equal(runs[1].latents, gen.latents) and torch.equal(runs[1].influence, gen.influence)
    # eta = 1 consumes noise: another seed gives another sample.
    other = pipeline(conds, batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(1),
                     progress=False)
    assert not torch.allclose(other.latents, gen.latents)


def test_released_reweighting_changes_the_sample_and_drives_the_mask_weight_down(pipeline, mask):
    conds = {"mask": mask, "text": "a red seven"}
    kwargs = dict(num_inference_steps=STEPS, eta=0.0, record=True, progress=False,
                  x_T=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)))
    plain = pipeline(conds, **kwargs)
    released = pipeline(conds, reweighting=ReleasedReweighting.released(), **kwargs)
    assert not torch.allclose(plain.latents, released.latents)
    assert released.influence[-1, :, 0].max() < 1e-4  # cosine decay: s(t=1) ~ 0, the text model takes over


def test_saving_writes_the_released_file_set(pipeline, mask, tmp_path):
    gen = pipeline({"mask": mask, "text": "a red seven"}, batch_size=2, num_inference_steps=STEPS,
                   generator=torch.Generator().manual_seed(0), record=True, progress=False)
    written = save_generation(
        gen, tmp_path, decode=pipeline.decode, mask_rgb=mask_to_rgb(mask, DIGITS), save_z=True,
        return_influence_function=True, display_x_inter=True, save_mixed=True, map_upscale=4,
    )
    names = sorted(p.name for p in written)
    expected = [f"{i:06d}_{kind}.png" for i in range(2) for kind in
                ("x_0", "mask_influence_function", "text_influence_function", "x_inter", "pred_x0", "z_0", "mixed")]
    assert names == sorted(expected)
    assert Image.open(tmp_path / "000000_x_0.png").size == (32, 32)
    # 4 steps in one row of 10: 4 tiles of 8*4 = 32 px with 2 px padding.
    assert Image.open(tmp_path / "000001_text_influence_function.png").size == (4 * 34 + 2, 34 + 2)
    assert Image.open(tmp_path / "000000_x_inter.png").size == (4 * 34 + 2, 34 + 2)
    with pytest.raises(UserError, match="generate with record=True"):
        save_generation(gen.__class__(gen.images, gen.latents, gen.modalities), tmp_path,
                        return_influence_function=True)


def test_pipeline_errors_and_folder_names(pipeline, mask):
    with pytest.raises(UserError, match="'sketch' condition was given but no 'sketch' uni-modal model"):
        pipeline({"mask": mask, "text": "a red seven", "sketch": mask}, num_inference_steps=1, progress=False)
    bad = mask.clone()
    bad[0, 0] = 5
    with pytest.raises(UserError, match=r"class ids \{5\} outside the palette"):
        pipeline({"mask": bad, "text": "a red seven"}, num_inference_steps=1, progress=False)
    assert safe_dirname("a red seven") == "a_red_seven-" + safe_dirname("a red seven").split("-")[-1]
    assert "/" not in safe_dirname("red/blue " * 40) and len(safe_dirname("x" * 300)) <= 80
    assert safe_dirname("plain") == "plain"
