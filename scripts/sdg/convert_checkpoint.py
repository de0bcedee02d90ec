"""Convert released SDG / guided-diffusion checkpoints to this lab's SDG folder (read with ``weights_only=True``).

    python scripts/sdg/convert_checkpoint.py --model_path models/lsun_bedroom.pt --image_size 256 \\
        --num_channels 256 --num_res_blocks 2 --attention_resolutions 32,16,8 --num_head_channels 64 \\
        --resblock_updown True --use_scale_shift_norm True --learn_sigma True --dropout 0.1 \\
        --clip_gd_path models/clip_bedroom.pt --clip_model RN50x16 --clip_weights models/RN50x16.pt \\
        --output_dir models/sdg_bedroom

``--model_path``: a guided-diffusion ``UNetModel`` state dict (``lsun_*.pt``, ILVR's ``ffhq_10m.pt``) described by
its ADM flags (guided-diffusion's names; every key and shape is checked against them, legacy per-head qkv split)
-> ``<output_dir>/unet/`` (diffusers ``UNet2DModel`` + ``adm_flags.json``).
``--clip_gd_path`` (optional): SDG's noise-aware ``CLIP_gd`` state dict (``clip_ffhq.pt``, ``clip_lsun_*.pt``) ->
``<output_dir>/clip/``; its key map is ``sdg.convert``'s and it is rebuilt on ``--clip_model`` (RN50x16) with the released
choices (FiLM default init, t_dim 128, hidden 512, input ``--image_size``). The text tower, not part of CLIP_gd,
comes from ``--clip_weights`` (OpenAI's RN50x16 weights), which the folder references by path.
The output folder is what ``scripts/sdg/sample.py --model_path/--clip_path`` and ``scripts/sample.py --method sdg
--pretrained_model_name_or_path`` take; it appears only when complete.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import UserError, cli_entry  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from sdg.adm import add_adm_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model_path", default=None, help="guided-diffusion UNet state dict (.pt)")
    p.add_argument("--clip_gd_path", default=None, help="SDG's noise-aware CLIP_gd state dict (.pt), optional")
    p.add_argument("--clip_model", default="RN50x16",
                   help="open_clip model of CLIP_gd: a name (RN50x16), a config .json or a local folder")
    p.add_argument("--clip_weights", default=None,
                   help="weights of --clip_model (OpenAI RN50x16 .pt): the frozen text tower for language guidance")
    p.add_argument("--clip_t_dim", type=int, default=128, help="CLIP_gd timestep sinusoid size")
    p.add_argument("--clip_hidden", type=int, default=512, help="CLIP_gd time MLP width")
    p.add_argument("--output_dir", default=None, help="the SDG folder to write (unet/, clip/)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="dtype of the written UNet")
    adm = p.add_argument_group("ADM model flags (guided-diffusion names and defaults)")
    add_adm_arguments(adm)
    return p


def adm_flags(args):
    from dataclasses import fields

    from sdg.adm import ADMFlags

    return ADMFlags.from_dict({f.name: getattr(args, f.name) for f in fields(ADMFlags)})


def convert_clip_gd(args, folder: Path, image_size: int) -> None:
    from common.io import safe_torch_load
    from common.tiny import seeded
    from sdg.checkpoint import clip_settings, load_base_clip, noise_aware_from_base, save_noise_aware_clip
    from sdg.convert import convert_sdg_clip_gd_state_dict
    from sdg.noisy_clip import load_noise_aware_clip

    state = convert_sdg_clip_gd_state_dict(safe_torch_load(args.clip_gd_path))
    model, _ = load_base_clip(args.clip_model, args.clip_weights)
    settings = {"image_size": image_size, "t_dim": args.clip_t_dim, "hidden": args.clip_hidden,
                "film_init": "default", "pos_init": "random"}
    with seeded(0):  # every tensor is overwritten by the checkpoint; seeded only so nothing random can leak
        clip = noise_aware_from_base(model, settings)
    load_noise_aware_clip(clip, state, source=str(args.clip_gd_path))
    save_noise_aware_clip(clip.eval(), folder, base_clip=args.clip_model, base_clip_weights=args.clip_weights,
                          settings=clip_settings(clip, "default", "random"),
                          extra={"converted_from": str(args.clip_gd_path)}, base_model=model)


@cli_entry
def main(argv=None) -> int:
    import torch

    from common.io import atomic_write_dir
    from sdg.checkpoint import CLIP_SUBFOLDER, UNET_SUBFOLDER, save_unet_folder
    from sdg.convert import load_adm_unet

    args = build_parser().parse_args(argv)
    if not args.output_dir:
        raise UserError("--output_dir is required: the SDG folder to write")
    if not args.model_path and not args.clip_gd_path:
        raise UserError("nothing to convert: pass --model_path (guided-diffusion .pt) and/or --clip_gd_path")
    for flag in ("model_path", "clip_gd_path"):
        value = getattr(args, flag)
        if value and not Path(value).is_file():
            raise UserError(f"--{flag} {value} does not exist: pass the released .pt file")
    if args.clip_gd_path and not args.clip_weights and not Path(args.clip_model).is_dir():
        raise UserError("--clip_gd_path needs --clip_weights (the OpenAI weights of --clip_model): CLIP_gd holds "
                        "only the image side, the text tower for language guidance comes from them")
    flags = adm_flags(args)
    unet = load_adm_unet(args.model_path, flags) if args.model_path else None  # checks every key before writing
    out = Path(args.output_dir)
    with atomic_write_dir(out) as tmp:
        if unet is not None:
            dtype = torch.float16 if args.dtype == "float16" else torch.float32
            save_unet_folder(unet, flags, tmp / UNET_SUBFOLDER, dtype, extra={"converted_from": args.model_path})
        if args.clip_gd_path:
            convert_clip_gd(args, tmp / CLIP_SUBFOLDER, flags.image_size)
    print(f"wrote {out} ({', '.join(p.name + '/' for p in sorted(out.iterdir()))})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
