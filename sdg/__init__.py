"""SDG (Liu et al., WACV 2023): semantic diffusion guidance with a noise-aware CLIP, on the shared core.

- ``sdg.noisy_clip``: the timestep-aware CLIP image encoder (FiLM on every norm layer; ResNet and ViT towers).
- ``sdg.scores``: language / content / style energies and ``SemanticGuidance``, the core's guidance hook.
- ``sdg.pipeline``: ``sample_sdg`` (DDPM, learned-range variance, x0 clipped) and ``encode_text``.
- ``sdg.finetune``: ``NoisyClipLoss``, the caption-free contrastive fine-tuning objective for the shared trainer.
- ``sdg.adm`` / ``sdg.convert``: guided-diffusion flags -> diffusers ``UNet2DModel``; checkpoint converters.
- ``sdg.tiny``: tiny models for tests and the digits demo. See ``sdg/METHOD.md`` for the equations.
"""
