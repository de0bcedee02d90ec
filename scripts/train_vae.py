"""Train a diffusers ``AutoencoderKL`` (the latent space every latent model of the lab uses) on an image folder.

    python scripts/train_vae.py --config configs/baseline/vae.yaml --train_data_dir data/digits/train \\
        --output_dir outputs/tiny/vae_run

Loss: mean squared reconstruction error + ``--kl_weight`` x KL(q(z|x) || N(0, I)), as the seed repos' own small
VAEs. At the end the latent ``scaling_factor`` is set to ``1 / std`` of the training latents (Stable Diffusion's
0.18215 was found the same way) and the model is written with ``save_pretrained`` (safetensors) into ``--output_dir``
itself, so ``AutoencoderKL.from_pretrained(output_dir)`` loads it (trainer checkpoints: ``checkpoint-<step>/``;
validation reconstructions, originals on the first row: ``validation/step-<step>/``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch  # noqa: E402

from common.errors import UserError, cli_entry  # noqa: E402
from common.latents import vae_scale_factor


def build_parser() -> argparse.ArgumentParser:
    from common.data_sources import add_dataset_args
    from common.train import add_train_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="YAML of flag defaults (command-line flags win)")
    p.add_argument("--train_data_dir", default=None, help="an image folder (captions are not needed)")
    add_dataset_args(p, captions=False)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--vae_config", default=None,
                   help="JSON config of the AutoencoderKL to train from scratch (default: common.tiny's)")
    p.add_argument("--pretrained_vae", default=None, help="a VAE folder to fine-tune instead of training anew")
    p.add_argument("--kl_weight", type=float, default=1e-6)
    p.add_argument("--center_crop", action=argparse.BooleanOptionalAction, default=True,
                   help="crop the centre square after resizing (--no-center_crop: a random crop)")
    p.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=False,
                   help="flip images horizontally at random")
    p.add_argument("--num_validation_images", type=int, default=8,
                   help="training images reconstructed at each validation (0: no validation)")
    add_train_args(p, defaults={"learning_rate": 1e-3, "train_batch_size": 64, "lr_warmup_steps": 100,
                                "checkpointing_steps": 1000, "validation_steps": 1000, "report_to": "none",
                                "tracker_project_name": "train_vae"})
    return p


def build_vae(args):
    from common.models import load_vae
    from common.tiny import tiny_vae, tiny_vae_config

    if args.pretrained_vae:
        return load_vae(args.pretrained_vae)
    if args.vae_config:
        from diffusers import AutoencoderKL

        path = Path(args.vae_config)
        if not path.is_file():
            raise UserError(f"--vae_config {path} does not exist: pass a JSON AutoencoderKL config")
        return AutoencoderKL.from_config(json.loads(path.read_text()))
    cfg = tiny_vae_config(sample_size=args.resolution)
    return tiny_vae(**{k: v for k, v in cfg.items() if not k.startswith("_")})


@cli_entry
def main(argv=None) -> int:
    import torch.nn.functional as F

    from common.data_sources import check_data_source, training_dataset
    from common.io import save_pretrained_into
    from common.train import Trainer, config_from_args, parse_args_with_config

    parser = build_parser()
    args = parse_args_with_config(parser, argv)
    check_data_source(args)
    config = config_from_args(args)
    if args.num_validation_images < 0:
        raise UserError(f"--num_validation_images must be >= 0, got {args.num_validation_images}")
    dataset = training_dataset(args, args.resolution, random_flip=args.random_flip, center_crop=args.center_crop,
                               require_captions=False)
    with Trainer(config) as trainer:
        vae = build_vae(args)
        factor = vae_scale_factor(vae)
        if args.resolution % factor:
            raise UserError(f"--resolution {args.resolution} is not divisible by the VAE's factor {factor}")

        def loss_fn(batch, ctx):
            pixels = batch["pixel_values"].to(ctx.device)
            recon, kl = ctx.models["vae"](pixels)  # through the (DDP-)prepared module so gradients sync
            mse = F.mse_loss(recon.float(), pixels.float())
            return {"loss": mse + args.kl_weight * kl, "mse": mse.detach(), "kl": kl.detach()}

        validation = min(args.num_validation_images, len(dataset))

        def validate(step, models):
            model = models["vae"].vae
            sample = torch.stack([dataset[i]["pixel_values"] for i in range(validation)])
            with torch.no_grad():
                recon = model(sample.to(trainer.device)).sample.float().clamp(-1, 1).cpu()
            mse = float(((recon - sample) ** 2).mean())
            # the originals, then their reconstructions, in [0, 1]
            return {"reconstructions": (torch.cat([sample, recon]) + 1) / 2, "reconstruction_mse": mse}

        result = trainer.fit({"vae": VAEWithKL(vae)}, loss_fn, dataset, validation_fn=validate if validation else None)
        if trainer.is_main_process and result.completed:
            vae = result.models["vae"].vae.eval()
            scale, mse = latent_statistics(vae, dataset)
            vae.register_to_config(scaling_factor=scale)
            save_pretrained_into(config.output_dir, lambda tmp: vae.save_pretrained(tmp, safe_serialization=True))
            print(f"VAE: reconstruction MSE {mse:.5f} (pixels in [-1, 1]), scaling_factor {scale:.4f}; "
                  f"saved to {config.output_dir}")
    return result.exit_code


class VAEWithKL(torch.nn.Module):
    """``pixels -> (reconstruction, KL per pixel)`` in one forward, so DDP sees every parameter used."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, pixels):
        posterior = self.vae.encode(pixels).latent_dist
        recon = self.vae.decode(posterior.sample()).sample
        return recon, posterior.kl().mean() / pixels[0].numel()


def latent_statistics(vae, dataset, limit: int = 512):
    """``(1 / std of latent samples, mean reconstruction MSE)`` over up to ``limit`` training images."""
    n = min(limit, len(dataset))
    with torch.no_grad():
        pixels = torch.stack([dataset[i]["pixel_values"] for i in range(n)])
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.sample(generator=torch.Generator().manual_seed(0))
        recon = vae.decode(posterior.mode()).sample
    return float(1.0 / latents.std()), float(((recon - pixels) ** 2).mean())


if __name__ == "__main__":
    raise SystemExit(main())
