"""ContextDiff's T5 text source end to end on tiny random models (issue #5): an adapter with text_sources
[clip, t5] trained in stage 1 and used in stage 2, the checkpoint's t5/ (or referenced T5), sampling, and bad input
(no T5 for a T5 adapter, a T5 of the wrong width): one line, exit 2, nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from script_loading import load_script  # noqa: E402
from tiny_data import write_captioned_images  # noqa: E402

from common.errors import UserError
from common.tiny import make_tiny_sd_folder, t5_tokenizer, tiny_t5_encoder, tiny_unet2d_condition
from contextdiff.adapter import load_adapter, tiny_adapter
from contextdiff.checkpoint import load_contextdiff, save_contextdiff


REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs" / "contextdiff"
SCRIPTS = REPO / "scripts" / "contextdiff"
FAST = ["--max_train_steps", "2", "--train_batch_size", "4", "--report_to", "none"]
PROMPTS = ["a red handwritten seven", "a blue handwritten one"]


def _script(name: str):
    return load_script(f"scripts/contextdiff/{name}.py")


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _t5_folder(path: Path, seed: int = 0, **overrides) -> Path:
    tiny_t5_encoder(seed, **overrides).save_pretrained(path, safe_serialization=True)
    t5_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny SD folder, two tiny T5 folders (32-d and 48-d), eight captioned 32x32 images, a [clip, t5] config."""
    root = tmp_path_factory.mktemp("t5world")
    data = write_captioned_images(root / "train")
    config = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    config["adapter"].update(text_sources=["clip", "t5"], text_dims=[32, 32])
    (root / "clip_t5.yaml").write_text(yaml.safe_dump(config))
    return {"sd": make_tiny_sd_folder(root / "tiny-sd"), "data": data, "config": root / "clip_t5.yaml",
            "t5": _t5_folder(root / "t5"), "t5_wide": _t5_folder(root / "t5-wide", d_model=48), "root": root}


@pytest.fixture(scope="module")
def stage1(world):
    """Stage 1 (UNet frozen), a [clip, t5] adapter, 2 steps, latents and T5 states cached."""
    out = world["root"] / "stage1"
    argv = ["--pretrained_model_name_or_path", str(world["sd"]), "--train_data_dir", str(world["data"]),
            "--output_dir", str(out), "--adapter_config", str(world["config"]), "--t5_model_name_or_path",
            str(world["t5"]), "--learning_rate", "1e-3", "--cache_latents", *FAST]
    assert _script("train_adapter").main(argv) == 0
    return out


@pytest.fixture(scope="module")
def stage2(world, stage1):
    """Stage 2 without --t5_model_name_or_path (the adapter's record), T5 run live (no cache), full checkpoint."""
    out = world["root"] / "stage2"
    argv = ["--pretrained_model_name_or_path", str(world["sd"]), "--adapter_path", str(stage1), "--train_data_dir",
            str(world["data"]), "--output_dir", str(out), *FAST]
    assert _script("finetune_diffusion").main(argv) == 0
    return out  # the checkpoint folder is the output folder itself


def test_stage1_writes_a_clip_t5_adapter_and_records_the_t5(stage1, world):
    folder = stage1 / "adapter"
    config = json.loads((folder / "config.json").read_text())
    assert config["text_sources"] == ["clip", "t5"] and config["text_dims"] == [32, 32]
    provenance = json.loads((folder / "process.json").read_text())["provenance"]
    assert Path(provenance["t5_model_name_or_path"]) == world["t5"].resolve()
    assert provenance["t5_max_length"] == 77
    adapter = load_adapter(folder, latent_channels=4, text_dims=[32, 32])
    assert adapter.proj_out.weight.abs().sum() > 0  # trained through x_t


def test_adapter_text_sources_flag_derives_the_widths(world, tmp_path):
    """--adapter_text_sources clip t5 on the CLIP-only tiny.yaml: the widths follow the encoders (48-d T5)."""
    out = tmp_path / "s1"
    argv = ["--pretrained_model_name_or_path", str(world["sd"]), "--train_data_dir", str(world["data"]),
            "--output_dir", str(out), "--adapter_config", str(CONFIGS / "tiny.yaml"), "--adapter_text_sources",
            "clip", "t5", "--t5_model_name_or_path", str(world["t5_wide"]), "--t5_max_length", "16",
            "--max_train_steps", "1", "--train_batch_size", "4", "--report_to", "none"]
    assert _script("train_adapter").main(argv) == 0
    config = json.loads((out / "adapter" / "config.json").read_text())
    assert config["text_sources"] == ["clip", "t5"] and config["text_dims"] == [32, 48]
    assert json.loads((out / "adapter" / "process.json").read_text())["provenance"]["t5_max_length"] == 16


def test_stage2_checkpoint_holds_the_t5_and_samples(stage2, stage1, world, tmp_path):
    ckpt = stage2
    meta = json.loads((ckpt / "contextdiff.json").read_text())
    assert meta["t5"] == "t5" and meta["t5_max_length"] == 77
    assert meta["provenance"]["t5_model_name_or_path"] == str(world["t5"].resolve())
    assert (ckpt / "t5" / "config.json").is_file() and list((ckpt / "t5").glob("*.safetensors"))
    assert (ckpt / "t5" / "tokenizer_config.json").is_file()
    model = load_contextdiff(ckpt)
    assert model.t5 is not None and list(model.adapter.config.text_sources) == ["clip", "t5"]
    kwargs = model.generate_kwargs()
    assert kwargs["t5"] is model.t5 and kwargs["t5_max_length"] == 77
    source = tiny_t5_encoder(0)  # the stage-1 T5: copied unchanged (frozen)
    for (name, a), (_, b) in zip(source.state_dict().items(), model.t5[0].state_dict().items()):
        assert torch.equal(a, b), name
    # a plain SD folder + the stage-1 adapter finds the T5 through the adapter's provenance
    assert load_contextdiff(world["sd"], stage1).t5 is not None

    sample = _script("sample")
    common = ["--checkpoint", str(ckpt), "--prompt", PROMPTS[0], "--num_inference_steps", "2",
              "--guidance_scale", "3", "--seed", "5", "--no_progress"]
    assert sample.main([*common, "--output_dir", str(tmp_path / "a")]) == 0
    assert len(list((tmp_path / "a" / "images").glob("*.png"))) == 1


def test_r_depends_on_the_t5_states_in_the_loss_batch(world):
    """training.loss_batch puts the captions' T5 states (and mask) into adapter_text, in text_sources order; with a
    non-zero adapter head, other T5 states change r and so the loss."""
    from common.latent_data import LatentTextEncoder
    from common.schedule import NoiseSchedule
    from contextdiff.checkpoint import load_t5
    from contextdiff.pipeline import encode_t5
    from contextdiff.process import ContextLossConfig, contextual_loss
    from contextdiff.training import loss_batch

    model = load_contextdiff(world["sd"], require_adapter=False)
    encoder = LatentTextEncoder(model.vae, model.text_encoder, model.tokenizer)
    t5 = load_t5(world["t5"])
    batch = {"pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1, "text": PROMPTS}
    torch.manual_seed(0)
    out = loss_batch(encoder, batch, "cpu", ["clip", "t5"], t5, 77)
    states, mask = encode_t5(t5[0], t5[1], PROMPTS, 77)
    assert out["adapter_text"][0] is out["encoder_hidden_states"] and out["adapter_text_mask"][0] is None
    assert torch.equal(out["adapter_text"][1], states) and torch.equal(out["adapter_text_mask"][1], mask)
    assert not mask.all() and mask[:, 0].all()  # padding is masked

    adapter = tiny_adapter(seed=1, head_std=0.2, text_sources=("clip", "t5"), text_dims=(32, 32))
    x0, clip = out["latents"], out["encoder_hidden_states"]
    r = adapter(x0, out["adapter_text"], out["adapter_text_mask"])
    r_other = adapter(x0, [clip, states + torch.randn_like(states)], out["adapter_text_mask"])
    assert (r - r_other).abs().max() > 1e-3

    schedule = NoiseSchedule.from_config(model.scheduler_config)
    fixed = dict(timesteps=torch.tensor([300, 600]), noise=torch.randn_like(x0))
    config = ContextLossConfig(stage=2)
    loss = contextual_loss(out, model.unet, adapter, schedule, config, **fixed).loss
    other = {**out, "adapter_text": [clip, states + torch.randn_like(states)]}
    assert not torch.isclose(loss, contextual_loss(other, model.unet, adapter, schedule, config, **fixed).loss)


@pytest.mark.parametrize("reference", [False, True])
def test_save_load_round_trip_with_t5(world, tmp_path, reference):
    """A trained-looking [clip, t5] adapter saved with its T5 (copied, or referenced by relative path) reproduces
    its samples bit for bit; another T5 (--t5_model_name_or_path override) changes them."""
    from contextdiff.sample_cli import sample

    base = load_contextdiff(world["sd"], require_adapter=False)
    base.unet = tiny_unet2d_condition(seed=3)
    base.adapter = tiny_adapter(seed=4, head_std=0.3, text_sources=("clip", "t5"), text_dims=(32, 32))
    from contextdiff.checkpoint import load_t5

    base.t5, base.t5_max_length = load_t5(world["t5"]), 20
    process = {"parameterization": "shifted_eps", "k_schedule": "quadratic", "k_scale": 1.0}
    towers = {**base.tower_paths, "t5": world["t5"]} if reference else None
    folder = tmp_path / "ckpt"
    save_contextdiff(folder, unet=base.unet, adapter=base.adapter, vae=base.vae, text_encoder=base.text_encoder,
                     tokenizer=base.tokenizer, scheduler_config=base.scheduler_config, process=process,
                     reference_towers=towers, t5=base.t5, t5_max_length=20)
    meta = json.loads((folder / "contextdiff.json").read_text())
    assert (folder / "t5").is_dir() != reference
    assert (folder / meta["t5"]).resolve() == (world["t5"].resolve() if reference else (folder / "t5").resolve())
    loaded = load_contextdiff(folder)
    assert loaded.t5_max_length == 20
    kwargs = dict(steps=3, guidance_scale=3.0, seed=11)
    after = sample(loaded, PROMPTS, **kwargs)
    assert torch.equal(sample(base, PROMPTS, **kwargs), after)
    other_t5 = _t5_folder(tmp_path / "t5-other", seed=9)
    swapped = load_contextdiff(folder, t5_path=other_t5)
    assert (sample(swapped, PROMPTS, **kwargs) - after).abs().max() > 1e-4


def test_save_refuses_a_t5_of_the_wrong_width(world, tmp_path):
    base = load_contextdiff(world["sd"], require_adapter=False)
    adapter = tiny_adapter(text_sources=("clip", "t5"), text_dims=(32, 32))
    common = dict(unet=base.unet, adapter=adapter, vae=base.vae, text_encoder=base.text_encoder,
                  tokenizer=base.tokenizer, scheduler_config=base.scheduler_config,
                  process={"parameterization": "shifted_eps", "k_schedule": "quadratic", "k_scale": 1.0})
    for t5, needle in ((None, "no T5"), ((tiny_t5_encoder(d_model=48), t5_tokenizer()), "48")):
        with pytest.raises(UserError, match=needle):
            save_contextdiff(tmp_path / "never", t5=t5, **common)
        assert not (tmp_path / "never").exists()


def test_load_errors(world, stage1, tmp_path):
    with pytest.raises(UserError, match="48"):
        load_contextdiff(world["sd"], stage1, t5_path=world["t5_wide"])
    with pytest.raises(UserError, match="does not exist"):
        load_contextdiff(world["sd"], stage1, t5_path=tmp_path / "nowhere")
    orphan = tmp_path / "orphan"  # an adapter that reads T5 with no record of which
    tiny_adapter(text_sources=("clip", "t5"), text_dims=(32, 32)).save_pretrained(orphan)
    with pytest.raises(UserError, match="--t5_model_name_or_path"):
        load_contextdiff(world["sd"], orphan)
    with pytest.warns(UserWarning, match="without the adapter"):
        assert load_contextdiff(world["sd"], orphan, require_adapter=False).adapter is None


@pytest.mark.parametrize("case", ["stage1_no_t5", "stage1_flag_no_t5", "stage1_width", "stage1_t5_unused",
                                  "stage1_missing_folder", "stage1_cache_captions", "stage2_width", "stage2_orphan",
                                  "sample_width"])
def test_bad_t5_input_one_line_exit_2_nothing_written(case, world, stage1, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--pretrained_model_name_or_path", str(world["sd"]), "--train_data_dir", str(world["data"]),
              "--output_dir", str(out), *FAST]
    orphan = tmp_path / "orphan"
    tiny_adapter(text_sources=("clip", "t5"), text_dims=(32, 32)).save_pretrained(orphan)
    t5_flag = ["--t5_model_name_or_path"]
    multi = tmp_path / "multi"  # two captions per image: a cached CLIP draw the T5 cache could not match
    (multi / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(multi / "images" / "0.png")
    (multi / "metadata.jsonl").write_text(json.dumps({"file_name": "images/0.png", "text": ["a red 1", "a 1"]}))
    script, needle, argv = {
        "stage1_no_t5": ("train_adapter", "--t5_model_name_or_path", [*common, "--adapter_config",
                                                                       str(world["config"])]),
        "stage1_flag_no_t5": ("train_adapter", "--t5_model_name_or_path",
                              [*common, "--adapter_config", str(CONFIGS / "tiny.yaml"), "--adapter_text_sources",
                               "clip", "t5"]),
        "stage1_width": ("train_adapter", "t5 text width 32 but the T5 encoder gives 48",
                         [*common, "--adapter_config", str(world["config"]), *t5_flag, str(world["t5_wide"])]),
        "stage1_t5_unused": ("train_adapter", "reads only ['clip']",
                             [*common, "--adapter_config", str(CONFIGS / "tiny.yaml"), *t5_flag, str(world["t5"])]),
        "stage1_missing_folder": ("train_adapter", "does not exist",
                                  [*common, "--adapter_config", str(world["config"]), *t5_flag,
                                   str(tmp_path / "nowhere")]),
        "stage1_cache_captions": ("train_adapter", "--cache_latents",
                                  ["--pretrained_model_name_or_path", str(world["sd"]), "--train_data_dir", str(multi),
                                   "--output_dir", str(out), *FAST, "--cache_latents", "--adapter_config",
                                   str(world["config"]), *t5_flag, str(world["t5"])]),
        "stage2_width": ("finetune_diffusion", "48", [*common, "--adapter_path", str(stage1), *t5_flag,
                                                      str(world["t5_wide"])]),
        "stage2_orphan": ("finetune_diffusion", "--t5_model_name_or_path", [*common, "--adapter_path", str(orphan)]),
        "sample_width": ("sample", "48", ["--checkpoint", str(world["sd"]), "--adapter_path",
                                          str(stage1), *t5_flag, str(world["t5_wide"]), "--prompt", PROMPTS[0],
                                          "--output_dir", str(out), "--no_progress"]),
    }[case]
    with pytest.raises(SystemExit) as err:
        _script(script).main(argv)
    assert err.value.code == 2
    assert needle in _one_error_line(capsys)
    assert not out.exists()
