"""Convert released Versatile Diffusion weights (or an SD v1 UNet) into our diffuser folder, strictly.

    python scripts/versatile/convert.py --from vd-r1 --src pretrained/vd-four-flow-v1-0.pth --dst out/vd \\
        --model_config paper
    python scripts/versatile/convert.py --from diffusers --src path/to/versatile-diffusion --dst out/vd \\
        --image_vae path/to/vae --clip path/to/open_clip_folder --text_vae path/to/optimus     # a full folder

Layouts (``versatile.convert``): ``vd-r0`` (the 2022-12 repo, ``model.diffusion_model.*``), ``vd-r1``
(``vd-four-flow-v1-0.pth``, ``diffuser.*``), ``diffusers`` (the hub folder's ``image_unet/`` + ``text_unet/``, or
a flat state dict with those prefixes), ``sd-unet`` (an SD v1 ``UNet2DConditionModel`` state dict: global + image
data layers + both context sets, the paper's stage-1 init; the text data layers stay freshly initialised),
``auto`` (detected from the keys). Every weight the layout should hold must be there with the right shape, and
every key under the layout's prefix must be used: otherwise one line names the layer groups (and flows) that
would be broken, exit 2, and nothing is written ([R] ``app.py`` loads with ``strict=False``; we never do). Keys
outside the prefix (the VAE, CLIP, EMA copies in a full checkpoint) are counted and reported, not loaded.

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
    p.add_argument("--src", required=True, help="checkpoint file (.pth/.ckpt/.safetensors) or diffusers VD folder")
    p.add_argument("--dst", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--model_config", default="paper", help="versatile config of the sizes: paper, tiny, digits, YAML")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="storage dtype")
    p.add_argument("--image_vae", default=None, help="with --clip: write a complete versatile folder")
    p.add_argument("--clip", default=None, help="open_clip folder of the contexts (with --image_vae)")
    p.add_argument("--text_vae", default=None, help="text VAE folder (text flows)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
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
    src, dst = Path(args.src), Path(args.dst)
    if not src.exists():
        raise UserError(f"--src {src} does not exist: pass a checkpoint file or a diffusers Versatile Diffusion folder")
    if dst.exists() and not args.overwrite:
        raise UserError(f"--dst {dst} exists: pass a new folder, or --overwrite")
    if bool(args.image_vae) != bool(args.clip):
        raise UserError("a complete folder needs both --image_vae and --clip (or neither, for weights only)")
    config = VersatileConfig.load(args.model_config)
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
                             context_scale=config.context.context_scale)
    else:
        save_diffuser(model, dst, dtype=dtype, shard_by_group=True)
    ignored = f"; {len(report.ignored)} keys outside the diffuser ignored (e.g. {report.ignored[0]})" if report.ignored else ""
    print(f"converted {report.loaded} {layout} tensors into {dst}{ignored}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
