"""Versatile Diffusion (Xu et al., ICCV 2023): one multi-flow diffuser for text, images and their variations.

Modules (see ``METHOD.md`` for the paper -> code map):

- ``versatile.multiflow``: ``MultiFlowDiffuser`` (global / data / context layer groups on one layer sequence),
  ``FLOWS`` (t2i, iv, i2t, tv, dual), ``Context``, ``layer_plan``, ``count_parameters``, ``build_diffuser``.
- ``versatile.layers``: ``LinearMultiDim``, ``FlatResBlock``, ``ImageHead``, ``TextHead``.
- ``versatile.context``: ``ClipTextContext``, ``ClipImageContext``, ``ContextEncoders`` (normalised CLIP contexts,
  unconditional contexts); ``OpenClipTextContext``, ``OpenClipImageContext``, ``open_clip_contexts`` (the same on
  open_clip towers, e.g. the project's tiny CLIP).
- ``versatile.text_vae``: ``OptimusVAE`` (BERT -> latent, GPT-2 with latent injection), ``word_tokenizer``.
- ``versatile.pipeline``: ``VersatilePipeline`` (every flow on ``common.samplers.sample_ddim`` with CFG).
- ``versatile.training``: ``flow_loss``, ``multiflow_loss``, ``param_groups``, ``FlowSampler``, ``drop_context``.
- ``versatile.convert``: released checkpoint layouts ([R0], [R], diffusers hub, SD v1 UNet) <-> ours, strictly.
- ``versatile.config`` / ``versatile.tiny``: flat YAML configs (``configs/versatile``) and tiny random stacks
  (plus tiny random tower folders and digits samples for smoke runs).
- ``versatile.checkpoint``: our folder (``versatile.json`` + ``diffuser/``), tower loading, trained-flow checks.
- ``versatile.flows_cli`` / ``versatile.sample_cli``: input checks of the scripts; ``scripts/sample.py --method
  versatile``.

Nothing is imported here, so ``import versatile`` stays cheap.
"""
