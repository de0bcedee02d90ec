"""Fit the Gaussian bank of Shifted Diffusion to CLIP image embeddings (the reference's ``mean.pth`` / ``std.pth``).

    python scripts/shifted/fit_bank.py --cache emb/train.safetensors --size 16 --out bank.safetensors
    python scripts/shifted/fit_bank.py --train_data_dir data/digits/train --size 1 --out global.safetensors  # K=1

K clusters of the raw image embeddings (spherical k-means on directions, as components are chosen by cosine; or
``gmm_diag``), each summarised by the mean and per-dimension std of its members (floored); ``--std_scale`` s
gives the terminal std ``S = s sigma`` (reference 5). ``--size 1`` is the global Gaussian. The bank records the
CLIP models of its space; a prior, a cache or a text embedding from other CLIPs is refused later.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.errors import UserError, cli_entry  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from shifted.cli import add_clip_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--cache", help="embedding cache from extract_embeddings.py")
    src.add_argument("--train_data_dir", help="image folder (embedded on the fly with --clip)")
    p.add_argument("--out", required=True, help="bank file to write (.safetensors)")
    p.add_argument("--size", "--K", dest="size", type=int, default=1024, help="number of Gaussians K (1 = global)")
    p.add_argument("--method", default="spherical_kmeans", choices=("spherical_kmeans", "gmm_diag"))
    p.add_argument("--std_scale", type=float, default=5.0, help="s: the terminal std is s * sigma (reference 5)")
    p.add_argument("--std_floor", type=float, default=1e-4, help="lower bound of every sigma")
    p.add_argument("--similarity", default="concat", choices=("concat", "per_block"),
                   help="how texts pick a component: cosine on the concatenation (reference) or per CLIP block")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    add_clip_args(p, text_states=False)
    return p


@cli_entry
def main(argv=None) -> int:
    import warnings

    from shifted.bank import fit_bank
    from shifted.embeddings import load_embedding_cache

    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if out.suffix != ".safetensors" or out.is_dir():
        raise UserError(f"--out {out} must be a file path ending in .safetensors")
    if args.std_scale <= 0 or args.std_floor < 0:
        raise UserError(f"--std_scale must be > 0 and --std_floor >= 0, got {args.std_scale} and {args.std_floor}")
    if args.cache:
        tensors, meta = load_embedding_cache(args.cache)
        names, block_dims = meta["clip_models"], meta["block_dims"]
        if args.clip:
            from shifted.bank import check_clip_models
            from shifted.checkpoint import model_name
            from shifted.cli import clip_paths

            check_clip_models(names, [model_name(p) for p in clip_paths(args)], f"the embedding cache {args.cache}")
    else:
        from shifted.checkpoint import load_clip_models
        from shifted.cli import clip_paths
        from shifted.data import embed_folder

        clip = load_clip_models(clip_paths(args), args.device)
        tensors, _, _ = embed_folder(clip, args.train_data_dir, with_text=False, progress=True)
        names, block_dims = list(clip.names), list(clip.block_dims)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bank = fit_bank(tensors["image_emb"], args.size, args.method, std_scale=args.std_scale,
                        std_floor=args.std_floor, seed=args.seed, clip_models=names, block_dims=block_dims,
                        similarity=args.similarity)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    bank.save(out)
    counts = bank.std.mean(dim=1)
    print(f"wrote {out}: K={bank.size} Gaussians in {bank.dim}-d ({list(names)}), std_scale {args.std_scale:g}, "
          f"mean sigma {float(counts.mean()):.4g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
