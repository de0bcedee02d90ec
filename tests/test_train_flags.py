"""The trainer's run-facing behaviour: validation under mixed precision (after the checkpoint, images on disk and in
tensorboard), the launcher's settings, gradient checkpointing of the project's modules, Min-SNR and offset noise
against diffusers, and boolean flags that a YAML cannot lock on."""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from torch import nn
from torch.utils.data import TensorDataset

from common.diffusion_loss import diffusion_mse, min_snr_weights, training_noise
from common.grad_checkpoint import enable_gradient_checkpointing
from common.train import (
    TrainConfig,
    Trainer,
    launch_mismatch_note,
    launcher_requested_processes,
    parse_args_with_config,
    validation_images,
)


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fresh_accelerate_state(monkeypatch):
    for name in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# --------------------------------------------------------------------------------------------------------------
# Min-SNR and offset noise: diffusers' train_text_to_image.py is the oracle
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_loss_is_diffusers_train_text_to_image(prediction_type):
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from common.schedule import NoiseSchedule

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type)
    schedule = NoiseSchedule.from_config(dict(scheduler.config))
    g = torch.Generator().manual_seed(0)
    timesteps = torch.tensor([0, 1, 10, 100, 400, 999, 500, 250])
    pred, target = torch.randn(8, 4, 6, 6, generator=g), torch.randn(8, 4, 6, 6, generator=g)
    gamma = 5.0
    # diffusers/examples/text_to_image/train_text_to_image.py, the snr_gamma branch
    snr = compute_snr(scheduler, timesteps)
    weights = torch.stack([snr, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
    expected = F.mse_loss(pred.float(), target.float(), reduction="none")
    expected = (expected.mean(dim=list(range(1, len(expected.shape)))) * weights).mean()

    abar = schedule.abar(timesteps, like=pred)
    torch.testing.assert_close(min_snr_weights(abar, gamma, prediction_type), weights.float(), rtol=1e-5, atol=0)
    got = diffusion_mse(pred, target, abar=abar, snr_gamma=gamma, prediction_type=prediction_type)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    # the closed form: SNR = abar / (1 - abar); low-noise steps are capped at gamma
    a = scheduler.alphas_cumprod[timesteps].double()
    closed = (a / (1 - a)).clamp(max=gamma) / ((a / (1 - a)) + (prediction_type == "v_prediction"))
    torch.testing.assert_close(min_snr_weights(abar, gamma, prediction_type).double(), closed, rtol=1e-5, atol=0)
    assert torch.equal(diffusion_mse(pred, target), F.mse_loss(pred, target))  # no gamma: plain MSE


def test_offset_noise_draws_as_diffusers():
    latents = torch.zeros(3, 4, 5, 5)
    torch.manual_seed(7)
    got = training_noise(latents, 0.1)
    torch.manual_seed(7)
    noise = torch.randn_like(latents)
    noise += 0.1 * torch.randn((latents.shape[0], latents.shape[1], 1, 1), device=latents.device)
    assert torch.equal(got, noise)
    torch.manual_seed(7)
    plain = training_noise(latents, 0.0)
    torch.manual_seed(7)
    assert torch.equal(plain, torch.randn_like(latents))


# --------------------------------------------------------------------------------------------------------------
# Gradient checkpointing of the project's own modules: same gradients, and the blocks really recompute
# --------------------------------------------------------------------------------------------------------------


def _relational_net():
    from contextdiff.adapter import RelationalNet

    torch.manual_seed(0)
    net = RelationalNet(latent_channels=4, patch_size=2, dim=16, depth=2, heads=2, text_dims=(8,))
    nn.init.normal_(net.proj_out.weight, std=0.1)  # zero-init head: give the blocks a gradient
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 8, generator=g))
    return net, lambda m: m(*args).square().mean(), "blocks"


def _shifted_prior():
    from shifted.prior import ShiftedPrior

    torch.manual_seed(0)
    prior = ShiftedPrior(emb_dim=24, text_dim=32, text_len=8, width=64, layers=2, heads=4, dim_head=16,
                         clip_models=["a", "b", "c"], clip_dims=[8, 8, 8], text_encoder="tiny-t5")
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(3, 24, generator=g), torch.randint(0, 1000, (3,), generator=g), torch.randn(3, 24, generator=g),
            torch.randn(3, 8, 32, generator=g), torch.randint(0, 16, (3,), generator=g))
    return prior, lambda m: m(*args).square().mean(), "blocks"


def _noise_aware_clip():
    from sdg.tiny import tiny_noise_aware_clip

    clip, _ = tiny_noise_aware_clip("vit", film_init="default")
    g = torch.Generator().manual_seed(1)
    x, t = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.tensor([10, 900])
    return clip, lambda m: m(x, t).embedding.square().mean(), None


@pytest.mark.parametrize("build", [_relational_net, _shifted_prior, _noise_aware_clip])
def test_gradient_checkpointing_keeps_the_gradients(build):
    plain, loss_of, blocks = build()
    checkpointed = copy.deepcopy(plain)
    assert enable_gradient_checkpointing(checkpointed)
    for m in (plain, checkpointed):
        m.train()
        loss_of(m).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert plain.state_dict().keys() == checkpointed.state_dict().keys()
    assert type(checkpointed).__name__ == type(plain).__name__
    if blocks:  # a block's layers run twice in a training step: the forward, and the recomputation in the backward
        calls = []
        for layer in getattr(checkpointed, blocks)[0].modules():
            layer.register_forward_hook(lambda *_: calls.append(1))
        with torch.no_grad():
            loss_of(checkpointed)
        once = len(calls)
        calls.clear()
        loss_of(checkpointed).backward()
        # recomputed in the backward (torch stops recomputing once the saved tensors are back: not every layer)
        assert once > 0 and len(calls) > once + once // 2
    else:
        assert checkpointed.gradient_checkpointing


def test_gradient_checkpointing_uses_the_models_own_switch():
    from codiff.dynamic import DynamicDiffusers
    from common.tiny import tiny_unet2d_condition

    dyn = DynamicDiffusers({"text": tiny_unet2d_condition(), "mask": tiny_unet2d_condition()})
    assert enable_gradient_checkpointing(dyn) == ["nets.text", "nets.mask"]
    assert all(net.is_gradient_checkpointing for net in dyn.nets.values())


# --------------------------------------------------------------------------------------------------------------
# Validation: the training dtype, after the checkpoint, on disk and in tensorboard
# --------------------------------------------------------------------------------------------------------------


class Frozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return torch.sigmoid(self.conv(x))


def test_bf16_validation_runs_after_the_checkpoint_and_records_images(tmp_path):
    torch.manual_seed(0)
    model, frozen = nn.Linear(4, 4), Frozen()
    data = TensorDataset(torch.randn(8, 4))
    out = tmp_path / "run"
    seen = []

    def loss_fn(batch, ctx):
        return ctx.models["model"](batch[0]).float().square().mean()

    def validate(step, models):
        seen.append((step, (out / f"checkpoint-{step}").is_dir()))
        # a float32 trainable module feeding a bf16 frozen one, as a pipeline does: only autocast makes it work
        latents = models["model"](torch.randn(2, 8, 8, 4)).permute(0, 3, 1, 2)
        return {"samples": frozen(latents), "score": 0.5}

    config = TrainConfig(output_dir=str(out), max_train_steps=2, train_batch_size=4, lr_warmup_steps=0,
                         mixed_precision="bf16", report_to="tensorboard", checkpointing_steps=2, validation_steps=2)
    with Trainer(config) as trainer:
        result = trainer.fit({"model": model}, loss_fn, data, frozen={"frozen": frozen}, validation_fn=validate)
    assert frozen.conv.weight.dtype == torch.bfloat16 and result.completed
    assert seen == [(2, True)]  # once (not again at the end), with the checkpoint already on disk
    folder = out / "validation" / "step-2"
    assert sorted(p.name for p in folder.iterdir()) == ["samples-000.png", "samples-001.png", "samples-grid.png"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images, scalars = set(), set()
    for event_file in (out / "logs").rglob("events.out.tfevents.*"):
        events = EventAccumulator(str(event_file), size_guidance={"images": 0, "scalars": 0})
        events.Reload()
        images |= set(events.Tags()["images"])
        scalars |= set(events.Tags()["scalars"])
    assert any(tag.startswith("samples") for tag in images), images
    assert "validation/score" in scalars


def test_validation_images_accepts_the_usual_returns():
    from PIL import Image

    batch = torch.rand(3, 3, 4, 4)
    assert [im.size for im in validation_images(batch)] == [(4, 4)] * 3
    assert len(validation_images(list(batch))) == 3 and len(validation_images(batch[0])) == 1
    assert validation_images([Image.new("RGB", (2, 2))])[0].size == (2, 2)
    first = validation_images(batch)[0]
    assert first.getpixel((0, 0)) == tuple(round(float(v) * 255) for v in batch[0, :, 0, 0])
    assert validation_images(torch.tensor(0.5)) == [] and validation_images([1.0, 2.0]) == []


# --------------------------------------------------------------------------------------------------------------
# The launcher decides
# --------------------------------------------------------------------------------------------------------------


def test_mixed_precision_defaults_to_the_launchers(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch` exports from its config
    with Trainer(TrainConfig(output_dir=str(tmp_path / "a"), report_to="none")) as trainer:
        assert trainer.config.mixed_precision == "bf16" and trainer.accelerator.mixed_precision == "bf16"
        assert trainer.weight_dtype == torch.bfloat16
    AcceleratorState._reset_state(reset_partial_state=True)
    with Trainer(TrainConfig(output_dir=str(tmp_path / "b"), report_to="none", mixed_precision="no")) as trainer:
        assert trainer.accelerator.mixed_precision == "no"  # an explicit flag wins


def test_launcher_process_count_is_compared(tmp_path, monkeypatch):
    assert launcher_requested_processes(["python", "x.py"]) is None  # plain python: nothing was asked
    monkeypatch.setenv("ACCELERATE_USE_CPU", "False")
    argv = ["/venv/bin/accelerate", "launch", "--num_processes", "2", "scripts/train_vae.py"]
    assert launcher_requested_processes(argv) == ("accelerate launch", 2)
    assert launcher_requested_processes(["accelerate", "launch", "--num-processes=3", "x.py"])[1] == 3
    config = tmp_path / "acc.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\nnum_processes: 4\nmixed_precision: bf16\n")
    assert launcher_requested_processes(["accelerate", "launch", "--config_file", str(config), "x.py"])[1] == 4
    note = launch_mismatch_note(("accelerate launch", 2), 1)
    assert "asked for 2 processes but this run has 1" in note
    if not torch.accelerator.is_available():
        assert "torchrun --nproc_per_node 2" in note
    assert launch_mismatch_note(("accelerate launch", 1), 1) is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launcher_requested_processes() == ("torchrun", 2)


# --------------------------------------------------------------------------------------------------------------
# Flags: every boolean switchable both ways, the loss flags in every denoising trainer
# --------------------------------------------------------------------------------------------------------------

TRAINERS = {
    "train_text_to_image": "scripts/train_text_to_image.py",
    "train_vae": "scripts/train_vae.py",
    "train_clip": "scripts/train_clip.py",
    "shifted_finetune": "scripts/shifted/finetune.py",
    "shifted_train": "scripts/shifted/train.py",
    "sdg_train_unconditional": "scripts/sdg/train_unconditional.py",
    "sdg_finetune_clip": "scripts/sdg/finetune_clip.py",
    "codiff_train_unimodal": "scripts/codiff/train_unimodal.py",
    "codiff_train_dynamic": "scripts/codiff/train_dynamic.py",
    "versatile_train": "scripts/versatile/train.py",
    "versatile_train_text_vae": "scripts/versatile/train_text_vae.py",
}


def _parser(name: str) -> argparse.ArgumentParser:
    if name.startswith("contextdiff"):
        from contextdiff.training import build_parser

        return build_parser(1 if name.endswith("1") else 2)
    path = REPO / TRAINERS[name]
    spec = importlib.util.spec_from_file_location(f"_trainer_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.build_parser()


@pytest.mark.parametrize("name", [*TRAINERS, "contextdiff1", "contextdiff2"])
def test_every_boolean_flag_can_be_switched_off_and_on(name):
    parser = _parser(name)
    one_way = [a.option_strings[0] for a in parser._actions
               if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction))]
    assert not one_way, f"{name}: {one_way} can only be switched one way (use argparse.BooleanOptionalAction)"
    assert "--gradient_checkpointing" in parser._option_string_actions
    assert "--no-gradient_checkpointing" in parser._option_string_actions
    assert "--compile" in parser._option_string_actions  # every trainer can run compiled (common.compile)


DENOISING_TRAINERS = ["train_text_to_image", "shifted_finetune", "contextdiff1", "contextdiff2", "codiff_train_unimodal",
                      "codiff_train_dynamic", "versatile_train", "sdg_train_unconditional", "shifted_train"]


@pytest.mark.parametrize("name", DENOISING_TRAINERS)
def test_denoising_trainers_take_the_loss_flags(name):
    options = _parser(name)._option_string_actions
    assert {"--snr_gamma", "--noise_offset"} <= set(options)


def test_a_yaml_true_is_switched_off_on_the_command_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("cache_latents: true\nuse_ema: true\n")
    parser = _parser("train_text_to_image")
    args = parse_args_with_config(parser, ["--config", str(config)])
    assert args.cache_latents and args.use_ema
    args = parse_args_with_config(parser, ["--config", str(config), "--no-cache_latents", "--no-use_ema"])
    assert not args.cache_latents and not args.use_ema
    assert args.mixed_precision is None  # the launcher decides


def test_sdg_adm_switches_reach_the_trainer():
    spec = importlib.util.spec_from_file_location("_sdg_uncond", REPO / "scripts/sdg/train_unconditional.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = module.build_parser()
    args = parser.parse_args(["--use_checkpoint", "True", "--use_fp16", "True"])
    module.apply_adm_switches(args, module.adm_flags_from_args(args))
    assert args.gradient_checkpointing and args.mixed_precision == "fp16"
    args = parser.parse_args([])
    module.apply_adm_switches(args, module.adm_flags_from_args(args))
    assert not args.gradient_checkpointing and args.mixed_precision is None
    args = parser.parse_args(["--use_fp16", "True", "--mixed_precision", "bf16"])
    from common.errors import UserError

    with pytest.raises(UserError, match="--use_fp16"):
        module.apply_adm_switches(args, module.adm_flags_from_args(args))
