"""ContextDiff (ICLR 2024): cross-modal contextualized diffusion on the shared core (see ``contextdiff/METHOD.md``).

- ``contextdiff.adapter``: the relational network r_phi(x0, c) (cross-attention, zero-init output), save / load;
- ``contextdiff.process``: the contextual ``Shift`` for the core samplers, the shifted-eps -> x0 wrapper, the loss;
- ``contextdiff.pipeline``: ``generate`` (DDPM / DDIM, CFG then one shift) and ``invert`` (contextualized DDIM);
- ``contextdiff.config``: ``configs/contextdiff/*.yaml`` -> parts and parameter counts;
- ``contextdiff.checkpoint``: checkpoint folders (SD folder + ``adapter/`` + ``contextdiff.json``), save / load;
- ``contextdiff.training``: stage 1 / stage 2 training programs (``scripts/contextdiff/*.py``);
- ``contextdiff.sample_cli``: ``scripts/sample.py --method contextdiff`` and ``evaluate_digits``.
"""
