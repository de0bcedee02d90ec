"""Convert a released Collaborative Diffusion checkpoint (LDM Lightning ``.ckpt``) into the project's folders.

One command per released file, with the official config that describes it (``configs/*.yaml`` of the official
repository, read with ``yaml.safe_load``)::

    # the collaboration: both frozen members, the VAE and the dynamic diffusers, all from the one file
    python scripts/codiff/convert.py --checkpoint pretrained/512_codiff_mask_text.ckpt \\
        --config Collaborative-Diffusion/configs/512_codiff_mask_text.yaml \\
        --tokenizer path/to/bert-base-uncased --output outputs/codiff-512
    python scripts/sample.py --method codiff --pretrained_model_name_or_path outputs/codiff-512 \\
        --prompt "This woman is in her twenties." --mask_path mask.png --steps 50 --eta 1 --guidance_scale 1

    # a uni-modal model alone (a member folder with its VAE inside) or the VAE alone (a diffusers folder)
    python scripts/codiff/convert.py --checkpoint pretrained/512_text.ckpt --config .../configs/512_text.yaml \\
        --tokenizer path/to/bert-base-uncased --output outputs/codiff-512-text
    python scripts/codiff/convert.py --checkpoint pretrained/512_vae.ckpt --config .../configs/512_vae.yaml \\
        --output outputs/codiff-512-vae

The collaboration config names its member configs (``configs/512_mask.yaml``, ...); they are looked up as given,
from the official repository root above ``--config`` and beside it. ``--tokenizer`` is a local
``bert-base-uncased`` folder: the released text encoder was trained from scratch on BERT token ids, and only the
tokenizer is BERT's. The 256 files convert the same way with the 256 configs.

Strict: every weight the config's networks need must be in the file with its shape, and every entry of the file
must be one of them (or a known non-network entry: noise-schedule buffers, the VAE's training loss, the text
encoder's unused token head); otherwise one line names the key, exit 2, nothing written. The file is read with
``torch.load(weights_only=True)``: nothing in it is executed. ``--output`` must be new (or an empty folder); it is
written all at once. Formats and key maps: ``codiff/METHOD.md``, "Released checkpoints".
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import cli_entry


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="released .ckpt: {256,512}_{vae,text,mask,codiff_mask_text}.ckpt")
    p.add_argument("--config", required=True, type=Path, help="the official configs/*.yaml of that checkpoint")
    p.add_argument("--output", required=True, type=Path, help="new folder to write")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="local bert-base-uncased tokenizer folder (needed for text and collaboration checkpoints)")
    p.add_argument("--scale_factor", type=float, default=None,
                   help="latent scale factor of a VAE converted alone (default: the released 0.141 at 512px, "
                        "0.058 at 256px)")
    return p


@cli_entry
def main(argv=None) -> int:
    from codiff.convert import convert_release, needs_tokenizer, write_converted
    from common.errors import UserError

    args = build_parser().parse_args(argv)
    if args.tokenizer is None and needs_tokenizer(args.config):
        raise UserError(f"{args.config} describes a model that reads text (BERT token ids): pass --tokenizer <a local "
                        "bert-base-uncased folder>")
    if args.output.exists() and (not args.output.is_dir() or any(args.output.iterdir())):
        raise UserError(f"output {args.output} already exists: pass a new folder")
    converted = convert_release(args.checkpoint, args.config, scale_factor=args.scale_factor)
    out = write_converted(converted, args.output, str(args.checkpoint), tokenizer_path=args.tokenizer)
    what = {"vae": "VAE folder", "member": "member folder", "collaboration": "collaboration checkpoint"}[converted.kind]
    print(f"wrote the {what} {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
