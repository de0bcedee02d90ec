"""The method registry: every registered method honours the contract (load the shipped checkpoint, two images,
deterministic under a seed, bad settings refused in one line); the registry path gives the pixels of a direct
pipeline call; a sixth method registered with one entry appears in scripts/sample.py, the demo and the page."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import methods
from common.errors import UserError


REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO / "scripts"))
import app  # noqa: E402
import demo  # noqa: E402
import sample  # noqa: E402


PROMPTS = ["a red handwritten seven", "a blue handwritten two"]


def _settings(spec, **values):
    steps = 4 if spec.name == "sdg" else 2
    return spec.settings(prompts=list(PROMPTS), num_inference_steps=steps, **values)


@pytest.mark.parametrize("name", methods.REGISTRY)
def test_every_registered_method_honours_the_contract(name):
    spec = methods.get(name)
    assert spec.name == name and issubclass(spec.settings, methods.SamplingSettings)
    pipe = spec.load(str(spec.checkpoint_path()), "cpu")
    settings = _settings(spec, seed=3)
    settings.check()
    seen = []
    first = pipe(settings, callback=lambda stage, done, total: seen.append((done, total)))
    assert first.images.shape[0] == 2 and first.images.shape[1] == 3
    assert 0.0 <= float(first.images.min()) and float(first.images.max()) <= 1.0
    assert seen and seen[-1][0] == seen[-1][1]  # progress reached the end of the sampling
    again = pipe(settings)
    assert torch.equal(first.images, again.images)  # same seed, same pixels
    other = pipe(dataclasses.replace(settings, seed=4))
    assert not torch.equal(first.images, other.images)
    for bad in (dict(num_inference_steps=0), dict(eta=1.5), dict(sampler="euler"), dict(seed=-1)):
        with pytest.raises(UserError) as info:
            dataclasses.replace(settings, **bad).check()
        message = str(info.value)
        assert "\n" not in message and message.startswith("--"), message


def test_registry_path_gives_the_pixels_of_a_direct_pipeline_call():
    from common.pipeline import LatentTextToImage
    from contextdiff.checkpoint import load_contextdiff
    from contextdiff.pipeline import generate
    from sdg.sample_cli import run

    spec = methods.get("baseline")
    ours = spec.load(str(spec.checkpoint_path()))(_settings(spec, seed=5, guidance_scale=3.0)).images
    direct = LatentTextToImage.from_pretrained(str(spec.checkpoint_path()))(
        PROMPTS, num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(5),
        progress=False).images
    assert torch.equal(ours, direct)

    spec = methods.get("contextdiff")
    ours = spec.load(str(spec.checkpoint_path()))(_settings(spec, seed=1, guidance_scale=3.0)).images
    model = load_contextdiff(spec.checkpoint_path())
    direct = generate(**model.generate_kwargs(), prompts=PROMPTS, steps=2, guidance_scale=3.0,
                      generator=torch.Generator().manual_seed(1), progress=False).images
    assert torch.equal(ours, direct)

    spec = methods.get("sdg")
    ours = spec.load(str(spec.checkpoint_path()))(_settings(spec, seed=2, text_weight=300.0)).images
    folder = spec.checkpoint_path()
    direct = run(folder, PROMPTS, text_weight=300.0, clip_path=folder / "clip", respacing="4", seed=2)
    assert torch.equal(ours, direct)


def test_sdg_loads_its_unet_once_per_generation(monkeypatch, tmp_path):
    import sdg.checkpoint

    calls = []
    original = sdg.checkpoint.load_diffusion_model
    monkeypatch.setattr(sdg.checkpoint, "load_diffusion_model", lambda *a, **k: calls.append(a) or original(*a, **k))
    assert sample.main(["--method", "sdg", "--prompt", "a seven", "--num_inference_steps", "2", "--text_weight", "0",
                        "--no_progress", "--output_dir", str(tmp_path / "out")]) == 0
    assert len(calls) == 1


def test_codiff_without_a_mask_writes_no_dataset(monkeypatch, tmp_path):
    """The test masks are computed in memory and equal those of a digits build."""
    import codiff.sample_cli as cli
    from codiff.evaluation import paired_masks
    from common.digits import build_digits

    monkeypatch.setattr(cli, "DIGITS_ROOT", tmp_path / "never" / "digits")
    monkeypatch.chdir(tmp_path)
    assert sample.main(["--method", "codiff", "--prompt", "a red seven", "--num_inference_steps", "1",
                        "--no_progress", "--output_dir", str(tmp_path / "out")]) == 0
    assert not (tmp_path / "never").exists() and not (tmp_path / "data").exists()
    built = paired_masks([7, 3, 7, None], build_digits(tmp_path / "digits"))
    memory = paired_masks([7, 3, 7, None], None, masks=cli.digits_test_masks())
    assert all(torch.equal(a.ids, b.ids) and a.digit == b.digit for a, b in zip(built, memory))


def test_one_vocabulary_of_flags_old_spellings_warn(capsys):
    args, spec = sample.parse_args(["--method", "contextdiff", "--prompt", "x", "--steps", "7", "--scale", "2.5",
                                    "--pretrained_model_name_or_path", "somewhere"])
    err = capsys.readouterr().err
    assert (args.num_inference_steps, args.guidance_scale, args.checkpoint) == (7, 2.5, "somewhere")
    for old, new in (("--steps", "--num_inference_steps"), ("--scale", "--guidance_scale"),
                     ("--pretrained_model_name_or_path", "--checkpoint")):
        assert f"note: {old} is an old spelling of {new}" in err
    args, _ = sample.parse_args(["--method", "contextdiff", "--prompt", "x", "--num_inference_steps", "7"])
    assert args.num_inference_steps == 7 and not capsys.readouterr().err


def test_one_sampler_entry_dispatches_by_name_and_reports_progress():
    from common.samplers import sample as sample_by_name
    from common.samplers import sample_ddim, sample_ddpm
    from common.schedule import NoiseSchedule, make_plan

    schedule = NoiseSchedule.named("linear", 1000)
    plan = make_plan(schedule, "5")

    def denoiser(x, t):
        return 0.1 * x

    def run(fn, name=None, **kw):
        gen = torch.Generator().manual_seed(0)
        args = (denoiser, schedule, plan, (2, 3))
        return fn(name, *args, generator=gen, **kw) if name else fn(*args, generator=gen, **kw)

    assert torch.equal(run(sample_by_name, "ddim", eta=0.5, progress=False), run(sample_ddim, eta=0.5, progress=False))
    assert torch.equal(run(sample_by_name, "ddpm", variance_type="fixed_large", progress=False),
                       run(sample_ddpm, variance_type="fixed_large", progress=False))
    seen = []
    run(sample_by_name, "ddim", progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert seen == [("DDIM", i, 5) for i in range(6)]
    with pytest.raises(UserError, match="unknown sampler 'euler'"):
        run(sample_by_name, "euler")


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setattr(methods, "_added", {})
    methods.register("toy", "toy_method")
    yield methods.get("toy")


def test_a_sixth_method_is_one_registry_entry(toy_registered, tmp_path):
    spec = toy_registered
    # scripts/sample.py: in --method's choices, its settings become flags, and it generates
    help_text = sample.build_parser().format_help()
    assert "toy" in help_text.split("--method")[1].split("\n")[0]
    assert "--brightness" in sample.build_parser(spec).format_help()
    out = tmp_path / "out"
    assert sample.main(["--method", "toy", "--prompt", "grey", "--num_images", "2", "--brightness", "0.25",
                        "--num_inference_steps", "1", "--no_progress", "--output_dir", str(out)]) == 0
    assert len(list((out / "images").glob("*.png"))) == 2
    # the demo and the cross-method table
    assert "toy" in demo.demo_methods()
    # the page: a tab with its own control, a flag for its checkpoint, and a run through the back end
    assert "toy" in app.page_methods()
    assert [f.name for f, _ in app.page_fields(spec)] == ["brightness"]
    assert app.build_parser().parse_args(["--toy_checkpoint", "x"]).toy_checkpoint == "x"
    result = app.run_job(app.Job("toy", "grey", app.Shared(steps=2, num_images=3), {"brightness": 0.75}),
                         tmp_path / "page")
    assert result.images.shape == (3, 3, 8, 8) and result.settings["settings"]["brightness"] == 0.75
    assert "--brightness 0.75" in result.settings["command"]


def test_a_method_registered_by_environment_shows_in_sample_help():
    env = dict(os.environ, DLAB_METHODS="toy=toy_method",
               PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "sample.py"), "--method", "toy", "--help"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "toy" in proc.stdout and "--brightness" in proc.stdout
