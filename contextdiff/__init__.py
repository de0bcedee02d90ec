"""ContextDiff (ICLR'24): cross-modal contextualized diffusion. Implementation lands with its issue."""
