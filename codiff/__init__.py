"""Collaborative Diffusion (CVPR'23): dynamic diffusers over uni-modal models. Implementation lands with its issue."""
