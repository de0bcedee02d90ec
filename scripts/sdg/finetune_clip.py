"""Fine-tune a noise-aware CLIP image encoder E'(x_t, t) from a pretrained CLIP, without captions.

    python scripts/sdg/finetune_clip.py --config configs/sdg/finetune_clip.yaml \\
        --data_dir data/digits/train --clip_model_path ckpt/tiny/clip --output_dir outputs/tiny/sdg/clip_run

The image tower of ``--clip_model_path`` (an open_clip folder, e.g. ``ckpt/tiny/clip``; or an open_clip name / config
.json with ``--clip_weights``) gets a timestep MLP and FiLM after every norm layer (``sdg.noisy_clip``). For clean
images x_0 of ``--data_dir`` (captions unused), t ~ U{0..T-1} (``--schedule_sampler``) and
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with the diffusion model's schedule, the student embedding
E'(x_t, t) is pulled towards the FROZEN CLIP embedding of the clean x_0 against the rest of the batch (symmetric
InfoNCE at logit scale ``--logit_scale`` (SDG: a fixed 100; here by default the base CLIP's own; reached by a
warm-up with ``--logit_scale_warmup_steps``, or learned with ``--learn_logit_scale``), directions summed;
``sdg.clip_training``). The text tower is untouched,
so the CLIP text embedding still scores E' (language guidance). Writes the noise-aware CLIP at ``<output_dir>`` itself,
beside the run's checkpoints (``--clip_path <output_dir>`` of ``scripts/sdg/sample.py``); the base CLIP is referenced
by path, not copied.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from common.errors import UserError, cli_entry  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from common.data import add_image_augmentation_args
    from common.data_sources import add_dataset_args
    from common.train import add_train_args
    from sdg.adm import str2bool
    from sdg.clip_training import T_SAMPLERS
    from sdg.noisy_clip import FILM_INITS, FINETUNE_MODES, POS_INITS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="YAML of flag defaults (command-line flags win)")
    p.add_argument("--data_dir", "--train_data_dir", dest="data_dir", default=None,
                   help="folder of training images of the diffusion model's domain (no captions needed)")
    add_dataset_args(p, captions=False)
    p.add_argument("--clip_model_path", default=None,
                   help="the pretrained CLIP: an open_clip folder (ckpt/tiny/clip), or a name / config .json with "
                        "--clip_weights")
    p.add_argument("--clip_weights", default=None, help="weights file of --clip_model_path when it is a name/.json")
    p.add_argument("--image_size", type=int, default=None,
                   help="the diffusion model's resolution (default: the CLIP's own); the positional table is resized")
    p.add_argument("--t_dim", type=int, default=128, help="timestep sinusoid size (SDG: 128)")
    p.add_argument("--hidden", type=int, default=512, help="time MLP width (SDG: 512)")
    p.add_argument("--film_init", default="zero", choices=FILM_INITS,
                   help="zero: start exactly at the pretrained CLIP (ours); default: PyTorch init (released)")
    p.add_argument("--pos_init", default="interp", choices=POS_INITS,
                   help="new positional table: bicubic resize of the pretrained one (ours) or random (released)")
    p.add_argument("--schedule_sampler", default="uniform", choices=T_SAMPLERS, help="how t is drawn")
    p.add_argument("--noised", type=str2bool, default=True, help="False: train on clean images at t = 0")
    p.add_argument("--finetune_clip_layer", default="all", choices=FINETUNE_MODES,
                   help="all: every parameter; last: last stage + time MLP + FiLM projection")
    p.add_argument("--logit_scale", type=float, default=None,
                   help="fixed InfoNCE logit scale; default: the base CLIP's own learned one (exp(logit_scale)), "
                        "which is SDG's 100 for OpenAI's RN50x16")
    p.add_argument("--logit_scale_warmup_steps", type=int, default=0,
                   help="ramp the logit scale geometrically from the base CLIP's own to --logit_scale over this many "
                        "steps (reaches SDG's 100 without the collapse a fixed 100 causes on a softer CLIP)")
    p.add_argument("--learn_logit_scale", type=str2bool, default=False,
                   help="learn the temperature as CLIP does (exp(log_scale), capped at 100), starting at the base "
                        "CLIP's own scale (or --logit_scale)")
    p.add_argument("--logit_scale_lr", type=float, default=None,
                   help="learning rate of the learned temperature (default: 100 x --learning_rate: at the student's "
                        "rate Adam would move log_scale by at most ~0.2 in 2000 steps)")
    p.add_argument("--diffusion_steps", type=int, default=1000, help="T of the diffusion model to be guided")
    p.add_argument("--noise_schedule", default="linear", choices=("linear", "cosine"),
                   help="beta schedule of the diffusion model to be guided (ADM names)")
    p.add_argument("--eval_dir", default=None,
                   help="optional folder with digit labels (data/digits/test): each validation appends the zero-shot "
                        "digit accuracy of E'(x_t, t) and of the plain CLIP at several t to <output_dir>/zero_shot.jsonl")
    p.add_argument("--save_dtype", default="float32", choices=("float32", "float16"))
    add_image_augmentation_args(p)
    add_train_args(p, defaults={"learning_rate": 1e-4, "train_batch_size": 32, "lr_warmup_steps": 0,
                                "adam_weight_decay": 0.0, "report_to": "none",
                                "tracker_project_name": "sdg_noisy_clip"})
    return p


def base_logit_scale(model: torch.nn.Module) -> float:
    """The temperature the base CLIP learned, ``exp(logit_scale)`` (OpenAI CLIPs: 100, SDG's fixed value). A tiny CLIP
    trained here learns a much softer one (~18); distilling into it at 100 collapses the student (bench/results.md)."""
    scale = getattr(model, "logit_scale", None)
    return float(scale.detach().exp()) if torch.is_tensor(scale) else 100.0


class ResizedTeacher(torch.nn.Module):
    """The frozen CLIP image tower fed at its own resolution: a clean image prepared for the student (diffusion size,
    CLIP-normalised) is resized bicubically when the sizes differ (SDG's teacher sees CLIP's 384 px)."""

    def __init__(self, visual: torch.nn.Module):
        super().__init__()
        self.visual = visual
        size = visual.image_size
        self.size = int(size[0] if isinstance(size, (tuple, list)) else size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        return self.visual(x)


@cli_entry
def main(argv=None) -> int:
    from common.data_sources import check_data_source, training_dataset
    from common.train import Trainer, config_from_args, parse_args_with_config
    from sdg.adm import ADMFlags, noise_schedule
    from sdg.checkpoint import clip_settings, load_base_clip, noise_aware_from_base, save_noise_aware_clip
    from sdg.clip_training import LearnedLogitScale, NoisyClipLoss
    from sdg.data import InMemoryImages

    parser = build_parser()
    args = parse_args_with_config(parser, argv)
    args.train_data_dir = args.data_dir  # --data_dir is this script's (guided-diffusion's) name for it
    check_data_source(args)
    if not args.clip_model_path:
        raise UserError("--clip_model_path is required: the pretrained CLIP to make noise-aware (e.g. ckpt/tiny/clip)")
    if args.train_batch_size < 2:
        raise UserError("--train_batch_size must be >= 2: the other images of the batch are the contrastive negatives")
    config = config_from_args(args)
    schedule = noise_schedule(ADMFlags(diffusion_steps=args.diffusion_steps, noise_schedule=args.noise_schedule))
    with Trainer(config) as trainer:
        model, tokenizer = load_base_clip(args.clip_model_path, args.clip_weights)
        settings = {"image_size": args.image_size, "t_dim": args.t_dim, "hidden": args.hidden,
                    "film_init": args.film_init, "pos_init": args.pos_init}
        student = noise_aware_from_base(model, settings)
        student.set_finetune_mode(args.finetune_clip_layer)
        teacher = ResizedTeacher(copy.deepcopy(model.visual)).eval().requires_grad_(False)
        dataset = InMemoryImages(training_dataset(args, student.image_size, require_captions=False,
                                                  center_crop=args.center_crop),
                                 student.image_size, random_flip=args.random_flip)
        base_scale = base_logit_scale(model)
        logit_scale = args.logit_scale or base_scale
        if not logit_scale > 0:
            raise UserError(f"--logit_scale must be > 0, got {logit_scale}")
        if args.logit_scale_warmup_steps < 0:
            raise UserError(f"--logit_scale_warmup_steps must be >= 0, got {args.logit_scale_warmup_steps}")
        if args.learn_logit_scale and args.logit_scale_warmup_steps:
            raise UserError("--learn_logit_scale and --logit_scale_warmup_steps exclude each other: choose one")
        models, params = {"clip": student}, None
        temperature = None
        if args.learn_logit_scale:
            temperature = LearnedLogitScale(min(logit_scale, 100.0))
            models["temperature"] = temperature
            lr = args.logit_scale_lr if args.logit_scale_lr is not None else 100 * args.learning_rate
            params = [{"params": [p for p in student.parameters() if p.requires_grad]},
                      {"params": [temperature.log_scale], "lr": lr, "weight_decay": 0.0}]
        loss = NoisyClipLoss(student, teacher, schedule, t_sampler=args.schedule_sampler, noised=args.noised,
                             logit_scale=logit_scale, logit_scale_start=base_scale,
                             logit_scale_warmup_steps=args.logit_scale_warmup_steps, temperature=temperature)
        if temperature is not None:
            print(f"contrastive logit scale learned, from {logit_scale:.4g} (capped at 100)")
        elif args.logit_scale_warmup_steps:
            print(f"contrastive logit scale {base_scale:.4g} -> {logit_scale:.4g} over "
                  f"{args.logit_scale_warmup_steps} steps")
        else:
            print(f"contrastive logit scale {logit_scale:.4g}")

        validate = None
        if args.eval_dir:
            from sdg.digits_eval import zero_shot_report

            plain = noise_aware_from_base(model, {**settings, "film_init": "zero"}).eval()

            def validate(step, models):
                report = zero_shot_report(models["clip"], plain, model, tokenizer, args.eval_dir, schedule)
                line = json.dumps({"step": step, **{k: round(v, 4) for k, v in report.items()}})
                with open(Path(config.output_dir) / "zero_shot.jsonl", "a") as handle:
                    handle.write(line + "\n")
                print(f"\nzero-shot digit accuracy on noisy {args.eval_dir} images: {line}")
                return report

        result = trainer.fit(models, loss, dataset, frozen={"teacher": teacher}, params=params,
                             validation_fn=validate)
        if trainer.is_main_process and result.completed:
            trained = result.models["clip"].eval()
            dtype = torch.float16 if args.save_dtype == "float16" else torch.float32
            extra = {"trained_with": {"data_dir": str(args.data_dir), "schedule_sampler": args.schedule_sampler,
                                      "noised": args.noised, "finetune_clip_layer": args.finetune_clip_layer,
                                      "logit_scale": logit_scale, "diffusion_steps": args.diffusion_steps,
                                      "logit_scale_warmup_steps": args.logit_scale_warmup_steps,
                                      "learned_logit_scale": (float(result.models["temperature"]().detach())
                                                              if temperature is not None else None),
                                      "noise_schedule": args.noise_schedule,
                                      "max_train_steps": config.max_train_steps,
                                      "train_batch_size": config.train_batch_size}}
            out = save_noise_aware_clip(trained, Path(config.output_dir), base_clip=args.clip_model_path,
                                        base_clip_weights=args.clip_weights,
                                        settings=clip_settings(trained, args.film_init, args.pos_init),
                                        extra=extra, dtype=dtype, base_model=model,
                                        beside_existing=True)  # at output_dir itself: --clip_path output_dir
            print(f"noise-aware CLIP saved to {out} (pass it as --clip_path)")
    return result.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
