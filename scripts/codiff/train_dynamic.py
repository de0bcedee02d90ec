"""Train the dynamic diffusers of a collaboration; the uni-modal members stay frozen.

For each modality a small UNet ``D_m(x_t, t, c_m)`` predicts a logit map; the per-pixel softmax over modalities
weights the frozen members' eps, and only the diffusers learn, from the plain eps loss on the combination::

    python scripts/codiff/train_dynamic.py --config configs/codiff/train_dynamic_tiny.yaml      # digits, ~5 min

``--mask_model_dir`` / ``--text_model_dir``: member folders (``scripts/codiff/train_unimodal.py``; a Stable
Diffusion pipeline folder is a text member, e.g. ``ckpt/tiny/baseline``). The members must share the VAE latent
space and the noise schedule. Writes a collaboration checkpoint to ``--export_dir`` (default
``<output_dir>`` itself, beside the run's checkpoints): ``codiff.json`` (members, VAE, schedule, sampling defaults, by path) and
``dynamic_diffusers/``. Generate from it with ``scripts/codiff/generate.py --model_dir``.
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--mask_model_dir", default=None, help="mask-to-image member folder")
    p.add_argument("--text_model_dir", default=None, help="text-to-image member folder (or an SD pipeline folder)")
    p.add_argument("--train_data_dir", default=None,
                   help="image folder with metadata.jsonl/.csv (text, mask_file_name), or CelebAMask-HQ's layout "
                        "(CelebA-HQ-img/ with CelebAMask-HQ-mask-anno/ or a combined mask folder)")
    add_dataset_args(p)
    p.add_argument("--model_config", default=str(REPO / "configs" / "codiff" / "tiny.yaml"),
                   help="codiff YAML whose dynamic_diffuser section builds the diffusers")
    p.add_argument("--confidence_input", choices=("x_t", "unet_output"), default=None,
                   help="what the diffusers read (default: the model config's; the release uses x_t)")
    p.add_argument("--cache_latents", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--default_steps", type=int, default=50, help="sampling default stored in the checkpoint")
    p.add_argument("--default_eta", type=float, default=1.0, help="sampling default stored in the checkpoint")
    p.add_argument("--default_guidance_scale", type=float, default=1.0,
                   help="per-member CFG scale stored as the sampling default (1 = none, the paper)")
    p.add_argument("--export_dir", default=None, help="where the checkpoint goes (default: --output_dir itself)")
    p.add_argument("--validation_prompts", nargs="*", default=None,
                   help="prompts the collaboration samples at each validation (every --validation_steps and at the "
                        "end), each with --validation_mask or else a test mask of the prompt's digit")
    p.add_argument("--validation_mask", default=None, help="class-id mask PNG used for every validation prompt")
    add_diffusion_loss_args(p, prediction_type=False)  # CoDiff's members are eps models
    add_image_augmentation_args(p, cached_flag="--cache_latents")
    add_train_args(p, defaults={"learning_rate": 1e-4, "train_batch_size": 64, "lr_warmup_steps": 100,
                                "report_to": "none", "tracker_project_name": "codiff-dynamic",
                                "output_dir": "outputs/codiff/dynamic"})
    return p


def shared_vae(members: dict, vae_override=None):
    """The VAE of the collaboration (the text member's, as released) after checking every member names the same."""
    import torch

    from common.models import load_vae

    paths = {name: m.vae_path for name, m in members.items() if m.vae_path is not None}
    if not paths:
        raise UserError("no member names its VAE: re-export the members with scripts/codiff/train_unimodal.py")
    order = [n for n in ("text", "mask") if n in paths] + [n for n in paths if n not in ("text", "mask")]
    first = order[0]
    vae = load_vae(paths[first]).float().eval().requires_grad_(False)
    for name in order[1:]:
        if Path(paths[name]).resolve() == Path(paths[first]).resolve():
            continue
        other = load_vae(paths[name]).float()
        same = all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), other.state_dict().values()))
        if not same:
            raise UserError(f"the {name!r} member was trained on the VAE {paths[name]} but the {first!r} member on "
                            f"{paths[first]}: members must share the latent space, retrain one")
    return vae, Path(paths[first])


@cli_entry
def main(argv=None) -> int:
    import torch

    from codiff.checkpoint import build_collaboration, load_member, save_checkpoint
    from codiff.config import load_config
    from codiff.data import cache_latents
    from codiff.dynamic import DynamicDiffusers, build_dynamic_diffuser
    from codiff.training import DynamicDiffuserObjective
    from common.data_sources import check_data_source, describe_source, training_dataset
    from common.train import Trainer, config_from_args, parse_args_with_config

    args = parse_args_with_config(build_parser(), argv)
    from common.data import check_image_augmentation_args

    check_image_augmentation_args(args, args.cache_latents, "--cache_latents")  # flags first, before any file
    check_data_source(args)
    dirs = {name: getattr(args, f"{name}_model_dir") for name in ("mask", "text")}
    dirs = {name: d for name, d in dirs.items() if d}
    if not dirs:
        raise UserError("give the frozen members: --mask_model_dir and/or --text_model_dir")
    model_config = load_config(args.model_config)
    section = model_config.get("dynamic_diffuser", {})
    confidence_input = args.confidence_input or section.get("confidence_input", "x_t")
    from common.diffusion_loss import check_diffusion_loss_args

    check_diffusion_loss_args(args)
    loss_flags = {"snr_gamma": args.snr_gamma, "noise_offset": args.noise_offset}
    config = config_from_args(args)

    with Trainer(config) as trainer:
        members = {name: load_member(path) for name, path in dirs.items()}
        for name, member in members.items():
            if member.kind != name:
                raise UserError(f"--{name}_model_dir {dirs[name]} holds a {member.kind} member, not a {name} member")
        vae, vae_path = shared_vae(members)
        latent_c, latent_h, _ = next(iter(members.values())).latent_shape
        nets = {}
        for k, (name, member) in enumerate(members.items()):
            unet_cfg = {**section["unet"], "cross_attention_dim": member.token_dim, "sample_size": latent_h,
                        "in_channels": latent_c}
            nets[name] = build_dynamic_diffuser(unet_cfg, seed=(config.seed or 0) + 1 + 2 * k,
                                                zero_init=section.get("zero_init", "ldm"))
        collab = build_collaboration(members, DynamicDiffusers(nets, confidence_input), vae)
        factor = vae_scale_factor(vae)
        resolution = latent_h * factor
        mask_member = members.get("mask")
        dataset = training_dataset(args, resolution, require_captions="text" in members,
                                   num_mask_classes=mask_member.mask_format.num_classes if mask_member else None,
                                   center_crop=args.center_crop, random_flip=args.random_flip)
        text_member = members.get("text")
        encoders, keys = {}, {}
        if mask_member:
            encoders["mask"], keys["mask"] = mask_member.encode, "mask"
        if args.cache_latents:
            data = cache_latents(dataset, vae, text_conditioner=text_member.encoder if text_member else None,
                                 keys=("mask",) if mask_member else ())
            if text_member:
                encoders["text"], keys["text"] = (lambda states: states), "text_states"
        else:
            data = dataset
            if text_member:
                encoders["text"], keys["text"] = text_member.encode, "text"
        objective = DynamicDiffuserObjective(collab.model, collab.schedule, encoders, condition_keys=keys,
                                             vae=None if args.cache_latents else vae, **loss_flags)
        frozen = objective.frozen_modules()
        if mask_member:
            frozen["mask_encoder"] = mask_member.encoder
        validate = None
        if args.validation_prompts:
            def validate(step, models):
                from codiff.sample_cli import CoDiffSettings, generate_collaboration

                settings = CoDiffSettings(prompts=list(args.validation_prompts), num_inference_steps=25,
                                          eta=args.default_eta, guidance_scale=args.default_guidance_scale,
                                          mask_path=args.validation_mask)
                # collab.model holds the modules being trained (EMA weights swapped in by the trainer)
                return generate_collaboration(collab, settings, generator=torch.Generator().manual_seed(0)).images

        result = trainer.fit(objective.trainable_modules(), objective, data, frozen=frozen, validation_fn=validate)
        if trainer.is_main_process and result.completed:
            export = Path(args.export_dir or config.output_dir)  # default: the output folder itself
            sampling = {"ddim_steps": args.default_steps, "eta": args.default_eta,
                        "guidance_scale": args.default_guidance_scale}
            info = {"train": {"data": describe_source(args), "max_train_steps": config.max_train_steps,
                              "batch_size": config.train_batch_size,
                              "final_loss": result.loss_history[-1] if result.loss_history else None}}
            with torch.no_grad():
                save_checkpoint(export, dirs, result.models["dynamic"].eval(), vae_path=vae_path,
                                scheduler_config=collab.scheduler_config, sampling=sampling, info=info)
            print(f"collaboration checkpoint saved to {export}")
    return result.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
