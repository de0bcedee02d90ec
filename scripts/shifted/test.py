"""Image -> CLIP image embedding -> image with a fine-tuned image-embedding decoder (the reference ``test.py``).

    python scripts/shifted/test.py --image data/digits/test/images/00000.png --output_dir outputs/shifted/img2img
    python scripts/shifted/test.py --image_dir photos/ --decoder out/finetune --clip A --clip B ...

Each input is centre-cropped square, embedded by the CLIP model(s) the decoder was fine-tuned with, and decoded
with classifier-free guidance against ``--negative null`` (the null embedding fine-tuning dropped to) or ``black``
(the CLIP embedding of a black image, the reference's choice). Writes ``images/``, ``metadata.jsonl`` (file_name,
source), ``grid.png`` and ``embeddings.safetensors`` to ``--output_dir``, all at once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import UserError, cli_entry  # noqa: E402


@cli_entry
def main(argv=None) -> int:
    from common.io import load_image_rgb, save_safetensors, write_image_folder
    from shifted.cli import DEFAULT_CHECKPOINT, add_clip_args, add_decoder_args, decoder_kwargs
    from shifted.system import image_to_image, load_system

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", action="append", default=None, help="an input image; repeat for several")
    p.add_argument("--image_dir", default=None, help="or a folder of images")
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                   help="Shifted Diffusion checkpoint folder (its decoder/ and CLIP) unless --decoder/--clip")
    p.add_argument("--decoder", default=None, help="decoder pipeline folder written by finetune.py")
    p.add_argument("--negative", default="null", choices=("null", "black"))
    p.add_argument("--output_dir", default="outputs/shifted/test")
    add_clip_args(p, text_states=False)
    add_decoder_args(p)
    from common import limits

    args = limits.check_namespace(p.parse_args(argv))
    kwargs = decoder_kwargs(args)
    paths = [Path(x) for x in (args.image or [])]
    if args.image_dir:
        folder = Path(args.image_dir)
        if not folder.is_dir():
            raise UserError(f"--image_dir {folder} does not exist")
        paths += sorted(f for f in folder.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not paths:
        raise UserError("no input image: pass --image PATH (repeatable) or --image_dir FOLDER")
    images = [load_image_rgb(path) for path in paths]  # unreadable -> one-line UserError, nothing written
    checkpoint = args.checkpoint if (not args.decoder or not args.clip) else None
    system = load_system(checkpoint, decoder=args.decoder, clip=args.clip, need_prior=False, device=args.device)
    out, emb = image_to_image(system, images, seed=args.seed, negative=args.negative, decoder_kwargs=kwargs)
    rows = [{"source": str(path)} for path in paths]
    folder = write_image_folder(args.output_dir, out, rows, {
        "embeddings.safetensors": lambda f: save_safetensors({"image_emb": emb}, f)})
    print(f"wrote {len(paths)} image(s) to {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
