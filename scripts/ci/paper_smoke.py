"""Paper-scale smoke run: every ``configs/<method>/paper.yaml`` stage builds, takes one training step and samples.

    python scripts/ci/paper_smoke.py                       # every method and stage, 18 GB budget, 2 threads
    python scripts/ci/paper_smoke.py --methods codiff --stages train_dynamic --max_memory_gb 8
    python scripts/ci/paper_smoke.py --config configs/codiff/tiny.yaml --methods codiff --stages sample

For each stage the full-size networks are built with random weights through the method packages' own builders and
trained for ONE optimizer step through ``common.train.Trainer`` (the loop every training script uses: the method's
loss function, AdamW with the config's betas, gradient checkpointing on, EMA where the stage keeps one) on one
synthetic sample at batch 1 (and a reduced resolution where the stage says so); a ``sample`` stage runs ONE
denoising step of the method's sampler plus the decoder. Before a stage starts, its memory is estimated
(parameters x bytes for weights, gradients, AdamW moments and EMA, plus activations); a stage over
``--max_memory_gb`` is skipped with a one-line reason instead of being run. Each stage runs in its own subprocess
(per-stage peak RSS; a failure does not stop the others) under a watchdog that kills it at the budget.
``--record`` writes the table to bench/results.json / results.md (section "paper smoke").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


ROOT = Path(__file__).resolve().parents[2]
METHODS = ("codiff", "contextdiff", "shifted", "sdg", "versatile")
RESULT_TAG = "SMOKE_RESULT "
GB = 1024**3
# Python + torch + diffusers/transformers imported, before any model: measured RSS of a bare worker.
BASE_GB = 0.8


# ------------------------------------------------------------------------------------------------ plans and stages


@dataclasses.dataclass
class Plan:
    """What a stage will hold in memory, from parameter counts taken on the meta device."""

    trainable: int = 0  # parameters the optimizer updates (fp32 weights + grads + AdamW moments [+ EMA])
    frozen: int = 0  # parameters held for the forward pass only (fp32)
    ema: bool = False
    optimizer_states: int = 2  # AdamW: exp_avg and exp_avg_sq
    activations_gb: float = 0.0
    setting: str = ""  # resolution / batch actually used, for the table
    note: str = ""

    @property
    def params(self) -> int:
        return self.trainable + self.frozen

    def parts_gb(self) -> dict[str, float]:
        return {
            "weights": 4 * self.params / GB,
            "grads": 4 * self.trainable / GB,
            "AdamW": 4 * self.optimizer_states * self.trainable / GB,
            "EMA": (4 * self.trainable / GB) if self.ema else 0.0,
            "activations": self.activations_gb,
            "runtime": BASE_GB,
        }

    def total_gb(self) -> float:
        return sum(self.parts_gb().values())

    def without_optimizer_gb(self) -> float:
        """Forward + backward without the optimizer's state: what the fallback of an over-budget stage holds."""
        parts = self.parts_gb()
        return self.total_gb() - parts["AdamW"] - parts["EMA"]

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in self.parts_gb().items() if v > 0.05)
        return f"~{self.total_gb():.1f} GB ({parts})"


@dataclasses.dataclass
class Stage:
    method: str
    name: str
    kind: str  # "train" | "sample"
    plan: Callable[[dict, argparse.Namespace], Plan]
    run: Callable[[dict, argparse.Namespace], dict]


STAGES: list[Stage] = []


def stage(method: str, name: str, kind: str, plan: Callable[[dict, argparse.Namespace], Plan]):
    def register(run: Callable[[dict, argparse.Namespace], dict]):
        STAGES.append(Stage(method, name, kind, plan, run))
        return run

    return register


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_count(build: Callable[[], Any]) -> int:
    """Parameters of ``build()`` constructed on the meta device (no memory, no init time)."""
    import torch

    with torch.device("meta"):
        module = build()
    return count(module)


def skip_reason(plan: Plan, budget_gb: float) -> str | None:
    """The one-line reason a stage is not run, or None when its estimate fits the budget."""
    total = plan.total_gb()
    if total <= budget_gb:
        return None
    what = f"needs {plan.describe()}"
    if plan.trainable and plan.without_optimizer_gb() <= budget_gb:
        what += "; the AdamW state (and EMA) do not fit"
    return f"skipped: {what}; would need --max_memory_gb {math.ceil(total)} (budget {budget_gb:g} GB)"


# ------------------------------------------------------------------------------------------------ shared helpers


def train_one_step(trainable: dict, loss_fn, batch: Any, opts: argparse.Namespace, *, frozen=None, params=None,
                   collate_fn=None,
                   learning_rate: float = 1e-4, betas=(0.9, 0.999), weight_decay: float = 1e-2, eps: float = 1e-8,
                   use_ema: bool = False, ema_decay: float = 0.9999, max_grad_norm: float = 1.0,
                   gradient_checkpointing: bool = True) -> dict:
    """ONE optimizer step of ``common.train.Trainer`` on a one-sample dataset; no checkpoint, no tracker.

    With ``opts.without_optimizer`` (a stage whose AdamW state does not fit): the trainer's module preparation and
    the same loss, forward and backward, but no optimizer (so no AdamW moments, no EMA) and no update.
    """
    from common.train import TrainConfig, Trainer

    if getattr(opts, "without_optimizer", False):
        return _forward_backward(trainable, loss_fn, batch, frozen or {}, collate_fn, gradient_checkpointing)

    class OneSample:
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return batch

    with tempfile.TemporaryDirectory(prefix="paper_smoke_") as out:
        config = TrainConfig(
            output_dir=out, seed=0, train_batch_size=1, max_train_steps=1, gradient_checkpointing=gradient_checkpointing,
            learning_rate=learning_rate, lr_scheduler="constant", lr_warmup_steps=0, adam_beta1=betas[0],
            adam_beta2=betas[1], adam_weight_decay=weight_decay, adam_epsilon=eps, max_grad_norm=max_grad_norm,
            use_ema=use_ema, ema_decay=ema_decay, mixed_precision="no", report_to="none",
            checkpointing_steps=10**9, validation_steps=10**9,
        )
        start = time.perf_counter()
        with Trainer(config) as trainer:
            # ``batch`` is a ready batch, or one dataset item when the script's own ``collate_fn`` is given
            result = trainer.fit(trainable, loss_fn, OneSample(), collate_fn=collate_fn or (lambda items: items[0]),
                                 frozen=frozen,
                                 params=params)
        seconds = time.perf_counter() - start
    if not result.completed or not result.loss_history:
        raise RuntimeError("the training step did not complete")
    loss = result.loss_history[-1]
    if loss != loss:
        raise RuntimeError("the training step gave a NaN loss")
    return {"train_s": seconds, "loss": loss}


def _forward_backward(trainable: dict, loss_fn, batch: Any, frozen: dict, collate_fn, gradient_checkpointing: bool):
    import torch

    from common.train import StepContext, Trainer, unpack_loss

    for name, module in trainable.items():
        if gradient_checkpointing:
            Trainer._enable_gradient_checkpointing(name, module)
        module.train()
    for module in frozen.values():
        module.requires_grad_(False).eval()
    device = torch.device("cpu")
    ctx = StepContext(0, 0, {**trainable, **frozen}, type("CPU", (), {"device": device})(), torch.float32)
    batch = collate_fn([batch]) if collate_fn is not None else batch
    start = time.perf_counter()
    out = loss_fn(batch, ctx)
    loss, _ = unpack_loss(out)  # the trainer's reading of a loss_fn result (tensor, dict, LossOutput, ...)
    loss.backward()
    seconds = time.perf_counter() - start
    grads = [p.grad for m in trainable.values() for p in m.parameters() if p.requires_grad]
    if not grads or any(g is None for g in grads[:1]) or not all(torch.isfinite(g).all() for g in grads if g is not None):
        raise RuntimeError("the backward pass left no finite gradient")
    return {"train_s": seconds, "loss": float(loss.detach()), "without_optimizer": True}


def script_module(relative: str):
    """A script of scripts/ loaded as a module (scripts are files, not packages), for the pieces it defines."""
    import importlib.util

    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(f"smoke_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def pixels(resolution: int, channels: int = 3):
    import torch

    return torch.rand(1, channels, resolution, resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


# ------------------------------------------------------------------------------------------------ methods' stages

# Collaborative Diffusion: two uni-modal members (mask, text), then the dynamic diffusers over the frozen members.


def _codiff_latent(cfg: dict, opts) -> tuple[int, str]:
    """Pixel resolution of the step: --resolution, but never above the config's own image size."""
    size = min(int(cfg.get("image_size", opts.resolution)), opts.resolution)
    return size, f"{size}px batch 1 fp32"


def _codiff_parts(cfg: dict, modality: str, device: str = "cpu"):
    import torch

    from codiff.config import build_mask_encoder, build_text_encoder, build_unet

    section = cfg["modalities"][modality]
    with torch.device(device):
        unet = build_unet(section["unet"], 0, section.get("zero_init", "ldm"))
        if section["kind"] == "mask":
            encoder = build_mask_encoder(section, 100)
        else:
            encoder = build_text_encoder(section["text_encoder"], 101)
    return section, unet, encoder


def _codiff_vae(cfg: dict, device: str = "cpu"):
    import torch

    from codiff.config import build_vae

    with torch.device(device):
        return build_vae(cfg["vae"], 102)


def _codiff_condition(section: dict, encoder, resolution: int):
    """A batch condition the member's encoder takes: class-id masks, or token ids (no tokenizer files needed)."""
    import torch

    g = torch.Generator().manual_seed(0)
    if section["kind"] == "mask":
        fmt = encoder.fmt
        height, width = fmt.image_size or (resolution, resolution)
        return torch.randint(0, fmt.num_classes, (1, height, width), generator=g)
    config = getattr(encoder, "config", None)
    vocab = int(getattr(config, "vocab_size", None) or section["text_encoder"].get("args", {}).get("vocab_size"))
    return torch.randint(0, vocab, (1, int(section.get("max_length", 77))), generator=g)


def _codiff_member_plan(modality: str):
    def plan(cfg: dict, opts) -> Plan:
        size, setting = _codiff_latent(cfg, opts)
        section, unet, encoder = _codiff_parts(cfg, modality, "meta")
        vae = count(_codiff_vae(cfg, "meta"))
        trains_encoder = section["kind"] == "mask" or section["text_encoder"].get("builder") == "ldm_bert"
        enc = count(encoder)
        # checkpointed UNet at batch 1: ~1.5 GB at 64x64 latents (512 px), scaling with the latent area
        act = 1.5 * (size / 512) ** 2 + 0.3
        return Plan(trainable=count(unet) + (enc if trains_encoder else 0), frozen=vae + (0 if trains_encoder else enc),
                    activations_gb=act, setting=setting)

    return plan


def _codiff_member_run(modality: str):
    def run(cfg: dict, opts) -> dict:

        from codiff.config import schedule_from_config
        from codiff.training import UniModalObjective

        size, _ = _codiff_latent(cfg, opts)
        section, unet, encoder = _codiff_parts(cfg, modality)
        vae = _codiff_vae(cfg).float().eval().requires_grad_(False)
        schedule = schedule_from_config(cfg)
        cond = _codiff_condition(section, encoder, size)
        train = cfg.get("train_unimodal", {})
        lr = train.get("base_learning_rate", train.get("learning_rate", 1e-4))
        lr = float(lr[modality] if isinstance(lr, dict) else lr)
        if section["kind"] == "mask":  # the paper's mask Linear trains with its UNet (scripts/codiff/train_unimodal.py)
            objective = UniModalObjective(unet, encoder, encoder.one_hot, schedule, "mask", train_encoder=True, vae=vae)
        else:  # LDM's from-scratch BERT trains jointly; a pre-trained CLIP stays frozen
            trains = section["text_encoder"].get("builder") == "ldm_bert"
            objective = UniModalObjective(unet, encoder, lambda ids: ids, schedule, "text", train_encoder=trains, vae=vae)
        batch = {"pixel_values": pixels(size), section["kind"] if section["kind"] == "mask" else "text": cond}
        out = train_one_step(objective.trainable_modules(), objective, batch, opts,
                             frozen=objective.frozen_modules(), learning_rate=lr,
                             weight_decay=float(train.get("weight_decay", 0.01)))
        out["trainable"] = sum(count(m) for m in objective.trainable_modules().values())
        return out

    return run


for _modality in ("mask", "text"):
    stage("codiff", f"train_{_modality}", "train", _codiff_member_plan(_modality))(_codiff_member_run(_modality))


def _codiff_all(cfg: dict, device: str = "cpu"):
    import torch

    from codiff.config import build_models

    with torch.device(device):
        return build_models(cfg, device=device, seed=0)


def _codiff_dynamic_plan(cfg: dict, opts) -> Plan:
    size, setting = _codiff_latent(cfg, opts)
    models = _codiff_all(cfg, "meta")
    trainable = count(models.collaboration.dynamic)
    frozen = count(models.collaboration) - trainable + sum(count(e) for e in models.encoders.values())
    frozen += count(models.vae) if models.vae is not None else 0
    # both frozen UNets' activations are kept for the backward through the influence maps only (no grad): small
    return Plan(trainable=trainable, frozen=frozen, activations_gb=0.6 * (size / 512) ** 2 + 0.3, setting=setting)


@stage("codiff", "train_dynamic", "train", _codiff_dynamic_plan)
def _codiff_dynamic_run(cfg: dict, opts) -> dict:
    from codiff.config import schedule_from_config
    from codiff.training import DynamicDiffuserObjective

    size, _ = _codiff_latent(cfg, opts)
    models = _codiff_all(cfg)
    model = models.collaboration
    model.unets.requires_grad_(False)
    schedule = schedule_from_config(cfg)
    encoders, keys, batch = {}, {}, {"pixel_values": pixels(size)}
    for name, section in cfg["modalities"].items():
        encoder = models.encoders[name].eval().requires_grad_(False)
        batch[name] = _codiff_condition(section, encoder, size)
        keys[name] = name
        encoders[name] = encoder.encode_ids if section["kind"] == "mask" else (lambda ids, e=encoder: e(ids)[0])
    objective = DynamicDiffuserObjective(model, schedule, encoders, condition_keys=keys, vae=models.vae)
    train = cfg.get("train_dynamic", {})
    lr = float(train.get("base_learning_rate", train.get("learning_rate", 1e-4)))
    frozen = {**objective.frozen_modules(), **{f"encoder_{n}": e for n, e in models.encoders.items()}}
    out = train_one_step(objective.trainable_modules(), objective, batch, opts, frozen=frozen, learning_rate=lr,
                         weight_decay=float(train.get("weight_decay", 0.01)))
    return out


def _codiff_sample_plan(cfg: dict, opts) -> Plan:
    size, _ = _codiff_latent(cfg, opts)
    models = _codiff_all(cfg, "meta")
    frozen = count(models.collaboration) + sum(count(e) for e in models.encoders.values())
    frozen += count(models.vae) if models.vae is not None else 0
    return Plan(frozen=frozen, activations_gb=1.0 * (size / 512) ** 2 + 0.2,
                setting=f"{size}px batch 1, 1 DDIM step + decode")


@stage("codiff", "sample", "sample", _codiff_sample_plan)
def _codiff_sample_run(cfg: dict, opts) -> dict:
    import torch

    from codiff.config import schedule_from_config
    from codiff.pipeline import CollaborativePipeline

    size, _ = _codiff_latent(cfg, opts)
    models = _codiff_all(cfg)
    model = models.collaboration.eval()
    conditions, encoders = {}, {}
    for name, section in cfg["modalities"].items():
        encoder = models.encoders[name].eval()
        conditions[name] = _codiff_condition(section, encoder, size)
        encoders[name] = encoder.encode_ids if section["kind"] == "mask" else (lambda ids, e=encoder: e(ids)[0])
    factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
    channels = model.unets[model.modalities[0]].config.in_channels
    pipe = CollaborativePipeline(model, models.vae.eval(), schedule_from_config(cfg), encoders,
                                 latent_shape=(channels, size // factor, size // factor))
    sampling = cfg.get("sampling", {})
    out, seconds = timed(lambda: pipe(conditions, num_inference_steps=1, eta=float(sampling.get("eta", 1.0)),
                                      generator=torch.Generator().manual_seed(0), progress=False))
    if not torch.isfinite(out.images).all():
        raise RuntimeError("the sample is not finite")
    return {"sample_s": seconds, "output": list(out.images.shape)}


# ContextDiff at SD-2.1-base scale: stage 1 trains the adapter through the frozen UNet, stage 2 the UNet (+ EMA).

CLIP_TOKENIZER = ROOT / "ckpt" / "tiny" / "baseline" / "tokenizer"  # the real CLIP BPE vocabulary (49408 tokens)


def _contextdiff_parts(cfg: dict, device: str = "cpu", seed: int = 0):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from common.tiny import seeded
    from contextdiff.adapter import RelationalNet

    with torch.device(device), seeded(seed):
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
        adapter = RelationalNet(**cfg["adapter"])
    return unet, vae, text_encoder, adapter


def _contextdiff_setting(cfg: dict, opts, key: str) -> tuple[int, str]:
    size = min(int(cfg.get(key, {}).get("resolution", opts.resolution)), opts.resolution)
    return size, f"{size}px batch 1 fp32"


def _contextdiff_plan(stage_number: int):
    def plan(cfg: dict, opts) -> Plan:
        section = cfg[f"stage{stage_number}"]
        size, setting = _contextdiff_setting(cfg, opts, f"stage{stage_number}")
        unet, vae, text, adapter = (count(m) for m in _contextdiff_parts(cfg, "meta"))
        act = 2.0 * (size / 512) ** 2 + 0.5  # checkpointed SD UNet, batch 1; the backward runs through it in both stages
        if stage_number == 1:
            return Plan(trainable=adapter, frozen=unet + vae + text, activations_gb=act, setting=setting)
        return Plan(trainable=unet, frozen=adapter + vae + text, ema=bool(section.get("use_ema")),
                    activations_gb=act, setting=setting)

    return plan


def _contextdiff_run(stage_number: int):
    def run(cfg: dict, opts) -> dict:
        from transformers import AutoTokenizer

        from common.latent_data import LatentTextEncoder
        from common.schedule import NoiseSchedule
        from contextdiff.process import ContextLossConfig, contextual_loss, trainable_modules
        from contextdiff.training import loss_batch

        section = cfg[f"stage{stage_number}"]
        size, _ = _contextdiff_setting(cfg, opts, f"stage{stage_number}")
        unet, vae, text_encoder, adapter = _contextdiff_parts(cfg)
        vae.requires_grad_(False).eval()
        text_encoder.requires_grad_(False).eval()
        tokenizer = AutoTokenizer.from_pretrained(CLIP_TOKENIZER)
        fields = ContextLossConfig.__dataclass_fields__
        loss_config = ContextLossConfig(stage=stage_number, **{k: v for k, v in section.items() if k in fields
                                                               and k != "stage"})
        schedule = NoiseSchedule.from_config(cfg["scheduler"])
        encoder = LatentTextEncoder(vae, text_encoder, tokenizer)
        null_text = encoder.text([""])
        sources = list(cfg["adapter"].get("text_sources", ["clip"]))
        if "t5" in sources:
            raise RuntimeError("the smoke run builds no T5 tower: use text_sources [clip]")
        trainable, frozen = trainable_modules(loss_config, unet, adapter)

        def loss_fn(batch, ctx):  # contextdiff/training.py's loss_fn
            return contextual_loss(loss_batch(encoder, batch, ctx.device, sources), ctx.models["unet"],
                                   ctx.models["adapter"], schedule, loss_config, null_text=null_text)

        item = {"pixel_values": pixels(size)[0], "text": "a photo of a cat"}
        lr = float(section.get("learning_rate", 1e-4))
        return train_one_step(trainable, loss_fn, item, opts, collate_fn=encoder.collate,
                              frozen={**frozen, "vae": vae, "text_encoder": text_encoder}, learning_rate=lr,
                              betas=(float(section.get("adam_beta1", 0.9)), float(section.get("adam_beta2", 0.999))),
                              weight_decay=float(section.get("adam_weight_decay", 1e-2)),
                              eps=float(section.get("adam_epsilon", 1e-8)), use_ema=bool(section.get("use_ema")),
                              ema_decay=float(section.get("ema_decay", 0.9999)),
                              max_grad_norm=float(section.get("max_grad_norm", 1.0)))

    return run


for _n in (1, 2):
    stage("contextdiff", f"stage{_n}", "train", _contextdiff_plan(_n))(_contextdiff_run(_n))


def _contextdiff_sample_plan(cfg: dict, opts) -> Plan:
    size, _ = _contextdiff_setting(cfg, opts, "sample")
    frozen = sum(count(m) for m in _contextdiff_parts(cfg, "meta"))
    return Plan(frozen=frozen, activations_gb=1.5 * (size / 512) ** 2 + 0.3,
                setting=f"{size}px batch 1, 1 DDIM step with CFG + decode")


@stage("contextdiff", "sample", "sample", _contextdiff_sample_plan)
def _contextdiff_sample_run(cfg: dict, opts) -> dict:
    import torch
    from transformers import AutoTokenizer

    from contextdiff.pipeline import generate

    section = cfg.get("sample", {})
    size, _ = _contextdiff_setting(cfg, opts, "sample")
    unet, vae, text_encoder, adapter = (m.eval() for m in _contextdiff_parts(cfg))
    tokenizer = AutoTokenizer.from_pretrained(CLIP_TOKENIZER)
    stage2 = cfg.get("stage2", {})
    with torch.no_grad():
        out, seconds = timed(lambda: generate(
            unet, adapter, vae, text_encoder, tokenizer, ["a photo of a cat"], steps=1,
            guidance_scale=float(section.get("guidance_scale", 7.5)), sampler=section.get("sampler", "ddim"),
            generator=torch.Generator().manual_seed(0), eta=float(section.get("eta", 0.0)),
            scheduler_config=cfg["scheduler"], parameterization=stage2.get("parameterization"),
            k_schedule=stage2.get("k_schedule", "quadratic"), k_scale=float(stage2.get("k_scale", 1.0)),
            height=size, width=size))
    if not torch.isfinite(out.images).all():
        raise RuntimeError("the sample is not finite")
    return {"sample_s": seconds, "output": list(out.images.shape)}


# Shifted Diffusion: the prior (train.py), the SD decoder fine-tuning (finetune.py), text -> embedding -> image.

SD2_SCHEDULER = {  # stabilityai/stable-diffusion-2-base scheduler_config.json (epsilon prediction)
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
    "timestep_spacing": "leading",
}


def _shifted_prior(cfg: dict, device: str = "cpu"):
    import torch

    from common.tiny import seeded
    from shifted.prior import ShiftedPrior

    p = cfg["prior"]
    dims = [int(d) for d in cfg["clip_dims"]]
    with torch.device(device), seeded(0):
        return ShiftedPrior(
            emb_dim=sum(dims), text_dim=int(p["t5_dim"]), text_len=int(p["t5_max_length"]), width=int(p["model_width"]),
            layers=int(p["model_layers"]), heads=int(p["model_num_heads"]), dim_head=int(p["model_dim_head"]),
            use_bank_token=bool(p.get("use_vocab", True)), clip_models=[str(m) for m in cfg["clip_models"]],
            clip_dims=dims, text_encoder=str(cfg.get("t5_model", "t5")),
            num_train_timesteps=int(p.get("num_train_timesteps", 1000)), beta_schedule=p.get("noise_schedule", "linear"),
            beta_start=float(p["beta_min"]), beta_end=float(p["beta_max"]))


def _shifted_bank(cfg: dict, prior):
    """A random bank of the configured size over the prior's embedding (a fitted one has the same shapes)."""
    import torch

    from shifted.bank import GaussianBank

    if not prior.config.use_bank_token:
        return None
    g = torch.Generator().manual_seed(0)
    k, d = int(cfg["bank"]["size"]), int(prior.config.emb_dim)
    return GaussianBank(torch.randn(k, d, generator=g), torch.rand(k, d, generator=g) * 0.1 + 0.01,
                        std_scale=float(cfg["bank"].get("std_scale", 5.0)), clip_models=prior.config.clip_models,
                        block_dims=prior.config.clip_dims, similarity=cfg["bank"].get("similarity", "concat"))


def _shifted_inputs(prior) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    c = prior.config
    return {"image_emb": torch.randn(1, c.emb_dim, generator=g), "text_emb": torch.randn(1, c.emb_dim, generator=g),
            "text_states": torch.randn(1, c.text_len, c.text_dim, generator=g)}


T5_NOTE = "text states random: the T5 text tower is not built"


def _shifted_prior_plan(cfg: dict, opts) -> Plan:
    prior = _shifted_prior(cfg, "meta")
    return Plan(trainable=count(prior), activations_gb=0.3, setting="batch 1 fp32", note=T5_NOTE)


@stage("shifted", "prior", "train", _shifted_prior_plan)
def _shifted_prior_run(cfg: dict, opts) -> dict:
    from shifted.training import PriorObjective

    p = cfg["prior"]
    prior = _shifted_prior(cfg)
    objective = PriorObjective(prior, _shifted_bank(cfg, prior), empty_text_prob=float(p.get("empty_t5_prob", 0.1)),
                               empty_clip_prob=float(p.get("empty_clip_prob", 0.0)),
                               p2_gamma=float(p.get("p2_gamma", 1.0)))
    return train_one_step(objective.models, objective, _shifted_inputs(prior), opts,
                          learning_rate=float(p.get("learning_rate", 1e-4)),
                          betas=(float(p.get("adam_beta1", 0.9)), float(p.get("adam_beta2", 0.999))),
                          weight_decay=float(p.get("adam_weight_decay", 1e-2)), eps=float(p.get("adam_epsilon", 1e-8)),
                          use_ema=float(p.get("ema_decay", 0.0)) > 0, ema_decay=float(p.get("ema_decay", 0.9999)),
                          max_grad_norm=float(p.get("max_grad_norm", 1.0)))


def _shifted_decoder(cfg: dict, device: str = "cpu"):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from common.tiny import seeded
    from shifted.projection import ImageEmbProjection

    sd = cfg["sd"]
    with torch.device(device), seeded(0):
        unet = UNet2DConditionModel(**sd["unet"])
        vae = AutoencoderKL(**sd["vae"])
        projection = ImageEmbProjection(sum(int(d) for d in cfg["clip_dims"]), int(sd.get("n_tokens", 4)),
                                        int(unet.config.cross_attention_dim), bool(sd.get("learned_null", False)))
    return unet, vae, projection


def _shifted_sd_setting(cfg: dict, opts) -> tuple[int, str]:
    size = min(int(cfg.get("sd", {}).get("resolution", opts.resolution)), opts.resolution)
    return size, f"{size}px batch 1 fp32"


def _shifted_sd_plan(cfg: dict, opts) -> Plan:
    size, setting = _shifted_sd_setting(cfg, opts)
    unet, vae, projection = (count(m) for m in _shifted_decoder(cfg, "meta"))
    return Plan(trainable=unet + projection, frozen=vae, ema=bool(cfg["sd"].get("use_ema")),
                activations_gb=2.0 * (size / 512) ** 2 + 0.5, setting=setting,
                note="image embeddings random: the three CLIP image towers are not built")


@stage("shifted", "sd", "train", _shifted_sd_plan)
def _shifted_sd_run(cfg: dict, opts) -> dict:
    import torch

    from common.diffusion_loss import diffusion_mse
    from common.process import canonical_prediction_type, q_sample, training_target
    from common.schedule import NoiseSchedule

    sd = cfg["sd"]
    size, _ = _shifted_sd_setting(cfg, opts)
    unet, vae, projection = _shifted_decoder(cfg)
    vae.requires_grad_(False).eval()
    schedule = NoiseSchedule.from_config(SD2_SCHEDULER)
    ptype = canonical_prediction_type(SD2_SCHEDULER["prediction_type"])
    scaling = float(vae.config.scaling_factor)
    g = torch.Generator().manual_seed(0)
    batch = {"pixel_values": pixels(size), "image_emb": torch.randn(1, projection.config.in_dim, generator=g)}

    def loss_fn(batch, ctx):  # scripts/shifted/finetune.py's loss (epsilon target), with the CLIP embedding given
        with torch.no_grad():
            latents = ctx.models["vae"].encode(batch["pixel_values"]).latent_dist.sample() * scaling
        drop = torch.rand(1) < float(sd.get("cfg_drop", 0.1))
        tokens = ctx.models["projection"](projection.drop(batch["image_emb"], drop))
        noise = torch.randn_like(latents)
        t = torch.randint(0, schedule.num_train_timesteps, (1,))
        abar = schedule.abar(t, like=latents)
        pred = ctx.models["unet"](q_sample(latents, abar, noise), t, encoder_hidden_states=tokens).sample
        return diffusion_mse(pred, training_target(latents, noise, abar, ptype), abar=abar, prediction_type=ptype)

    return train_one_step({"unet": unet, "projection": projection}, loss_fn, batch, opts, frozen={"vae": vae},
                          learning_rate=float(sd.get("learning_rate", 1e-5)), use_ema=bool(sd.get("use_ema")),
                          ema_decay=float(sd.get("ema_decay", 0.9999)))


def _shifted_sample_plan(cfg: dict, opts) -> Plan:
    size, _ = _shifted_sd_setting(cfg, opts)
    frozen = count(_shifted_prior(cfg, "meta")) + sum(count(m) for m in _shifted_decoder(cfg, "meta"))
    return Plan(frozen=frozen, activations_gb=1.5 * (size / 512) ** 2 + 0.3,
                setting=f"{size}px batch 1, 1 prior step + 1 DDIM step with CFG + decode", note=T5_NOTE)


@stage("shifted", "sample", "sample", _shifted_sample_plan)
def _shifted_sample_run(cfg: dict, opts) -> dict:
    import torch

    from shifted.pipeline import ImageDecoder, sample_prior

    size, _ = _shifted_sd_setting(cfg, opts)
    prior = _shifted_prior(cfg).eval()
    bank = _shifted_bank(cfg, prior)
    inputs = _shifted_inputs(prior)
    s = cfg.get("sample", {})
    unet, vae, projection = (m.eval() for m in _shifted_decoder(cfg))
    decoder = ImageDecoder(unet, vae, projection, SD2_SCHEDULER, prior.config.clip_models)

    def run():
        with torch.no_grad():
            emb = sample_prior(prior, bank, inputs["text_emb"], inputs["text_states"], steps="1",
                               sampler=s.get("sampler", "ddpm"), prior_noise=s.get("prior_noise", "data_std"),
                               posterior_component=s.get("posterior_component", "text"),
                               generator=torch.Generator().manual_seed(0))
            return decoder(emb, num_inference_steps=1, guidance_scale=float(cfg["sd"].get("guidance_scale", 2.0)),
                           resolution=size, generator=torch.Generator().manual_seed(0))

    images, seconds = timed(run)
    if not torch.isfinite(images).all():
        raise RuntimeError("the sample is not finite")
    return {"sample_s": seconds, "output": list(images.shape)}


# SDG: the unconditional ADM (train_unconditional.py), the noise-aware CLIP (finetune_clip.py), guided sampling.


def _sdg_flags(cfg: dict):
    from sdg.adm import ADMFlags

    return ADMFlags.from_dict(cfg["models"][cfg["default_model"]])


def _sdg_flags_at(cfg: dict, size: int):
    """The same network (channel multipliers, attention at the same downsampling rates) declared for ``size`` px,
    so the sampler's resolution checks hold at the reduced resolution."""
    import dataclasses

    from sdg.adm import attention_downsample_rates, channel_mult

    flags = _sdg_flags(cfg)
    if size == flags.image_size:
        return flags
    rates = attention_downsample_rates(flags)
    return dataclasses.replace(flags, image_size=size, channel_mult=",".join(str(m) for m in channel_mult(flags)),
                               attention_resolutions=",".join(str(size // r) for r in rates))


def _sdg_unet(cfg: dict, device: str = "cpu", size: int | None = None):
    import torch

    from common.tiny import seeded
    from sdg.adm import build_unet

    with torch.device(device), seeded(0):
        return build_unet(_sdg_flags_at(cfg, size) if size else _sdg_flags(cfg))


def _sdg_base_clip(cfg: dict, device: str = "cpu"):
    """The base CLIP with random weights (a registered open_clip name or a model-config .json) and its tokenizer."""
    import open_clip
    import torch

    from common.models import register_open_clip_config
    from common.tiny import seeded

    name = str(cfg["clip"]["model"])
    if name.endswith(".json"):
        name = register_open_clip_config(ROOT / name)
    with torch.device(device), seeded(0):
        model = open_clip.create_model(name, pretrained=None, device=device)
    return model.float().eval(), open_clip.get_tokenizer(name)


def _sdg_student(cfg: dict, model, image_size: int | None = None):
    """The noise-aware CLIP of the config; ``image_size``: built for another diffusion resolution (the paper's is
    the ADM's own, 256 px; the sample step runs at --pixel_resolution)."""
    from sdg.checkpoint import noise_aware_from_base

    c = dict(cfg["clip"], **({"image_size": image_size} if image_size else {}))
    return noise_aware_from_base(model, {k: c[k] for k in ("image_size", "t_dim", "hidden", "film_init", "pos_init")
                                         if k in c})


def _sdg_size(cfg: dict, opts) -> tuple[int, str]:
    size = min(int(_sdg_flags(cfg).image_size), opts.pixel_resolution)
    return size, f"{size}px"


def _sdg_unet_plan(cfg: dict, opts) -> Plan:
    size, setting = _sdg_size(cfg, opts)
    return Plan(trainable=count(_sdg_unet(cfg, "meta")), activations_gb=3.0 * (size / 256) ** 2 + 0.2,
                setting=f"{setting} batch 1 fp32 ({cfg['default_model']})")


@stage("sdg", "train_unconditional", "train", _sdg_unet_plan)
def _sdg_unet_run(cfg: dict, opts) -> dict:
    from sdg.adm import noise_schedule
    from sdg.training import HybridLoss

    size, _ = _sdg_size(cfg, opts)
    unet = _sdg_unet(cfg).train()
    loss = HybridLoss(unet, noise_schedule(_sdg_flags(cfg)))
    return train_one_step({"unet": unet}, loss, {"pixel_values": pixels(size)}, opts, learning_rate=1e-4,
                          weight_decay=0.0)


def _sdg_clip_plan(cfg: dict, opts) -> Plan:
    model, _ = _sdg_base_clip(cfg, "meta")
    student = count(_sdg_student(cfg, model))
    teacher = count(model.visual)
    size = int(cfg["clip"].get("image_size", 224))
    return Plan(trainable=student, frozen=teacher, activations_gb=0.6 * (size / 256) ** 2 + 0.2,
                setting=f"{size}px batch 2 fp32 (the contrastive loss needs a negative)")


@stage("sdg", "finetune_clip", "train", _sdg_clip_plan)
def _sdg_clip_run(cfg: dict, opts) -> dict:
    import copy

    import torch

    from sdg.adm import noise_schedule
    from sdg.clip_training import NoisyClipLoss

    ResizedTeacher = script_module("scripts/sdg/finetune_clip.py").ResizedTeacher

    f = cfg.get("finetune", {})
    model, _ = _sdg_base_clip(cfg)
    student = _sdg_student(cfg, model)
    student.set_finetune_mode(f.get("finetune_clip_layer", "all"))
    teacher = ResizedTeacher(copy.deepcopy(model.visual)).eval().requires_grad_(False)
    size = student.image_size
    loss = NoisyClipLoss(student, teacher, noise_schedule(_sdg_flags(cfg)), t_sampler=f.get("schedule_sampler", "uniform"),
                         noised=bool(f.get("noised", True)), logit_scale=float(f.get("logit_scale", 100.0)))
    batch = {"pixel_values": torch.cat([pixels(size), -pixels(size)])}
    return train_one_step({"clip": student}, loss, batch, opts, frozen={"teacher": teacher},
                          learning_rate=float(f.get("lr", 1e-4)), weight_decay=float(f.get("weight_decay", 0.0)))


def _sdg_sample_plan(cfg: dict, opts) -> Plan:
    size, setting = _sdg_size(cfg, opts)
    model, _ = _sdg_base_clip(cfg, "meta")
    frozen = count(_sdg_unet(cfg, "meta", size)) + count(model) + count(_sdg_student(cfg, model, size))
    return Plan(frozen=frozen, activations_gb=1.0 * (size / 256) ** 2 + 0.3,
                setting=f"{setting} batch 1, 1 DDPM step with language guidance (noise-aware CLIP at {size} px)")


@stage("sdg", "sample", "sample", _sdg_sample_plan)
def _sdg_sample_run(cfg: dict, opts) -> dict:
    import torch

    from sdg.adm import noise_schedule
    from sdg.pipeline import encode_text, sample_sdg

    size, _ = _sdg_size(cfg, opts)
    unet = _sdg_unet(cfg, size=size).eval()
    model, tokenizer = _sdg_base_clip(cfg)
    student = _sdg_student(cfg, model, size).eval()
    with torch.no_grad():
        text = encode_text(model, tokenizer, "a photo of a cat")
    schedule = noise_schedule(_sdg_flags(cfg))
    x_T = torch.randn(1, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    images, seconds = timed(lambda: sample_sdg(unet, schedule, "1", clip=student, text_embedding=text,
                                               text_weight=160.0, x_T=x_T, generator=torch.Generator().manual_seed(0)))
    if not torch.isfinite(images).all():
        raise RuntimeError("the sample is not finite")
    return {"sample_s": seconds, "output": list(images.shape)}


# Versatile Diffusion: the four-flow diffuser (train.py, Algorithm 1), the Optimus text VAE (train_text_vae.py),
# text-to-image and image-to-text sampling (VersatilePipeline).

SD_KL_F8 = {  # Stable Diffusion's kl-f8 image VAE (the one VD uses), diffusers AutoencoderKL config
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215,
}
SMOKE_CAPTION = "a photo of a cat on a red sofa"


def _versatile_config(cfg: dict):
    import dataclasses

    from versatile.config import VersatileConfig, trainer_keys

    config = VersatileConfig.from_mapping(cfg, passthrough=trainer_keys(), source="paper smoke")
    if config.text_vae.optimus_tokenizer not in ("words", "clip"):
        # the released BERT / GPT-2 tokenizer folders are not shipped: a word tokenizer feeds the same-size model
        words = tuple(SMOKE_CAPTION.split())
        config = dataclasses.replace(config, text_vae=dataclasses.replace(config.text_vae, optimus_tokenizer="words",
                                                                          optimus_words=words))
    return config


def _versatile_text_vae(config, device=None):
    from versatile.text_vae import build_text_vae

    return build_text_vae(config.text_vae, config.diffuser.text_latent_dim, seed=0, device=device)


def _versatile_diffuser(config, device=None):
    import torch

    from common.tiny import seeded
    from versatile.multiflow import build_diffuser

    with seeded(0):
        if device == "meta":
            with torch.device("meta"):
                return build_diffuser(config.diffuser)
        return build_diffuser(config.diffuser)


def _versatile_contexts(config, device: str = "cpu"):
    """CLIP ViT-L/14 (the paper's context encoder) with random weights; the shipped tiny CLIP for narrow configs."""
    import open_clip

    from common.tiny import seeded
    from versatile.context import open_clip_contexts

    if config.diffuser.context_dim == 768:
        with seeded(0):
            model = open_clip.create_model("ViT-L-14", pretrained=None, device=device)
        tokenizer = open_clip.get_tokenizer("ViT-L-14")
        if device == "meta":
            return model
        return open_clip_contexts(model.float(), tokenizer, scale=config.context.context_scale)
    from versatile.tiny import tiny_contexts

    contexts = tiny_contexts(0, config)
    contexts.set_scale(config.context.context_scale)
    return contexts


def _versatile_image_vae(config, device: str = "cpu"):
    import torch
    from diffusers import AutoencoderKL

    from common.tiny import seeded, tiny_vae

    if config.diffuser.image_latent_channels == 4 and config.diffuser.model_channels >= 320:
        with torch.device(device), seeded(0):
            return AutoencoderKL(**SD_KL_F8)
    with torch.device(device):
        return tiny_vae(0)


def _versatile_setting(config, opts) -> tuple[int, str]:
    size = min(int(config.sampling.resolution), opts.resolution)
    return size, f"{size}px"


def _versatile_diffuser_plan(cfg: dict, opts) -> Plan:
    config = _versatile_config(cfg)
    size, setting = _versatile_setting(config, opts)
    flows = list(cfg.get("flows", ["t2i"]))
    return Plan(trainable=count(_versatile_diffuser(config, "meta")), activations_gb=2.5 * (size / 512) ** 2 + 0.5,
                setting=f"{setting} batch 1 fp32, flows {'+'.join(flows)} on cached latents and contexts")


@stage("versatile", "train_diffuser", "train", _versatile_diffuser_plan)
def _versatile_diffuser_run(cfg: dict, opts) -> dict:
    import torch

    from versatile.multiflow import FLOWS
    from versatile.pipeline import vd_schedule
    from versatile.training import FlowSampler, check_multipliers, flow_loss, param_groups

    config = _versatile_config(cfg)
    size, _ = _versatile_setting(config, opts)
    flows = list(cfg.get("flows", ["t2i"]))
    model = _versatile_diffuser(config).train()
    d = config.diffuser
    g = torch.Generator().manual_seed(0)
    # the batch scripts/versatile/train.py's EncodedData yields: latent moments, contexts, Optimus means
    batch = {"latent_mean": torch.randn(1, d.image_latent_channels, size // 8, size // 8, generator=g),
             "latent_std": torch.full((1, d.image_latent_channels, size // 8, size // 8), 0.1),
             "text_ctx": torch.randn(1, config.context.clip_text_max_length, d.context_dim, generator=g),
             "image_ctx": torch.randn(1, 257, d.context_dim, generator=g),  # ViT-L/14 at 224 px: 16 x 16 + class
             "text_latent": torch.randn(1, d.text_latent_dim, generator=g)}
    schedule = vd_schedule(config.sampling)
    sampler = FlowSampler(flows, cfg.get("flow_sampling", "all"))
    cond_drop = float(cfg.get("cond_drop", 0.0))
    nulls = {"text": torch.zeros_like(batch["text_ctx"]), "image": torch.zeros_like(batch["image_ctx"])}
    scaling = float(config.sampling.image_scaling_factor)

    def loss_fn(batch, ctx):  # scripts/versatile/train.py's loss_fn
        diffuser = ctx.models["diffuser"]
        mean = batch["latent_mean"]
        image_x0 = (mean + batch["latent_std"] * torch.randn_like(mean)) * scaling
        total = 0.0
        for name in sampler(ctx.step):
            flow = FLOWS[name]
            item = {"x0": image_x0 if flow.xtype == "image" else batch["text_latent"]}
            for kind in flow.ctypes:
                item[kind] = batch[f"{kind}_ctx"]
            total = total + flow_loss(diffuser, item, flow, schedule=schedule, cond_drop=cond_drop, null_contexts=nulls)
        return total

    lr = float(cfg.get("learning_rate", 1e-4))
    groups = param_groups(model, lr, check_multipliers(cfg.get("group_lr_scale")))
    return train_one_step({"diffuser": model}, loss_fn, batch, opts, params=groups, learning_rate=lr)


def _versatile_text_vae_plan(cfg: dict, opts) -> Plan:
    config = _versatile_config(cfg)
    return Plan(trainable=count(_versatile_text_vae(config, "meta")), activations_gb=0.5,
                setting=f"batch 1 fp32, {len(SMOKE_CAPTION.split())}-word caption, word tokenizer "
                        "(the BERT / GPT-2 tokenizer files are not shipped)")


@stage("versatile", "train_text_vae", "train", _versatile_text_vae_plan)
def _versatile_text_vae_run(cfg: dict, opts) -> dict:
    config = _versatile_config(cfg)
    vae = _versatile_text_vae(config).train()

    def loss_fn(batch, ctx):  # scripts/versatile/train_text_vae.py's loss_fn after the beta warm-up
        model = ctx.models["text_vae"]
        model = getattr(model, "module", model)
        loss, logs = model.reconstruction_loss(batch["text"], beta=1.0)
        return {"loss": loss, **logs}

    return train_one_step({"text_vae": vae}, loss_fn, {"text": [SMOKE_CAPTION]}, opts, learning_rate=5e-5)


def _versatile_sample_plan(cfg: dict, opts) -> Plan:
    config = _versatile_config(cfg)
    size, setting = _versatile_setting(config, opts)
    frozen = sum(count(m) for m in (_versatile_diffuser(config, "meta"), _versatile_text_vae(config, "meta"),
                                    _versatile_contexts(config, "meta"), _versatile_image_vae(config, "meta")))
    return Plan(frozen=frozen, activations_gb=1.5 * (size / 512) ** 2 + 0.5,
                setting=f"{setting} batch 1, 1 DDIM step with CFG: t2i + decode, i2t + Optimus decode")


@stage("versatile", "sample", "sample", _versatile_sample_plan)
def _versatile_sample_run(cfg: dict, opts) -> dict:
    import torch

    from versatile.pipeline import VersatilePipeline

    config = _versatile_config(cfg)
    size, _ = _versatile_setting(config, opts)
    pipe = VersatilePipeline(_versatile_diffuser(config).eval(), _versatile_image_vae(config).eval(),
                             _versatile_text_vae(config).eval(), _versatile_contexts(config), config.sampling)
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    t2i, t2i_s = timed(lambda: pipe("t2i", prompt=SMOKE_CAPTION, num_inference_steps=1, height=size, width=size,
                                    generator=torch.Generator().manual_seed(0)))
    i2t, i2t_s = timed(lambda: pipe("i2t", image=image, num_inference_steps=1,
                                    generator=torch.Generator().manual_seed(0)))
    if not torch.isfinite(t2i.images).all() or not isinstance(i2t.texts[0], str):
        raise RuntimeError("the samples are not finite")
    return {"sample_s": t2i_s + i2t_s, "t2i_s": t2i_s, "i2t_s": i2t_s, "output": list(t2i.images.shape)}


# ------------------------------------------------------------------------------------------------ driver


def config_path(method: str, opts: argparse.Namespace) -> Path:
    return Path(opts.config) if opts.config else ROOT / "configs" / method / "paper.yaml"


def load_config(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def selected(opts: argparse.Namespace) -> list[Stage]:
    """The stages to run: every stage of ``--methods``, or ``--stages`` (names, or method:name in the order given)."""
    methods = opts.methods or list(METHODS)
    if opts.stages and all(":" in name for name in opts.stages):
        chosen = [s for name in opts.stages for s in STAGES if f"{s.method}:{s.name}" == name and s.method in methods]
    else:
        chosen = [s for s in STAGES if s.method in methods and (not opts.stages or s.name in opts.stages)]
    if not chosen:
        from common.errors import UserError

        known = ", ".join(f"{s.method}:{s.name}" for s in STAGES)
        raise UserError(f"no stage matches --methods {methods} --stages {opts.stages}; stages are {known}")
    return chosen


def find(method: str, name: str) -> Stage:
    return next(s for s in STAGES if s.method == method and s.name == name)


def worker(opts: argparse.Namespace) -> int:
    """Run one stage in this process and print its result line."""
    import torch

    torch.set_num_threads(opts.threads)
    method, name = opts.worker.split(":")
    s = find(method, name)
    cfg = load_config(config_path(method, opts))
    out = s.run(cfg, opts)
    out["peak_rss_gb"] = rss_gb()
    print(RESULT_TAG + json.dumps(out), flush=True)
    return 0


def _rss_of(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return 0.0


def available_gb() -> float:
    """The machine's MemAvailable (other users' processes count): a stage must never push the machine into swap/OOM."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return float("inf")


MIN_FREE_GB = 1.0  # a stage is killed when the machine's available memory falls below this


def run_stage(s: Stage, opts: argparse.Namespace) -> dict:
    """Estimate, then (if it fits) run ``s`` in a subprocess under an RSS watchdog; the table row."""
    cfg_file = config_path(s.method, opts)
    row: dict[str, Any] = {"stage": f"{s.method}:{s.name}", "config": str(cfg_file.relative_to(ROOT))
                           if cfg_file.is_absolute() and ROOT in cfg_file.parents else str(cfg_file)}
    plan = s.plan(load_config(cfg_file), opts)
    row.update(params=plan.params, trainable=plan.trainable, setting=plan.setting, estimate_gb=round(plan.total_gb(), 2))
    reason = skip_reason(plan, opts.max_memory_gb)
    without_optimizer = bool(reason and opts.fallback and plan.trainable
                             and plan.without_optimizer_gb() <= opts.max_memory_gb)
    if reason and not without_optimizer:
        row["status"] = reason
        return row
    need = plan.without_optimizer_gb() if without_optimizer else plan.total_gb()
    deadline = time.monotonic() + opts.wait_memory_s
    while (free := available_gb()) < need + MIN_FREE_GB and time.monotonic() < deadline:
        time.sleep(10)  # a shared machine: other jobs come and go
    if free < need + MIN_FREE_GB:
        row["status"] = (f"skipped: needs ~{need:.1f} GB but the machine had {free:.1f} GB available "
                         f"(waited {opts.wait_memory_s:g} s); rerun when it is idle")
        return row
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", f"{s.method}:{s.name}",
           "--threads", str(opts.threads), "--resolution", str(opts.resolution),
           "--pixel_resolution", str(opts.pixel_resolution)]
    if opts.config:
        cmd += ["--config", str(opts.config)]
    if without_optimizer:
        cmd += ["--without_optimizer"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": str(opts.threads)}
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    killed: list[float] = []
    done = threading.Event()

    def watch() -> None:  # the estimate can be wrong: never let a stage grow past the budget
        # never proc.poll() here: it would reap the child before os.wait4 reads its resource usage
        while not done.wait(0.2):
            rss = _rss_of(proc.pid)
            if rss > opts.max_memory_gb or available_gb() < MIN_FREE_GB:
                killed.append(rss)
                proc.kill()
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.perf_counter()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    proc.returncode = os.waitstatus_to_exitcode(status)
    watcher.join()
    row["wall_s"] = round(time.perf_counter() - start, 1)
    row["peak_rss_gb"] = round(usage.ru_maxrss / 1024**2, 2)
    log.seek(0)
    text = log.read()
    log.close()
    result = next((json.loads(line[len(RESULT_TAG):]) for line in text.splitlines() if line.startswith(RESULT_TAG)),
                  None)
    if killed:
        row["status"] = (f"killed at {killed[0]:.1f} GB RSS (over the {opts.max_memory_gb:g} GB budget or under "
                         f"{MIN_FREE_GB:g} GB free on the machine; estimate was {plan.describe()})")
    elif proc.returncode != 0 or result is None:
        tail = [line for line in text.strip().splitlines() if line.strip()][-1:] or ["no output"]
        row["status"] = f"failed (exit {proc.returncode}): {tail[0][:300]}"
        if opts.verbose:
            print(text, file=sys.stderr)
    else:
        row.update({k: (round(v, 2) if isinstance(v, float) else v) for k, v in result.items()})
        notes = [n for n in (plan.note, result.get("note")) if n]
        row["status"] = "ok" + (f" ({'; '.join(notes)})" if notes else "")
        if without_optimizer:
            row["estimate_gb"] = round(plan.without_optimizer_gb(), 2)
            row["status"] = ("partial: forward + backward only" + (f" ({'; '.join(notes)})" if notes else "")
                             + "; the full step " + reason.removeprefix("skipped: "))
    return row


def format_table(rows: list[dict]) -> str:
    head = "| stage | params | trainable | setting | train step s | sample step s | peak RSS GB | estimate GB | status |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        def cell(key, fmt="{}", r=r):
            return fmt.format(r[key]) if r.get(key) is not None else "-"

        lines.append(f"| {r['stage']} | {r['params'] / 1e6:.1f}M | {r['trainable'] / 1e6:.1f}M | {r['setting']} | "
                     f"{cell('train_s', '{:.1f}')} | {cell('sample_s', '{:.1f}')} | {cell('peak_rss_gb', '{:.2f}')} | "
                     f"{cell('estimate_gb', '{:.1f}')} | {r['status']} |")
    return "\n".join(lines)


def summary(row: dict) -> str:
    """One readable cell: what ran, how long, how much memory, and the status or the reason it did not run."""
    parts = []
    if row.get("train_s") is not None:
        parts.append(f"train step {row['train_s']:.1f} s")
    if row.get("sample_s") is not None:
        parts.append(f"sample step {row['sample_s']:.1f} s")
    if row.get("peak_rss_gb") is not None:
        parts.append(f"peak RSS {row['peak_rss_gb']:.2f} GB")
    parts.append(f"{row['params'] / 1e6:.1f}M params ({row['trainable'] / 1e6:.1f}M trained)")
    parts.append(row["setting"])
    parts.append(row["status"])
    return "; ".join(parts)


def record(rows: list[dict], opts: argparse.Namespace) -> None:
    """One record per stage in bench/results.json (the numbers as fields too), section "paper smoke"."""
    from common.bench_records import write_records

    records = []
    for r in rows:
        fields = {k: r[k] for k in ("params", "trainable", "setting", "train_s", "sample_s", "peak_rss_gb",
                                    "estimate_gb", "status") if r.get(k) is not None}
        records.append({"section": "paper smoke", "name": f"paper smoke {r['stage']}", "value": summary(r),
                        "unit": "", "target": f"one step within {opts.max_memory_gb:g} GB",
                        "command": "make paper-smoke", **fields})
    write_records(records, replace_section="paper smoke")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", choices=METHODS, default=None, help="Methods to run (default: all).")
    p.add_argument("--stages", nargs="*", default=None, help="Stage names to run (default: all of each method).")
    p.add_argument("--config", default=None, help="Use this config instead of configs/<method>/paper.yaml "
                                                  "(one method only; the tiny configs keep the driver tested).")
    p.add_argument("--max_memory_gb", type=float, default=18.0,
                   help="Skip a stage whose estimate exceeds this, and kill one whose RSS does.")
    p.add_argument("--resolution", type=int, default=256,
                   help="Pixel resolution of the image stages' training step and sample (the papers' is 256-512).")
    p.add_argument("--pixel_resolution", type=int, default=64,
                   help="Resolution of the pixel-space (ADM) stages, whose cost grows with the pixel count.")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each stage.")
    p.add_argument("--json", default=None, help="Also write the rows to this JSON file.")
    p.add_argument("--record", action="store_true", help="Write the table into bench/results.json and results.md.")
    p.add_argument("--rows", nargs="*", default=None,
                   help="Run nothing: print (and with --record, record) the rows of earlier --json files; a later "
                        "file's row replaces an earlier one of the same stage.")
    p.add_argument("--dry_run", action="store_true", help="Print the estimates only; run nothing.")
    p.add_argument("--verbose", action="store_true", help="Print a failed stage's whole log.")
    p.add_argument("--wait_memory_s", type=float, default=600,
                   help="How long a stage waits for the machine to have its estimate (+1 GB) available.")
    p.add_argument("--fallback", action=argparse.BooleanOptionalAction, default=True,
                   help="A stage whose AdamW state (and EMA) does not fit still runs its forward + backward "
                        "without the optimizer, when that fits (--no-fallback: skip it).")
    p.add_argument("--without_optimizer", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    opts = build_parser().parse_args(argv)
    if opts.worker:
        return worker(opts)
    from common.errors import UserError

    if opts.config and opts.methods is not None and len(opts.methods) != 1:
        raise UserError("--config replaces one method's paper.yaml: give exactly one --methods")
    if opts.config and not opts.methods:
        raise UserError("--config needs --methods naming its method")
    if opts.config and not Path(opts.config).is_file():
        raise UserError(f"--config {opts.config}: no such file; pass a configs/<method>/*.yaml")
    if opts.rows is not None:
        merged: dict[str, dict] = {}
        for path in opts.rows:
            merged.update({row["stage"]: row for row in json.loads(Path(path).read_text())})
        order = [f"{s.method}:{s.name}" for s in STAGES]
        rows = sorted(merged.values(), key=lambda r: order.index(r["stage"]) if r["stage"] in order else len(order))
        print(format_table(rows))
        if opts.record:
            record(rows, opts)
        return 0
    rows = []
    for s in selected(opts):
        if opts.dry_run:
            plan = s.plan(load_config(config_path(s.method, opts)), opts)
            reason = skip_reason(plan, opts.max_memory_gb)
            print(f"{s.method}:{s.name}: {plan.params / 1e6:.1f}M params, {plan.setting}, {plan.describe()}"
                  + (f" -> {reason}" if reason else ""), flush=True)
            continue
        print(f"[paper-smoke] {s.method}:{s.name} ...", flush=True)
        row = run_stage(s, opts)
        rows.append(row)
        print(f"[paper-smoke] {row['stage']}: train {row.get('train_s', '-')} s, sample {row.get('sample_s', '-')} s, "
              f"peak RSS {row.get('peak_rss_gb', '-')} GB, {row['status']}", flush=True)
        if opts.json:
            Path(opts.json).write_text(json.dumps(rows, indent=1))
    if rows:
        print(format_table(rows))
        if opts.record:
            record(rows, opts)
    return 1 if any(r["status"].startswith(("failed", "killed")) for r in rows) else 0


if __name__ == "__main__":
    from common.errors import cli_entry

    raise SystemExit(cli_entry(main)())
