"""Train a tiny text-conditioned UNet plus a projection for a few steps through common/train.py, on whatever engine
the launcher selected, and check what a sharded run must get right (scripts/ci/gpu_check.sh runs it under DDP,
FSDP1, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3).

Two trainable modules (a diffusers UNet2DConditionModel, whose BasicTransformerBlock / ResnetBlock2D FSDP wraps,
and a linear projection of the conditioning, as Shifted Diffusion's finetune and ContextDiff's adapter train), one
checkpoint, a stop and an exact resume, validation on gathered weights, and an export that reloads with
``from_pretrained``. Exit code 0 and a last line ``engine check passed: <engine>`` when everything holds.

    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 scripts/ci/engine_step.py \\
        --output_dir /tmp/engine-fsdp --expect FSDP
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from common.errors import cli_entry
from common.train import TrainConfig, Trainer


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )  # fmt: skip


def train(output_dir: str, steps: int, stop_at: int, resume: str | None, mixed_precision: str | None):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 4, 8, 8, generator=g), torch.randn(64, 3, 16, generator=g))
    validations: list[float] = []
    config = TrainConfig(output_dir=output_dir, seed=0, train_batch_size=4, max_train_steps=steps,
                         learning_rate=1e-3, lr_warmup_steps=0, checkpointing_steps=2, validation_steps=2,
                         report_to="none", resume_from_checkpoint=resume, mixed_precision=mixed_precision)  # fmt: skip
    with Trainer(config) as trainer:
        torch.manual_seed(0)
        unet, projection = build_unet(), nn.Linear(16, 32)

        def loss_fn(batch, ctx):
            if ctx.step + 1 == stop_at:
                trainer.request_stop()
            latents, text = batch
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (latents.shape[0],), device=latents.device)
            states = ctx.models["projection"](text)
            pred = ctx.models["unet"](latents + noise, t, encoder_hidden_states=states).sample
            return nn.functional.mse_loss(pred.float(), noise.float())

        def validate(step, models):  # main process, gathered full modules
            with torch.no_grad():
                out = models["unet"](torch.zeros(1, 4, 8, 8, device=trainer.device), 10,
                                     encoder_hidden_states=models["projection"](torch.zeros(1, 3, 16, device=trainer.device))).sample  # fmt: skip
            validations.append(float(out.float().abs().mean()))
            return {"output_abs_mean": validations[-1]}

        result = trainer.fit({"unet": unet, "projection": projection}, loss_fn, data, validation_fn=validate)
        record = {"engine": trainer.engine.kind, "describe": trainer.engine_description, "step": result.global_step,
                  "completed": result.completed, "history": result.loss_history, "validations": validations}  # fmt: skip
        if trainer.is_main_process and result.completed:
            result.models["unet"].save_pretrained(Path(output_dir) / "unet")
            record["unet_sum"] = float(sum(p.double().sum() for p in result.models["unet"].parameters()))
            torch.save(result.models["projection"].state_dict(), Path(output_dir) / "projection.pt")
        if trainer.is_main_process:
            (Path(output_dir) / f"record-{stop_at}.json").write_text(json.dumps(record))
    return result, record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--expect", required=True, choices=["DDP", "FSDP", "DeepSpeed", "plain"])
    parser.add_argument("--phase", choices=["stop", "resume"], required=True)
    parser.add_argument("--mixed_precision", default=None)
    args = parser.parse_args(argv)
    if args.phase == "stop":  # 3 steps: checkpoint and validation at 2, stop requested at 3 (checkpoint-3)
        result, record = train(args.output_dir, 4, 3, None, args.mixed_precision)
        assert record["engine"] == args.expect, f"expected {args.expect}, accelerate runs {record['describe']}"
        assert (result.global_step, result.completed) == (3, False), record
        assert (Path(args.output_dir) / "checkpoint-3" / "manifest.json").is_file()
        return 0
    result, record = train(args.output_dir, 4, 0, "latest", args.mixed_precision)
    assert record["engine"] == args.expect and result.completed and result.global_step == 4, record
    assert len(record["history"]) == 1 and all(v == v for v in record["history"]), record  # resumed at 3, finite
    if "unet_sum" in record:
        from diffusers import UNet2DConditionModel

        reloaded = UNet2DConditionModel.from_pretrained(Path(args.output_dir) / "unet")
        total = float(sum(p.double().sum() for p in reloaded.parameters()))
        assert abs(total - record["unet_sum"]) < 1e-6 * max(1.0, abs(total)), (total, record["unet_sum"])
        print(f"engine check passed: {record['describe']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli_entry(main)())
