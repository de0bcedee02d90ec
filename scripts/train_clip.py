"""Train an open_clip CLIP (from a model config, with the real bundled tokenizer) on image-caption pairs.

    python scripts/train_clip.py --config configs/baseline/clip.yaml --train_data_dir data/digits/train \\
        --output_dir outputs/tiny/clip_run

Loss: the symmetric InfoNCE of CLIP (Radford et al. 2021) with a learned temperature (open_clip's ``ClipLoss``).
Writes, into ``--output_dir`` itself (beside the trainer's ``checkpoint-<step>/``), open_clip's local folder layout (``open_clip_config.json`` + ``open_clip_model.safetensors``, loadable with
``common.models.load_open_clip(folder)``) and, in ``text_encoder/`` + ``tokenizer/``, the text tower converted to a
transformers ``CLIPTextModelWithProjection`` for Stable-Diffusion-layout pipelines. ``--save_dtype float16`` keeps
the committed tiny checkpoint small (the 49,408-token embedding dominates it). Validation (``--validation_steps``, and
at the end): zero-shot retrieval on the first ``--num_validation_pairs`` training pairs (top-1 accuracy of the
matching caption among theirs) and their image-text similarity matrix as a figure in ``validation/step-<step>/``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common.errors import cli_entry  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from common.data import add_image_augmentation_args
    from common.data_sources import add_dataset_args
    from common.train import add_train_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="YAML of flag defaults (command-line flags win)")
    add_dataset_args(p)
    p.add_argument("--model_config", default=None, help="open_clip model config JSON (default: configs/tiny's)")
    p.add_argument("--save_dtype", default="float32", choices=("float32", "float16"))
    p.add_argument("--num_validation_pairs", type=int, default=32,
                   help="training pairs of the zero-shot retrieval validation (0: no validation)")
    add_image_augmentation_args(p)
    add_train_args(p, defaults={"learning_rate": 1e-3, "train_batch_size": 128, "lr_warmup_steps": 100,
                                "checkpointing_steps": 1000, "validation_steps": 100000, "report_to": "none",
                                "tracker_project_name": "train_clip", "adam_weight_decay": 0.1})
    return p


class ContrastiveCLIP(torch.nn.Module):
    """``(images, token ids) -> InfoNCE loss`` in one forward, so DDP sees every parameter used."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.model = model
        # pixels arrive in [-1, 1]; CLIP wants its own normalisation (the same open_clip's preprocess applies)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images, ids):
        from open_clip.loss import ClipLoss

        out = self.model(((images + 1) / 2 - self.mean) / self.std, ids)
        image_features, text_features, logit_scale = out[:3]
        return ClipLoss()(image_features, text_features, logit_scale)

    def similarity(self, images, ids):
        """Cosine similarities ``[images, texts]`` of the normalised embeddings."""
        out = self.model(((images + 1) / 2 - self.mean) / self.std, ids)
        return out[0] @ out[1].T


def similarity_figure(sim: torch.Tensor, cell: int = 4) -> torch.Tensor:
    """A similarity matrix as an image ``[3, N*cell, N*cell]`` in [0, 1] (cosine -1 black .. 1 white)."""
    grey = ((sim.clamp(-1, 1) + 1) / 2).repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    return grey.unsqueeze(0).expand(3, -1, -1).contiguous()


@cli_entry
def main(argv=None) -> int:
    import open_clip

    from common.data_sources import check_data_source, training_dataset
    from common.models import create_open_clip, save_open_clip_folder
    from common.train import Trainer, config_from_args, parse_args_with_config

    parser = build_parser()
    args = parse_args_with_config(parser, argv)
    check_data_source(args)
    repo = Path(__file__).resolve().parent.parent
    model_config = Path(args.model_config or repo / "configs" / "tiny" / "tiny-open-clip.json")
    config = config_from_args(args)
    with Trainer(config) as trainer:
        model, name, preprocess_cfg = create_open_clip(model_config)
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        tokenizer = open_clip.get_tokenizer(name)
        dataset = training_dataset(args, size, center_crop=args.center_crop, random_flip=args.random_flip)

        def collate(items):
            return {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
                    "input_ids": tokenizer([it["text"] for it in items])}

        def loss_fn(batch, ctx):
            return ctx.models["clip"](batch["pixel_values"].to(ctx.device), batch["input_ids"].to(ctx.device))

        mean = preprocess_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = preprocess_cfg.get("std", open_clip.OPENAI_DATASET_STD)
        pairs = min(max(args.num_validation_pairs, 0), len(dataset))

        def validate(step, models):
            batch = collate([dataset[i] for i in range(pairs)])
            with torch.no_grad():
                sim = models["clip"].similarity(batch["pixel_values"].to(trainer.device),
                                                batch["input_ids"].to(trainer.device)).float().cpu()
            top1 = float((sim.argmax(dim=1) == torch.arange(pairs)).float().mean())
            return {"zero_shot_top1": top1, "similarity": similarity_figure(sim)}

        result = trainer.fit({"clip": ContrastiveCLIP(model, mean, std)}, loss_fn, dataset, collate_fn=collate,
                             validation_fn=validate if pairs else None)
        if trainer.is_main_process and result.completed:
            model = result.models["clip"].model.eval()
            model_cfg = json.loads(model_config.read_text())
            dtype = torch.float16 if args.save_dtype == "float16" else torch.float32
            save_open_clip_folder(model, model_cfg, preprocess_cfg, Path(config.output_dir), dtype)
            print(f"CLIP saved to {config.output_dir} (open_clip layout + text_encoder/ + tokenizer/)")
    return result.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
