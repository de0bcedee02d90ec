"""The prior network, its guidance, training loss, save/load and configs."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from common.errors import UserError
from common.process import q_sample
from shifted.bank import GaussianBank, fit_bank
from shifted.config import build_prior, load_config, parameter_counts
from shifted.embeddings import mean_block_cosine
from shifted.pipeline import (
    check_prior_bank,
    load_prior,
    prior_denoiser,
    sample_prior,
    save_prior,
)
from shifted.prior import ShiftedPrior, prior_parameter_count
from shifted.process import bank_shift
from shifted.training import PriorObjective, prior_loss


CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "shifted"
NAMES = ["clip-a", "clip-b", "clip-c"]
TINY = dict(emb_dim=24, text_dim=32, text_len=8, width=64, layers=2, heads=4, dim_head=16,
            clip_models=NAMES, clip_dims=[8, 8, 8], text_encoder="tiny-t5")
L = TINY["text_len"]


def tiny_prior(seed=0, **overrides):
    torch.manual_seed(seed)
    return ShiftedPrior(**{**TINY, **overrides}).eval()


def inputs(b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x_t=torch.randn(b, 24, generator=g),
        timesteps=torch.randint(0, 1000, (b,), generator=g),
        clip_text=torch.randn(b, 24, generator=g),
        text_states=torch.randn(b, L, 32, generator=g),
        bank_index=torch.randint(0, 16, (b,), generator=g),
    )


def tiny_bank(seed=0, size=4):
    g = torch.Generator().manual_seed(seed)
    return GaussianBank(torch.randn(size, 24, generator=g), 0.1 + torch.rand(size, 24, generator=g), 5.0,
                        clip_models=NAMES, block_dims=(8, 8, 8))


def test_output_shape_parameter_formula_and_zero_text_path():
    prior = tiny_prior()
    x = inputs()
    out = prior(**x)
    assert out.shape == (3, 24) and bool(torch.isfinite(out).all())
    assert sum(p.numel() for p in prior.parameters()) == prior_parameter_count(24, 32, 64, 2, 4, 16)
    baseline = tiny_prior(use_bank_token=False)
    assert sum(p.numel() for p in baseline.parameters()) == prior_parameter_count(
        24, 32, 64, 2, 4, 16, use_bank_token=False)
    assert prior.seq_len == L + 5 and baseline.seq_len == L + 4
    null = prior(**{**x, "text_states": torch.zeros(3, L, 32)})  # the CFG null: all-zero text states
    assert bool(torch.isfinite(null).all()) and not torch.allclose(null, out)


def test_causality_earlier_positions_ignore_later_tokens_and_the_output_sees_every_token():
    prior = tiny_prior()
    x = inputs(b=2)
    base_h = prior.hidden_states(**x)
    base_out = prior(**x)
    # (input to perturb, its position in the sequence)
    positions = {"clip_text": L, "timesteps": L + 1, "bank_index": L + 2, "x_t": L + 3}
    for name, pos in positions.items():
        changed = dict(x)
        changed[name] = x[name] + (7 if name in ("timesteps", "bank_index") else 0.5 * torch.randn_like(x[name]))
        h = prior.hidden_states(**changed)
        assert torch.equal(h[:, :pos], base_h[:, :pos]), name  # nothing before the token moves, bit for bit
        assert not torch.allclose(h[:, pos:], base_h[:, pos:]), name
        assert not torch.allclose(prior(**changed), base_out, atol=1e-6), name
    for token in (0, L - 1):  # first and last (padding) text state are both genuine inputs
        states = x["text_states"].clone()
        states[:, token] += torch.randn(2, 32)  # (a constant shift would vanish in the LayerNorm)
        h = prior.hidden_states(**{**x, "text_states": states})
        assert torch.equal(h[:, :token], base_h[:, :token])
        assert not torch.allclose(prior(**{**x, "text_states": states}), base_out, atol=1e-6)


class CountingPrior(torch.nn.Module):
    """Wraps a prior and records the batch size of every forward."""

    def __init__(self, prior):
        super().__init__()
        self.prior, self.calls, self.config = prior, [], prior.config

    def forward(self, x_t, timesteps, clip_text, text_states, bank_index=None):
        self.calls.append(x_t.shape[0])
        return self.prior(x_t, timesteps, clip_text, text_states, bank_index)


def test_cfg_limits_all_dimensions_and_the_released_half_split():
    prior = CountingPrior(tiny_prior())
    x = inputs(b=2)
    args = (x["x_t"], x["timesteps"])
    cond = prior.prior(x["x_t"], x["timesteps"], x["clip_text"], x["text_states"], x["bank_index"])
    uncond = prior.prior(x["x_t"], x["timesteps"], x["clip_text"], torch.zeros_like(x["text_states"]), x["bank_index"])
    ctx = (x["clip_text"], x["text_states"], x["bank_index"])
    assert torch.allclose(prior_denoiser(prior, *ctx, guidance_scale=0.0)(*args), uncond, atol=1e-6)
    prior.calls.clear()
    assert torch.allclose(prior_denoiser(prior, *ctx, guidance_scale=1.0)(*args), cond, atol=1e-6)
    assert prior.calls == [2]  # w = 1: one conditional forward, no doubling
    prior.calls.clear()
    guided = prior_denoiser(prior, *ctx, guidance_scale=3.0)(*args)
    assert prior.calls == [4]  # [uncond; cond] in one batched forward
    assert torch.allclose(guided, uncond + 3.0 * (cond - uncond), atol=1e-5)  # every one of the 24 dims
    half = prior_denoiser(prior, *ctx, guidance_scale=3.0, guide_half=True)(*args)
    assert torch.allclose(half[:, :12], guided[:, :12], atol=1e-6)
    assert torch.allclose(half[:, 12:], cond[:, 12:], atol=1e-6)  # released helper: second half unguided
    assert not torch.allclose(half[:, 12:], guided[:, 12:], atol=1e-4)


def test_sample_prior_guidance_zero_equals_sampling_without_text_states():
    prior, bank = tiny_prior(), tiny_bank()
    x = inputs(b=3)
    kw = dict(steps="8", generator=None)
    a = sample_prior(prior, bank, x["clip_text"], x["text_states"], guidance_scale=0.0,
                     **{**kw, "generator": torch.Generator().manual_seed(5)})
    b = sample_prior(prior, bank, x["clip_text"], torch.zeros_like(x["text_states"]),
                     **{**kw, "generator": torch.Generator().manual_seed(5)})
    assert torch.allclose(a, b, atol=1e-5)
    c = sample_prior(prior, bank, x["clip_text"], x["text_states"],
                     **{**kw, "generator": torch.Generator().manual_seed(5)})
    assert not torch.allclose(a, c, atol=1e-3)
    clamped = sample_prior(prior, bank, x["clip_text"], x["text_states"], sampler="ddim", clip_denoised=True,
                           steps="8", generator=torch.Generator().manual_seed(5))
    k = bank.select(x["clip_text"])
    assert bool((clamped >= bank.mean[k] - 3 * bank.std[k] - 1e-5).all())  # DDIM eta 0 ends on the clamped x0
    assert bool((clamped <= bank.mean[k] + 3 * bank.std[k] + 1e-5).all())


def test_loss_is_the_p2_weighted_x0_error_on_the_shifted_marginal():
    prior, bank = tiny_prior(), tiny_bank()
    g = torch.Generator().manual_seed(6)
    batch = {"image_emb": torch.randn(5, 24, generator=g), "text_emb": torch.randn(5, 24, generator=g),
             "text_states": torch.randn(5, L, 32, generator=g)}
    before = {k: v.clone() for k, v in batch.items()}
    loss = prior_loss(prior, bank, batch, empty_text_prob=0.5, generator=torch.Generator().manual_seed(7))
    # the same draws, written out: t, noise, then the two keep masks
    g = torch.Generator().manual_seed(7)
    schedule = prior.noise_schedule()
    t = torch.randint(0, 1000, (5,), generator=g)
    noise = torch.randn(5, 24, generator=g)
    keep_text = (torch.rand(5, generator=g) >= 0.5).float()
    abar = schedule.alphas_cumprod[t].float().unsqueeze(1)
    k = bank.select(batch["text_emb"])
    mu, S = bank.mean[k], 5.0 * bank.std[k]
    x_t = abar.sqrt() * batch["image_emb"] + (1 - abar.sqrt()) * mu + (1 - abar).sqrt() * S * noise
    assert torch.allclose(q_sample(batch["image_emb"], abar, noise, bank_shift(bank, k)), x_t, atol=1e-5)
    pred = prior(x_t, t, batch["text_emb"], batch["text_states"] * keep_text[:, None, None], k)
    expected = ((1 - abar) * (pred - batch["image_emb"]).pow(2).mean(1, keepdim=True)).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    assert 0 < keep_text.sum() < 5  # the draw really dropped some captions
    for key in batch:  # CFG dropout did not write into the caller's tensors
        assert torch.equal(batch[key], before[key])
    # as the shared trainer calls it: loss_fn(batch, ctx) runs the PREPARED module in ctx.models
    wrapped = CountingPrior(prior)
    objective = PriorObjective(prior, bank, empty_text_prob=0.5)
    via_ctx = objective(batch, SimpleNamespace(models={"prior": wrapped}), torch.Generator().manual_seed(7))
    assert wrapped.calls == [5] and torch.allclose(via_ctx, loss)
    assert objective.models == {"prior": prior}


def test_objective_trains_in_the_shared_trainer(tmp_path):
    from accelerate.state import AcceleratorState, GradientState

    from common.train import TrainConfig, Trainer
    from shifted.embeddings import EmbeddingDataset

    g = torch.Generator().manual_seed(9)
    data = EmbeddingDataset({
        "image_emb": torch.randn(24, 24, generator=g),
        "text_emb": torch.randn(24, 24, generator=g),
        "text_states": torch.randn(24, L, 32, generator=g),
    })
    config = TrainConfig(output_dir=str(tmp_path / "run"), max_train_steps=3, train_batch_size=8, lr_warmup_steps=0,
                         checkpointing_steps=3, validation_steps=10, report_to="none")
    prior, bank = tiny_prior(), tiny_bank()
    before = [p.detach().clone() for p in prior.parameters()]
    try:
        with Trainer(config) as trainer:
            objective = PriorObjective(prior, bank)
            result = trainer.fit(objective.models, objective, data)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert result.completed and result.global_step == 3 and len(result.loss_history) == 3
    assert all(loss > 0 for loss in result.loss_history)
    assert any(not torch.equal(a, b) for a, b in zip(before, result.models["prior"].parameters()))
    folder = save_prior(tmp_path / "prior", result.models["prior"], bank)
    assert torch.equal(load_prior(folder)[0].query, result.models["prior"].query)


def test_tiny_prior_learns_text_conditional_embeddings():
    """Synthetic (text, image) pairs in 3 clusters and ONE global bank Gaussian (so the text
    information must come through the network): the loss falls and samples land on their caption's cluster."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(8)
    centers = 2.0 * torch.randn(3, 24, generator=g)
    labels = torch.randint(0, 3, (600,), generator=g)
    image = centers[labels] + 0.2 * torch.randn(600, 24, generator=g)
    text = centers[labels] + 0.5 * torch.randn(600, 24, generator=g)
    states = torch.randn(3, L, 32, generator=g)[labels]
    bank = fit_bank(image, 1, clip_models=NAMES, block_dims=(8, 8, 8))
    prior = tiny_prior(seed=1).train()
    objective = PriorObjective(prior, bank)
    opt = torch.optim.AdamW(prior.parameters(), lr=3e-3)
    test = torch.arange(0, 600, 50)

    def score():
        prior.eval()
        out = sample_prior(prior, bank, text[test], states[test], generator=torch.Generator().manual_seed(0))
        prior.train()
        return float(mean_block_cosine(out, centers[labels[test]], (8, 8, 8)).mean())

    before = score()
    losses = []
    for _ in range(60):
        idx = torch.randint(0, 600, (32,), generator=g)
        loss = objective({"image_emb": image[idx], "text_emb": text[idx], "text_states": states[idx]}, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) < 0.2 * sum(losses[:10])
    after = score()
    assert before < 0.5 < 0.95 < after, (before, after)  # the cluster centres are nearly orthogonal


def test_save_load_round_trip_and_mismatched_models_are_refused(tmp_path):
    prior, bank = tiny_prior(), tiny_bank()
    folder = save_prior(tmp_path / "prior", prior, bank)
    loaded, loaded_bank = load_prior(folder, clip_models=NAMES, text_encoder="tiny-t5")
    x = inputs()
    assert torch.equal(loaded(**x), prior(**x))
    assert torch.equal(loaded_bank.std, bank.std) and loaded.config.clip_models == NAMES
    one = lambda **kw: sample_prior(loaded, loaded_bank, x["clip_text"], x["text_states"],  # noqa: E731
                                    generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(one(), sample_prior(prior, bank, x["clip_text"], x["text_states"],
                                           generator=torch.Generator().manual_seed(3)))
    cases = [
        (lambda: load_prior(folder, clip_models=["ViT-B-16/openai", "ViT-B-32/openai", "RN101/openai"]),
         "CLIP models"),
        (lambda: load_prior(folder, text_encoder="t5-11b"), "tiny-t5 text states, not t5-11b"),
        (lambda: check_prior_bank(prior, GaussianBank(torch.zeros(2, 30), torch.ones(2, 30))), "30-dimensional"),
        (lambda: check_prior_bank(prior, GaussianBank(torch.zeros(2, 24), torch.ones(2, 24),
                                                      clip_models=["x", "y", "z"], block_dims=(8, 8, 8))),
         "CLIP models"),
        (lambda: check_prior_bank(prior, None), "pass its bank"),
        (lambda: sample_prior(tiny_prior(use_bank_token=False), bank, x["clip_text"], x["text_states"]),
         "no-bank baseline"),
        (lambda: prior(**{**x, "x_t": torch.randn(3, 30)}), "24-d embeddings"),
        (lambda: prior(**{**x, "text_states": torch.randn(3, 5, 32)}), r"\[B, 8, 32\]"),
        (lambda: load_prior(tmp_path / "nowhere"), "not a prior folder"),
        (lambda: sample_prior(prior, bank, x["clip_text"], x["text_states"], sampler="euler"),
         "unknown prior sampler"),
    ]
    for call, match in cases:
        with pytest.raises(UserError, match=match) as err:
            call()
        assert "\n" not in str(err.value)


def test_baseline_prior_without_bank_trains_and_samples_plain_ddpm():
    prior = tiny_prior(use_bank_token=False)
    x = inputs()
    batch = {"image_emb": x["x_t"], "text_emb": x["clip_text"], "text_states": x["text_states"]}
    loss = prior_loss(prior, None, batch, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and loss.item() > 0
    out = sample_prior(prior, None, x["clip_text"], x["text_states"], sampler="ddim", steps=10)
    assert out.shape == (3, 24)
    with pytest.raises(UserError, match="need a Gaussian bank"):
        sample_prior(prior, None, x["clip_text"], x["text_states"], prior_noise="zero")


def test_paper_config_builds_on_meta_with_the_released_sizes(capsys):
    cfg = load_config(CONFIGS / "paper.yaml")
    counts = parameter_counts(cfg)
    assert counts["prior"] == prior_parameter_count(1536, 1024, 2048, 8, 32) == 580_337_664  # ~0.58B
    assert counts["sd_unet"] == 865_910_724  # stock SD-2 UNet
    assert counts["sd_projection"] == 1536 * 4 * 1024 + 4 * 1024  # Linear(1536 -> 4 x 1024)
    assert counts["sd_vae"] == 83_653_863
    for layers, billions in ((16, 1.12), (20, 1.39)):  # the released "smaller" / "larger" checkpoints
        big = build_prior(cfg, "meta", layers=layers)
        assert round(sum(p.numel() for p in big.parameters()) / 1e9, 2) == billions
        assert next(big.parameters()).device.type == "meta"
    from shifted.config import main

    main([str(CONFIGS / "paper.yaml")])
    printed = capsys.readouterr().out
    assert "580,337,664" in printed and "865,910,724" in printed


def test_tiny_config_builds_a_working_prior_and_projection():
    cfg = load_config(CONFIGS / "tiny.yaml")
    prior = build_prior(cfg)
    assert prior.config.emb_dim == 64 and prior.config.clip_models == cfg["clip_models"]  # the one shipped CLIP
    b = 2
    out = prior(torch.randn(b, 64), torch.tensor([0, 999]), torch.randn(b, 64), torch.randn(b, 12, 32),
                torch.tensor([0, 15]))
    assert out.shape == (b, 64)
    counts = parameter_counts(cfg, device="cpu")
    assert counts["prior"] == prior_parameter_count(64, 32, 96, 3, 4, 24)
    assert counts["sd_projection"] == 64 * 4 * 32 + 4 * 32
    # the flat script config trains the prior tiny.yaml describes
    import yaml

    flat = yaml.safe_load((CONFIGS / "tiny_prior.yaml").read_text())
    for key in ("model_width", "model_layers", "model_num_heads", "model_dim_head", "t5_max_length",
                "learning_rate", "max_train_steps", "lr_scheduler", "lr_warmup_steps"):
        assert flat[key] == cfg["prior"][key], key
