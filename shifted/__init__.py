"""Shifted Diffusion (CVPR'23): shifted embedding prior. Implementation lands with its issue."""
