"""Collaborative Diffusion (Huang et al., CVPR 2023): dynamic diffusers weight frozen uni-modal models per pixel.

Modules (see ``codiff/METHOD.md``): ``conditions`` (masks and prompts -> tokens), ``dynamic`` (dynamic diffusers,
influence maps), ``collaborate`` (the collaboration as a core denoiser), ``losses`` (training objectives),
``pipeline`` (generation and the released outputs), ``edit`` (Imagic per modality, then collaboration),
``config`` / ``cli`` (configs, model builders, generate flags), ``text_encoder`` (the paper's LDM text encoder),
``tiny`` (tiny random collaborations).
"""
