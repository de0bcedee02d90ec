"""Convert released Versatile Diffusion weights (or an SD v1 UNet) into our diffuser folder, strictly.

    python scripts/versatile/convert.py --from vd-r1 --src pretrained/vd-four-flow-v1-0.pth --dst out/vd \\
        --model_config paper
    python scripts/versatile/convert.py --from diffusers --src path/to/versatile-diffusion --dst out/vd \\
        --image_vae path/to/vae --clip path/to/open_clip_folder --text_vae path/to/optimus     # a full folder
    python scripts/versatile/convert.py --from vd-r1 --src pretrained/vd-four-flow-v1-0.pth --dst out/vd \\
        --image_vae path/to/vae --clip path/to/open_clip_folder --optimus_vae pretrained/optimus-vae.pth \\
        --bert_tokenizer path/to/bert-base-cased --gpt2_tokenizer path/to/gpt2     # released text VAE inside
    python scripts/versatile/convert.py --optimus_vae pretrained/optimus-vae.pth --bert_tokenizer DIR \\
        --gpt2_tokenizer DIR --dst out/optimus                                   # the text VAE alone

Layouts (``versatile.convert``): ``vd-r0`` (the 2022-12 repo, ``model.diffusion_model.*``), ``vd-r1``
(``vd-four-flow-v1-0.pth``, ``diffuser.*``), ``diffusers`` (the hub folder's ``image_unet/`` + ``text_unet/``, or
a flat state dict with those prefixes), ``sd-unet`` (an SD v1 ``UNet2DConditionModel`` state dict: global + image
data layers + both context sets, the paper's stage-1 init; the text data layers stay freshly initialised),
``auto`` (detected from the keys). Every weight the layout should hold must be there with the right shape, and
every key under the layout's prefix must be used: otherwise one line names the layer groups (and flows) that
would be broken, exit 2, and nothing is written ([R] ``app.py`` loads with ``strict=False``; we never do). Keys
outside the prefix (the VAE, CLIP, EMA copies in a full checkpoint) are counted and reported, not loaded.

``--optimus_vae``: the released Optimus text VAE (``optimus-vae.pth``, ``versatile.optimus_convert``), read with
``weights_only=True`` and strictly (a missing, unexpected or mis-shaped tensor is one line); its tokenizers come
from local files: ``--bert_tokenizer`` (a folder with ``vocab.txt`` or ``bert-base-cased-vocab.txt``) and
``--gpt2_tokenizer`` (a folder with ``vocab.json`` + ``merges.txt`` or ``gpt2-vocab.json`` + ``gpt2-merges.txt``;
the official repository's ``lib/model_zoo/optimus_models/vocab/`` serves both). With ``--src`` it is stored inside
the complete folder (``text_vae/``); without ``--src``, ``--dst`` becomes a text VAE folder (``--text_vae`` of a
later conversion, or ``--text_vae_path`` of ``scripts/versatile/sample.py``).

Output: ``--dst/diffuser_config.json`` + per-group ``diffuser-<group>.safetensors`` (``versatile.convert``); with
``--image_vae`` and ``--clip`` a complete versatile folder (``versatile.json`` + ``diffuser/``) that
``scripts/versatile/sample.py`` runs directly (released checkpoints are four-flow; an SD UNet serves t2i only).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import UserError, cli_entry  # noqa: E402


FORMATS = ("auto", "vd-r0", "vd-r1", "diffusers", "sd-unet", "native")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="layout", default="auto", help=f"source layout: {' | '.join(FORMATS)}")
    p.add_argument("--src", default=None, help="checkpoint file (.pth/.ckpt/.safetensors) or diffusers VD folder "
                                               "(omit to convert only --optimus_vae)")
    p.add_argument("--dst", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--model_config", default="paper", help="versatile config of the sizes: paper, tiny, digits, YAML")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="storage dtype")
    p.add_argument("--image_vae", default=None, help="with --clip: write a complete versatile folder")
    p.add_argument("--clip", default=None, help="open_clip folder of the contexts (with --image_vae)")
    p.add_argument("--text_vae", default=None, help="text VAE folder (text flows)")
    p.add_argument("--optimus_vae", default=None, help="the released Optimus text VAE, optimus-vae.pth")
    p.add_argument("--bert_tokenizer", default=None, help="with --optimus_vae: folder with BERT-base-cased's vocab.txt")
    p.add_argument("--gpt2_tokenizer", default=None, help="with --optimus_vae: folder with GPT-2's vocab.json + "
                                                          "merges.txt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the files an earlier conversion wrote in --dst (anything else there is never touched)")
    return p


@cli_entry
def main(argv=None) -> int:
    import torch

    from versatile.checkpoint import save_pipeline_folder
    from versatile.config import VersatileConfig
    from versatile.convert import convert_state_dict, detect_layout, read_checkpoint, save_diffuser
    from versatile.multiflow import build_diffuser

    args = build_parser().parse_args(argv)
    if args.layout not in FORMATS:
        raise UserError(f"unknown layout {args.layout!r} for --from: choose one of {', '.join(FORMATS)}")
    dst = Path(args.dst)
    if dst.exists() and not args.overwrite:
        raise UserError(f"--dst {dst} exists: pass a new folder, or --overwrite to replace an earlier conversion there")
    _check_optimus_args(args)
    if args.src is None:
        return _convert_optimus_only(args, dst)
    src = Path(args.src)
    if not src.exists():
        raise UserError(f"--src {src} does not exist: pass a checkpoint file or a diffusers Versatile Diffusion folder")
    if bool(args.image_vae) != bool(args.clip):
        raise UserError("a complete folder needs both --image_vae and --clip (or neither, for weights only)")
    if args.optimus_vae and not args.image_vae:
        raise UserError("--optimus_vae with --src is stored in a complete folder: add --image_vae and --clip, or "
                        "drop --src to convert the text VAE alone")
    config = VersatileConfig.load(args.model_config)
    text_vae_model = _read_optimus(args, config) if args.optimus_vae else None
    state = read_checkpoint(src)
    layout = detect_layout(state) if args.layout == "auto" else args.layout
    model = build_diffuser(config.diffuser)
    keep = {k: v for k, v in model.state_dict().items() if k.startswith("data.text.")} if layout == "sd-unet" else None
    converted, report = convert_state_dict(state, layout, config.diffuser, model, keep=keep)
    model.load_state_dict(converted, strict=True)
    dtype = torch.float16 if args.dtype == "float16" else None
    if args.image_vae:
        flows = ("t2i",) if layout == "sd-unet" else ("t2i", "iv", "i2t", "tv")
        save_pipeline_folder(dst, model, image_vae=args.image_vae, clip=args.clip, text_vae=args.text_vae,
                             trained_flows=flows, sampling=config.sampling, uncond_image=config.context.uncond_image,
                             stages=[{"converted_from": str(src), "layout": layout}], dtype=dtype,
                             context_scale=config.context.context_scale, text_vae_model=text_vae_model)
    else:
        save_diffuser(model, dst, dtype=dtype, shard_by_group=True)
    ignored = f"; {len(report.ignored)} keys outside the diffuser ignored (e.g. {report.ignored[0]})" if report.ignored else ""
    optimus = " and the Optimus text VAE (text_vae/)" if text_vae_model is not None else ""
    print(f"converted {report.loaded} {layout} tensors{optimus} into {dst}{ignored}")
    return 0


def _check_optimus_args(args) -> None:
    """The Optimus flags, checked before anything is read."""
    if args.optimus_vae is None:
        if args.bert_tokenizer or args.gpt2_tokenizer:
            raise UserError("--bert_tokenizer / --gpt2_tokenizer go with --optimus_vae: add the optimus-vae.pth path")
        if args.src is None:
            raise UserError("nothing to convert: pass --src (the diffuser) and/or --optimus_vae (the text VAE)")
        return
    if not Path(args.optimus_vae).is_file():
        raise UserError(f"--optimus_vae {args.optimus_vae} does not exist: pass the released optimus-vae.pth")
    if not args.bert_tokenizer or not args.gpt2_tokenizer:
        raise UserError("--optimus_vae needs --bert_tokenizer and --gpt2_tokenizer (local folders: BERT-base-cased's "
                        "vocab.txt, GPT-2's vocab.json + merges.txt; nothing is downloaded)")
    if args.text_vae:
        raise UserError("pass the text VAE once: --text_vae (a converted folder) or --optimus_vae (the release)")
    if args.src is None and (args.image_vae or args.clip):
        raise UserError("--image_vae / --clip build a complete folder around a diffuser: add --src, or drop them to "
                        "convert the text VAE alone")


def _read_optimus(args, config):
    from versatile.optimus_convert import convert_optimus_vae

    return convert_optimus_vae(args.optimus_vae, args.bert_tokenizer, args.gpt2_tokenizer, config.text_vae,
                               config.diffuser.text_latent_dim)


def _convert_optimus_only(args, dst: Path) -> int:
    from versatile.config import VersatileConfig
    from versatile.text_vae import save_text_vae

    vae = _read_optimus(args, VersatileConfig.load(args.model_config))
    save_text_vae(vae, dst)
    count = len(vae.state_dict())
    print(f"converted {count} Optimus tensors (+ {vae.decoder.config.n_layer} causal masks dropped) into {dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
