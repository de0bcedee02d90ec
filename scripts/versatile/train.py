"""Train the multi-flow diffuser of Versatile Diffusion (VD §3.5, Algorithm 1, Table 1) with the shared trainer.

Progressive schedule of the paper, one run per stage, each starting from the previous one::

    python scripts/versatile/train.py --config configs/versatile/stage1_single.yaml   # image variation
    python scripts/versatile/train.py --config configs/versatile/stage2_dual.yaml     # + text-to-image
    python scripts/versatile/train.py --config configs/versatile/stage3_four.yaml     # + image-to-text, text variation

``--stage single|dual|four`` picks the flows (iv | t2i, iv | t2i, iv, i2t, tv; ``--flows`` overrides) and the
default per-group LR multipliers (Table 1's rows, ``--group_lr_scale`` overrides); ``--flow_sampling all`` runs every
flow each step and sums their losses before one optimizer step (Algorithm 1), ``one`` draws one flow per step with
``--flow_weights``. Image latents come from ``--vae_model_path`` (times its ``scaling_factor``), contexts from the
open_clip towers of ``--clip_model_path`` (normalised projected tokens), text latents from
``--text_vae_path`` (scripts/versatile/train_text_vae.py). Every caption and image is encoded once before training.
Each item serves every flow: t2i / tv are conditioned on its caption, iv / i2t on its image; image flows generate
its latent, text flows its caption latent. ``--cond_drop`` replaces a context by the null one the flow samples with
(CLIP(""), zeros for iv, black for i2t; ``--uncond_image`` overrides).

Output (``--save_to``, default ``<output_dir>`` itself): ``versatile.json`` + ``diffuser/`` (see
``versatile.checkpoint``), loadable by ``scripts/versatile/sample.py`` and ``scripts/sample.py --method versatile``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common.errors import UserError, cli_entry  # noqa: E402
from common.latents import vae_scale_factor


STAGES = {"single": ("iv",), "dual": ("t2i", "iv"), "four": ("t2i", "iv", "i2t", "tv")}


def build_parser() -> argparse.ArgumentParser:
    from common.data import add_image_augmentation_args
    from common.data_sources import add_dataset_args
    from common.diffusion_loss import add_diffusion_loss_args
    from common.train import add_train_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="YAML of flag defaults (command-line flags win)")
    p.add_argument("--model_config", default="digits",
                   help="versatile config: a name under configs/versatile (digits, tiny, paper) or a YAML path")
    add_dataset_args(p)
    p.add_argument("--resolution", type=int, default=None, help="training resolution (default: the VAE's)")
    p.add_argument("--vae_model_path", default="ckpt/tiny/vae", help="diffusers AutoencoderKL folder")
    p.add_argument("--clip_model_path", default="ckpt/tiny/clip", help="open_clip local folder (both towers)")
    p.add_argument("--text_vae_path", default=None, help="text VAE folder (needed by the text flows i2t, tv)")
    p.add_argument("--stage", default="four", choices=tuple(STAGES), help="progressive stage: its flows and LR row")
    p.add_argument("--flows", default=None, help="comma list of flows to train (overrides --stage's): t2i,iv,i2t,tv")
    p.add_argument("--flow_sampling", default="all", choices=("all", "one"),
                   help="all: every flow each step, losses summed (Algorithm 1); one: one flow drawn per step")
    p.add_argument("--flow_weights", default=None, help="comma list, one weight per flow (--flow_sampling one)")
    p.add_argument("--group_lr_scale", default=None,
                   help="per-group LR multipliers, e.g. data_image=0.2,data_text=1,ctx_image=1,ctx_text=1,global=0.1 "
                        "(default: Table 1's row for the stage)")
    p.add_argument("--cond_drop", type=float, default=0.1, help="probability of the null context per sample (CFG)")
    p.add_argument("--uncond_image", default=None, choices=("zeros", "grey", "black"),
                   help="null image context (default per flow: zeros for iv, black for i2t)")
    p.add_argument("--init_from", default=None,
                   help="a versatile folder (versatile.json) or a diffuser folder to start from (previous stage)")
    p.add_argument("--save_to", default=None,
                   help="output versatile folder (default: --output_dir itself, beside the run's checkpoints)")
    p.add_argument("--save_dtype", default="float32", choices=("float32", "float16"),
                   help="storage dtype of the diffuser weights (float16 keeps the shipped checkpoint small)")
    p.add_argument("--validation_prompts", nargs="*", default=None,
                   help="prompts sampled with the text-to-image flow at each validation (every --validation_steps "
                        "and at the end; needs t2i among the trained flows)")
    add_diffusion_loss_args(p, prediction_type=False)  # every flow predicts eps (the released model's target)
    add_image_augmentation_args(p, random_flip=False)  # every image is encoded once: no per-step flip
    add_train_args(p, defaults={"learning_rate": 5e-4, "train_batch_size": 64, "lr_warmup_steps": 200,
                                "report_to": "none", "tracker_project_name": "versatile",
                                "checkpointing_steps": 100000, "validation_steps": 100000})
    return p


def parse_multipliers(text):
    if text is None:
        return None
    try:
        pairs = [item.split("=") for item in text.split(",") if item.strip()]
        return {k.strip(): float(v) for k, v in pairs}
    except ValueError:
        raise UserError(f"--group_lr_scale {text!r}: write name=multiplier,name=multiplier") from None


def resolve_training_flows(args) -> tuple[str, ...]:
    from versatile.multiflow import resolve_flow

    names = [f.strip() for f in args.flows.split(",") if f.strip()] if args.flows else list(STAGES[args.stage])
    if not names:
        raise UserError("--flows is empty: name at least one of t2i, iv, i2t, tv")
    flows = []
    for name in names:
        flow = resolve_flow(name).name
        if flow == "dual":
            raise UserError("dual is a sampling-time mixture of t2i and iv inside the context layers: train t2i and iv")
        if flow not in flows:
            flows.append(flow)
    return tuple(flows)


def default_multipliers(stage: str) -> dict:
    from versatile.training import FOUR_FLOW_LR_MULTIPLIERS, SINGLE_FLOW_LR_MULTIPLIERS

    return dict(FOUR_FLOW_LR_MULTIPLIERS if stage == "four" else SINGLE_FLOW_LR_MULTIPLIERS)


class EncodedData(torch.utils.data.Dataset):
    """Everything a step needs, encoded once: image latent posteriors, text latents, both CLIP contexts."""

    def __init__(self, tensors: dict):
        self.tensors = tensors
        self.length = len(next(iter(tensors.values())))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.tensors.items()}


@torch.no_grad()
def encode_dataset(dataset, vae, contexts, text_vae, need_text_latents: bool, batch_size: int = 64) -> dict:
    """``latent_mean``/``latent_std`` ``[N, 4, h, w]`` (unscaled), ``text_ctx`` ``[N, L, D]``, ``image_ctx``
    ``[N, 1 + P, D]`` and, for text flows, ``text_latent`` ``[N, D_t]`` (scaled by the text VAE's factor)."""
    from common.data import encode_once

    cache: dict[str, tuple] = {}  # captions repeat (digits: templates): each distinct one is encoded once

    def encode(batch):
        pixels = batch["pixel_values"]  # [-1, 1]
        posterior = vae.encode(pixels).latent_dist
        out = {"latent_mean": posterior.mean, "latent_std": posterior.std, "image_ctx": contexts.image((pixels + 1) / 2)}
        texts = list(batch["text"])
        todo = sorted({t for t in texts if t not in cache})
        if todo:
            text_ctx = contexts.text(todo)
            latents = (text_vae.encode(todo) * text_vae.config.optimus_scaling_factor if need_text_latents
                       else [None] * len(todo))
            for i, t in enumerate(todo):
                cache[t] = (text_ctx[i], latents[i])
        out["text_ctx"] = torch.stack([cache[t][0] for t in texts])
        if need_text_latents:
            out["text_latent"] = torch.stack([cache[t][1] for t in texts])
        return out

    encoded, _ = encode_once(dataset, encode, batch_size=batch_size, progress=True)
    keys = ["latent_mean", "latent_std", "text_ctx", "image_ctx"] + (["text_latent"] if need_text_latents else [])
    return {k: encoded[k].float() for k in keys}


def stage_record(args, flows, multipliers, steps, seconds) -> dict:
    return {"stage": args.stage, "flows": list(flows), "flow_sampling": args.flow_sampling,
            "group_lr_scale": multipliers, "steps": steps, "batch_size": args.train_batch_size,
            "learning_rate": args.learning_rate, "cond_drop": args.cond_drop, "seconds": round(seconds, 1),
            "init_from": args.init_from}


def load_init(model, path: Path):
    """Weights (strict) and the manifest, if any, of ``--init_from``."""
    from versatile.checkpoint import DIFFUSER_DIR, MANIFEST, read_manifest
    from versatile.convert import load_diffuser_weights, read_diffuser_weights

    if not path.is_dir():
        raise UserError(f"--init_from {path} does not exist: pass the previous stage's output folder")
    manifest = read_manifest(path) if (path / MANIFEST).is_file() else None
    weights_dir = path / DIFFUSER_DIR if manifest is not None else path
    load_diffuser_weights(model, read_diffuser_weights(weights_dir), layout="native")
    return manifest


@cli_entry
def main(argv=None) -> int:
    from common.data_sources import check_data_source, training_dataset
    from common.diffusion_loss import check_diffusion_loss_args
    from common.train import Trainer, config_from_args, parse_args_with_config
    from versatile.checkpoint import load_towers, save_pipeline_folder
    from versatile.config import VersatileConfig
    from versatile.context import DEFAULT_NULL_IMAGE
    from versatile.multiflow import FLOWS, build_diffuser
    from versatile.pipeline import vd_schedule
    from versatile.training import FlowSampler, check_multipliers, flow_loss, param_groups

    parser = build_parser()
    args = parse_args_with_config(parser, argv)
    flows = resolve_training_flows(args)
    check_data_source(args)
    if not 0.0 <= args.cond_drop < 1.0:
        raise UserError(f"--cond_drop must lie in [0, 1), got {args.cond_drop}")
    check_diffusion_loss_args(args)
    if args.validation_prompts and "t2i" not in flows:
        raise UserError(f"--validation_prompts samples the t2i flow, which this run does not train ({', '.join(flows)})"
                        ": add it with --flows or --stage, or drop --validation_prompts")
    multipliers = check_multipliers(parse_multipliers(args.group_lr_scale) or default_multipliers(args.stage))
    weights = None
    if args.flow_weights:
        try:
            weights = [float(w) for w in args.flow_weights.split(",")]
        except ValueError:
            raise UserError(f"--flow_weights {args.flow_weights!r}: write comma-separated numbers") from None
    sampler = FlowSampler(flows, args.flow_sampling, weights, seed=args.seed or 0)
    needs_text = any(FLOWS[f].xtype == "text" for f in flows)
    if needs_text and not args.text_vae_path:
        raise UserError(f"flows {', '.join(f for f in flows if FLOWS[f].xtype == 'text')} generate text: pass "
                        "--text_vae_path (scripts/versatile/train_text_vae.py)")
    model_config = VersatileConfig.load(args.model_config)
    config = config_from_args(args)
    save_to = Path(args.save_to) if args.save_to else Path(config.output_dir)
    init = Path(args.init_from) if args.init_from else None

    with Trainer(config) as trainer:
        text_vae_path = Path(args.text_vae_path) if args.text_vae_path else None
        vae, contexts, text_vae = load_towers(Path(args.vae_model_path), Path(args.clip_model_path), text_vae_path,
                                              context_scale=model_config.context.context_scale)
        if contexts.dim != model_config.diffuser.context_dim:
            raise UserError(f"the CLIP at {args.clip_model_path} gives {contexts.dim}-d contexts but --model_config "
                            f"{args.model_config} expects context_dim {model_config.diffuser.context_dim}")
        if text_vae is not None and text_vae.latent_dim != model_config.diffuser.text_latent_dim:
            raise UserError(f"the text VAE latent is {text_vae.latent_dim}-d but --model_config expects "
                            f"text_latent_dim {model_config.diffuser.text_latent_dim}")
        model = build_diffuser(model_config.diffuser)
        previous = load_init(model, init) if init is not None else None
        if previous is not None and previous.context_scale != model_config.context.context_scale:
            raise UserError(f"--init_from {init} was trained with context_scale {previous.context_scale}, "
                            f"--model_config says {model_config.context.context_scale}: use the same")
        factor = vae_scale_factor(vae)
        resolution = args.resolution or vae.config.sample_size
        if resolution % factor:
            raise UserError(f"--resolution {resolution} is not divisible by the VAE's factor {factor}")
        dataset = training_dataset(args, resolution, center_crop=args.center_crop)
        data = EncodedData(encode_dataset(dataset, vae, contexts, text_vae, needs_text))
        scaling = float(vae.config.scaling_factor)
        schedule = vd_schedule(model_config.sampling)
        nulls = {}
        for name in flows:
            kind = args.uncond_image or DEFAULT_NULL_IMAGE.get(name, "zeros")
            nulls[name] = {"text": contexts.null("text", 1), "image": contexts.null("image", 1, kind)}
        groups = param_groups(model, config.learning_rate, multipliers)
        model.train()

        def loss_fn(batch, ctx):
            diffuser = ctx.models["diffuser"]
            mean = batch["latent_mean"]
            image_x0 = (mean + batch["latent_std"] * torch.randn_like(mean)) * scaling
            total, logs = 0.0, {}
            for name in sampler(ctx.step):
                flow = FLOWS[name]
                item = {"x0": image_x0 if flow.xtype == "image" else batch["text_latent"]}
                for kind in flow.ctypes:
                    item[kind] = batch[f"{kind}_ctx"]
                null = {k: v.to(mean.device) for k, v in nulls[name].items()}
                loss = flow_loss(diffuser, item, flow, schedule=schedule, cond_drop=args.cond_drop, null_contexts=null,
                                 snr_gamma=args.snr_gamma, noise_offset=args.noise_offset)
                total = total + loss
                logs[f"loss_{name}"] = loss.detach()
            return {"loss": total, **logs}

        validate = None
        if args.validation_prompts:
            from versatile.pipeline import VersatilePipeline

            def validate(step, models):
                pipe = VersatilePipeline(models["diffuser"], vae, text_vae, contexts, model_config.sampling,
                                         uncond_image=args.uncond_image)
                out = pipe("t2i", list(args.validation_prompts), num_inference_steps=25,
                           generator=torch.Generator().manual_seed(0))
                return out.images  # [B, 3, H, W] in [0, 1]: the trainer writes and logs each image

        start = time.perf_counter()
        result = trainer.fit({"diffuser": model}, loss_fn, data, params=groups, validation_fn=validate)
        if trainer.is_main_process and result.completed:
            seconds = time.perf_counter() - start
            trained = set(flows) | set(previous.trained_flows if previous else ())
            stages = (previous.stages if previous else []) + [
                stage_record(args, flows, multipliers, result.global_step, seconds)]
            dtype = torch.float16 if args.save_dtype == "float16" else None
            sampling = model_config.sampling
            save_pipeline_folder(
                save_to, result.models["diffuser"].eval(), image_vae=args.vae_model_path, clip=args.clip_model_path,
                text_vae=args.text_vae_path or (previous.text_vae if previous else None), trained_flows=trained,
                sampling=sampling, uncond_image=args.uncond_image, stages=stages, dtype=dtype,
                context_scale=model_config.context.context_scale,
                beside_existing=save_to.resolve() == Path(config.output_dir).resolve(),
            )
            losses = result.loss_history[-50:]
            print(f"versatile folder saved to {save_to}: flows {sorted(trained)}, {result.global_step} steps in "
                  f"{seconds:.0f} s, final loss {sum(losses) / max(len(losses), 1):.4f}")
            (Path(config.output_dir)).mkdir(parents=True, exist_ok=True)
            (Path(config.output_dir) / "stage.json").write_text(json.dumps(stages[-1], indent=2))
    return result.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
