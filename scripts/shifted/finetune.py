"""Fine-tune Stable Diffusion on images only, conditioned on their CLIP image embeddings (language-free).

    python scripts/shifted/finetune.py --config configs/shifted/tiny_finetune.yaml \\
        --pretrained_model_name_or_path ckpt/tiny/baseline --train_data_dir data/digits/train \\
        --prior outputs/shifted/prior --output_dir outputs/shifted/finetune

No caption is read: each training image is embedded by the CLIP model(s) (``--clip``, concatenated in order) and the
embedding reaches the UNet's cross-attention through ``ImageEmbProjection`` (Linear(D -> n_tokens x
cross_attention_dim)); the whole UNet and the projection train on the usual eps (or v) loss. For
classifier-free guidance ``--cfg_drop`` of the embeddings are replaced by a null embedding: ``--null_embedding prior``
(the reference: the prior's sample for the empty caption, needs ``--prior``), ``zero``, ``black`` (CLIP of a black
image) or a .safetensors file holding one embedding. Start from an SD folder (``--pretrained_model_name_or_path``,
the reference fine-tunes SD-2-base; here the tiny text-to-image baseline) or from parts (``--vae_model_path`` +
``--unet_config``). Output: ``<output_dir>`` itself (beside the run's checkpoints) is a complete diffusers
StableDiffusionPipeline folder (its text tower is carried along, unused, unless ``--no_text_tower``) plus
``image_projection/`` and ``shifted_decoder.json`` (the CLIP models).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common.errors import UserError, cli_entry  # noqa: E402
from common.latents import vae_scale_factor


DEFAULTS = {  # the reference finetune.py defaults
    "learning_rate": 1e-4, "train_batch_size": 16, "lr_warmup_steps": 500, "checkpointing_steps": 500,
    "lr_scheduler": "constant", "max_grad_norm": 1.0, "adam_weight_decay": 1e-2, "adam_epsilon": 1e-8,
    "report_to": "none", "tracker_project_name": "shifted_finetune",
}


def build_parser() -> argparse.ArgumentParser:
    from common.data_sources import add_dataset_args
    from common.diffusion_loss import add_diffusion_loss_args
    from common.train import add_train_args
    from shifted.cli import add_clip_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_argument_group("model")
    src.add_argument("--pretrained_model_name_or_path", default=None, help="a local SD-layout pipeline folder")
    src.add_argument("--vae_model_path", default=None, help="from parts: a VAE folder")
    src.add_argument("--unet_config", default=None, help="from parts: UNet2DConditionModel JSON config")
    src.add_argument("--text_tower_path", default=None,
                     help="from parts: text_encoder/ + tokenizer/ folder carried into the pipeline (default: the "
                          "first --clip folder's)")
    src.add_argument("--n_tokens", type=int, default=4, help="cross-attention tokens made from one embedding")
    src.add_argument("--prediction_type", default=None, choices=("epsilon", "v_prediction"))
    src.add_argument("--no_text_tower", action=argparse.BooleanOptionalAction, default=False,
                     help="leave the (unused) text encoder and tokenizer out of the output; diffusers then loads it "
                          "with StableDiffusionPipeline.from_pretrained(folder, text_encoder=None, tokenizer=None)")
    src.add_argument("--frozen_save_dtype", default="float32", choices=("float32", "float16"),
                     help="dtype the frozen VAE and text tower are written in (float16 keeps checkpoints small)")
    data = p.add_argument_group("data (images only)")
    data.add_argument("--train_data_dir", default=None, help="image folder; captions, if any, are never read")
    add_dataset_args(p, captions=False)
    data.add_argument("--resolution", type=int, default=None, help="default: the VAE's sample size")
    data.add_argument("--center_crop", action=argparse.BooleanOptionalAction, default=True)
    data.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=False)
    data.add_argument("--cache_latents", action=argparse.BooleanOptionalAction, default=False,
                      help="encode every image once (VAE posterior + CLIP embedding); no augmentation then")
    add_clip_args(data)
    cfg = p.add_argument_group("classifier-free guidance")
    cfg.add_argument("--cfg_drop", type=float, default=0.1, help="fraction of embeddings replaced by the null")
    cfg.add_argument("--null_embedding", default=None,
                     help="prior | zero | black | FILE.safetensors (default: prior with --prior, else zero)")
    cfg.add_argument("--learned_null", action=argparse.BooleanOptionalAction, default=False,
                     help="train the null embedding (init as chosen)")
    cfg.add_argument("--prior", default=None, help="prior folder (train.py) whose empty-caption sample is the null")
    cfg.add_argument("--validation_images", type=int, default=0,
                     help="at each validation, decode the embeddings of this many training images")
    add_diffusion_loss_args(p)
    add_train_args(p, defaults=DEFAULTS)
    return p


def load_components(args):
    """``(unet, vae, text_encoder, tokenizer, scheduler_config)``."""
    from diffusers import UNet2DConditionModel

    from common.models import load_clip_text, load_unet, load_vae
    from common.pipeline import read_scheduler_config
    from common.tiny import sd_ddim_scheduler

    if args.pretrained_model_name_or_path:
        folder = args.pretrained_model_name_or_path
        if not Path(folder).is_dir():
            raise UserError(f"--pretrained_model_name_or_path {folder} does not exist: pass an SD pipeline folder")
        unet = load_unet(folder, subfolder="unet")
        vae = load_vae(folder, subfolder="vae")
        text_encoder, tokenizer = load_clip_text(folder)
        scheduler_config = read_scheduler_config(folder)
    else:
        missing = [f for f in ("vae_model_path", "unet_config") if not getattr(args, f)]
        if missing:
            raise UserError("pass --pretrained_model_name_or_path, or --vae_model_path and --unet_config (missing: "
                            f"{', '.join('--' + m for m in missing)})")
        import json

        from shifted.cli import clip_paths

        vae = load_vae(args.vae_model_path)
        path = Path(args.unet_config)
        if not path.is_file():
            raise UserError(f"--unet_config {path} does not exist: pass a UNet2DConditionModel JSON config")
        unet = UNet2DConditionModel.from_config(json.loads(path.read_text()))
        tower = Path(args.text_tower_path or clip_paths(args)[0])
        text_encoder, tokenizer = load_clip_text(tower / "text_encoder", tokenizer_path=tower / "tokenizer")
        scheduler_config = dict(sd_ddim_scheduler().config)
    if args.prediction_type:
        scheduler_config["prediction_type"] = args.prediction_type
    return unet, vae.float(), text_encoder.float(), tokenizer, scheduler_config


def null_embedding(args, clip) -> torch.Tensor:
    """The CFG null ``[D]`` (the prior's embedding of the empty text in the reference)."""
    from common.io import load_safetensors

    choice = args.null_embedding or ("prior" if args.prior else "zero")
    if args.prior and choice != "prior":
        raise UserError(f"--prior is only used for --null_embedding prior, not {choice!r}: drop one of them")
    if choice == "zero":
        return torch.zeros(clip.dim)
    if choice == "black":
        from shifted.data import clip_resolution

        size = clip_resolution(clip)
        return clip.encode_image(torch.zeros(1, 3, size, size))[0].cpu()
    if choice == "prior":
        if not args.prior:
            raise UserError("--null_embedding prior needs --prior FOLDER (train.py's --output_dir)")
        from shifted.checkpoint import load_text_states
        from shifted.cli import text_states_path
        from shifted.embeddings import PriorTextEncoder
        from shifted.pipeline import load_prior, null_image_embedding

        prior, bank = load_prior(args.prior, clip_models=clip.names)
        encoder = PriorTextEncoder(clip, load_text_states(text_states_path(args), prior.config.text_len))
        return null_image_embedding(prior, bank, encoder, generator=torch.Generator().manual_seed(0)).cpu()
    tensors = load_safetensors(choice)
    if len(tensors) != 1:
        raise UserError(f"--null_embedding {choice} must hold exactly one tensor (the embedding), got {len(tensors)}")
    value = next(iter(tensors.values())).float().reshape(-1)
    if value.numel() != clip.dim:
        raise UserError(f"--null_embedding {choice} is {value.numel()}-d but the CLIP models give {clip.dim}-d")
    return value


class ImagesOnly(torch.utils.data.Dataset):
    """An image folder's pixels and nothing else (no captions, no labels)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return {"pixel_values": self.dataset[i]["pixel_values"]}


@torch.no_grad()
def cache_dataset(dataset, vae, clip, batch_size: int = 64):
    from common.data import encode_once
    from shifted.embeddings import EmbeddingDataset

    def encode(batch):
        pixels = batch["pixel_values"]
        posterior = vae.encode(pixels).latent_dist
        return {"latent_mean": posterior.mean, "latent_std": posterior.std,
                "image_emb": clip.encode_image((pixels + 1) / 2)}

    tensors, _ = encode_once(dataset, encode, batch_size=batch_size)
    return EmbeddingDataset(tensors)


@cli_entry
def main(argv=None) -> int:
    from common.data_sources import check_data_source, training_dataset
    from common.diffusion_loss import check_diffusion_loss_args, diffusion_mse, training_noise
    from common.process import canonical_prediction_type, q_sample, training_target
    from common.schedule import NoiseSchedule
    from common.train import Trainer, config_from_args, parse_args_with_config
    from shifted.checkpoint import load_clip_models, quiet_transformers, save_decoder
    from shifted.cli import check_positive, check_probability, clip_paths
    from shifted.projection import ImageEmbProjection

    parser = build_parser()
    args = parse_args_with_config(parser, argv)
    check_data_source(args)
    check_probability("cfg_drop", args.cfg_drop)
    check_positive("n_tokens", args.n_tokens)
    check_diffusion_loss_args(args)
    if args.random_flip and args.cache_latents:
        raise UserError("--random_flip needs on-the-fly encoding: drop --cache_latents (or --random_flip)")
    config = config_from_args(args)
    # read and check every input before the trainer creates --output_dir
    clip = load_clip_models(clip_paths(args))
    with quiet_transformers():
        unet, vae, text_encoder, tokenizer, scheduler_config = load_components(args)
    null = null_embedding(args, clip)
    factor = vae_scale_factor(vae)
    resolution = args.resolution or vae.config.sample_size
    if resolution % factor:
        raise UserError(f"--resolution {resolution} is not divisible by the VAE's factor {factor}")
    dataset = training_dataset(args, resolution, require_captions=False, caption_column="__captions_are_not_read__",
                               center_crop=args.center_crop, random_flip=args.random_flip)
    if not isinstance(dataset, torch.utils.data.IterableDataset):  # a stream keeps its items (batched as they are)
        dataset = ImagesOnly(dataset)
    with Trainer(config) as trainer:
        projection = ImageEmbProjection(clip.dim, args.n_tokens, unet.config.cross_attention_dim, args.learned_null)
        projection.set_null_embedding(null)
        vae.requires_grad_(False)
        schedule = NoiseSchedule.from_config(scheduler_config)
        ptype = canonical_prediction_type(scheduler_config.get("prediction_type", "epsilon"))
        scaling = float(vae.config.scaling_factor)
        if args.cache_latents:
            dataset = cache_dataset(dataset, vae, clip)
        else:
            for _, model, _ in clip.models:
                model.to(trainer.device)
        plain_projection = projection

        def loss_fn(batch, ctx):
            if "latent_mean" in batch:
                mean, std = batch["latent_mean"].to(ctx.device), batch["latent_std"].to(ctx.device)
                latents = (mean + std * torch.randn_like(mean)) * scaling
                emb = batch["image_emb"].to(ctx.device)
            else:
                pixels = batch["pixel_values"].to(ctx.device)
                with torch.no_grad():
                    latents = ctx.models["vae"].encode(pixels.to(ctx.weight_dtype)).latent_dist.sample() * scaling
                    emb = clip.encode_image((pixels.float() + 1) / 2)
            drop = torch.rand(emb.shape[0], device=ctx.device) < args.cfg_drop
            tokens = ctx.models["projection"](plain_projection.drop(emb.float(), drop))
            noise = training_noise(latents, args.noise_offset)
            t = torch.randint(0, schedule.num_train_timesteps, (latents.shape[0],), device=latents.device)
            abar = schedule.abar(t, like=latents)
            pred = ctx.models["unet"](q_sample(latents, abar, noise), t, encoder_hidden_states=tokens).sample
            return diffusion_mse(pred, training_target(latents, noise, abar, ptype), abar=abar,
                                 snr_gamma=args.snr_gamma, prediction_type=ptype)

        validate = None
        if args.validation_images > 0:
            base = training_dataset(args, resolution, require_captions=False)
            n = min(args.validation_images, len(base))
            pixels = torch.stack([base[i]["pixel_values"] for i in range(n)])
            val_emb = clip.encode_image(((pixels + 1) / 2).to(trainer.device)).cpu()

            def validate(step, models):
                from shifted.pipeline import ImageDecoder

                decoder = ImageDecoder(models["unet"], vae, models["projection"], scheduler_config)
                out = decoder(val_emb, num_inference_steps=25, guidance_scale=2.0,
                              generator=torch.Generator().manual_seed(0))
                return out  # [B, 3, H, W] in [0, 1]

        result = trainer.fit({"unet": unet, "projection": projection}, loss_fn, dataset, frozen={"vae": vae},
                             validation_fn=validate)
        if trainer.is_main_process and result.completed:
            from diffusers import DDIMScheduler

            dtype = torch.float16 if args.frozen_save_dtype == "float16" else torch.float32
            keep = not args.no_text_tower
            parts = dict(vae=vae.to(dtype), unet=result.models["unet"].eval(),
                         text_encoder=text_encoder.to(dtype) if keep else None, tokenizer=tokenizer if keep else None,
                         scheduler=DDIMScheduler.from_config(scheduler_config))
            out = save_decoder(Path(config.output_dir), parts, result.models["projection"].eval(), clip.names,
                               beside_existing=True)  # at output_dir itself: from_pretrained(output_dir) loads it
            print(f"decoder saved to {out} (StableDiffusionPipeline folder + image_projection/)")
    return result.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
