"""Versatile Diffusion scripts on tiny random towers: train (text VAE, progressive diffuser), sample every flow,
convert, ``scripts/sample.py --method versatile``; bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from script_loading import load_script, run_main  # noqa: E402


REPO = Path(__file__).resolve().parent.parent




convert_script = load_script("scripts/versatile/convert.py")
sample_script = load_script("scripts/versatile/sample.py")
train_script = load_script("scripts/versatile/train.py")
train_text_vae = load_script("scripts/versatile/train_text_vae.py")
root_sample = load_script("scripts/sample.py")


pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny random vae/ clip/ text_vae/, 8 digits, and a 2-step four-flow versatile folder trained by train.py."""
    from versatile.tiny import write_tiny_digits, write_tiny_towers

    root = tmp_path_factory.mktemp("vd")
    towers = write_tiny_towers(root)
    data = write_tiny_digits(root / "digits", per_split=8)
    folder = root / "four"
    argv = ["--train_data_dir", data / "train", "--vae_model_path", towers["vae"], "--clip_model_path",
            towers["clip"], "--text_vae_path", towers["text_vae"], "--stage", "four", "--max_train_steps", 2,
            "--train_batch_size", 4, "--output_dir", root / "run_four", "--save_to", folder, "--save_dtype", "float16",
            "--validation_prompts", "a red handwritten seven"]
    assert train_script.main([str(a) for a in argv]) == 0
    return {"root": root, "data": data, "folder": folder, **towers}


def test_text_vae_script_trains_saves_and_scores(world, tmp_path, capsys):
    from versatile.text_vae import load_text_vae

    out = tmp_path / "run"  # no --save_to: the text VAE is the output folder itself
    code, _ = run_main(train_text_vae.main, ["--train_data_dir", world["data"] / "train", "--eval_data_dir",
                                             world["data"] / "test", "--max_train_steps", 2, "--train_batch_size", 4,
                                             "--beta_warmup_steps", 2, "--free_bits", 0.5, "--eval_samples", 3,
                                             "--output_dir", out], capsys)
    assert code == 0
    assert not (out / "text_vae").exists() and (out / "train_summary.json").is_file()
    vae = load_text_vae(out)
    scores = json.loads((out / "eval.json").read_text())
    assert scores["count"] == 3 and 0 <= scores["greedy_digit"] <= 1
    assert vae.config.optimus_scaling_factor == pytest.approx(1 / scores["latent_std"])


def test_four_flow_folder_records_flows_and_shards(world):
    from versatile.checkpoint import read_manifest

    manifest = read_manifest(world["folder"])
    assert manifest.trained_flows == ("t2i", "iv", "i2t", "tv")
    # --validation_prompts: the t2i flow's samples of the final validation, written by the trainer
    assert list((world["root"] / "run_four" / "validation").glob("step-*/*.png"))
    assert set(manifest.usable_flows()) == {"t2i", "iv", "i2t", "tv", "dual"}
    shards = sorted(p.name for p in (world["folder"] / "diffuser").glob("*.safetensors"))
    assert len(shards) == 5 and manifest.image_vae == world["vae"] and manifest.stages[-1]["steps"] == 2
    assert manifest.context_scale == 8.0  # configs/versatile/digits.yaml


def test_progressive_stages_and_untrained_flows_are_refused(world, tmp_path, capsys):
    base = ["--train_data_dir", world["data"] / "train", "--vae_model_path", world["vae"], "--clip_model_path",
            world["clip"], "--max_train_steps", 1, "--train_batch_size", 4]
    single = tmp_path / "r1"  # no --save_to: the versatile folder is the output folder itself
    code, _ = run_main(train_script.main, [*base, "--stage", "single", "--output_dir", single,
                                           "--flow_sampling", "one"], capsys)
    assert code == 0
    assert (single / "versatile.json").is_file() and (single / "train_summary.json").is_file()
    assert not (single / "pipeline").exists()
    from versatile.checkpoint import load_pipeline

    assert load_pipeline(single)[1].trained_flows == ("iv",)
    dual = tmp_path / "dual"
    code, _ = run_main(train_script.main, [*base, "--stage", "dual", "--init_from", single, "--output_dir",
                                           tmp_path / "r2", "--save_to", dual, "--group_lr_scale",
                                           "data_image=0.1,ctx_text=1,ctx_image=1,global=0.1,data_text=0"], capsys)
    assert code == 0
    manifest = json.loads((dual / "versatile.json").read_text())
    assert manifest["trained_flows"] == ["t2i", "iv"] and [s["stage"] for s in manifest["stages"]] == ["single", "dual"]
    assert manifest["stages"][1]["group_lr_scale"]["data_image"] == 0.1
    out = tmp_path / "never"
    code, err = run_main(sample_script.main, ["--checkpoint", single, "--flow", "t2i", "--prompt", "a red seven",
                                              "--num_inference_steps", 1, "--output_dir", out, "--no_progress"], capsys)
    assert code == 2 and len(err) == 1 and "untrained layers ctx_text" in err[0] and not out.exists()


def test_text_flows_need_the_text_vae(world, tmp_path, capsys):
    code, err = run_main(train_script.main, ["--train_data_dir", world["data"] / "train", "--vae_model_path",
                                             world["vae"], "--clip_model_path", world["clip"], "--flows", "i2t",
                                             "--output_dir", tmp_path / "r"], capsys)
    assert code == 2 and len(err) == 1 and "--text_vae_path" in err[0] and not (tmp_path / "r").exists()


@pytest.mark.parametrize("flow,extra,count", [
    ("t2i", ["--prompt", "a red handwritten seven", "--num_samples", 2], 2),
    ("i2i", ["--image", "IMG"], 1),
    ("i2t", ["--image", "IMG", "--image", "IMG", "--text_temperature", 0], 2),
    ("t2t", ["--prompt", "a blue handwritten two"], 1),
    ("dual", ["--prompt", "a green digit", "--image", "IMG", "--mix_ratio", 0.3], 1),
])
def test_sample_script_runs_every_flow(world, tmp_path, capsys, flow, extra, count):
    image = world["data"] / "test" / "images" / "00000.png"
    out = tmp_path / "out"
    argv = ["--checkpoint", world["folder"], "--flow", flow, "--num_inference_steps", 2, "--output_dir", out, "--no_progress",
            *[image if a == "IMG" else a for a in extra]]
    code, _ = run_main(sample_script.main, argv, capsys)
    assert code == 0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == count and all(isinstance(r["text"], str) for r in rows)
    if flow in ("t2i", "i2i", "dual"):
        assert (out / rows[0]["file_name"]).is_file() and (out / "grid.png").is_file()
    assert json.loads((out / "settings.json").read_text())["flow"] == flow


@pytest.mark.parametrize("extra,message", [
    (["--flow", "x2y", "--prompt", "a"], "unknown flow 'x2y'"),
    (["--flow", "t2t", "--prompt", "a", "--image", "IMG"], "takes no image"),
    (["--flow", "i2t", "--image", "IMG", "--prompt", "a"], "takes no prompt"),
    (["--flow", "dual", "--prompt", "a", "--image", "IMG", "--mix_ratio", 1.5], "outside [0, 1]"),
    (["--flow", "dual", "--prompt", "a", "--image", "IMG", "--mix_ratio", -0.1], "outside [0, 1]"),
    (["--flow", "t2i", "--prompt", "a", "--mix_ratio", 0.5], "only applies to the dual flow"),
    (["--flow", "iv"], "needs an image"),
    (["--flow", "iv", "--image", "/nonexistent.png"], "does not exist"),
    (["--flow", "t2i", "--prompt", "a", "--checkpoint", "/nonexistent"], "does not exist"),
    (["--flow", "t2i", "--prompt", "a", "--checkpoint", "NO_CTX_IMAGE"], "lacks"),
])
def test_sample_script_bad_input_is_one_line_exit_2_nothing_written(world, tmp_path, capsys, extra, message):
    image = world["data"] / "test" / "images" / "00000.png"
    broken = tmp_path / "broken"
    if "NO_CTX_IMAGE" in extra:  # a checkpoint missing a flow's layers: strict loading refuses it whole
        shutil.copytree(world["folder"], broken)
        (broken / "diffuser" / "diffuser-ctx_image.safetensors").unlink()
        for sub in ("vae", "clip", "text_vae"):  # keep the manifest's relative tower paths valid
            (broken.parent / sub).symlink_to(world[sub])
    out = tmp_path / "never"
    argv = ["--checkpoint", world["folder"], "--num_inference_steps", 1, "--output_dir", out, "--no_progress",
            *[image if a == "IMG" else broken if a == "NO_CTX_IMAGE" else a for a in extra]]
    code, err = run_main(sample_script.main, argv, capsys)
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()
    if "NO_CTX_IMAGE" in extra:
        assert "ctx_image" in err[0] and "iv" in err[0]


def test_scripts_sample_method_versatile(world, tmp_path, capsys):
    image = world["data"] / "test" / "images" / "00000.png"
    base = ["--method", "versatile", "--checkpoint", world["folder"], "--num_inference_steps", 2,
            "--no_progress", "--guidance_scale", 3]
    out = tmp_path / "t2i"
    code, _ = run_main(root_sample.main, [*base, "--prompt", "a red seven", "--prompt", "a blue two",
                                          "--output_dir", out], capsys)
    assert code == 0 and len((out / "metadata.jsonl").read_text().splitlines()) == 2
    out = tmp_path / "iv"
    code, _ = run_main(root_sample.main, [*base, "--flow", "i2i", "--image", image, "--prompt", "a red seven",
                                          "--num_images", 2, "--output_dir", out], capsys)
    assert code == 0 and len(list((out / "images").iterdir())) == 2
    for extra, message in ((["--flow", "i2t", "--image", image], "generates captions"),
                           (["--flow", "dual", "--image", image, "--mix_ratio", 2], "--mix_ratio must lie in [0, 1]"),
                           (["--flow", "t2i", "--image", image], "takes no image")):
        out = tmp_path / "never"
        code, err = run_main(root_sample.main, [*base, "--prompt", "a red seven", *extra, "--output_dir", out], capsys)
        assert code == 2 and len(err) == 1 and message in err[0] and not out.exists()


def test_convert_script_is_strict(tmp_path, capsys):
    from versatile.convert import export_state_dict, load_diffuser
    from versatile.tiny import tiny_diffuser

    model = tiny_diffuser(seed=3, zero_init=False)
    state = export_state_dict(model, "vd-r1")
    state["autokl.encoder.x"] = torch.zeros(1)  # outside the diffuser: reported, not loaded
    torch.save(state, tmp_path / "vd.pth")
    code, _ = run_main(convert_script.main, ["--from", "vd-r1", "--src", tmp_path / "vd.pth", "--dst",
                                             tmp_path / "ours", "--model_config", "tiny"], capsys)
    assert code == 0
    loaded = load_diffuser(tmp_path / "ours")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    torch.save({k: v for k, v in state.items() if ".text.data_blocks." not in k}, tmp_path / "partial.pth")
    code, err = run_main(convert_script.main, ["--src", tmp_path / "partial.pth", "--dst", tmp_path / "never",
                                               "--model_config", "tiny"], capsys)
    assert code == 2 and len(err) == 1 and "data_text" in err[0] and "i2t, tv" in err[0]
    assert not (tmp_path / "never").exists()


def test_evaluate_script_scores_every_flow(world, tmp_path, capsys):
    evaluate = load_script("scripts/versatile/evaluate.py")
    out = tmp_path / "eval"
    code, _ = run_main(evaluate.main, ["--checkpoint", world["folder"], "--data_dir", world["data"] / "test",
                                       "--n", 2, "--num_inference_steps", 1, "--baseline", "", "--output_dir", out], capsys)
    assert code == 0
    scores = json.loads((out / "scores.json").read_text())
    assert {"t2i", "iv", "iv_sources", "i2t_greedy", "tv_sampled", "dual_0.5"} <= set(scores)
    assert scores["t2i"]["count"] == 2 and 0 <= scores["tv_greedy"]["digit_accuracy"] <= 1
    assert (out / "t2i" / "metadata.jsonl").is_file() and (out / "i2t_greedy.jsonl").is_file()
