"""Train the frozen model SDG guides: an unconditional ADM-style pixel UNet (learn_sigma) with ADM's hybrid loss.

    python scripts/sdg/train_unconditional.py --config configs/sdg/train_unconditional.yaml \\
        --train_data_dir data/digits/train --output_dir outputs/tiny/sdg_unet_run

Model: guided-diffusion flags (``--image_size --num_channels --num_res_blocks --channel_mult --attention_resolutions
--num_head_channels --resblock_updown --use_scale_shift_norm --learn_sigma --dropout --diffusion_steps
--noise_schedule``) -> diffusers ``UNet2DModel`` (``sdg.adm``), the same path that loads the paper's LSUN/FFHQ models.
Loss (Improved DDPM eq. 16, ``sdg.training``): ``L_simple + lambda * L_vlb`` with lambda = ``--lambda_vlb`` 0.001,
the VLB term with a stop-gradient on the mean so it trains only the learned variance. No captions are used.
``--snr_gamma`` Min-SNR-weights the eps term (the VLB term keeps its own weighting); ``--noise_offset`` adds
per-channel offset noise (``common/diffusion_loss.py``, as diffusers' examples).
ADM's ``--use_checkpoint True`` is ``--gradient_checkpointing`` and ``--use_fp16 True`` is ``--mixed_precision fp16``
(GPU only; the weights stay float32 and autocast runs the forward in fp16, as diffusers' examples do).
Writes the UNet at ``<output_dir>`` itself (diffusers ``UNet2DModel`` folder + ``adm_flags.json``, beside the
trainer's ``checkpoint-*``), loadable by ``UNet2DModel.from_pretrained(output_dir)``, ``scripts/sdg/sample.py
--model_path`` and ``scripts/sample.py --method sdg``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common.errors import UserError, cli_entry  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from common.data import add_image_augmentation_args
    from common.data_sources import add_dataset_args
    from common.diffusion_loss import add_diffusion_loss_args
    from common.train import add_train_args
    from sdg.adm import add_adm_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="YAML of flag defaults (command-line flags win)")
    p.add_argument("--train_data_dir", default=None,
                   help="image folder (metadata.jsonl optional: captions are not used); e.g. data/digits/train")
    add_dataset_args(p, captions=False)
    p.add_argument("--lambda_vlb", type=float, default=1e-3,
                   help="weight of the VLB term that trains the learned variance (Improved DDPM: 0.001)")
    p.add_argument("--save_dtype", default="float32", choices=("float32", "float16"),
                   help="dtype of the saved weights (float16 halves the shipped file; sampling casts to float32)")
    p.add_argument("--num_validation_images", type=int, default=8,
                   help="unguided samples drawn at each validation (0: none)")
    add_diffusion_loss_args(p, prediction_type=False)  # ADM's learn_sigma output is eps + variance: no v target
    adm = p.add_argument_group("ADM model flags (guided-diffusion names and defaults)")
    add_adm_arguments(adm)
    add_image_augmentation_args(p)
    add_train_args(p, defaults={"learning_rate": 1e-4, "train_batch_size": 32, "lr_warmup_steps": 100,
                                "report_to": "none", "tracker_project_name": "sdg_unconditional",
                                "adam_weight_decay": 0.0})
    return p


def adm_flags_from_args(args):
    from dataclasses import fields

    from sdg.adm import ADMFlags

    return ADMFlags.from_dict({f.name: getattr(args, f.name) for f in fields(ADMFlags)})


def apply_adm_switches(args, flags) -> None:
    """guided-diffusion's ``--use_checkpoint`` / ``--use_fp16``: the trainer's gradient checkpointing and fp16."""
    if flags.use_checkpoint:
        args.gradient_checkpointing = True
    if flags.use_fp16:
        if args.mixed_precision not in (None, "fp16"):
            raise UserError(f"--use_fp16 True asks for fp16 but --mixed_precision is {args.mixed_precision}: "
                            "pass one of them")
        args.mixed_precision = "fp16"


@cli_entry
def main(argv=None) -> int:
    from common.data_sources import check_data_source, training_dataset
    from common.diffusion_loss import check_diffusion_loss_args
    from common.train import Trainer, config_from_args, parse_args_with_config
    from sdg.adm import build_unet, noise_schedule
    from sdg.checkpoint import save_unet_folder
    from sdg.data import InMemoryImages
    from sdg.training import HybridLoss

    parser = build_parser()
    args = parse_args_with_config(parser, argv)
    check_data_source(args)
    check_diffusion_loss_args(args)
    flags = adm_flags_from_args(args)
    if not flags.learn_sigma:
        raise UserError("SDG guides a learn_sigma model (ADM's learned variance): pass --learn_sigma True")
    if args.num_validation_images < 0:
        raise UserError(f"--num_validation_images must be >= 0, got {args.num_validation_images}")
    apply_adm_switches(args, flags)
    config = config_from_args(args)
    with Trainer(config) as trainer:
        unet = build_unet(flags).train()
        schedule = noise_schedule(flags)
        dataset = InMemoryImages(training_dataset(args, flags.image_size, require_captions=False,
                                                  center_crop=args.center_crop),
                                 flags.image_size, random_flip=args.random_flip)
        loss = HybridLoss(unet, schedule, lambda_vlb=args.lambda_vlb, snr_gamma=args.snr_gamma,
                          noise_offset=args.noise_offset)

        validate = None
        if args.num_validation_images:
            def validate(step, models):
                from common.io import to_pil
                from sdg.pipeline import sample_sdg

                x = sample_sdg(models["unet"], schedule, "25", batch_size=args.num_validation_images,
                               generator=torch.Generator().manual_seed(0))
                return [to_pil(im) for im in x]

        result = trainer.fit({"unet": unet}, loss, dataset, validation_fn=validate)
        if trainer.is_main_process and result.completed:
            dtype = torch.float16 if args.save_dtype == "float16" else torch.float32
            out = save_unet_folder(result.models["unet"].eval(), flags, Path(config.output_dir), dtype,
                                   extra={"trained_with": {"lambda_vlb": args.lambda_vlb,
                                                           "max_train_steps": config.max_train_steps,
                                                           "train_batch_size": config.train_batch_size}},
                                   beside_existing=True)  # UNet2DModel.from_pretrained(output_dir) loads it
            print(f"unconditional UNet saved to {out} (diffusers UNet2DModel + adm_flags.json)")
    return result.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
