"""Flags shared by the Shifted Diffusion scripts (``scripts/shifted/*.py``) and their checks."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import UserError
from common.methods import add_flag


REPO = Path(__file__).resolve().parent.parent
DEFAULT_CLIP = REPO / "ckpt" / "tiny" / "clip"
DEFAULT_CHECKPOINT = REPO / "ckpt" / "tiny" / "shifted"


def add_clip_args(parser: argparse.ArgumentParser, text_states: bool = True) -> None:
    """``--clip`` (repeatable, concatenation order) and, for the prior's text tokens, ``--t5_model``."""
    parser.add_argument(
        "--clip", action="append", default=None,
        help=f"open_clip model folder; repeat for several CLIPs, concatenated in the order given (the paper: "
             f"ViT-B/16, ViT-B/32, RN101). Default: the shipped tiny CLIP {DEFAULT_CLIP.relative_to(REPO)}")
    if text_states:
        parser.add_argument(
            "--t5_model", "--text_states", dest="t5_model", default=None,
            help="text encoder folder whose per-token states feed the prior (T5 in the paper; a T5 or CLIP "
                 "text_encoder folder). Default: <first --clip>/text_encoder")
        parser.add_argument("--t5_max_length", type=int, default=80,
                            help="text states are padded / truncated to this many tokens (reference: 80)")


def clip_paths(args) -> list[Path]:
    paths = [Path(p) for p in (args.clip or [DEFAULT_CLIP])]
    for path in paths:
        if not path.is_dir():
            raise UserError(f"CLIP folder {path} does not exist: pass --clip with an open_clip folder "
                            "(the shipped one appears in ckpt/tiny/clip once ckpt/tiny/READY exists)")
    return paths


def text_states_path(args) -> Path:
    from shifted.checkpoint import default_text_states

    if args.t5_model:
        path = Path(args.t5_model)
        if not path.is_dir():
            raise UserError(f"--t5_model {path} does not exist: pass a T5 or CLIP text_encoder folder")
        return path
    return default_text_states(clip_paths(args))


def check_positive(name: str, value, minimum=1) -> None:
    if value is not None and value < minimum:
        raise UserError(f"--{name} must be >= {minimum}, got {value}")


def check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise UserError(f"--{name} must lie in [0, 1], got {value}")


def check_new_output(path: Path, what: str = "output") -> None:
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} path {path} is a file: pass a folder path")


def add_prior_sampling_args(parser, prefix: str = "") -> None:
    """The prior sampler's flags (defaults = the consistent process; the released behaviours behind flags)."""
    parser.add_argument(f"--{prefix}respacing", default="8",
                        help="prior sampling steps: a respacing string ('8' = the reference demo, 'ddim25', ...)")
    parser.add_argument(f"--{prefix}sampler", default="ddpm", choices=("ddpm", "ddim"), help="prior sampler")
    parser.add_argument(f"--{prefix}eta", type=float, default=0.0, help="prior DDIM eta")
    parser.add_argument("--prior_guidance", type=float, default=1.0,
                        help="prior classifier-free guidance on x0 (1 = the reference's effective value)")
    parser.add_argument("--guide_half", action="store_true",
                        help="released quirk: guide only the first half of the embedding dimensions")
    parser.add_argument("--prior_noise", default="data_std", choices=("data_std", "zero"),
                        help="zero = the released demo (bank std never loaded: x_T = mu, no noise)")
    parser.add_argument("--posterior_component", default="text", choices=("text", "pred_x0"),
                        help="pred_x0 = the released demo (posterior mean shifted by the component nearest x0_hat)")
    parser.add_argument("--clip_denoised", action="store_true", help="clamp x0_hat to mu +- 3 sigma")


def prior_sampling_kwargs(args, prefix: str = "") -> dict:
    check_respacing(getattr(args, f"{prefix}respacing"))
    if not 0.0 <= getattr(args, f"{prefix}eta") <= 1.0:
        raise UserError(f"--{prefix}eta must lie in [0, 1], got {getattr(args, f'{prefix}eta')}")
    return dict(
        steps=getattr(args, f"{prefix}respacing"), sampler=getattr(args, f"{prefix}sampler"),
        eta=getattr(args, f"{prefix}eta"), guidance_scale=args.prior_guidance, guide_half=args.guide_half,
        prior_noise=args.prior_noise, posterior_component=args.posterior_component,
        clip_denoised=args.clip_denoised,
    )


def check_respacing(value: str) -> None:
    from common.schedule import NoiseSchedule, make_plan

    try:
        make_plan(NoiseSchedule.named("linear", 1000), value)
    except UserError:
        raise
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise UserError(f"bad prior respacing {value!r} ({err}): use e.g. '8', 'ddim25' or '10,20,30'") from None


def add_decoder_args(p) -> None:
    add_flag(p, "--num_inference_steps", "--steps", dest="steps", type=int, default=50, help="decoder sampling steps")
    p.add_argument("--guidance_scale", type=float, default=2.0, help="decoder classifier-free guidance scale")
    p.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"))
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")


def decoder_kwargs(args) -> dict:
    check_positive("num_inference_steps", args.steps)
    if not 0.0 <= args.eta <= 1.0:
        raise UserError(f"--eta must lie in [0, 1], got {args.eta}")
    return dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale, sampler=args.sampler,
                eta=args.eta)
