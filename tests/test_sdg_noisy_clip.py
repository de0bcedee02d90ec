"""SDG's noise-aware CLIP: FiLM time conditioning (ResNet and ViT towers), checkpoints, and the fine-tuning loss."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from common.errors import UserError
from common.modules import timestep_embedding
from common.schedule import NoiseSchedule
from sdg.clip_training import LearnedLogitScale, NoisyClipLoss, contrastive_loss, sample_timesteps, warmed_logit_scale
from sdg.convert import convert_sdg_clip_gd_state_dict
from sdg.noisy_clip import NoiseAwareCLIP, film_sites, load_noise_aware_clip
from sdg.tiny import tiny_noise_aware_clip


def images(n=2, size=32, seed=0, dtype=torch.float32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2 - 1


# --------------------------------------------------------------------------------------------------------------
# time conditioning
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_zero_initialised_film_is_exactly_the_plain_clip(kind):
    clip, model = tiny_noise_aware_clip(kind)
    x = images(3)
    plain = model.visual.forward_intermediates(clip.preprocess(x))
    for t in (torch.tensor([0, 0, 0]), torch.tensor([999, 500, 1])):
        out = clip(x, t)
        assert torch.equal(out.embedding, model.visual(clip.preprocess(x)))
        assert all(torch.equal(a, b) for a, b in zip(out.features, plain["image_intermediates"]))
    # The hooks are live: a non-zero projection makes the embedding depend on t (and differ from CLIP).
    torch.nn.init.normal_(clip.emb_layers[1].weight, std=0.05)
    e = clip.embed(x[:1].expand(2, -1, -1, -1), torch.tensor([10, 900]))
    assert (e[0] - e[1]).abs().max() > 1e-4
    # Outside forward() the modulation is unset: the wrapped tower is the plain encoder again.
    assert torch.equal(clip.visual(clip.preprocess(x)), model.visual(clip.preprocess(x)))


def test_film_sites_follow_sdg_on_rn50x16():
    """RN50x16: 123 BatchNorms outside the downsample branch, 91,200 channels, a 93,571,200-parameter projection."""
    from open_clip.modified_resnet import ModifiedResNet

    with torch.device("meta"):
        visual = ModifiedResNet(layers=[6, 8, 18, 8], output_dim=768, heads=48, image_size=384, width=96)
        clip = NoiseAwareCLIP(visual, image_size=256, film_init="default", pos_init="random")
    assert len(clip.film_site_names) == 123 and sum(clip.film_channels) == 91_200
    assert clip.film_site_names[:4] == ["bn1", "bn2", "bn3", "layer1.0.bn1"]
    assert not any("downsample" in name for name in clip.film_site_names)
    assert sum(p.numel() for p in clip.emb_layers.parameters()) == 93_571_200
    assert tuple(clip.visual.attnpool.positional_embedding.shape) == (65, 3072)  # 8x8 grid + mean token at 256 px


def test_vit_sites_are_its_layer_norms():
    clip, _ = tiny_noise_aware_clip("vit")
    names = film_sites(clip.visual)
    assert [n for n, _ in names] == ["ln_pre", "transformer.resblocks.0.ln_1", "transformer.resblocks.0.ln_2",
                                     "transformer.resblocks.1.ln_1", "transformer.resblocks.1.ln_2", "ln_post"]


def test_timestep_embedding_is_adms_cosine_first_sinusoid():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 17, 999])
    ours = timestep_embedding(t, 32)
    torch.testing.assert_close(ours, get_timestep_embedding(t, 32, flip_sin_to_cos=True, downscale_freq_shift=0))
    assert torch.equal(ours[0, :16], torch.ones(16))  # cos(0) first


def test_deepcopy_gives_an_independent_encoder():
    """EMA copies the encoder: the copy's hooks must read the copy's own modulation."""
    clip, _ = tiny_noise_aware_clip("resnet")
    ema = copy.deepcopy(clip)
    torch.nn.init.normal_(ema.emb_layers[1].bias, std=0.1)
    x, t = images(2), torch.tensor([3, 700])
    before = clip.embed(x, t)
    assert (ema.embed(x, t) - before).abs().max() > 1e-4
    assert torch.equal(clip.embed(x, t), before)


@pytest.mark.parametrize("kind, size, tokens", [("resnet", 64, 5), ("vit", 16, 5)])
def test_new_image_size_rebuilds_the_positional_table(kind, size, tokens):
    clip, model = tiny_noise_aware_clip(kind, image_size=size, pos_init="interp")
    table = clip.visual.attnpool.positional_embedding if kind == "resnet" else clip.visual.positional_embedding
    original = model.visual.attnpool.positional_embedding if kind == "resnet" else model.visual.positional_embedding
    assert table.shape[0] == tokens and torch.equal(table[0], original[0])  # the mean/class token is kept
    assert clip.image_size == size and clip.embed(images(2, size), 5).shape == (2, 16 if kind == "resnet" else 64)
    with pytest.raises(UserError, match="divisible"):
        tiny_noise_aware_clip(kind, image_size=size + 4)


# --------------------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_and_refusals(tmp_path):
    from common.io import save_safetensors

    clip, model = tiny_noise_aware_clip("resnet", film_init="default")
    fresh, _ = tiny_noise_aware_clip("resnet", seed=5)
    x, t = images(2), torch.tensor([5, 600])
    load_noise_aware_clip(fresh, save_safetensors(clip.state_dict(), tmp_path / "noisy_clip.safetensors"))
    assert torch.equal(fresh.embed(x, t), clip.embed(x, t))

    plain = save_safetensors({f"visual.{k}": v for k, v in model.visual.state_dict().items()}, tmp_path / "plain_clip.safetensors")
    with pytest.raises(UserError, match="plain_clip.safetensors is a plain \\(not noise-aware\\) CLIP.*time_embed.0.weight") as err:
        load_noise_aware_clip(fresh, plain)
    assert "\n" not in str(err.value)
    vit, _ = tiny_noise_aware_clip("vit")
    with pytest.raises(UserError, match="different CLIP architecture"):
        load_noise_aware_clip(fresh, vit.state_dict())
    with pytest.raises(UserError, match="does not fit"):
        load_noise_aware_clip(fresh, {**clip.state_dict(), "visual.extra": torch.zeros(1)})


def test_released_clip_gd_layout_converts():
    """A synthetic CLIP_gd state dict, named as the released files are, loads into our module."""
    clip, _ = tiny_noise_aware_clip("resnet", film_init="default")
    stem = {"conv1": "0", "bn1": "1", "conv2": "3", "bn2": "4", "conv3": "6", "bn3": "7",
            "layer1": "10", "layer2": "11", "layer3": "12"}
    released = {}
    for key, value in clip.state_dict().items():
        if key.startswith("visual."):
            head, rest = key[len("visual."):].split(".", 1)
            if head in stem:
                key = f"visual_frozen.{stem[head]}.{rest}"
            elif head == "attnpool":
                key = f"attn_pool.{rest}"
            else:
                key = f"{head}.{rest}"
        released[key] = value.clone()
    assert "visual_frozen.10.0.conv1.weight" in released and "emb_layers.1.weight" in released
    fresh, _ = tiny_noise_aware_clip("resnet", seed=3)
    load_noise_aware_clip(fresh, convert_sdg_clip_gd_state_dict(released))
    x, t = images(2), torch.tensor([1, 999])
    assert torch.equal(fresh.embed(x, t), clip.embed(x, t))
    with pytest.raises(UserError, match="unexpected key 'text_projection'"):
        convert_sdg_clip_gd_state_dict({**released, "text_projection": torch.zeros(2)})


# --------------------------------------------------------------------------------------------------------------
# fine-tuning objective
# --------------------------------------------------------------------------------------------------------------


def test_contrastive_loss_is_symmetric_infonce_at_scale_100():
    s = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    c = torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    logits = 100 * s @ c.T  # rows already unit norm
    by_hand = 0.0
    for i in range(3):
        by_hand += -torch.log_softmax(logits[i], 0)[i] / 3 - torch.log_softmax(logits[:, i], 0)[i] / 3
    torch.testing.assert_close(contrastive_loss(s, 3 * c), by_hand)
    eye = torch.eye(4, 8)
    assert float(contrastive_loss(eye, eye)) < 1e-12  # identical, orthogonal rows: perfectly matched


def test_logit_scale_warm_up_is_geometric_from_start_to_end():
    assert warmed_logit_scale(0, 18.5, 100.0, 1000) == pytest.approx(18.5)
    assert warmed_logit_scale(500, 18.5, 100.0, 1000) == pytest.approx((18.5 * 100.0) ** 0.5)  # geometric mean
    assert warmed_logit_scale(250, 18.5, 100.0, 1000) == pytest.approx(18.5 * (100 / 18.5) ** 0.25)
    assert warmed_logit_scale(1000, 18.5, 100.0, 1000) == warmed_logit_scale(5000, 18.5, 100.0, 1000) == 100.0
    assert warmed_logit_scale(7, 18.5, 100.0, 0) == 100.0  # no warm-up: the end value from the start


def test_noisy_clip_loss_follows_the_trainer_step_through_the_warm_up():
    student, model = tiny_noise_aware_clip("vit")
    schedule = NoiseSchedule.named("linear", 1000)
    batch = {"pixel_values": images(4, seed=2)}

    def loss_at(step, **kw):
        fn = NoisyClipLoss(student, model.visual, schedule, generator=torch.Generator().manual_seed(0), **kw)
        with torch.no_grad():
            return float(fn(batch, SimpleNamespace(models={}, step=step)))

    warm = {"logit_scale": 100.0, "logit_scale_start": 10.0, "logit_scale_warmup_steps": 100}
    assert loss_at(0, **warm) == pytest.approx(loss_at(0, logit_scale=10.0), rel=1e-6)
    assert loss_at(50, **warm) == pytest.approx(loss_at(0, logit_scale=(10.0 * 100.0) ** 0.5), rel=1e-6)
    assert loss_at(100, **warm) == pytest.approx(loss_at(0, logit_scale=100.0), rel=1e-6)
    assert loss_at(0, **warm) != pytest.approx(loss_at(100, **warm), rel=1e-3)  # the scale matters to the loss
    with pytest.raises(UserError, match="start scale"):
        NoisyClipLoss(student, model.visual, schedule, logit_scale=100.0, logit_scale_warmup_steps=10)
    with pytest.raises(UserError, match="exclude each other"):
        NoisyClipLoss(student, model.visual, schedule, logit_scale_start=10.0, logit_scale_warmup_steps=10,
                      temperature=LearnedLogitScale(10.0))


def test_learned_temperature_gets_gradients_and_is_capped_at_clips_100():
    student, model = tiny_noise_aware_clip("vit")
    temperature = LearnedLogitScale(18.5)
    assert float(temperature().detach()) == pytest.approx(18.5)
    fn = NoisyClipLoss(student, model.visual, NoiseSchedule.named("linear", 1000), temperature=temperature,
                       generator=torch.Generator().manual_seed(0))
    prepared = copy.deepcopy(temperature)  # under the trainer the prepared module in ctx.models is the one called
    fn({"pixel_values": images(4)}, SimpleNamespace(models={"temperature": prepared}, step=0)).backward()
    assert prepared.log_scale.grad is not None and prepared.log_scale.grad.abs() > 0
    assert temperature.log_scale.grad is None
    # By hand: d loss / d log_scale equals the loss's derivative in the scale times the scale (chain rule).
    s, c = torch.randn(5, 8), torch.randn(5, 8)
    log_scale = torch.tensor(2.0, requires_grad=True)
    contrastive_loss(s, c, log_scale.exp()).backward()
    scale = torch.tensor(2.0).exp().requires_grad_(True)
    contrastive_loss(s, c, scale).backward()
    torch.testing.assert_close(log_scale.grad, scale.grad * scale.detach())
    capped = LearnedLogitScale(100.0)
    with torch.no_grad():
        capped.log_scale.add_(1.0)  # e * 100 before the cap
    assert float(capped().detach()) == 100.0
    capped().backward()
    assert float(capped.log_scale.grad) == 0.0  # at the cap the clamp stops the gradient, as in CLIP
    with pytest.raises(UserError, match="initial logit scale"):
        LearnedLogitScale(150.0)


def test_timestep_samplers():
    gen = torch.Generator().manual_seed(0)
    uniform = sample_timesteps(4000, 1000, "uniform", gen)
    half = sample_timesteps(4000, 1000, "half", gen)
    linear = sample_timesteps(4000, 1000, "linear", gen)
    assert uniform.min() >= 0 and uniform.max() <= 999 and half.max() < 500
    assert linear.float().mean() > uniform.float().mean() + 100  # weights 1..10 favour noisy t (mean ~ 636)
    with pytest.raises(UserError, match="timestep sampler"):
        sample_timesteps(2, 1000, "cosine")


def test_noisy_clip_loss_trains_only_what_it_should():
    student, model = tiny_noise_aware_clip("resnet")
    schedule = NoiseSchedule.named("linear", 1000)
    loss_fn = NoisyClipLoss(student, model.visual, schedule, generator=torch.Generator().manual_seed(0))
    trainable = student.set_finetune_mode("last")
    student.train()
    assert not student.visual.bn1.training and student.visual.layer4.training  # frozen stem keeps its statistics
    stem_stats = student.visual.bn1.running_mean.clone()
    loss = loss_fn({"pixel_values": images(4)})
    loss.backward()
    assert torch.equal(student.visual.bn1.running_mean, stem_stats)
    assert student.visual.conv1.weight.grad is None and student.visual.layer1[0].conv1.weight.grad is None
    assert student.emb_layers[1].weight.grad.abs().sum() > 0  # zero-initialised, yet it learns
    assert {id(p) for p in trainable} >= {id(student.visual.layer4[0].conv1.weight), id(student.emb_layers[1].weight)}
    assert all(not p.requires_grad for p in model.visual.parameters())  # the teacher is frozen

    student.set_finetune_mode("all")
    assert student.visual.bn1.training
    # Under the shared trainer the loss calls the prepared modules of ctx.models, not its own references.
    prepared = copy.deepcopy(student)
    loss_fn({"pixel_values": images(4)}, SimpleNamespace(models={"clip": prepared, "teacher": model.visual})).backward()
    assert prepared.visual.conv1.weight.grad is not None and student.visual.conv1.weight.grad is None


def test_noisy_clip_loss_decreases_under_training():
    torch.manual_seed(0)
    student, model = tiny_noise_aware_clip("vit")
    loss_fn = NoisyClipLoss(student, model.visual, NoiseSchedule.named("linear", 1000),
                            t_sampler="half", generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(student.set_finetune_mode("all"), lr=3e-3)
    student.train()
    batch = images(8, seed=3)
    losses = []
    for _ in range(12):
        loss = loss_fn(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    with pytest.raises(UserError, match="at least 2 images"):
        loss_fn(batch[:1])
    with pytest.raises(UserError, match="pixel_values"):
        loss_fn({"images": batch})


def test_preprocess_maps_diffusion_range_to_clip_normalisation():
    clip, _ = tiny_noise_aware_clip("vit")
    x = torch.zeros(1, 3, 2, 2)  # mid-grey in [-1, 1] = 0.5 in [0, 1]
    expected = (0.5 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(clip.preprocess(x)[0, :, 0, 0], expected)
    assert F.mse_loss(clip.preprocess(-torch.ones(1, 3, 1, 1)), clip.preprocess(torch.ones(1, 3, 1, 1))) > 1
