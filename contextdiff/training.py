"""ContextDiff's two training stages as command-line programs; ``scripts/contextdiff/*.py`` are thin over this.

Stage 1 (``train_adapter.py``, spec §3.1 / §8): the relational adapter r_phi(x0, c) is trained on image-caption data
through the contextualized process ``x_t = sqrt(abar) x0 + k_t r + sqrt(1 - abar) eps``, with x_t NOT detached, so
the adapter learns through the denoiser's input. ``--freeze_unet`` (default) keeps the UNet's weights fixed (the
gradient still flows through it); ``--no-freeze_unet`` trains both jointly (the paper's joint objective).

Stage 2 (``finetune_diffusion.py``, spec §3.2): the diffusion model is fine-tuned on the process the stage-1 adapter
defines; the adapter is LOADED, checked against the model, frozen and used for x_t and the target (the released
stage 2 never loaded it, spec §7.1 / issue #8). Missing or ill-fitting adapter: one-line error, nothing written.

Outputs (all atomic): stage 1 ``<output_dir>/adapter/`` (safetensors + config.json + process.json) and, when the
UNet was trained, ``<output_dir>/pipeline/``; stage 2 ``<output_dir>/pipeline/``, a ContextDiff checkpoint folder
(``contextdiff.checkpoint``: a diffusers Stable Diffusion folder plus ``adapter/`` and ``contextdiff.json``).
Every input is checked before the trainer creates ``--output_dir``, so bad input leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from common.errors import UserError
from contextdiff.adapter import RelationalNet, load_adapter, read_adapter_config
from contextdiff.checkpoint import (
    PROCESS_KEYS,
    check_adapter_fits,
    load_sd_parts,
    process_dict,
    read_process,
    read_sd_configs,
    resolve_adapter_folder,
    save_adapter,
    save_contextdiff,
)
from contextdiff.process import (
    ContextLossConfig,
    add_contextdiff_args,
    contextual_loss,
    parameterization_from_prediction_type,
    trainable_modules,
)


ADAPTER_FLAGS = {"adapter_dim": "dim", "adapter_depth": "depth", "adapter_heads": "heads",
                 "adapter_patch_size": "patch_size"}
TRAIN_DEFAULTS = {"learning_rate": 1e-4, "train_batch_size": 16, "lr_warmup_steps": 0, "report_to": "none",
                  "tracker_project_name": "contextdiff"}
DESCRIPTIONS = {
    1: "ContextDiff stage 1: train the relational adapter r_phi(x0, c) (UNet frozen or joint) on image-caption data.",
    2: "ContextDiff stage 2: fine-tune the diffusion model on the process defined by a trained stage-1 adapter.",
}


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one-line UserErrors (``cli_entry`` prints them and exits 2), not usage dumps."""

    def error(self, message: str):
        raise UserError(f"{message} (see --help)")


def build_parser(stage: int) -> argparse.ArgumentParser:
    """Flags: diffusers' ``train_text_to_image.py`` names (``common.train``) + the released script's + the method's."""
    from common.train import add_train_args

    p = _Parser(description=DESCRIPTIONS[stage])
    p.add_argument("--config", default=None, help="flat YAML of this script's flags (command-line flags win), e.g. "
                   f"configs/contextdiff/{'train_adapter' if stage == 1 else 'finetune_diffusion'}_tiny.yaml")
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="a local Stable Diffusion folder (e.g. ckpt/tiny/baseline) or a ContextDiff checkpoint folder")
    if stage == 1:
        p.add_argument("--adapter_config", default=None,
                       help="adapter architecture: a ContextDiff YAML (its adapter: section, e.g. "
                            "configs/contextdiff/tiny.yaml) or an adapter config.json; --adapter_* flags override it")
        p.add_argument("--adapter_dim", type=int, default=None, help="adapter width (default 512)")
        p.add_argument("--adapter_depth", type=int, default=None, help="relational blocks (default 4)")
        p.add_argument("--adapter_heads", type=int, default=None, help="attention heads (default 8)")
        p.add_argument("--adapter_patch_size", type=int, default=None, help="latent patch size (default 2)")
        p.add_argument("--unet_config", default=None,
                       help="train the UNet FROM SCRATCH with this UNet2DConditionModel JSON config (joint training; "
                            "the VAE, text encoder and scheduler still come from --pretrained_model_name_or_path)")
        p.add_argument("--adapter_learning_rate", type=float, default=None,
                       help="the adapter's learning rate (default: --learning_rate, which the UNet uses when joint)")
    else:
        p.add_argument("--adapter_path", default=None,
                       help="REQUIRED: the stage-1 adapter (train_adapter.py's output_dir, or its adapter/ folder)")
    p.add_argument("--train_data_dir", default=None, help="image folder with metadata.jsonl (file_name, text)")
    p.add_argument("--caption_column", default="text")
    p.add_argument("--resolution", type=int, default=None, help="training resolution (default: the VAE's)")
    p.add_argument("--center_crop", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--cache_latents", action=argparse.BooleanOptionalAction, default=False,
                   help="encode every image and caption once (VAE posterior, text states) and train on the cache")
    p.add_argument("--cache_dir", default=None,
                   help="with --cache_latents: keep the encodings in this folder (keyed by data and model fingerprints)")
    p.add_argument("--validation_prompts", nargs="*", default=None)
    p.add_argument("--text_encoder_save_dtype", default="float32", choices=("float32", "float16"),
                   help="dtype the (frozen) text encoder is written in; float16 keeps tiny checkpoints small")
    p.add_argument("--checkpoint_dir", default=None,
                   help="where the ContextDiff checkpoint folder is written (default: <output_dir>/pipeline)")
    p.add_argument("--reference_towers", action=argparse.BooleanOptionalAction, default=False,
                   help="write the UNet, scheduler and adapter only and reference the source VAE / text encoder / "
                        "tokenizer by relative path instead of copying them (small shipped checkpoints)")
    add_contextdiff_args(p, stage=stage)
    if stage == 2:  # default: the process the adapter was trained for (its process.json)
        p.set_defaults(parameterization=None, k_schedule=None, k_scale=None)
    add_train_args(p, defaults=TRAIN_DEFAULTS)
    return p


# ------------------------------------------------------------------------------------------------------ inputs


def _adapter_architecture(args, latent_channels: int, text_dims: list[int]) -> dict[str, Any]:
    """The stage-1 adapter config: RelationalNet defaults < --adapter_config < --adapter_* flags; the latent channels
    and text width come from the loaded models unless the config names them (then they must match)."""
    config: dict[str, Any] = {}
    if args.adapter_config:
        path = Path(args.adapter_config)
        if path.suffix in (".yaml", ".yml"):
            from contextdiff.config import load_config

            config = dict(load_config(path)["adapter"])
        else:  # an adapter folder or its config.json
            config = dict(read_adapter_config(path.parent if path.name == "config.json" else path))
            config = {k: v for k, v in config.items() if not k.startswith("_")}
    for flag, key in ADAPTER_FLAGS.items():
        if getattr(args, flag) is not None:
            config[key] = getattr(args, flag)
    config.setdefault("latent_channels", latent_channels)
    config.setdefault("text_sources", ["clip"])
    config.setdefault("text_dims", list(text_dims))
    return config


def _read_unet_config(path, text_width: int) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--unet_config {path} does not exist: pass a UNet2DConditionModel JSON config "
                        "(e.g. configs/baseline/unet.json)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"--unet_config {path} is not valid JSON ({' '.join(str(err).split())})") from None
    if not isinstance(config, dict) or int(config.get("cross_attention_dim", -1)) != int(text_width):
        raise UserError(f"--unet_config {path}: cross_attention_dim {config.get('cross_attention_dim')} must equal "
                        f"the text encoder's width {text_width}")
    return config


def _resolve_process(args, adapter_folder: Path) -> None:
    """Stage 2: unset process flags take the adapter's (process.json); a different explicit value is warned about."""
    trained = read_process(adapter_folder)
    fallback = {"parameterization": "shifted_eps", "k_schedule": "quadratic", "k_scale": 1.0}
    for key in PROCESS_KEYS:
        value = getattr(args, key)
        if value is None:
            setattr(args, key, trained.get(key, fallback[key]))
        elif key in trained and trained[key] != value:
            warnings.warn(f"--{key} {value} differs from the {trained[key]} the adapter was trained with "
                          f"({adapter_folder}); the UNet will learn a process the adapter was not trained for",
                          stacklevel=2)


def _baseline_data_path():
    """The baseline's exact data path (``common.latent_data.LatentTextEncoder``: VAE posterior sample x scaling
    factor, 77-token CLIP states, optional cache), so both arms of a comparison see identical latents and text."""
    from common.latent_data import LatentTextEncoder

    return LatentTextEncoder


# --------------------------------------------------------------------------------------------------------- run


def run(args: argparse.Namespace, stage: int) -> int:
    """Train stage ``stage`` with parsed ``args``; returns the trainer's exit code (0 done, 143/130 interrupted)."""
    from common.data import image_text_dataset
    from common.schedule import NoiseSchedule
    from common.tiny import seeded
    from common.train import Trainer, config_from_args

    if not args.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required: a local Stable Diffusion folder such as "
                        "ckpt/tiny/baseline")
    if not args.train_data_dir:
        raise UserError("--train_data_dir is required: an image folder with metadata.jsonl captions")
    adapter_folder = None
    if stage == 2:
        if not args.adapter_path:
            raise UserError("stage 2 fine-tunes on the process the stage-1 adapter defines, and none was given: pass "
                            "--adapter_path <train_adapter.py output_dir>")
        adapter_folder = resolve_adapter_folder(args.adapter_path)
        _resolve_process(args, adapter_folder)
    config = config_from_args(args)
    loss_config = ContextLossConfig.from_args(args)  # unknown k_t, bad combinations -> one line, nothing written

    # Every check reads configs only: no weight is loaded and nothing is written before the inputs are known good.
    configs = read_sd_configs(args.pretrained_model_name_or_path)
    unet_config = None
    if stage == 1 and args.unet_config:
        unet_config = _read_unet_config(args.unet_config, configs["text_width"])
        if loss_config.freeze_unet:
            raise UserError("--unet_config starts the UNet from scratch, which a frozen UNet cannot learn: add "
                            "--no-freeze_unet")
        configs["unet"] = unet_config
    latent_channels = int(configs["unet"].get("in_channels", 4))
    factor = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    resolution = args.resolution or int(configs["vae"]["sample_size"])
    if resolution % factor:
        raise UserError(f"--resolution {resolution} is not divisible by the VAE's factor {factor}: use a multiple")
    latent_size = (resolution // factor, resolution // factor)
    text_dims = [configs["text_width"]]
    if stage == 1 and loss_config.freeze_unet:
        model_param = parameterization_from_prediction_type(configs["scheduler"].get("prediction_type", "epsilon"))
        if model_param != loss_config.parameterization:
            raise UserError(f"the frozen UNet of {args.pretrained_model_name_or_path} is a {model_param} model but "
                            f"--parameterization is {loss_config.parameterization}: match them, or --no-freeze_unet")
    if stage == 1:
        architecture = _adapter_architecture(args, latent_channels, text_dims)
        check_adapter_fits(architecture, latent_channels, latent_size, text_dims,
                           where="the adapter (--adapter_config / --adapter_*)")
        with seeded(0 if config.seed is None else config.seed):
            adapter = RelationalNet(**architecture)  # zero-init head: r == 0, the process starts as plain DDPM
    else:
        check_adapter_fits(read_adapter_config(adapter_folder), latent_channels, latent_size, text_dims,
                           where=f"adapter {adapter_folder}")
        adapter = load_adapter(adapter_folder)
    dataset = image_text_dataset(args.train_data_dir, resolution=resolution, caption_column=args.caption_column,
                                 center_crop=args.center_crop, random_flip=args.random_flip)

    unet, vae, text_encoder, tokenizer, scheduler_config, towers = load_sd_parts(args.pretrained_model_name_or_path)
    if unet_config is not None:
        unet = None  # built right after the trainer seeds the RNGs, as scripts/train_text_to_image.py builds its UNet
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    schedule = NoiseSchedule.from_config(scheduler_config)
    process = process_dict(loss_config.parameterization, loss_config.k_schedule, loss_config.k_scale)

    encoder = _baseline_data_path()(vae, text_encoder, tokenizer)
    null_text = encoder.text([""])
    if args.cache_latents:
        dataset = encoder.cache(dataset, args.cache_dir)
    with Trainer(config) as trainer:  # creates output_dir: every check above has passed
        if unet is None:
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel.from_config(unet_config)
        trainable, frozen = trainable_modules(loss_config, unet, adapter)
        null_text = null_text.to(trainer.device)

        def loss_fn(batch, ctx):
            latents, states = encoder.encode_batch(batch, ctx.device)
            return contextual_loss({"latents": latents, "encoder_hidden_states": states}, ctx.models["unet"],
                                   ctx.models["adapter"], schedule, loss_config, null_text=null_text)

        validate = None
        if args.validation_prompts:
            def validate(step, models):
                from contextdiff.pipeline import generate

                out = generate(models.get("unet", unet), models.get("adapter", adapter), vae, text_encoder,
                               tokenizer, args.validation_prompts, steps=25, guidance_scale=3.0,
                               generator=torch.Generator().manual_seed(0), scheduler_config=scheduler_config,
                               parameterization=loss_config.parameterization, k_schedule=loss_config.k_schedule,
                               k_scale=loss_config.k_scale)
                from common.io import to_pil

                return [to_pil(im, value_range=(0, 1)) for im in out.images]

        params = None  # every trainable parameter at --learning_rate
        if stage == 1 and args.adapter_learning_rate is not None:
            params = [{"params": list(adapter.parameters()), "lr": args.adapter_learning_rate}]
            if "unet" in trainable:
                params.append({"params": list(unet.parameters())})
        result = trainer.fit(trainable, loss_fn, dataset, collate_fn=encoder.collate, params=params,
                             frozen={**frozen, "vae": vae, "text_encoder": text_encoder}, validation_fn=validate)
        if trainer.is_main_process and result.completed:
            _save(args, stage, result, unet, adapter, vae, text_encoder, tokenizer, scheduler_config, towers,
                  process, adapter_folder)
    return result.exit_code


def _save(args, stage, result, unet, adapter, vae, text_encoder, tokenizer, scheduler_config, towers, process,
          adapter_folder: Optional[Path]) -> None:
    out = Path(args.output_dir)
    unet = result.models.get("unet", unet).float().eval()
    adapter = result.models.get("adapter", adapter).float().eval()
    provenance = {"stage": stage, "steps": result.global_step,
                  "pretrained_model_name_or_path": str(args.pretrained_model_name_or_path),
                  "train_data_dir": str(args.train_data_dir)}
    if stage == 1:
        provenance["freeze_unet"] = bool(args.freeze_unet)
        save_adapter(out / "adapter", adapter, process, provenance)
        print(f"adapter saved to {out / 'adapter'} (safetensors + config.json + process.json)")
        if args.freeze_unet:
            return
    else:
        provenance["adapter_path"] = str(adapter_folder)
    text_dtype = torch.float16 if args.text_encoder_save_dtype == "float16" else torch.float32
    folder = Path(args.checkpoint_dir) if args.checkpoint_dir else out / "pipeline"
    folder = save_contextdiff(folder, unet=unet, adapter=adapter, vae=vae.float(),
                              text_encoder=text_encoder.float(), tokenizer=tokenizer,
                              scheduler_config=scheduler_config, process=process,
                              reference_towers=towers if args.reference_towers else None,
                              text_encoder_dtype=text_dtype, provenance=provenance)
    kind = "UNet, scheduler and adapter; towers referenced" if args.reference_towers else \
        "diffusers StableDiffusionPipeline layout + adapter/"
    print(f"ContextDiff checkpoint saved to {folder} ({kind})")


def main(stage: int, argv=None) -> int:
    from common.train import parse_args_with_config

    args = parse_args_with_config(build_parser(stage), argv)
    return run(args, stage)
