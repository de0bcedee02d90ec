"""``--snr_gamma`` / ``--noise_offset`` in the method trainers with their own losses (SDG's hybrid loss, Versatile's
flow loss, the Shifted prior's x0 loss): the weights are diffusers' ``compute_snr`` recipe, the offset noise is
drawn as diffusers' examples draw it, and where a flag cannot apply the trainer refuses it in one line."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from common.errors import UserError


REPO = Path(__file__).resolve().parent.parent


def _diffusers_min_snr_weights(betas: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction_type: str):
    """diffusers/examples/text_to_image/train_text_to_image.py, the snr_gamma branch, on a scheduler with ``betas``."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(num_train_timesteps=len(betas), trained_betas=betas.double().numpy())
    snr = compute_snr(scheduler, timesteps)
    weights = torch.stack([snr, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        return weights / snr
    if prediction_type == "v_prediction":
        return weights / (snr + 1)
    return weights  # x0 target


class _RecordingUNet(torch.nn.Module):
    """A learn_sigma stand-in: records x_t and t, returns a fixed function of x_t with 2C channels."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.config = SimpleNamespace(in_channels=channels, out_channels=2 * channels)
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.calls = []

    def forward(self, x_t, t):
        self.calls.append((x_t.detach().clone(), t.clone()))
        return SimpleNamespace(sample=torch.cat([self.scale * x_t, torch.zeros_like(x_t)], dim=1))


def _sdg_schedule():
    from sdg.adm import ADMFlags, noise_schedule

    return noise_schedule(ADMFlags(diffusion_steps=1000, noise_schedule="linear"))


def test_sdg_hybrid_loss_min_snr_weights_the_eps_term_as_diffusers():
    from sdg.training import HybridLoss, _Tables, hybrid_terms

    schedule, gamma = _sdg_schedule(), 5.0
    x0 = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    unet = _RecordingUNet()
    torch.manual_seed(3)
    got = HybridLoss(unet, schedule, lambda_vlb=1e-3, snr_gamma=gamma)(x0).loss
    torch.manual_seed(3)  # the same draws: t, then the noise
    t = torch.randint(0, 1000, (6,))
    noise = torch.randn_like(x0)
    x_t, _ = unet.calls[0]
    output = unet(x_t, t).sample
    terms = hybrid_terms(output, x0, x_t, t, noise, schedule, _Tables(schedule))
    weights = _diffusers_min_snr_weights(schedule.betas, t, gamma, "epsilon").float()
    expected = (terms["mse"] * weights + 1e-3 * 1000 * terms["vb"]).mean()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert weights.min() < 1  # the draw has low-noise steps whose eps term is really down-weighted
    torch.manual_seed(3)
    plain = HybridLoss(unet, schedule, lambda_vlb=1e-3)(x0).loss
    assert not torch.allclose(plain, got)


def test_sdg_hybrid_loss_offset_noise_is_diffusers_draw():
    from sdg.training import HybridLoss

    schedule = _sdg_schedule()
    x0 = torch.zeros(4, 3, 5, 5)  # x_t = sqrt(1 - abar) noise: the noise can be read back from x_t
    unet = _RecordingUNet()
    torch.manual_seed(11)
    HybridLoss(unet, schedule, noise_offset=0.1)(x0)
    x_t, t = unet.calls[0]
    used = x_t / (1 - schedule.abar(t, like=x_t)).sqrt()
    torch.manual_seed(11)  # diffusers' examples: randn_like, plus offset * randn(B, C, 1, 1)
    expected_t = torch.randint(0, 1000, (4,))
    noise = torch.randn_like(x0)
    noise += 0.1 * torch.randn((x0.shape[0], x0.shape[1], 1, 1))
    assert torch.equal(t, expected_t)
    torch.testing.assert_close(used, noise, rtol=1e-4, atol=1e-4)


def test_versatile_flow_loss_min_snr_and_offset_noise():
    from versatile.multiflow import flow_contexts, resolve_flow
    from versatile.pipeline import vd_schedule
    from versatile.tiny import tiny_diffuser
    from versatile.training import flow_loss

    model = tiny_diffuser(seed=4, zero_init=False).eval()
    cfg, g = model.config, torch.Generator().manual_seed(5)
    text = torch.randn(2, 7, cfg.context_dim, generator=g)
    x0, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([5, 800])
    noise = torch.randn(2, 4, 8, 8, generator=g)
    schedule = vd_schedule()
    batch = {"x0": x0, "text": text, "t": t, "noise": noise}
    gamma = 5.0
    with torch.no_grad():
        got = flow_loss(model, batch, "t2i", schedule=schedule, snr_gamma=gamma)
        plain = flow_loss(model, batch, "t2i", schedule=schedule)
        abar = schedule.abar(t, like=x0)
        eps = model(abar.sqrt() * x0 + (1 - abar).sqrt() * noise, t, flow_contexts(resolve_flow("t2i"), text=text),
                    "image")
    per_sample = (eps.float() - noise).pow(2).flatten(1).mean(1)
    weights = _diffusers_min_snr_weights(schedule.betas, t, gamma, "epsilon").float()
    torch.testing.assert_close(got, (per_sample * weights).mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(plain, per_sample.mean(), rtol=1e-5, atol=1e-7)

    # offset noise with the flow's generator: image latents get it, text latents (one vector each) do not
    def noise_used(x0, flow, ctx_kind, offset):
        seen = []

        def spy(x_t, t, contexts, xtype):
            seen.append(x_t)
            return torch.zeros_like(x_t)

        item = {"x0": x0, ctx_kind: text, "t": torch.tensor([999, 999])}
        flow_loss(spy, item, flow, schedule=schedule, noise_offset=offset, generator=torch.Generator().manual_seed(9))
        abar = schedule.abar(item["t"], like=x0)
        return (seen[0] - abar.sqrt() * x0) / (1 - abar).sqrt()

    g = torch.Generator().manual_seed(9)
    expected = torch.randn(2, 4, 8, 8, generator=g)
    expected = expected + 0.2 * torch.randn(2, 4, 1, 1, generator=g)
    torch.testing.assert_close(noise_used(x0, "t2i", "text", 0.2), expected, rtol=1e-4, atol=1e-4)
    text_x0 = torch.randn(2, cfg.text_latent_dim)
    torch.testing.assert_close(noise_used(text_x0, "tv", "text", 0.2), noise_used(text_x0, "tv", "text", 0.0))


def test_shifted_prior_min_snr_replaces_the_p2_weight():
    from shifted.bank import GaussianBank
    from shifted.prior import ShiftedPrior
    from shifted.training import prior_loss

    names = ["clip-a", "clip-b", "clip-c"]
    torch.manual_seed(0)
    prior = ShiftedPrior(emb_dim=24, text_dim=32, text_len=8, width=64, layers=2, heads=4, dim_head=16,
                         clip_models=names, clip_dims=[8, 8, 8], text_encoder="tiny-t5").eval()
    g = torch.Generator().manual_seed(0)
    bank = GaussianBank(torch.randn(4, 24, generator=g), 0.1 + torch.rand(4, 24, generator=g), 5.0,
                        clip_models=names, block_dims=(8, 8, 8))
    batch = {"image_emb": torch.randn(5, 24, generator=g), "text_emb": torch.randn(5, 24, generator=g),
             "text_states": torch.randn(5, 8, 32, generator=g)}
    gamma = 2.0
    with torch.no_grad():
        got = prior_loss(prior, bank, batch, empty_text_prob=0.0, snr_gamma=gamma,
                         generator=torch.Generator().manual_seed(7))
        p2 = prior_loss(prior, bank, batch, empty_text_prob=0.0, generator=torch.Generator().manual_seed(7))
        g = torch.Generator().manual_seed(7)
        schedule = prior.noise_schedule()
        t = torch.randint(0, 1000, (5,), generator=g)
        noise = torch.randn(5, 24, generator=g)
        from common.process import q_sample
        from shifted.process import bank_shift

        k = bank.select(batch["text_emb"])
        abar = schedule.abar(t, like=batch["image_emb"])
        x_t = q_sample(batch["image_emb"], abar, noise, bank_shift(bank, k))
        pred = prior(x_t, t, batch["text_emb"], batch["text_states"], k)
    weights = _diffusers_min_snr_weights(schedule.betas, t, gamma, "sample").float()
    expected = (weights * (pred - batch["image_emb"]).pow(2).mean(1)).mean()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(got, p2)


def _script(path: str):
    spec = importlib.util.spec_from_file_location(f"_s_{Path(path).stem}", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shifted_prior_refuses_noise_offset_in_one_line(tmp_path, capsys):
    train = _script("scripts/shifted/train.py")
    out = tmp_path / "prior"
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--cache", str(tmp_path / "none.safetensors"), "--no_bank", "--noise_offset", "0.1",
                    "--output_dir", str(out)])
    code = exit_info.value.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code != 0 and len(err) == 1 and "--noise_offset" in err[0] and "embedding" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("script", ["scripts/sdg/train_unconditional.py", "scripts/versatile/train.py"])
def test_bad_loss_flag_values_are_one_line(script, tmp_path, capsys):
    module = _script(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--train_data_dir", str(tmp_path), "--snr_gamma", "-1", "--output_dir", str(tmp_path / "o")])
    code = exit_info.value.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code != 0 and len(err) == 1 and "--snr_gamma" in err[0], err
    assert not (tmp_path / "o").exists()
    with pytest.raises(UserError):
        from common.diffusion_loss import check_diffusion_loss_args

        check_diffusion_loss_args(SimpleNamespace(snr_gamma=None, noise_offset=-0.5))


# --------------------------------------------------------------------------------------------------------------
# --center_crop / --random_flip wherever images are trained
# --------------------------------------------------------------------------------------------------------------

IMAGE_TRAINERS = ["scripts/train_text_to_image.py", "scripts/train_vae.py", "scripts/train_clip.py",
                  "scripts/shifted/finetune.py", "scripts/sdg/train_unconditional.py", "scripts/sdg/finetune_clip.py",
                  "scripts/codiff/train_unimodal.py", "scripts/codiff/train_dynamic.py"]


@pytest.mark.parametrize("script", IMAGE_TRAINERS)
def test_image_trainers_take_crop_and_flip_both_ways(script):
    parser = _script(script).build_parser()
    options = set(parser._option_string_actions)
    assert {"--center_crop", "--no-center_crop", "--random_flip", "--no-random_flip"} <= options
    defaults = parser.parse_args([])
    assert defaults.center_crop is True and defaults.random_flip is False  # diffusers' example defaults


def test_versatile_offers_the_crop_only_since_it_encodes_every_image_once():
    parser = _script("scripts/versatile/train.py").build_parser()
    assert "--no-center_crop" in parser._option_string_actions
    assert "--random_flip" not in parser._option_string_actions


@pytest.mark.parametrize("script", ["scripts/codiff/train_unimodal.py", "scripts/codiff/train_dynamic.py"])
def test_codiff_random_flip_with_cached_latents_is_one_line(script, tmp_path, capsys):
    module = _script(script)
    argv = ["--train_data_dir", str(tmp_path), "--random_flip", "--output_dir", str(tmp_path / "o")]
    if script.endswith("train_unimodal.py"):
        argv += ["--modality", "text"]
    with pytest.raises(SystemExit):
        module.main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "--random_flip" in err[0] and "--no-cache_latents" in err[0], err
    assert not (tmp_path / "o").exists()


def test_sdg_images_flip_per_draw_and_crop_as_asked(tmp_path):
    from PIL import Image

    from sdg.data import InMemoryImages

    folder = tmp_path / "imgs"
    folder.mkdir()
    pixels = torch.zeros(24, 40, 3, dtype=torch.uint8)
    pixels[:, 8:16] = 255  # a bright band left of centre (inside the centre crop): a flip moves it to the right
    Image.fromarray(pixels.numpy()).save(folder / "a.png")
    plain = InMemoryImages(folder, 16)
    assert plain.pixels.shape == (1, 3, 16, 16) and not torch.equal(plain[0], plain[0].flip(-1))
    torch.manual_seed(0)
    flipping = InMemoryImages(folder, 16, random_flip=True)
    draws = [flipping[0] for _ in range(20)]
    flipped = [bool(torch.equal(d, plain[0].flip(-1))) for d in draws]
    assert all(f or torch.equal(d, plain[0]) for f, d in zip(flipped, draws))
    assert 0 < sum(flipped) < 20  # fresh draws, not one frozen choice
    crops = set()
    for seed in range(6):  # --no-center_crop: a random crop (27 x 16 after the resize: 12 offsets)
        torch.manual_seed(seed)
        crops.add(InMemoryImages(folder, 16, center_crop=False).pixels.numpy().tobytes())
    assert len(crops) > 1


def test_versatile_validation_needs_the_t2i_flow(tmp_path, capsys):
    module = _script("scripts/versatile/train.py")
    with pytest.raises(SystemExit):
        module.main(["--train_data_dir", str(tmp_path), "--stage", "single", "--validation_prompts", "a red seven",
                     "--output_dir", str(tmp_path / "o")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "--validation_prompts" in err[0] and "t2i" in err[0], err
    assert not (tmp_path / "o").exists()
