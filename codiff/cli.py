"""Command-line flags of the generation script, named as in the released ``generate.py``.

The released script declares its four switches with ``type=bool``, so ``--save_z False`` switches saving ON
(the released ``type=bool``). Here they are real booleans (``--save_z`` / ``--no-save_z``; ``--save_z 0`` is an error). The
released sampler's mask re-weighting is off by default (the learned maps as trained) and one flag away:
``--released_reweighting`` (mask x2, cosine decay), with ``--mask_schedule`` / ``--mask_scale_factor`` to tune it.

Sampling settings left unset (``--ddim_steps``, ``--eta``, ``--guidance_scale``) come from the checkpoint's
``sampling`` section, else the release's (50 DDIM steps, eta 1, no guidance). ``--weighting`` swaps the learned
influence maps for a fixed combination (``codiff.variants``): one member alone or the equal-weight average.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any, Optional

from codiff.collaborate import SCHEDULES, ReleasedReweighting
from codiff.variants import VARIANTS
from common.limits import add_memory_argument
from common.methods import add_flag


def generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Collaborative Diffusion: generate from a mask and a text.")
    parser.add_argument("--mask_path", type=str, default=None, help="class-id mask PNG (palette or greyscale)")
    parser.add_argument("--input_text", type=str, default=None, help="text condition")
    parser.add_argument("--config", type=str, default=None, help="YAML of flag defaults (command-line flags win)")
    add_flag(parser, "--checkpoint", "--model_dir", dest="model_dir", type=str, default="ckpt/tiny/codiff",
                        help="collaboration checkpoint folder (codiff.json), from scripts/codiff/train_dynamic.py")
    parser.add_argument("--save_folder", type=str, default="outputs/codiff_generate")
    parser.add_argument("--batch_size", type=int, default=4, help="number of images to generate")
    add_flag(parser, "--num_inference_steps", "--ddim_steps", dest="ddim_steps", type=int, default=None,
             help="number of DDIM steps (default: checkpoint's, 50; the release calls it --ddim_steps)")
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta (default: checkpoint's; the release: 1.0)")
    parser.add_argument("--seed", type=int, default=None, help="seed (the release sets none)")
    parser.add_argument("--guidance_scale", type=float, default=None,
                        help="classifier-free guidance per member (extension; 1 = none as in the paper; default: the "
                             "checkpoint's)")
    parser.add_argument("--weighting", choices=VARIANTS, default="collaborative",
                        help="collaborative = learned influence maps; average = fixed equal weights (Composable "
                             "Diffusion); mask_only / text_only = one member alone")
    parser.add_argument("--map_upscale", type=int, default=4,
                        help="nearest upscaling of the latent-resolution influence maps in the saved grids")
    bool_flag = argparse.BooleanOptionalAction
    parser.add_argument("--save_z", action=bool_flag, default=False, help="save the final latent as an image")
    parser.add_argument("--return_influence_function", action=bool_flag, default=False,
                        help="save the influence maps of every step, one grid per modality")
    parser.add_argument("--display_x_inter", action=bool_flag, default=False,
                        help="save the decoded intermediate latents and x0 predictions of every step")
    parser.add_argument("--save_mixed", action=bool_flag, default=False,
                        help="save the image blended with the mask (mask consistency at a glance)")
    parser.add_argument("--released_reweighting", action=bool_flag, default=False,
                        help="the released sampler's inference-only mask re-weighting (x2, cosine decay)")
    parser.add_argument("--mask_schedule", choices=SCHEDULES, default=None,
                        help="schedule of the re-weighting (default: the config's, or cosine_decay if released)")
    parser.add_argument("--mask_scale_factor", type=float, default=None, help="mask weight multiplier")
    parser.add_argument("--softmax_twice", action=bool_flag, default=False)
    parser.add_argument("--boost_factor", type=float, default=1.0)
    parser.add_argument("--device", type=str, default="cpu")
    add_memory_argument(parser)
    return parser


def reweighting_from_args(
    args: argparse.Namespace, sampling: Optional[Mapping[str, Any]] = None
) -> Optional[ReleasedReweighting]:
    """The re-weighting the flags ask for: flags override ``--released_reweighting``, which overrides the config's
    ``sampling`` section; None when the result is the identity (plain softmax)."""
    sampling = dict(sampling or {})
    schedule = sampling.get("mask_schedule", "none") or "none"
    scale = float(sampling.get("mask_scale_factor", 1.0))
    if args.released_reweighting:
        schedule, scale = "cosine_decay", 2.0
    if args.mask_schedule is not None:
        schedule = args.mask_schedule
    if args.mask_scale_factor is not None:
        scale = args.mask_scale_factor
    rw = ReleasedReweighting(
        tuple(sampling.get("emphasised", ("mask",))), scale, schedule, args.softmax_twice, args.boost_factor
    )
    return None if rw.is_identity else rw
