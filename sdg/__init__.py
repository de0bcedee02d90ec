"""SDG (WACV'23): semantic diffusion guidance with a noise-aware CLIP. Implementation lands with its issue."""
