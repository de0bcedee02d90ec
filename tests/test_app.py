"""scripts/app.py's back end without a browser: the page's images equal scripts/sample.py's for the same settings,
uploads are checked (type, size), bad settings are one-line UserErrors, settings JSON reproduces the run."""

import io
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.errors import UserError
from common.io import to_pil


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import app  # noqa: E402
import sample  # noqa: E402


def _png(size=(32, 32), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def _cli_images(command: str, out: Path) -> list:
    argv = shlex.split(command)[2:] + ["--output_dir", str(out), "--no_progress"]
    assert sample.main(argv) == 0
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    return [np.asarray(Image.open(out / m["file_name"])) for m in meta]


def test_page_and_sample_script_give_the_same_images(tmp_path):
    """ContextDiff, two prompts cycled over three images: the app's tensors, quantised as sample.py saves them, are
    pixel-equal to what `scripts/sample.py` writes when run with the command stored in the settings JSON."""
    job = app.Job("contextdiff", "a red handwritten seven\na blue handwritten two",
                  app.Shared(seed=5, steps=3, num_images=3, guidance_scale=3.0), {"k_schedule": "quadratic"})
    result = app.run_job(job, tmp_path / "app")
    settings = json.loads(result.settings_path.read_text())
    assert settings["seed"] == 5 and settings["steps"] == 3 and settings["method"] == "contextdiff"
    assert settings["checkpoint"] == str(REPO / "ckpt" / "tiny" / "contextdiff")
    assert settings["settings"]["k_schedule"] == "quadratic" and result.grid_path.is_file()
    assert settings["settings"]["num_inference_steps"] == 3 and len(settings["settings"]["prompts"]) == 3
    cli = _cli_images(settings["command"], tmp_path / "cli")
    assert len(cli) == len(result.images) == 3
    for ours, theirs in zip(result.images, cli):
        assert np.array_equal(np.asarray(to_pil(ours, value_range=(0, 1))), theirs)


def test_codiff_drawn_mask_with_influence_maps_matches_sample_script(tmp_path):
    """The CoDiff tab records the influence maps of every step; recording does not change the images."""
    ids = np.zeros((32, 32), dtype=np.uint8)
    ids[6:26, 14:18] = 1  # a drawn "one"
    mask = tmp_path / "mask.png"
    Image.fromarray(ids).save(mask)
    job = app.Job("codiff", "a green handwritten one", app.Shared(seed=2, steps=3, num_images=2),
                  {"weighting": "collaborative"}, {"mask_path": mask})
    result = app.run_job(job, tmp_path / "app")
    assert set(result.influence) == {"mask", "text"}
    assert result.influence["mask"].size[0] > result.influence["mask"].size[1]  # 3 steps side by side
    # each tile is labelled with its step and the model timestep the sampler used (LDM's uniform DDIM steps)
    assert result.influence_labels["mask"] == ["step 1, t=667", "step 2, t=334", "step 3, t=1"]
    # the mask the images were conditioned on is shown back, in the checkpoint's palette
    assert len(result.masks) == 2
    shown = np.asarray(result.masks[0])[::4, ::4]
    palette = np.asarray(app.methods.get("codiff").load(app.default_checkpoint("codiff")).collab.mask_format.palette)
    assert np.array_equal(shown, palette[ids])
    cli = _cli_images(result.settings["command"], tmp_path / "cli")
    for ours, theirs in zip(result.images, cli):
        assert np.array_equal(np.asarray(to_pil(ours, value_range=(0, 1))), theirs)


def test_versatile_image_to_text_returns_captions_and_progress_is_tracked(tmp_path):
    image = tmp_path / "digit.png"
    image.write_bytes(_png())
    job = app.Job("versatile", "", app.Shared(seed=0, steps=2, num_images=2), {"flow": "i2t"}, {"image": image})
    result = app.run_tracked(job, tmp_path / "out")
    assert result.images is None and result.grid_path is None
    assert len(result.texts) == 2 and all(isinstance(t, str) for t in result.texts)
    assert json.loads(result.settings_path.read_text())["outputs"]["texts"] == result.texts
    desc, n, total, running = app.PROGRESS.snapshot()
    assert total == 2 and n == 2 and not running  # the sampler's steps came through the pipeline's callback


@pytest.mark.parametrize("values,message", [
    (dict(steps=0), "steps must be a whole number between 1 and 1000"),
    (dict(steps=5000), "steps must be a whole number between 1 and 1000"),
    (dict(steps=2.5), "steps must be a whole number"),
    (dict(steps=None), "steps is empty"),
    (dict(num_images=0), "num images must be a whole number between 1 and 16"),
    (dict(eta=1.5), "eta must lie in [0, 1]"),
    (dict(seed=-1), "seed must be a whole number"),
    (dict(sampler="euler"), "choose ddim, ddpm"),
])
def test_bad_shared_settings_are_user_errors(values, message):
    base = dict(seed=0, steps=4, sampler="ddim", eta=0.0, guidance_scale=3.0, num_images=2)
    with pytest.raises(UserError) as info:
        app.Shared.from_values({**base, **values})
    assert message in str(info.value)


def test_empty_prompt_is_refused_where_one_is_needed(tmp_path):
    for method in ("contextdiff", "shifted", "codiff"):
        with pytest.raises(UserError, match="the prompt is empty"):
            app.run_job(app.Job(method, "  \n ", app.Shared(steps=1, num_images=1)), tmp_path / method)
    with pytest.raises(UserError, match="the prompt is empty"):
        app.run_job(app.Job("versatile", "", app.Shared(steps=1, num_images=1), {"flow": "t2i"}), tmp_path / "v")
    from common import methods

    unguided = app.Job("sdg", "", app.Shared(num_images=2), {"text_weight": 0.0})
    assert app.job_settings(unguided, methods.get("sdg")).prompts == ["sdg sample"] * 2


def test_uploads_over_the_limit_or_not_images_are_refused():
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    data = buffer.getvalue()  # about 12 kB of noise
    assert app.check_upload("ok.png", data, 2**20).size == (64, 64)
    with pytest.raises(UserError, match="larger than the 0.00390625 MB upload limit"):
        app.check_upload("big.png", data, 4096)
    with pytest.raises(UserError, match="notes.txt is not an image"):
        app.check_upload("notes.txt", b"hello, not a picture\n" * 10, 2**20)
    with pytest.raises(UserError, match="is not an image"):
        app.check_upload("cut.png", data[: len(data) // 2], 2**20)  # truncated
    with pytest.raises(UserError, match="empty"):
        app.check_upload("empty.png", b"", 2**20)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PDF")
    with pytest.raises(UserError):
        app.check_upload("doc.pdf", buffer.getvalue(), 2**20)


def test_flags_default_to_localhost_and_checkpoints_follow_the_root(tmp_path):
    args = app.build_parser().parse_args([])
    assert (args.host, args.port, args.max_upload_mb) == ("127.0.0.1", 7860, app.DEFAULT_MAX_UPLOAD_MB)
    args = app.build_parser().parse_args(["--host", "0.0.0.0", "--port", "9000", "--sdg_checkpoint", "/m/sdg"])
    assert (args.host, args.port, args.sdg_checkpoint) == ("0.0.0.0", 9000, "/m/sdg")
    assert app.default_checkpoint("versatile", str(tmp_path)) == str(tmp_path / "versatile" / "pipeline")
    assert app.default_checkpoint("shifted") == str(REPO / "ckpt" / "tiny" / "shifted")
    assert app.main(["--max_upload_mb", "0"]) == 2


def test_tab_controls_are_the_method_settings_and_reproduce_on_the_command_line():
    from common import methods

    spec = methods.get("shifted")
    assert [f.name for f, _ in app.page_fields(spec)] == ["prior_respacing", "prior_sampler", "prior_eta",
                                                          "prior_guidance", "prior_variant"]
    job = app.Job("shifted", "x", app.Shared(num_images=1),
                  {"prior_guidance": 2.0, "prior_variant": "baseline", "prior_respacing": "4"})
    settings = app.job_settings(job, spec)
    command = app.sample_command(spec, "ckpt/tiny/shifted", settings, ["x"])
    args, _ = sample.parse_args(command[2:])  # sample.py's own parser reads the reproducing command back
    assert methods.settings_from_args(spec.settings, args, prompts=["x"]) == settings
    with pytest.raises(UserError, match="bad respacing .many."):
        app.job_settings(app.Job("shifted", "x", app.Shared(), {"prior_respacing": "many"}), spec)
    with pytest.raises(UserError, match="unknown setting 'bank'"):
        app.job_settings(app.Job("shifted", "x", app.Shared(), {"bank": False}), spec)


def test_empty_shared_fields_leave_the_method_defaults_to_sample_script(tmp_path):
    """sampler / eta / guidance left empty: the method's own defaults (its settings dataclass) apply."""
    job = app.Job("sdg", "a red handwritten seven", app.Shared(seed=1, steps=2, num_images=1),
                  {"text_weight": 0.0, "image_weight": 0.0})
    result = app.run_job(job, tmp_path / "app")
    assert "--sampler" not in result.settings["command"] and "--guidance_scale" not in result.settings["command"]
    assert result.settings["settings"]["sampler"] == "ddpm" and result.settings["settings"]["guidance_scale"] == 1.0
    cli = _cli_images(result.settings["command"], tmp_path / "cli")
    assert np.array_equal(np.asarray(to_pil(result.images[0], value_range=(0, 1))), cli[0])
    assert "SDG ddpm" in app.method_defaults()


def test_influence_grid_has_step_captions_and_a_zero_to_one_scale():
    import torch

    maps = torch.stack([torch.full((1, 4, 4), v) for v in (0.0, 0.5, 1.0)])
    grid = app.labelled_influence_grid(maps, app.influence_step_labels([981, 500, 1], 3), upscale=4)
    x, y, width = grid.info["scale_bar"]
    bar = np.asarray(grid.convert("L"))[y + 2, x:x + width].astype(int)
    assert bar[0] == 0 and bar[-1] == 255 and (np.diff(bar) >= 0).all()  # black (0) to white (1), monotone
    assert app.influence_step_labels([981, 500], 3) == ["step 1, t=981", "step 2, t=500", "step 3"]
    pixels = np.asarray(grid.convert("L"))
    caption_rows = pixels[4:4 + 24, 4:4 + 56]  # above the first tile: its caption is drawn in black
    assert (caption_rows < 128).any()


def test_a_cold_checkpoint_load_is_announced_before_sampling(tmp_path):
    app._PIPELINES.clear()
    seen = []
    job = app.Job("baseline", "a red handwritten seven", app.Shared(seed=0, steps=2, num_images=1))
    result = app.run_job(job, tmp_path / "a", callback=lambda desc, n, total: seen.append((desc, n, total)))
    assert seen[0][0].startswith("loading Baseline") and "ckpt/tiny/baseline" in seen[0][0] and seen[0][2] == 0
    assert result.load_seconds > 0 and seen[-1][1:] == (2, 2)  # then the sampler's steps
    seen.clear()
    again = app.run_job(job, tmp_path / "b", callback=lambda desc, n, total: seen.append(desc))
    assert again.load_seconds == 0 and not any(d.startswith("loading") for d in seen)  # reused: no load message


def test_each_tab_shows_its_method_defaults_which_reproduce_the_empty_fields(tmp_path):
    """The tab's sampler / eta / guidance are filled with the method's defaults; filled in, they give the same images
    as left to the method."""
    assert app.sampling_defaults("sdg") == {"sampler": "ddpm", "eta": 0.0, "guidance_scale": 1.0}
    assert app.sampling_defaults("codiff")["eta"] == 1.0
    job = app.Job("baseline", "a red handwritten seven", app.Shared(seed=3, steps=2, num_images=1))
    empty = app.run_job(job, tmp_path / "empty")
    filled = app.run_job(app.Job("baseline", job.prompt, app.Shared(seed=3, steps=2, num_images=1,
                                                                   **app.sampling_defaults("baseline"))),
                         tmp_path / "filled")
    assert np.array_equal(empty.images.numpy(), filled.images.numpy())
