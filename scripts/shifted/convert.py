"""Convert the authors' released Shifted Diffusion files into a checkpoint folder ``scripts/sample.py`` loads.

    python scripts/shifted/convert.py --prior small/model_state.th --mean small/mean.pth --std small/std.pth \\
        --decoder finetuned_coco --null_embedding small_sft_empty_embeds.th \\
        --clip clip/ViT-B-16 --clip clip/ViT-B-32 --clip clip/RN101 --t5_model t5-11b --out ckpt/shifted_released
    python scripts/sample.py --method shifted --pretrained_model_name_or_path ckpt/shifted_released \\
        --prompt "a yellow and blue train riding a track by some trees" --steps 100 --guidance_scale 2

``--prior``: ``model_state.th`` (the released ``ClipPrior`` state dict; 16 or 20 layers are read off the weights).
``--mean`` / ``--std``: the bank files released with it (first ``--bank_size`` rows, ``--std_scale`` 5 as in the
demo). ``--decoder``: the released fine-tuned Stable Diffusion folder (the fork's ``StableDiffusionPipelineWithCLIP``
layout), written as a plain diffusers pipeline + ``image_projection/``; ``--null_embedding``: the released
``*_empty_embeds.th`` the decoder was fine-tuned with as its CFG null (``small_sft_empty_embeds.th`` for the
released decoders). ``--prior_baseline``: optionally, a released no-bank prior. ``--clip`` (three open_clip folders,
in the release's order ViT-B/16, ViT-B/32, RN101) and ``--t5_model`` (the T5-11B encoder folder) are referenced by
the written ``shifted.json``, not copied; the prior records their names. All ``.th`` / ``.pth`` / ``.bin`` files are
read with ``torch.load(weights_only=True)``; the output is safetensors, written all at once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import UserError, cli_entry


@cli_entry
def main(argv=None) -> int:
    from common.io import atomic_write_dir
    from shifted import convert as release
    from shifted.checkpoint import ShiftedCheckpoint, model_name, text_encoder_name
    from shifted.cli import add_clip_args, clip_paths, text_states_path
    from shifted.pipeline import check_prior_bank, save_prior

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prior", required=True, help="released model_state.th (ClipPrior state dict)")
    p.add_argument("--mean", default=None, help="released mean.pth (bank means); needed for a prior with a bank")
    p.add_argument("--std", default=None, help="released std.pth (bank standard deviations)")
    p.add_argument("--bank_size", type=int, default=release.RELEASED_BANK_SIZE, help="bank rows kept (1024)")
    p.add_argument("--std_scale", type=float, default=release.RELEASED_STD_SCALE, help="terminal std scale (5)")
    p.add_argument("--heads", type=int, default=release.RELEASED_HEADS, help="attention heads of the prior (32)")
    p.add_argument("--prior_baseline", default=None, help="a released no-bank prior's model_state.th (optional)")
    p.add_argument("--decoder", required=True, help="released fine-tuned Stable Diffusion folder")
    p.add_argument("--null_embedding", default=None,
                   help="released *_empty_embeds.th: the decoder's CFG null (default: zeros)")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    add_clip_args(p)
    args = p.parse_args(argv)
    if args.clip is None:
        raise UserError("pass --clip three times (open_clip folders of ViT-B/16, ViT-B/32, RN101, in this order)")
    clips, states = clip_paths(args), text_states_path(args)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not (out / "shifted.json").is_file():
        raise UserError(f"--out {out} is a non-empty folder that is not a Shifted Diffusion checkpoint: pass a new "
                        "folder (it is replaced as a whole)")
    clip_names = [model_name(c) for c in clips]
    names = dict(clip_models=clip_names, text_encoder=text_encoder_name(states), heads=args.heads,
                 text_len=args.t5_max_length)

    prior = release.load_released_prior(args.prior, **names)
    dims = prior.config.clip_dims
    bank = None
    if prior.config.use_bank_token:
        if not (args.mean and args.std):
            raise UserError(f"{args.prior} is a shifted prior (it has the bank token): pass --mean and --std")
        bank = release.load_released_bank(args.mean, args.std, dim=prior.config.emb_dim, size=args.bank_size,
                                          std_scale=args.std_scale, clip_models=clip_names, block_dims=dims)
    check_prior_bank(prior, bank)
    baseline = None
    if args.prior_baseline:
        baseline = release.load_released_prior(args.prior_baseline, **names)
        if baseline.config.use_bank_token:
            raise UserError(f"--prior_baseline {args.prior_baseline} has a bank token: pass the no-bank prior")
    null = None
    if args.null_embedding:
        null = release.load_released_empty_embedding(args.null_embedding, prior.config.emb_dim)

    with atomic_write_dir(out) as tmp:
        save_prior(tmp / "prior", prior, bank)
        if baseline is not None:
            save_prior(tmp / "prior_baseline", baseline, None)
        release.convert_released_decoder(args.decoder, tmp / "decoder", clip_names, null)
        ShiftedCheckpoint.write_meta(tmp, clips, states, relative_to=out)
    print(f"wrote {out}: prior ({prior.config.layers} layers, {sum(p.numel() for p in prior.parameters()):,} "
          f"parameters{', bank of ' + str(bank.mean.shape[0]) if bank is not None else ''})"
          f"{' + prior_baseline' if baseline is not None else ''} + decoder"
          f"{' (null embedding ' + args.null_embedding + ')' if null is not None else ' (zero null embedding)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
