"""Train the Shifted Diffusion prior (text -> CLIP image embedding) on the shared trainer.

    python scripts/shifted/train.py --config configs/shifted/tiny_prior.yaml --cache emb/train.safetensors \\
        --bank bank.safetensors --output_dir outputs/shifted/prior
    python scripts/shifted/train.py ... --no_bank        # the baseline: plain DDPM prior, no bank token

Flags and defaults are the reference ``train.py``'s (batch 64, AdamW 1.2e-4 (0.9, 0.96) wd 0.06
eps 1e-6, clip 1.0, constant LR, linear betas 1e-4..0.02, x0 prediction with P2 gamma 1, text states dropped with
0.1, the CLIP text embedding never, width 2048 / 8 layers / 32 heads), plus ``--bank`` (from fit_bank.py; replaces
``--mean_path/--std_path``), ``--no_bank`` and ``--cache`` (from extract_embeddings.py; without it the folder is
embedded once at start, the same tensors). ``--snr_gamma`` replaces the P2 weight by Min-SNR's ``min(SNR_t, gamma)``
(the x0-target form); ``--noise_offset`` is refused (embedding vectors have no pixels to offset). Writes the prior at ``<output_dir>`` itself (config.json, weights,
bank.safetensors, beside the run's checkpoints), loadable with ``shifted.pipeline.load_prior(output_dir)``; checkpoints and ``--resume_from_checkpoint latest`` as every script.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import UserError, cli_entry  # noqa: E402


SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
DEFAULTS = {  # the reference train.py
    "train_batch_size": 64, "num_train_epochs": 100, "learning_rate": 1.2e-4, "adam_beta1": 0.9,
    "adam_beta2": 0.96, "adam_weight_decay": 0.06, "adam_epsilon": 1e-6, "max_grad_norm": 1.0,
    "lr_scheduler": "constant", "lr_warmup_steps": 500, "checkpointing_steps": 5000, "output_dir": "sft",
    "seed": None, "report_to": "none", "tracker_project_name": "shifted_prior", "ema_decay": 0.0,
}


def build_parser() -> argparse.ArgumentParser:
    from common.data_sources import add_dataset_args
    from common.diffusion_loss import add_diffusion_loss_args
    from common.train import add_train_args
    from shifted.cli import add_clip_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = p.add_argument_group("data")
    data.add_argument("--cache", default=None, help="embedding cache with captions (extract_embeddings.py)")
    data.add_argument("--train_data_dir", default=None, help="or an image folder with metadata.jsonl captions")
    add_dataset_args(p)
    add_clip_args(data)
    bank = p.add_argument_group("Gaussian bank (shifted process)")
    bank.add_argument("--bank", default=None, help="bank file from fit_bank.py (required unless --no_bank)")
    bank.add_argument("--no_bank", action=argparse.BooleanOptionalAction, default=False,
                      help="train the baseline prior: standard DDPM to N(0, I), no bank-index token")
    bank.add_argument("--mean_path", default=None,
                      help="instead of --bank: the reference's mean.pth (K x D means, reshaped to (-1, D))")
    bank.add_argument("--std_path", default=None, help="with --mean_path: the reference's std.pth (std, not log-std)")
    bank.add_argument("--size", type=int, default=None, help="use the bank's first K components (default: all)")
    bank.add_argument("--std_scale", type=float, default=None, help="override the bank's s (reference 5.0)")
    bank.add_argument("--use_mean", action=argparse.BooleanOptionalAction, default=True,
                      help="pick the component nearest the text embedding (reference); --no-use_mean: by samples")
    bank.add_argument("--sample_num", type=int, default=1, help="samples per component with --no-use_mean")
    model = p.add_argument_group("prior network and diffusion")
    model.add_argument("--model_width", type=int, default=2048)
    model.add_argument("--model_layers", type=int, default=8)
    model.add_argument("--model_num_heads", type=int, default=32)
    model.add_argument("--model_dim_head", type=int, default=64)
    model.add_argument("--noise_schedule", default="linear", choices=tuple(SCHEDULES))
    model.add_argument("--beta_min", type=float, default=1e-4)
    model.add_argument("--beta_max", type=float, default=0.02)
    model.add_argument("--p2_gamma", type=float, default=1.0, help="P2 weight 1/(1+SNR)^gamma (k = 1)")
    model.add_argument("--empty_t5_prob", type=float, default=0.1, help="CFG dropout of the text states (zeroed)")
    model.add_argument("--empty_clip_prob", type=float, default=0.0, help="CFG dropout of the CLIP text embedding")
    add_diffusion_loss_args(p, prediction_type=False)  # the prior predicts x0 (the reference's choice)
    add_train_args(p, defaults=DEFAULTS)
    return p


def load_training_data(args):
    """``(tensors, clip_names, block_dims, text_encoder_name)`` from a cache or an image folder."""
    from common.data_sources import SOURCE_FLAGS, check_data_source
    from shifted.embeddings import load_embedding_cache

    if args.cache and any(getattr(args, flag, None) for flag in SOURCE_FLAGS):
        raise UserError("pass either --cache (extract_embeddings.py) or a data source (--train_data_dir, "
                        "--dataset_name, --train_shards), not both")
    if not args.cache:
        check_data_source(args)
    if args.cache:
        tensors, meta = load_embedding_cache(args.cache)
        if "text_emb" not in tensors or "text_states" not in tensors:
            raise UserError(f"the cache {args.cache} holds no captions (made with --no_text): the prior needs "
                            "text_emb and text_states, re-run extract_embeddings.py without --no_text")
        if args.clip:
            from shifted.bank import check_clip_models
            from shifted.checkpoint import model_name
            from shifted.cli import clip_paths

            check_clip_models(meta["clip_models"], [model_name(p) for p in clip_paths(args)],
                              f"the embedding cache {args.cache}")
        tensors = {k: tensors[k] for k in ("image_emb", "text_emb", "text_states")}
        return tensors, list(meta["clip_models"]), list(meta["block_dims"]), meta.get("text_encoder") or "unknown"
    from common.data_sources import training_dataset
    from shifted.checkpoint import load_clip_models, load_text_states
    from shifted.cli import clip_paths, text_states_path
    from shifted.data import clip_resolution, embed_folder

    clip = load_clip_models(clip_paths(args))
    states = load_text_states(text_states_path(args), args.t5_max_length)
    dataset = training_dataset(args, clip_resolution(clip))
    tensors, _, _ = embed_folder(clip, dataset, text_states=states, progress=True)
    return tensors, list(clip.names), list(clip.block_dims), states.name


def load_bank(args, clip_names, dim, block_dims=None):
    import torch

    from shifted.bank import GaussianBank

    if args.no_bank:
        if args.bank or args.mean_path or args.std_path:
            raise UserError("--no_bank trains the baseline without a bank: drop --bank / --mean_path (or --no_bank)")
        return None
    if bool(args.mean_path) != bool(args.std_path) or (args.bank and args.mean_path):
        raise UserError("pass either --bank, or both --mean_path and --std_path (the reference's statistics files)")
    if not args.bank and not args.mean_path:
        raise UserError("--bank is required (fit_bank.py), or pass --no_bank to train the unshifted baseline")
    from common.io import require_file

    if args.mean_path:
        from common.io import safe_torch_load

        tensors = []
        for path in (args.mean_path, args.std_path):
            value = safe_torch_load(require_file(path, "statistics file"))
            if not isinstance(value, torch.Tensor) or value.numel() % dim:
                raise UserError(f"{path} must hold one tensor of K x {dim} values (the bank's means or stds)")
            tensors.append(value.float().reshape(-1, dim))
        bank = GaussianBank(tensors[0], tensors[1], 5.0 if args.std_scale is None else args.std_scale,
                            clip_models=clip_names, block_dims=block_dims)
    else:
        bank = GaussianBank.load(require_file(args.bank, "--bank file"), clip_models=clip_names)
    bank.check_embedding_dim(dim, f"the training embeddings (CLIP models {clip_names})")
    if args.size is not None:
        if not 1 <= args.size <= bank.size:
            raise UserError(f"--size {args.size} is not in 1..{bank.size} (the bank's number of Gaussians)")
        bank = GaussianBank(bank.mean[: args.size], bank.std[: args.size], float(bank.std_scale),
                            clip_models=bank.clip_models, block_dims=bank.block_dims, similarity=bank.similarity)
    if args.std_scale is not None:
        if args.std_scale <= 0:
            raise UserError(f"--std_scale must be > 0, got {args.std_scale}")
        bank.std_scale.fill_(args.std_scale)
    return bank


def check_args(args) -> None:
    from common.diffusion_loss import check_diffusion_loss_args
    from shifted.cli import check_positive, check_probability

    for name in ("model_width", "model_layers", "model_num_heads", "model_dim_head", "sample_num", "t5_max_length"):
        check_positive(name, getattr(args, name))
    check_probability("empty_t5_prob", args.empty_t5_prob)
    check_probability("empty_clip_prob", args.empty_clip_prob)
    if not 0 < args.beta_min < args.beta_max < 1:
        raise UserError(f"need 0 < --beta_min < --beta_max < 1, got {args.beta_min} and {args.beta_max}")
    check_diffusion_loss_args(args)
    if args.noise_offset:
        raise UserError("--noise_offset does not apply to the prior: it diffuses CLIP embedding vectors, which have no "
                        "pixels for a per-channel offset to be constant over (it would only inflate the noise): drop it")


def make_validation(tensors, bank, block_dims, n: int = 64):
    """Mean per-CLIP-block cosine of 8-step prior samples to the paired image embeddings (first n pairs)."""
    import torch

    from shifted.embeddings import mean_block_cosine
    from shifted.pipeline import sample_prior

    n = min(n, len(tensors["image_emb"]))
    image, text, states = (tensors[k][:n] for k in ("image_emb", "text_emb", "text_states"))

    def validate(step, models):
        prior = models["prior"]
        was_training = prior.training
        prior.eval()
        out = sample_prior(prior, bank, text, states, generator=torch.Generator().manual_seed(0))
        prior.train(was_training)
        return {"val_cosine_to_image": float(mean_block_cosine(out.cpu(), image, block_dims).mean())}

    return validate


@cli_entry
def main(argv=None) -> int:
    from common.train import Trainer, config_from_args, parse_args_with_config
    from shifted.embeddings import EmbeddingDataset
    from shifted.pipeline import save_prior
    from shifted.prior import ShiftedPrior
    from shifted.training import PriorObjective

    parser = build_parser()
    args = parse_args_with_config(parser, argv)
    check_args(args)
    config = config_from_args(args)
    # every input is read and checked before the trainer creates --output_dir: bad input writes nothing
    tensors, clip_names, block_dims, text_encoder = load_training_data(args)
    bank = load_bank(args, clip_names, tensors["image_emb"].shape[1], block_dims)
    _, text_len, text_dim = tensors["text_states"].shape
    prior_kwargs = dict(
        emb_dim=int(tensors["image_emb"].shape[1]), text_dim=int(text_dim), text_len=int(text_len),
        width=args.model_width, layers=args.model_layers, heads=args.model_num_heads, dim_head=args.model_dim_head,
        use_bank_token=bank is not None, clip_models=clip_names, clip_dims=block_dims, text_encoder=text_encoder,
        num_train_timesteps=1000, beta_schedule=SCHEDULES[args.noise_schedule], beta_start=args.beta_min,
        beta_end=args.beta_max,
    )
    with Trainer(config) as trainer:
        prior = ShiftedPrior(**prior_kwargs)
        objective = PriorObjective(
            prior, bank, empty_text_prob=args.empty_t5_prob, empty_clip_prob=args.empty_clip_prob,
            p2_gamma=args.p2_gamma, select_mode="mean" if args.use_mean else "sample", select_samples=args.sample_num,
            snr_gamma=args.snr_gamma,
        )
        n_params = sum(p.numel() for p in prior.parameters())
        kind = f"shifted (K={bank.size})" if bank is not None else "baseline (no bank)"
        print(f"prior: {n_params:,} parameters; {kind}; "
              f"{len(tensors['image_emb'])} training pairs; CLIP {clip_names}; text states {text_encoder}")
        result = trainer.fit(objective.models, objective, EmbeddingDataset(tensors),
                             validation_fn=make_validation(tensors, bank, block_dims))
        if trainer.is_main_process and result.completed:
            out = save_prior(Path(config.output_dir), result.models["prior"].eval(), bank,
                             beside_existing=True)  # load_prior(output_dir) loads it
            print(f"prior saved to {out} (final loss {result.loss_history[-1]:.4g})")
    return result.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
