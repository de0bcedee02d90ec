"""Versatile Diffusion (ICCV'23): one multi-flow diffuser. Implementation lands with its issue."""
