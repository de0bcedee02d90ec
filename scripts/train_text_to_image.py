"""Train or fine-tune a latent text-to-image model (the baseline of every comparison); output: a diffusers folder.

Fine-tune an existing Stable Diffusion folder (flags as diffusers' ``train_text_to_image.py``)::

    accelerate launch scripts/train_text_to_image.py --pretrained_model_name_or_path PATH/TO/SD \\
        --train_data_dir DATA --resolution 512 --train_batch_size 4 --learning_rate 1e-5 --max_train_steps 1000 \\
        --mixed_precision bf16 --use_ema --output_dir out/sd-finetuned

or build one from parts (the digits world: our own VAE and CLIP, a UNet from a config)::

    python scripts/train_text_to_image.py --config configs/baseline/tiny.yaml

The pipeline is written into ``--output_dir`` itself (as diffusers' example does; trainer checkpoints sit beside it
in ``checkpoint-<step>/``, validation images in ``validation/step-<step>/``), so ``output_dir`` loads with plain
``diffusers.DiffusionPipeline.from_pretrained(output_dir)`` and with ``scripts/sample.py
--pretrained_model_name_or_path``. Loss: the eps (or v) regression of DDPM on VAE latents (Min-SNR weighted with
``--snr_gamma``), captions dropped to "" with ``--proportion_empty_prompts`` so classifier-free guidance works.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common.errors import UserError, cli_entry  # noqa: E402
from common.latents import vae_scale_factor


def build_parser() -> argparse.ArgumentParser:
    from common.data_sources import add_dataset_args
    from common.diffusion_loss import add_diffusion_loss_args
    from common.train import add_train_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="YAML of flag defaults (command-line flags win)")
    p.add_argument("--pretrained_model_name_or_path", default=None, help="a local SD-layout pipeline folder")
    p.add_argument("--vae_model_path", default=None, help="from parts: a VAE folder (scripts/train_vae.py)")
    p.add_argument("--clip_model_path", default=None,
                   help="from parts: a CLIP folder with text_encoder/ and tokenizer/ (scripts/train_clip.py)")
    p.add_argument("--unet_config", default=None, help="from parts: JSON config of the UNet2DConditionModel")
    add_dataset_args(p)
    p.add_argument("--resolution", type=int, default=None, help="training resolution (default: the VAE's)")
    p.add_argument("--center_crop", action=argparse.BooleanOptionalAction, default=True,
                   help="crop the centre square after resizing (--no-center_crop: a random crop)")
    p.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=False,
                   help="flip images horizontally at random (needs on-the-fly encoding: --no-cache_latents)")
    p.add_argument("--proportion_empty_prompts", type=float, default=0.1,
                   help="fraction of captions replaced by '' (classifier-free guidance training)")
    p.add_argument("--cache_latents", action=argparse.BooleanOptionalAction, default=False,
                   help="encode every image and caption once (VAE posterior, text states) and train on the cache")
    p.add_argument("--cache_dir", default=None,
                   help="with --cache_latents: keep the encodings in this folder (safetensors, keyed by data and "
                        "model fingerprints) so later runs reuse them")
    p.add_argument("--validation_prompts", nargs="*", default=None,
                   help="prompts drawn at every --validation_steps (and at the end) into validation/step-<N>/")
    p.add_argument("--text_encoder_save_dtype", default="float32", choices=("float32", "float16"),
                   help="dtype the (frozen) text encoder is written in; float16 keeps tiny checkpoints small")
    add_diffusion_loss_args(p)
    add_train_args(p, defaults={"learning_rate": 1e-4, "train_batch_size": 16, "lr_warmup_steps": 500,
                                "report_to": "none", "tracker_project_name": "text2image"})
    return p


def load_components(args):
    """``(unet, vae, text_encoder, tokenizer, scheduler_config)`` from an SD folder or from parts."""
    from diffusers import UNet2DConditionModel

    from common.models import load_clip_text, load_unet, load_vae
    from common.pipeline import read_scheduler_config
    from common.tiny import sd_ddim_scheduler

    if args.pretrained_model_name_or_path:
        folder = args.pretrained_model_name_or_path
        unet = load_unet(folder, subfolder="unet")
        vae = load_vae(folder, subfolder="vae")
        text_encoder, tokenizer = load_clip_text(folder, with_projection=False)
        scheduler_config = read_scheduler_config(folder)
    else:
        missing = [f for f in ("vae_model_path", "clip_model_path", "unet_config") if not getattr(args, f)]
        if missing:
            raise UserError("pass --pretrained_model_name_or_path, or all of --vae_model_path --clip_model_path "
                            f"--unet_config (missing: {', '.join('--' + m for m in missing)})")
        vae = load_vae(args.vae_model_path)
        text_encoder, tokenizer = load_clip_text(Path(args.clip_model_path) / "text_encoder",
                                                 tokenizer_path=Path(args.clip_model_path) / "tokenizer",
                                                 with_projection=False)
        path = Path(args.unet_config)
        if not path.is_file():
            raise UserError(f"--unet_config {path} does not exist: pass a UNet2DConditionModel JSON config")
        unet = UNet2DConditionModel.from_config(json.loads(path.read_text()))
        scheduler_config = dict(sd_ddim_scheduler().config)
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise UserError(f"the UNet attends to width {unet.config.cross_attention_dim} but the text encoder gives "
                        f"{text_encoder.config.hidden_size}: they do not belong together")
    if args.prediction_type:
        scheduler_config["prediction_type"] = args.prediction_type
    text_encoder = text_encoder.float()
    return unet, vae.float(), text_encoder, tokenizer, scheduler_config


def save_pipeline(output_dir: Path, unet, vae, text_encoder, tokenizer, scheduler_config, text_dtype) -> Path:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from common.io import save_pretrained_into

    pipe = StableDiffusionPipeline(
        vae=vae.float(), text_encoder=text_encoder.to(text_dtype), tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler.from_config(scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    try:
        save_pretrained_into(output_dir, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))
    finally:
        text_encoder.float()
    return output_dir


@cli_entry
def main(argv=None) -> int:
    from common.data_sources import check_data_source, training_dataset
    from common.diffusion_loss import check_diffusion_loss_args, diffusion_mse, training_noise
    from common.latent_data import LatentTextEncoder
    from common.process import canonical_prediction_type, q_sample, training_target
    from common.schedule import NoiseSchedule
    from common.train import Trainer, config_from_args, parse_args_with_config

    parser = build_parser()
    args = parse_args_with_config(parser, argv)
    check_data_source(args)
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        raise UserError(f"--proportion_empty_prompts must lie in [0, 1], got {args.proportion_empty_prompts}")
    check_diffusion_loss_args(args)
    if args.random_flip and args.cache_latents:
        raise UserError("--random_flip needs on-the-fly encoding (the cache holds one view of each image): "
                        "add --no-cache_latents")
    config = config_from_args(args)
    with Trainer(config) as trainer:
        unet, vae, text_encoder, tokenizer, scheduler_config = load_components(args)
        vae.requires_grad_(False)
        text_encoder.requires_grad_(False)
        factor = vae_scale_factor(vae)
        resolution = args.resolution or vae.config.sample_size
        if resolution % factor:
            raise UserError(f"--resolution {resolution} is not divisible by the VAE's factor {factor}")
        schedule = NoiseSchedule.from_config(scheduler_config)
        ptype = canonical_prediction_type(scheduler_config.get("prediction_type", "epsilon"))
        dataset = training_dataset(args, resolution, random_flip=args.random_flip, center_crop=args.center_crop)
        encoder = LatentTextEncoder(vae, text_encoder, tokenizer)
        if args.cache_latents:
            dataset = encoder.cache(dataset, args.cache_dir)
        empty = encoder.text([""])

        def loss_fn(batch, ctx):
            latents, states = encoder.encode_batch(batch, ctx.device)
            drop = torch.rand(latents.shape[0], device=ctx.device) < args.proportion_empty_prompts
            states = torch.where(drop.view(-1, 1, 1), empty.to(ctx.device).expand_as(states), states)
            noise = training_noise(latents, args.noise_offset)
            t = torch.randint(0, schedule.num_train_timesteps, (latents.shape[0],), device=latents.device)
            abar = schedule.abar(t, like=latents)
            noisy = q_sample(latents, abar, noise)
            pred = ctx.models["unet"](noisy, t, encoder_hidden_states=states).sample
            return diffusion_mse(pred, training_target(latents, noise, abar, ptype), abar=abar,
                                 snr_gamma=args.snr_gamma, prediction_type=ptype)

        validate = None
        if args.validation_prompts:
            def validate(step, models):
                from common.pipeline import LatentTextToImage

                pipe = LatentTextToImage(models["unet"], vae, text_encoder, tokenizer, scheduler_config)
                out = pipe(args.validation_prompts, num_inference_steps=25, guidance_scale=3.0,
                           generator=torch.Generator().manual_seed(0), progress=False)
                return out.images  # [B, 3, H, W] in [0, 1]: the trainer writes and logs each image

        result = trainer.fit({"unet": unet}, loss_fn, dataset, collate_fn=encoder.collate,
                             frozen={"vae": vae, "text_encoder": text_encoder}, validation_fn=validate)
        if trainer.is_main_process and result.completed:
            dtype = torch.float16 if args.text_encoder_save_dtype == "float16" else torch.float32
            out = save_pipeline(Path(config.output_dir), result.models["unet"].eval(), vae,
                                text_encoder, tokenizer, scheduler_config, dtype)
            print(f"pipeline saved to {out} (diffusers StableDiffusionPipeline layout)")
    return result.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
