"""Shifted Diffusion (Zhou et al., CVPR 2023, "Corgi"): a CLIP-image-embedding prior whose diffusion is shifted
towards a Gaussian bank of embedding statistics, and Stable Diffusion conditioned on image embeddings.

Modules: ``bank`` (Gaussian bank, fit_bank), ``process`` (the bank's Shift on the core), ``prior`` (the causal
transformer), ``embeddings`` (multi-CLIP, text states, cache), ``adapter`` (image embedding -> SD tokens),
``pipeline`` (sampling, training loss, save/load), ``config``, ``release`` (the authors' released files).
See ``METHOD.md``.
"""
