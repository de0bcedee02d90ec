"""The shared diffusion core: one schedule, one process, one set of samplers, one trainer.

Method packages (contextdiff, shifted, codiff, sdg, versatile) import from here; nothing here imports a method.
"""
