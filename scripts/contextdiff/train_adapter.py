"""ContextDiff stage 1: train the relational adapter r_phi(x0, c) on image-caption data.

    python scripts/contextdiff/train_adapter.py --config configs/contextdiff/train_adapter_tiny.yaml \\
        --train_data_dir data/digits/train --output_dir outputs/contextdiff/stage1

    accelerate launch scripts/contextdiff/train_adapter.py --pretrained_model_name_or_path PATH/TO/SD \\
        --adapter_config configs/contextdiff/paper.yaml --train_data_dir DATA --resolution 512 \\
        --train_batch_size 16 --learning_rate 1e-4 --max_train_steps 50000 --mixed_precision bf16 \\
        --k_schedule quadratic --parameterization shifted_eps --freeze_unet --output_dir out/stage1

The UNet stays frozen by default (``--no-freeze_unet``: joint training); gradients reach the adapter THROUGH x_t
(``--detach_xt`` reproduces the released code's bug, parity only). Writes ``<output_dir>/adapter/`` (safetensors,
config.json, process.json) and, with ``--no-freeze_unet``, the ContextDiff checkpoint folder at ``<output_dir>`` itself.
Logic: ``contextdiff/training.py``.
"""




from common.errors import cli_entry  # noqa: E402


@cli_entry
def main(argv=None) -> int:
    from contextdiff.training import main as run_stage

    return run_stage(1, argv)


if __name__ == "__main__":
    raise SystemExit(main())
