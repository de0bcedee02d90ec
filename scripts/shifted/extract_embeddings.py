"""Embed an image folder once with one or several CLIPs (concatenated in order): the offline cache.

    python scripts/shifted/extract_embeddings.py --train_data_dir data/digits/train --out emb/train.safetensors
    python scripts/shifted/extract_embeddings.py --train_data_dir data/digits/train --clip A --clip B --no_text ...

Writes one safetensors file: ``image_emb [N, D]`` (raw CLIP image embeddings, D = sum of the CLIPs' widths), and
unless ``--no_text`` the captions' ``text_emb [N, D]`` and ``text_states [N, L, d]`` (the prior's text tokens), with
the CLIP model names, block widths, text encoder name and a caption fingerprint in its metadata. The tensors are
exactly what ``train.py`` computes when it is given the folder instead of the cache.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import UserError, cli_entry  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from shifted.cli import add_clip_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train_data_dir", required=True, help="image folder with metadata.jsonl (file_name, text)")
    p.add_argument("--out", required=True, help="the cache file to write (.safetensors)")
    p.add_argument("--no_text", action="store_true", help="images only (a caption-free folder)")
    p.add_argument("--resolution", type=int, default=None,
                   help="images are centre-cropped and resized to this first (default: the largest CLIP input)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    add_clip_args(p)
    return p


@cli_entry
def main(argv=None) -> int:
    from shifted.checkpoint import load_clip_models, load_text_states
    from shifted.cli import check_positive, clip_paths, text_states_path
    from shifted.data import embed_folder
    from shifted.embeddings import save_embedding_cache

    args = build_parser().parse_args(argv)
    check_positive("batch_size", args.batch_size)
    check_positive("t5_max_length", args.t5_max_length)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out} must end in .safetensors")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: pass a file path ending in .safetensors")
    clip = load_clip_models(clip_paths(args), args.device)
    states = None if args.no_text else load_text_states(text_states_path(args), args.t5_max_length, args.device)
    tensors, captions, _ = embed_folder(clip, args.train_data_dir, text_states=states, with_text=not args.no_text,
                                        resolution=args.resolution, batch_size=args.batch_size, progress=True)
    save_embedding_cache(out, tensors, clip, captions or None, states.name if states is not None else None)
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in tensors.items())
    print(f"wrote {out}: {shapes}; CLIP models {list(clip.names)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
