"""Train one uni-modal latent model of a collaboration (Collaborative Diffusion §3.1).

A mask-to-image model (``--modality mask``: the UNet and the mask's Linear encoder, trained jointly) or a
text-to-image model (``--modality text``: the UNet on a frozen CLIP text encoder), eps objective on VAE latents,
on the shared trainer (``common/train.py``: EMA, checkpoints, exact resume, mixed precision)::

    python scripts/codiff/train_unimodal.py --config configs/codiff/train_mask_tiny.yaml     # digits, ~5 min

The members of one collaboration must share the VAE and the noise schedule: ``--noise_schedule_from
ckpt/tiny/baseline`` trains on the baseline's schedule so that the shipped baseline can be the text member
(the default is LDM's schedule). ``--cond_dropout`` > 0 trains a null condition (all-zero one-hot
mask / empty prompt) for classifier-free guidance, an extension: the released models have none.
Writes the member folder to ``--export_dir`` (default ``<output_dir>`` itself, beside the run's checkpoints): ``unet/``, ``mask_encoder/``
and ``codiff_member.json``; frozen towers are referenced by path.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]

from common.errors import UserError, cli_entry  # noqa: E402
from common.latents import vae_scale_factor  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from common.data import add_image_augmentation_args
    from common.data_sources import add_dataset_args
    from common.diffusion_loss import add_diffusion_loss_args
    from common.train import add_train_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="YAML of flag defaults (command-line flags win)")
    p.add_argument("--modality", choices=("mask", "text"), default=None, help="which uni-modal model to train")
    p.add_argument("--train_data_dir", default=None,
                   help="image folder with metadata.jsonl/.csv (text, mask_file_name), or CelebAMask-HQ's layout "
                        "(CelebA-HQ-img/ with CelebAMask-HQ-mask-anno/ or a combined mask folder)")
    add_dataset_args(p)
    p.add_argument("--vae_model_path", default=None, help="frozen VAE: a VAE folder or a pipeline folder")
    p.add_argument("--noise_schedule_from", default=None,
                   help="pipeline folder or scheduler_config.json to take the noise schedule from (default: LDM's)")
    p.add_argument("--unet_config", default=None, help="JSON config of the UNet2DConditionModel")
    p.add_argument("--zero_init", choices=("ldm", "conv_out", "none"), default="ldm",
                   help="how the UNet starts: ldm (the release: output conv, each ResBlock's last conv and each "
                        "transformer's proj_out at zero), conv_out (output conv only), none (diffusers' init)")
    p.add_argument("--resolution", type=int, default=None, help="training resolution (default: the VAE's)")
    p.add_argument("--mask_classes", default="digits", help="digits, celebamask_hq, or comma-separated class names")
    p.add_argument("--mask_grid", type=int, default=16, help="mask token grid (tokens of grid*grid one-hot pixels)")
    p.add_argument("--mask_conditioning", choices=("crossattn", "concat"), default="crossattn",
                   help="crossattn: class tokens through cross-attention only (the paper); concat: also the mask "
                        "pooled to latent size, concatenated to x_t (LDM semantic synthesis; codiff/spatial.py)")
    p.add_argument("--text_encoder_path", default=None,
                   help="text modality: a CLIP text encoder folder, a CLIP folder with text_encoder/, or a pipeline")
    p.add_argument("--cond_dropout", type=float, default=0.0,
                   help="probability of the null condition per sample (CFG extension; 0 = the paper)")
    p.add_argument("--cache_latents", action=argparse.BooleanOptionalAction, default=True,
                   help="encode images (and captions) once and train on the cache")
    p.add_argument("--export_dir", default=None, help="where the member folder goes (default: --output_dir itself)")
    p.add_argument("--validation_prompts", nargs="*", default=None,
                   help="text member: prompts it samples at each validation (every --validation_steps and at the end)")
    p.add_argument("--validation_masks", nargs="*", default=None,
                   help="mask member: class-id mask PNGs it samples at each validation")
    add_diffusion_loss_args(p, prediction_type=False)  # CoDiff's members are eps models
    add_image_augmentation_args(p, cached_flag="--cache_latents")
    add_train_args(p, defaults={"learning_rate": 5e-4, "train_batch_size": 64, "lr_warmup_steps": 200,
                                "report_to": "none", "tracker_project_name": "codiff-unimodal",
                                "output_dir": "outputs/codiff/unimodal"})
    return p


def text_encoder_folder(path: Path) -> tuple[Path, Path | None]:
    """``(text encoder folder, tokenizer folder or None)`` from a CLIP folder with ``text_encoder/`` + ``tokenizer/``,
    a pipeline folder, or the encoder folder itself."""
    if (path / "text_encoder").is_dir():
        return path / "text_encoder", (path / "tokenizer") if (path / "tokenizer").is_dir() else None
    return path, None


def mask_format(args, resolution: int):
    from codiff.conditions import MaskFormat

    classes = args.mask_classes
    if classes not in ("digits", "celebamask_hq"):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
        if len(classes) < 2:
            raise UserError("--mask_classes needs digits, celebamask_hq or at least two comma-separated class names")
    return MaskFormat.from_config({"classes": classes, "grid": args.mask_grid, "image_size": resolution})


def validation_conditions(args, fmt, cached_text):
    """What validation conditions the member on, as a batch holds it: prompts (or their cached text states), or
    class-id masks ``[B, H, W]`` read from ``--validation_masks``; None when no validation was asked for."""
    if args.modality == "text":
        if args.validation_masks:
            raise UserError("--validation_masks is for --modality mask: the text member validates on "
                            "--validation_prompts")
        if not args.validation_prompts:
            return None
        prompts = list(args.validation_prompts)
        return cached_text(prompts).float() if cached_text is not None else prompts
    if args.validation_prompts:
        raise UserError("--validation_prompts is for --modality text: the mask member validates on --validation_masks")
    if not args.validation_masks:
        return None
    import torch

    from codiff.conditions import load_mask

    return torch.stack([torch.as_tensor(load_mask(path, fmt)) for path in args.validation_masks])


@cli_entry
def main(argv=None) -> int:
    import torch
    from diffusers import UNet2DConditionModel

    from codiff.checkpoint import read_scheduler_json, save_member
    from codiff.conditions import MaskEncoder
    from codiff.data import LDM_SCHEDULER_CONFIG, cache_latents, check_eps_schedule
    from codiff.dynamic import apply_zero_init
    from codiff.training import UniModalObjective
    from common.data_sources import check_data_source, describe_source, training_dataset
    from common.models import load_vae
    from common.schedule import NoiseSchedule
    from common.train import Trainer, config_from_args, parse_args_with_config

    args = parse_args_with_config(build_parser(), argv)
    from common.data import check_image_augmentation_args

    check_image_augmentation_args(args, args.cache_latents, "--cache_latents")  # flags first, before any file
    for flag in ("modality", "vae_model_path", "unet_config"):
        if not getattr(args, flag):
            raise UserError(f"--{flag} is required (or set it in --config)")
    check_data_source(args)
    if not 0.0 <= args.cond_dropout < 1.0:
        raise UserError(f"--cond_dropout must lie in [0, 1), got {args.cond_dropout}")
    if args.modality == "text" and not args.text_encoder_path:
        raise UserError("--modality text needs --text_encoder_path (a frozen CLIP text encoder)")
    unet_config = Path(args.unet_config)
    if not unet_config.is_file():
        raise UserError(f"--unet_config {unet_config} does not exist: pass a UNet2DConditionModel JSON config")
    from common.diffusion_loss import check_diffusion_loss_args

    check_diffusion_loss_args(args)
    loss_flags = {"snr_gamma": args.snr_gamma, "noise_offset": args.noise_offset}
    config = config_from_args(args)
    scheduler_config = check_eps_schedule(
        read_scheduler_json(args.noise_schedule_from) if args.noise_schedule_from else dict(LDM_SCHEDULER_CONFIG),
        args.noise_schedule_from or "the LDM schedule")
    schedule = NoiseSchedule.from_config(scheduler_config)

    with Trainer(config) as trainer:
        vae = load_vae(args.vae_model_path).float().eval().requires_grad_(False)
        vae_folder = Path(args.vae_model_path)
        if not (vae_folder / "config.json").is_file() and (vae_folder / "vae").is_dir():
            vae_folder = vae_folder / "vae"
        factor = vae_scale_factor(vae)
        resolution = args.resolution or vae.config.sample_size
        if resolution % factor:
            raise UserError(f"--resolution {resolution} is not divisible by the VAE's factor {factor}")
        unet_cfg = json.loads(unet_config.read_text())
        unet = apply_zero_init(UNet2DConditionModel.from_config(unet_cfg), args.zero_init)
        if unet.config.sample_size * factor != resolution or unet.config.in_channels != vae.config.latent_channels:
            raise UserError(f"--unet_config makes {unet.config.in_channels}x{unet.config.sample_size}^2 latents but the VAE "
                            f"gives {vae.config.latent_channels}x{resolution // factor}^2: fix sample_size/in_channels")
        dim = int(unet.config.cross_attention_dim)
        info = {"train": {"data": describe_source(args), "max_train_steps": config.max_train_steps,
                          "batch_size": config.train_batch_size, "cond_dropout": args.cond_dropout}}
        if args.modality == "mask":
            fmt = mask_format(args, resolution)
            dataset = training_dataset(args, resolution, num_mask_classes=fmt.num_classes, require_captions=False,
                                       center_crop=args.center_crop, random_flip=args.random_flip)
            encoder = MaskEncoder(fmt, dim)
            text, text_folder, tokenizer_folder = None, None, None
            if args.mask_conditioning == "concat":
                from codiff.spatial import SpatialMaskUNet

                unet = UNet2DConditionModel.from_config({**unet_cfg, "in_channels": unet.config.in_channels
                                                         + fmt.num_classes})
                unet = SpatialMaskUNet(unet, encoder)
        else:
            from codiff.checkpoint import load_text_encoder

            text_folder, tokenizer_folder = text_encoder_folder(Path(args.text_encoder_path))
            text = load_text_encoder(text_folder, tokenizer_folder, None)
            if text.text_encoder.config.hidden_size != dim:
                raise UserError(f"the UNet attends to width {dim} but the text encoder gives "
                                f"{text.text_encoder.config.hidden_size}: set cross_attention_dim in --unet_config")
            dataset = training_dataset(args, resolution, center_crop=args.center_crop, random_flip=args.random_flip)
        data = dataset
        if args.cache_latents:
            data = cache_latents(dataset, vae, text_conditioner=text if args.cache_latents else None,
                                 keys=("mask",) if args.modality == "mask" else ("text",))
        if args.modality == "mask" and args.mask_conditioning == "concat":
            # the wrapper holds the encoder: it trains as part of "unet" and takes the one-hot tokens themselves
            objective = UniModalObjective(unet, torch.nn.Identity(), encoder.one_hot, schedule, "mask",
                                          vae=None if args.cache_latents else vae, cond_dropout=args.cond_dropout,
                                          null_input=encoder.null_one_hot, **loss_flags)
        elif args.modality == "mask":
            objective = UniModalObjective(unet, encoder, encoder.one_hot, schedule, "mask", train_encoder=True,
                                          vae=None if args.cache_latents else vae, cond_dropout=args.cond_dropout,
                                          null_input=encoder.null_one_hot, **loss_flags)
        elif args.cache_latents:
            empty = text([""]).float()
            objective = UniModalObjective(unet, torch.nn.Identity(), lambda states: states, schedule, "text_states",
                                          cond_dropout=args.cond_dropout,
                                          null_input=lambda batch: empty.expand(batch, -1, -1), **loss_flags)
        else:
            objective = UniModalObjective(unet, text.text_encoder, text.tokenize, schedule, "text", vae=vae,
                                          cond_dropout=args.cond_dropout, null_input=text.null_ids, **loss_flags)
        validate = None
        conditions = validation_conditions(args, fmt if args.modality == "mask" else None,
                                           text if args.modality == "text" and args.cache_latents else None)
        if conditions is not None:
            def validate(step, models):
                # the lone member, DDIM 25 steps without guidance: what it has learnt of its own condition
                return objective.sample_images(conditions, vae, models=models, steps=25,
                                               generator=torch.Generator().manual_seed(0))

        result = trainer.fit(objective.trainable_modules(), objective, data, frozen=objective.frozen_modules(),
                             validation_fn=validate)
        if trainer.is_main_process and result.completed:
            export = Path(args.export_dir or config.output_dir)  # default: the output folder itself
            info["train"]["final_loss"] = result.loss_history[-1] if result.loss_history else None
            save_member(export, args.modality, result.models["unet"].eval(), scheduler_config=scheduler_config,
                        vae_path=vae_folder, mask_encoder=result.models.get("cond_encoder") if args.modality == "mask"
                        else None, text_encoder_path=text_folder, tokenizer_path=tokenizer_folder, info=info,
                        beside_existing=export.resolve() == Path(config.output_dir).resolve())
            print(f"{args.modality} member saved to {export}")
    return result.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
