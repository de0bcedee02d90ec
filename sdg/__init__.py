"""SDG (Liu et al., WACV 2023): semantic diffusion guidance with a noise-aware CLIP, on the shared core.

- ``sdg.noisy_clip``: the timestep-aware CLIP image encoder (FiLM on every norm layer; ResNet and ViT towers).
- ``sdg.scores``: language / content / style energies and ``SemanticGuidance``, the core's guidance hook.
- ``sdg.pipeline``: ``sample_sdg`` (DDPM, learned-range variance, x0 clipped) and ``encode_text``.
- ``sdg.clip_training``: ``NoisyClipLoss``, the caption-free contrastive fine-tuning objective for the shared trainer.
- ``sdg.adm`` / ``sdg.convert``: guided-diffusion flags -> diffusers ``UNet2DModel``; checkpoint converters.
- ``sdg.training``: ADM's hybrid loss (L_simple + 0.001 L_vlb) that trains the frozen learn_sigma model SDG guides.
- ``sdg.checkpoint``: SDG folders (``unet/`` + ``adm_flags.json``, ``clip/`` noise-aware CLIP referencing its base).
- ``sdg.data``: reference images, instruction files, in-memory training images.
- ``sdg.digits_eval``: the digits-world probes (zero-shot digit accuracy of E'(x_t, t)).
- ``sdg.sample_cli``: ``scripts/sample.py --method sdg`` and ``evaluate_digits``.
- ``sdg.tiny``: tiny models for tests and the digits demo. See ``sdg/METHOD.md`` for the equations.
"""
