"""ContextDiff's two training stages as command-line programs; ``scripts/contextdiff/*.py`` are thin over this.

Stage 1 (``train_adapter.py``): the relational adapter r_phi(x0, c) is trained on image-caption data
through the contextualized process ``x_t = sqrt(abar) x0 + k_t r + sqrt(1 - abar) eps``, with x_t NOT detached, so
the adapter learns through the denoiser's input. ``--freeze_unet`` (default) keeps the UNet's weights fixed (the
gradient still flows through it); ``--no-freeze_unet`` trains both jointly (the paper's joint objective).

Stage 2 (``finetune_diffusion.py``): the diffusion model is fine-tuned on the process the stage-1 adapter
defines; the adapter is LOADED, checked against the model, frozen and used for x_t and the target (the released
stage 2 never loaded it, GitHub issue #8 of YangLing0818/ContextDiff). Missing or ill-fitting adapter: one-line error, nothing written.

Outputs (all atomic): stage 1 with a frozen UNet ``<output_dir>/adapter/`` (safetensors + config.json +
process.json); stage 1 with ``--no-freeze_unet`` and stage 2 a ContextDiff checkpoint folder AT ``<output_dir>``
(``contextdiff.checkpoint``: a diffusers Stable Diffusion folder plus ``adapter/`` and ``contextdiff.json``, beside
the run's ``checkpoint-N/`` and logs), so ``StableDiffusionPipeline.from_pretrained(output_dir)`` and
``load_contextdiff(output_dir)`` both load it.
Every input is checked before the trainer creates ``--output_dir``, so bad input leaves nothing behind.

T5 text source: an adapter with ``text_sources [clip, t5]`` also reads a frozen T5 encoder
(``--t5_model_name_or_path``, a local folder with its tokenizer; ``--t5_max_length`` tokens, default 77). Stage 1
requires the flag for such an adapter and records the T5 in the adapter's ``process.json`` provenance; stage 2
defaults to that T5. The loss batch then carries ``adapter_text`` (the UNet's CLIP states, mask None; the T5 states
of the captions with their padding mask), in ``text_sources`` order. ``--cache_latents`` caches the T5 states too.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from common.data_sources import add_dataset_args, check_data_source, describe_source, training_dataset
from common.errors import UserError
from common.io import read_json_object
from common.latents import vae_scale_factor
from contextdiff.adapter import TEXT_SOURCES, RelationalNet, load_adapter, read_adapter_config
from contextdiff.checkpoint import (
    PROCESS_KEYS,
    T5_FLAG,
    adapter_t5,
    check_adapter_fits,
    check_t5_max_length,
    load_sd_parts,
    process_dict,
    read_process,
    read_sd_configs,
    read_t5_width,
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
                 "adapter_patch_size": "patch_size", "adapter_r_bound": "r_bound", "adapter_time_aware": "time_aware"}
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
    from common.diffusion_loss import add_diffusion_loss_args
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
        p.add_argument("--adapter_r_bound", type=float, default=None,
                       help="soft bound on r's elements, r = b tanh(raw / b) (default: none, as the paper)")
        p.add_argument("--adapter_time_aware", action=argparse.BooleanOptionalAction, default=None,
                       help="feed the noise level to the adapter, r = r_phi(x0, c, t) (default: t-free)")
        p.add_argument("--adapter_text_sources", nargs="+", choices=TEXT_SOURCES, default=None,
                       help="text encoders the adapter reads, in order (default clip); overrides the config's, and "
                            "the widths then follow the encoders (t5 needs --t5_model_name_or_path)")
        p.add_argument("--unet_config", default=None,
                       help="train the UNet FROM SCRATCH with this UNet2DConditionModel JSON config (joint training; "
                            "the VAE, text encoder and scheduler still come from --pretrained_model_name_or_path)")
        p.add_argument("--adapter_learning_rate", type=float, default=None,
                       help="the adapter's learning rate (default: --learning_rate, which the UNet uses when joint)")
    else:
        p.add_argument("--adapter_path", default=None,
                       help="REQUIRED: the stage-1 adapter (train_adapter.py's output_dir, or its adapter/ folder)")
    p.add_argument("--t5_model_name_or_path", default=None,
                   help="a local T5 encoder folder (T5EncoderModel + its tokenizer) for an adapter whose text_sources "
                        "include t5; frozen. " + ("Required for such an adapter" if stage == 1 else
                                                  "Default: the T5 recorded with the stage-1 adapter"))
    p.add_argument("--t5_max_length", type=int, default=None,
                   help="T5 tokens per caption, padded and masked (default 77" +
                        (")" if stage == 1 else ", or the stage-1 adapter's)"))
    add_dataset_args(p)
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
                   help="where the ContextDiff checkpoint folder is written (default: --output_dir itself)")
    p.add_argument("--reference_towers", action=argparse.BooleanOptionalAction, default=False,
                   help="write the UNet, scheduler and adapter only and reference the source VAE / text encoder / "
                        "tokenizer by relative path instead of copying them (small shipped checkpoints)")
    add_contextdiff_args(p, stage=stage)
    if stage == 2:  # default: the process the adapter was trained for (its process.json)
        p.set_defaults(parameterization=None, k_schedule=None, k_scale=None)
    add_diffusion_loss_args(p, prediction_type=False)  # the target is --parameterization
    add_train_args(p, defaults=TRAIN_DEFAULTS)
    return p


# ------------------------------------------------------------------------------------------------------ inputs


def _adapter_architecture(args, latent_channels: int) -> dict[str, Any]:
    """The stage-1 adapter config: RelationalNet defaults < --adapter_config < --adapter_* flags; the latent channels
    come from the model unless the config names them (then they must match). ``text_dims`` is left to the caller
    when the config does not name it (or ``--adapter_text_sources`` replaced the sources): it follows the sources."""
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
    if args.adapter_text_sources is not None:
        config["text_sources"] = list(args.adapter_text_sources)
        config.pop("text_dims", None)
    config.setdefault("latent_channels", latent_channels)
    config.setdefault("text_sources", ["clip"])
    sources = config["text_sources"]
    if (isinstance(sources, str) or not sources or len(set(sources)) != len(sources)
            or any(s not in TEXT_SOURCES for s in sources)):
        raise UserError(f"the adapter's text_sources {sources} are invalid: use one or both of clip, t5, once each")
    return config


def _resolve_t5(args, stage: int, sources: list[str], adapter_folder: Optional[Path]) -> tuple[Optional[Path], str]:
    """``(T5 folder, where it came from)`` for the adapter (None for a CLIP-only adapter); one-line UserError when
    it is missing or given for an adapter that does not read T5. Stage 2 defaults to the T5 recorded with the
    stage-1 adapter."""
    recorded_length, what = None, f"T5 folder ({T5_FLAG})"
    if stage == 2 and adapter_folder is not None:
        recorded, recorded_length = adapter_t5(adapter_folder)
        if "t5" in sources and not args.t5_model_name_or_path and recorded is not None:
            args.t5_model_name_or_path = str(recorded)
            what = f"the T5 folder recorded with adapter {adapter_folder}"
    if args.t5_max_length is None and recorded_length is not None:
        args.t5_max_length = recorded_length
    args.t5_max_length = check_t5_max_length(args.t5_max_length)
    if "t5" not in sources:
        if args.t5_model_name_or_path:
            fix = ("add t5 to the adapter's text_sources (--adapter_text_sources clip t5)" if stage == 1 else
                   "use an adapter trained with text_sources [clip, t5]")
            raise UserError(f"{T5_FLAG} was given but the adapter reads only {sources}: drop the flag, or {fix}")
        return None, what
    if not args.t5_model_name_or_path:
        where = "the adapter" if stage == 1 else f"adapter {adapter_folder}"
        known = "" if stage == 1 else " and its process.json names none"
        raise UserError(f"{where} reads T5 text states (text_sources {sources}){known}: pass {T5_FLAG} "
                        "<local T5 encoder folder>")
    return Path(args.t5_model_name_or_path), what


def _read_unet_config(path, text_width: int) -> dict[str, Any]:
    config = read_json_object(path, "--unet_config",
                              "pass a UNet2DConditionModel JSON config (e.g. configs/baseline/unet.json)")
    if int(config.get("cross_attention_dim", -1)) != int(text_width):
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
    from common.schedule import NoiseSchedule
    from common.tiny import seeded
    from common.train import Trainer, config_from_args

    if not args.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required: a local Stable Diffusion folder such as "
                        "ckpt/tiny/baseline")
    check_data_source(args)
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
    factor = vae_scale_factor(configs["vae"])
    resolution = args.resolution or int(configs["vae"]["sample_size"])
    if resolution % factor:
        raise UserError(f"--resolution {resolution} is not divisible by the VAE's factor {factor}: use a multiple")
    latent_size = (resolution // factor, resolution // factor)
    if stage == 1 and loss_config.freeze_unet:
        model_param = parameterization_from_prediction_type(configs["scheduler"].get("prediction_type", "epsilon"))
        if model_param != loss_config.parameterization:
            raise UserError(f"the frozen UNet of {args.pretrained_model_name_or_path} is a {model_param} model but "
                            f"--parameterization is {loss_config.parameterization}: match them, or --no-freeze_unet")
    adapter_config = _adapter_architecture(args, latent_channels) if stage == 1 else read_adapter_config(adapter_folder)
    sources = list(adapter_config.get("text_sources", ["clip"]))
    t5_path, t5_what = _resolve_t5(args, stage, sources, adapter_folder)
    text_dims = {"clip": configs["text_width"], "t5": None if t5_path is None else read_t5_width(t5_path, t5_what)}
    if stage == 1:
        adapter_config.setdefault("text_dims", [text_dims[s] for s in sources])
        check_adapter_fits(adapter_config, latent_channels, latent_size, text_dims,
                           where="the adapter (--adapter_config / --adapter_*)")
        with seeded(0 if config.seed is None else config.seed):
            adapter = RelationalNet(**adapter_config)  # zero-init head: r == 0, the process starts as plain DDPM
    else:
        check_adapter_fits(adapter_config, latent_channels, latent_size, text_dims, where=f"adapter {adapter_folder}")
        adapter = load_adapter(adapter_folder)
    dataset = training_dataset(args, resolution, center_crop=args.center_crop, random_flip=args.random_flip)
    if t5_path is not None and args.cache_latents and not getattr(dataset, "records", None):
        raise UserError("--cache_latents with a T5 adapter reads captions from an image folder's metadata: pass "
                        "--train_data_dir, or drop --cache_latents")
    if t5_path is not None and args.cache_latents and any(rec.captions for rec in dataset.records):
        raise UserError("--cache_latents with a T5 adapter needs one caption per image (the cache freezes one draw "
                        "of the CLIP states, which the T5 states could not match): drop --cache_latents")

    unet, vae, text_encoder, tokenizer, scheduler_config, towers = load_sd_parts(args.pretrained_model_name_or_path)
    if unet_config is not None:
        unet = None  # built right after the trainer seeds the RNGs, as scripts/train_text_to_image.py builds its UNet
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    t5 = None
    if t5_path is not None:
        from contextdiff.checkpoint import load_t5

        t5 = load_t5(t5_path)  # frozen; the trainer places t5[0] (in place) like the other frozen towers
    schedule = NoiseSchedule.from_config(scheduler_config)
    process = process_dict(loss_config.parameterization, loss_config.k_schedule, loss_config.k_scale)

    encoder = _baseline_data_path()(vae, text_encoder, tokenizer)
    null_text = encoder.text([""])
    if args.cache_latents:
        source = dataset
        dataset = encoder.cache(dataset, args.cache_dir)
        if t5 is not None:
            dataset = _cache_t5(dataset, source, t5, args.t5_max_length, args.cache_dir)
    with Trainer(config) as trainer:  # creates output_dir: every check above has passed
        if unet is None:
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel.from_config(unet_config)
        trainable, frozen = trainable_modules(loss_config, unet, adapter)
        null_text = null_text.to(trainer.device)

        def loss_fn(batch, ctx):
            return contextual_loss(loss_batch(encoder, batch, ctx.device, sources, t5, args.t5_max_length),
                                   ctx.models["unet"], ctx.models["adapter"], schedule, loss_config,
                                   null_text=null_text)

        validate = None
        if args.validation_prompts:
            def validate(step, models):
                from contextdiff.pipeline import generate

                out = generate(models.get("unet", unet), models.get("adapter", adapter), vae, text_encoder,
                               tokenizer, args.validation_prompts, steps=25, guidance_scale=3.0,
                               generator=torch.Generator().manual_seed(0), scheduler_config=scheduler_config,
                               parameterization=loss_config.parameterization, k_schedule=loss_config.k_schedule,
                               k_scale=loss_config.k_scale, t5=t5,
                               t5_max_length=args.t5_max_length)
                from common.io import to_pil

                return [to_pil(im, value_range=(0, 1)) for im in out.images]

        params = None  # every trainable parameter at --learning_rate
        if stage == 1 and args.adapter_learning_rate is not None:
            params = [{"params": list(adapter.parameters()), "lr": args.adapter_learning_rate}]
            if "unet" in trainable:
                params.append({"params": list(unet.parameters())})
        result = trainer.fit(trainable, loss_fn, dataset, collate_fn=encoder.collate, params=params,
                             frozen={**frozen, "vae": vae, "text_encoder": text_encoder,
                                     **({} if t5 is None else {"t5": t5[0]})}, validation_fn=validate)
        if trainer.is_main_process and result.completed:
            _save(args, stage, result, unet, adapter, vae, text_encoder, tokenizer, scheduler_config, towers,
                  process, adapter_folder, t5, t5_path)
    return result.exit_code


def loss_batch(encoder, batch: dict, device, sources: list[str], t5: Optional[tuple] = None,
               t5_max_length: int = 77) -> dict[str, Any]:
    """The batch ``contextual_loss`` takes: latents, the UNet's CLIP states and, for an adapter that reads T5,
    ``adapter_text`` / ``adapter_text_mask`` in ``sources`` order (clip: the UNet's CLIP states, mask None; t5: the
    captions' T5 states and padding mask, cached or computed by the frozen ``t5=(encoder, tokenizer)``). Caption
    dropout for classifier-free guidance happens later, in the loss, on the UNet's text only."""
    latents, states = encoder.encode_batch(batch, device)
    out = {"latents": latents, "encoder_hidden_states": states}
    if "t5" not in sources:
        return out
    if "t5_states" in batch:
        t5_states, t5_mask = batch["t5_states"].to(device), batch["t5_mask"].to(device).bool()
    else:
        if t5 is None:
            raise UserError(f"the adapter reads T5 text states: pass {T5_FLAG}")
        from contextdiff.pipeline import encode_t5

        t5_states, t5_mask = encode_t5(t5[0], t5[1], batch["text"], t5_max_length, device)
    per_source = {"clip": (states, None), "t5": (t5_states, t5_mask)}
    out["adapter_text"] = [per_source[s][0] for s in sources]
    out["adapter_text_mask"] = [per_source[s][1] for s in sources]
    return out


class _WithT5(torch.utils.data.Dataset):
    """Cached items plus the cached T5 states and padding mask of their captions."""

    def __init__(self, base, states: torch.Tensor, mask: torch.Tensor):
        self.base, self.states, self.mask = base, states, mask

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        return {**self.base[i], "t5_states": self.states[i], "t5_mask": self.mask[i]}


@torch.no_grad()
def _cache_t5(cached, source, t5: tuple, max_length: int, cache_dir=None, batch_size: int = 64):
    """``--cache_latents`` with a T5 adapter: the T5 states of every record's caption, once (kept in ``cache_dir``
    under a key of the captions, the T5 weights, its tokenizer and the length), aligned with the latent cache."""
    from contextdiff.pipeline import encode_t5

    if getattr(source, "skipped_at_load", 0):
        # A file broke while the latents were cached and the dataset served the next readable item in its place:
        # read the captions the latent cache actually saw, not the record list (slower, and only in this case).
        captions = [source[i]["text"] for i in range(len(source))]
    else:
        captions = [rec.text for rec in source.records]

    from common.data import encode_once

    def encode(batch):
        s, m = encode_t5(t5[0], t5[1], list(batch["text"]), max_length)
        return {"states": s, "mask": m.to(torch.uint8)}

    key = None
    if cache_dir is not None:
        import hashlib

        from common.data import module_fingerprint

        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps([captions, type(t5[1]).__name__, len(t5[1]), int(max_length)]).encode())
        key = f"t5-{h.hexdigest()}-{module_fingerprint(t5[0])}"
    t, reused = encode_once([{"text": c} for c in captions], encode, cache_dir=cache_dir, key=key,
                            batch_size=batch_size)
    if cache_dir is not None:
        print(("reusing" if reused else "wrote") + f" T5 encodings cache {cache_dir}/{key}")
    if len(t["states"]) != len(cached):
        raise UserError(f"the T5 cache has {len(t['states'])} captions but the latent cache {len(cached)} images: "
                        "drop --cache_latents (or clear --cache_dir)")
    return _WithT5(cached, t["states"], t["mask"].bool())


def _save(args, stage, result, unet, adapter, vae, text_encoder, tokenizer, scheduler_config, towers, process,
          adapter_folder: Optional[Path], t5: Optional[tuple] = None, t5_path: Optional[Path] = None) -> None:
    out = Path(args.output_dir)
    unet = result.models.get("unet", unet).float().eval()
    adapter = result.models.get("adapter", adapter).float().eval()
    provenance = {"stage": stage, "steps": result.global_step,
                  "pretrained_model_name_or_path": str(args.pretrained_model_name_or_path),
                  "train_data_dir": describe_source(args)}
    if t5 is not None:  # absolute: stage 2 and sampling find it from any working directory
        provenance["t5_model_name_or_path"] = str(Path(t5_path).resolve())
        provenance["t5_max_length"] = int(args.t5_max_length)
    provenance["objective"] = str(args.objective)
    adapter_provenance = None
    if stage == 1:
        provenance["freeze_unet"] = bool(args.freeze_unet)
        if args.freeze_unet:
            save_adapter(out / "adapter", adapter, process, provenance)
            print(f"adapter saved to {out / 'adapter'} (safetensors + config.json + process.json)")
            return
        adapter_provenance = provenance  # the checkpoint's adapter/ is also what stage 2 reads
    else:
        provenance["adapter_path"] = str(adapter_folder)
    text_dtype = torch.float16 if args.text_encoder_save_dtype == "float16" else torch.float32
    folder = Path(args.checkpoint_dir) if args.checkpoint_dir else out
    if args.reference_towers and t5 is not None:
        towers = {**towers, "t5": Path(t5_path).resolve()}
    t5_model = None if t5 is None else (t5[0].float().eval(), t5[1])
    folder = save_contextdiff(folder, unet=unet, adapter=adapter, vae=vae.float(),
                              text_encoder=text_encoder.float(), tokenizer=tokenizer,
                              scheduler_config=scheduler_config, process=process,
                              reference_towers=towers if args.reference_towers else None,
                              text_encoder_dtype=text_dtype, provenance=provenance, t5=t5_model,
                              t5_max_length=args.t5_max_length, adapter_provenance=adapter_provenance,
                              beside_existing=folder.resolve() == out.resolve())
    kind = "UNet, scheduler and adapter; towers referenced" if args.reference_towers else \
        "diffusers StableDiffusionPipeline layout + adapter/"
    print(f"ContextDiff checkpoint saved to {folder} ({kind})")


def main(stage: int, argv=None) -> int:
    from common.train import parse_args_with_config

    args = parse_args_with_config(build_parser(stage), argv)
    return run(args, stage)
