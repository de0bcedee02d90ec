"""Compare priors on held-out captions: Fréchet distance to the real image embeddings and paired cosine.

    python scripts/shifted/eval_prior.py --cache outputs/shifted/emb_test.safetensors \\
        --prior ckpt/tiny/shifted/prior --prior ckpt/tiny/shifted/prior_baseline [--train_cache emb_train.safetensors]

For every held-out (caption, image) pair of the cache each prior samples an embedding from the caption (8 respaced
DDPM steps by default, the reference demo); printed per prior: ``frechet`` (lower = closer to the real
image-embedding distribution) and ``cosine`` (mean per-CLIP-block cosine to the paired image embedding), over
``--seeds`` sampling seeds (mean and spread). Also printed: the caption's CLIP text embedding used as the image
embedding, and with ``--train_cache`` the real-vs-real floor. ``--json FILE`` writes everything.
"""

from __future__ import annotations

import argparse
import json

from common.errors import UserError, cli_entry  # noqa: E402


def evaluate(prior_folders, cache, seeds=(0, 1, 2), train_cache=None, **sample_kwargs) -> dict:
    import numpy as np

    from shifted.embeddings import load_embedding_cache
    from shifted.evaluation import evaluate_prior, reference_metrics
    from shifted.pipeline import load_prior

    tensors, meta = load_embedding_cache(cache)
    if "text_emb" not in tensors or "text_states" not in tensors:
        raise UserError(f"{cache} holds no captions: extract it without --no_text")
    train = None
    if train_cache:
        train, _ = load_embedding_cache(train_cache, clip_models=meta["clip_models"])
    results = {"references": reference_metrics(tensors, meta["block_dims"],
                                               train["image_emb"] if train is not None else None), "priors": {}}
    for folder in prior_folders:
        prior, bank = load_prior(folder, clip_models=meta["clip_models"], text_encoder=meta.get("text_encoder") or None)
        runs = [evaluate_prior(prior, bank, tensors, seed=s, **sample_kwargs) for s in seeds]
        summary = {}
        for key in ("frechet", "cosine", "seconds"):
            values = np.array([r[key] for r in runs])
            summary[key] = float(values.mean())
            summary[key + "_std"] = float(values.std())
        summary.update(count=runs[0]["count"], seeds=list(seeds), bank=None if bank is None else bank.size,
                       parameters=sum(p.numel() for p in prior.parameters()))
        results["priors"][str(folder)] = summary
    return results


@cli_entry
def main(argv=None) -> int:
    from shifted.cli import add_prior_sampling_args, prior_sampling_kwargs

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", required=True, help="held-out embedding cache with captions (extract_embeddings.py)")
    p.add_argument("--prior", action="append", required=True, help="prior folder; repeat to compare several")
    p.add_argument("--train_cache", default=None, help="training cache, for the real-vs-real Fréchet floor")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    add_prior_sampling_args(p)
    args = p.parse_args(argv)
    results = evaluate(args.prior, args.cache, tuple(args.seeds), args.train_cache, **prior_sampling_kwargs(args))
    ref = results["references"]
    print(f"text embedding as image embedding: frechet {ref['text_as_image']['frechet']:.3f}  "
          f"cosine {ref['text_as_image']['cosine']:.4f}")
    if "train_vs_test_frechet" in ref:
        print(f"real train vs held-out image embeddings: frechet {ref['train_vs_test_frechet']:.3f}")
    for name, r in results["priors"].items():
        print(f"{name}: frechet {r['frechet']:.3f} +- {r['frechet_std']:.3f}  cosine {r['cosine']:.4f} +- "
              f"{r['cosine_std']:.4f}  ({r['count']} captions x {len(r['seeds'])} seeds, {r['seconds']:.2f} s/run, "
              f"bank K={r['bank']})")
    if args.json:
        from common.io import atomic_write_file

        with atomic_write_file(args.json) as tmp:
            tmp.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
