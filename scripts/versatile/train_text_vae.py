"""Train the Optimus-like text VAE of Versatile Diffusion on captions (VD §3.4), with the shared trainer.

    python scripts/versatile/train_text_vae.py --config configs/versatile/text_vae_digits.yaml

Objective: Optimus' beta-VAE loss, token cross-entropy of the GPT-2 decoder given ``z = mu + sigma * eps`` plus
``beta * KL(q(z|x) || N(0, I))``. Over ``--beta_warmup_steps`` both the KL weight and the reparameterisation noise
ramp up linearly from 0 (a plain autoencoder first, so the decoder learns to read the latent before the noise
and the KL could teach it to ignore it: posterior collapse); ``--free_bits`` is Optimus' per-dimension KL
threshold, the other guard against collapse. Architecture and tokenizer come from a versatile config
(``--model_config``: the ``optimus_*`` keys and ``text_latent_dim``). The folder written to ``--save_to`` (default
``<output_dir>`` itself) holds config, weights and both tokenizers (``versatile.text_vae.load_text_vae``), with
``optimus_scaling_factor = 1 / std(mu)`` over the training captions so the diffuser sees unit-scale latents
(VD itself uses 1.0). ``eval.json`` beside the weights scores round trips on ``--eval_data_dir``:
exact sentence match, and the digit / colour words read back with ``common.judge.parse_prompt``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common.errors import UserError, cli_entry  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from common.train import add_train_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="YAML of flag defaults (command-line flags win)")
    p.add_argument("--model_config", default="digits",
                   help="versatile config (name under configs/versatile or a YAML path): optimus_* and text_latent_dim")
    p.add_argument("--train_data_dir", default=None, help="folder with metadata.jsonl (its caption column is used)")
    p.add_argument("--eval_data_dir", default=None, help="folder with metadata.jsonl to score round trips on")
    p.add_argument("--caption_column", default="text")
    p.add_argument("--beta", type=float, default=0.5, help="KL weight of the beta-VAE objective")
    p.add_argument("--beta_warmup_steps", type=int, default=0,
                   help="linear warm-up of the KL weight and of the latent noise from 0 over these steps")
    p.add_argument("--free_bits", type=float, default=0.0, help="per-dimension KL threshold (Optimus dim_target_kl)")
    p.add_argument("--save_to", default=None, help="folder for the trained text VAE (default: --output_dir itself)")
    p.add_argument("--eval_samples", type=int, default=200, help="captions scored in eval.json (0: skip)")
    add_train_args(p, defaults={"learning_rate": 1e-3, "train_batch_size": 64, "lr_warmup_steps": 100,
                                "report_to": "none", "tracker_project_name": "versatile_text_vae",
                                "checkpointing_steps": 100000, "validation_steps": 100000})
    return p


def read_captions(folder, column: str = "text") -> list[str]:
    """Every non-empty caption of ``folder/metadata.jsonl``."""
    path = Path(folder) / "metadata.jsonl"
    if not path.is_file():
        raise UserError(f"{path} does not exist: pass a folder with metadata.jsonl (e.g. data/digits/train, "
                        "built by `python scripts/make_digits.py --output_dir data/digits`)")
    from common.data import read_jsonl_rows

    captions = [row[column] for row in read_jsonl_rows(path)
                if isinstance(row.get(column), str) and row[column].strip()]
    if not captions:
        raise UserError(f"{path} has no '{column}' captions: pass --caption_column")
    return captions


class Captions(torch.utils.data.Dataset):
    def __init__(self, captions: list[str]):
        self.captions = captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        return {"text": self.captions[i], "index": i}


def collate(items: list[dict]) -> dict:
    return {"text": [it["text"] for it in items], "index": torch.tensor([it["index"] for it in items])}


@torch.no_grad()
def latent_std(vae, captions: list[str], batch: int = 256) -> float:
    """Standard deviation of the posterior means over ``captions`` (all dimensions pooled)."""
    mus = torch.cat([vae.encode(captions[i : i + batch]) for i in range(0, len(captions), batch)])
    return float(mus.float().std())


@torch.no_grad()
def round_trip_scores(vae, captions: list[str], seed: int = 0) -> dict:
    """Encode -> decode (greedy and temperature 1) on ``captions``: exact matches and parsed digit / colour words."""
    from common.judge import parse_prompt

    mu = vae.encode(captions)
    out = {"count": len(captions)}
    for name, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        texts = vae.decode(mu, temperature=temperature, generator=torch.Generator().manual_seed(seed))
        pairs = [(parse_prompt(src), parse_prompt(dst)) for src, dst in zip(captions, texts)]
        out[f"{name}_exact"] = sum(a.lower().split() == b.split() for a, b in zip(captions, texts)) / len(captions)
        out[f"{name}_digit"] = sum(s[0] == d[0] for s, d in pairs) / len(pairs)
        out[f"{name}_color"] = sum(s[1] == d[1] for s, d in pairs) / len(pairs)
        out[f"{name}_examples"] = [[c, t] for c, t in list(zip(captions, texts))[:5]]
    return out


@cli_entry
def main(argv=None) -> int:
    import dataclasses

    from common.train import Trainer, config_from_args, parse_args_with_config
    from versatile.config import VersatileConfig
    from versatile.text_vae import build_text_vae, save_text_vae

    parser = build_parser()
    args = parse_args_with_config(parser, argv)
    if not args.train_data_dir:
        raise UserError("--train_data_dir is required: a folder with metadata.jsonl captions")
    for name in ("beta", "free_bits"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.beta_warmup_steps < 0:
        raise UserError(f"--beta_warmup_steps must be >= 0, got {args.beta_warmup_steps}")
    model_config = VersatileConfig.load(args.model_config)
    captions = read_captions(args.train_data_dir, args.caption_column)
    eval_captions = read_captions(args.eval_data_dir, args.caption_column) if args.eval_data_dir else captions
    config = config_from_args(args)
    save_to = Path(args.save_to) if args.save_to else Path(config.output_dir)
    with Trainer(config) as trainer:
        vae = build_text_vae(model_config.text_vae, model_config.diffuser.text_latent_dim, seed=config.seed or 0)
        vae.train()

        def loss_fn(batch, ctx):
            warm = args.beta_warmup_steps
            ramp = min(1.0, ctx.step / warm) if warm else 1.0
            model = ctx.models["text_vae"]
            model = getattr(model, "module", model)  # the loss is a method, not forward: call the unwrapped module
            loss, logs = model.reconstruction_loss(batch["text"], beta=args.beta * ramp, free_bits=args.free_bits,
                                                   noise_scale=ramp)
            return {"loss": loss, **logs, "beta": args.beta * ramp}

        result = trainer.fit({"text_vae": vae}, loss_fn, Captions(captions), collate_fn=collate)
        if trainer.is_main_process and result.completed:
            vae = result.models["text_vae"].eval()
            std = latent_std(vae, captions)
            vae.config = dataclasses.replace(vae.config, optimus_scaling_factor=1.0 / max(std, 1e-6))
            scores = {}
            if args.eval_samples:
                scores = round_trip_scores(vae, eval_captions[: args.eval_samples], seed=config.seed or 0)
            scores.update({"latent_std": std, "optimus_scaling_factor": vae.config.optimus_scaling_factor,
                           "steps": result.global_step})
            save_text_vae(vae, save_to, beside_existing=save_to.resolve() == Path(config.output_dir).resolve())
            (save_to / "eval.json").write_text(json.dumps(scores, indent=2))
            summary = {k: v for k, v in scores.items() if not k.endswith("examples")}
            print(f"text VAE saved to {save_to}: {json.dumps(summary)}")
    return result.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
