"""ContextDiff stage 2: fine-tune the diffusion model with the trained stage-1 adapter loaded and used.

    python scripts/contextdiff/finetune_diffusion.py --config configs/contextdiff/finetune_diffusion_tiny.yaml \\
        --adapter_path outputs/contextdiff/stage1 --train_data_dir data/digits/train \\
        --output_dir outputs/contextdiff/stage2

The adapter (``--adapter_path``: stage 1's output_dir or its ``adapter/``) is checked against the model (latent
channels, latent size vs patch, text width) before anything is written, frozen, and defines x_t and the target the
UNet is fine-tuned on; its ``process.json`` supplies the default k_t schedule and parameterisation. (The released
``finetune_diffusion.py`` never loaded the adapter.) Writes the ContextDiff checkpoint folder at ``<output_dir>``
itself (a diffusers Stable Diffusion folder + ``adapter/`` + ``contextdiff.json``, beside the run's checkpoints), so
``StableDiffusionPipeline.from_pretrained(output_dir)`` loads it and ``scripts/sample.py --method contextdiff
--checkpoint <output_dir>`` samples it. Logic: ``contextdiff/training.py``.
"""




from common.errors import cli_entry  # noqa: E402


@cli_entry
def main(argv=None) -> int:
    from contextdiff.training import main as run_stage

    return run_stage(2, argv)


if __name__ == "__main__":
    raise SystemExit(main())
