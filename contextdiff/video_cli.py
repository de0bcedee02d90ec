"""The command line of ``scripts/contextdiff/edit_video.py``: text-guided video editing with ContextDiff.

    python scripts/contextdiff/edit_video.py --video embedded --target_prompt "a blue handwritten seven" \\
        --output_dir outputs/contextdiff_video
    python scripts/contextdiff/edit_video.py --video clip.mp4 --source_prompt "a red handwritten seven" \\
        --target_prompt "a blue handwritten seven" --n_frames 8 --steps 25 --guidance_scale 3 --train_steps 60 \\
        --output_dir outputs/edit --no_shift

``--video``: a folder of frames (sorted by name), a GIF, an MP4 (PyAV), or ``embedded[:DIGIT:COLOUR]`` (the digits
world's moving-digit clip, ``common.video_clip``; its caption is the default source prompt). Frames are scaled and
centre-cropped to the model's resolution. The image checkpoint (``--model_dir``, default the shipped tiny
ContextDiff) is inflated over time (``contextdiff.video``), tuned on the clip with the source prompt, the clip is
inverted with the contextual shift and sampled with the target prompt. ``--no_shift`` is the same budget without
the shift (plain Tune-A-Video); ``--shift train`` is the released code (shift in tuning only).

Writes, all or nothing, ``<output_dir>/``: ``edited.gif`` (and ``edited.mp4`` when PyAV is installed),
``source.gif``, ``strip.png`` (source frames over edited frames), ``frames/00000.png ...`` (edited frames),
``settings.json`` (flags, timings, scores). Bad input (unreadable or empty video, frames of different sizes, more
frames than the memory limit) is a one-line error and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common.errors import UserError, cli_entry
from common.latents import vae_scale_factor
from common.methods import add_flag


REPO = Path(__file__).resolve().parents[1]


DEFAULT_MODEL = "ckpt/tiny/contextdiff"
EMBEDDED = "embedded"
DESCRIPTION = ("Text-guided video editing with ContextDiff: one-shot tuning, contextualized inversion, "
               "edited sampling.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--video", required=True,
                        help="frame folder, GIF, MP4, or embedded[:DIGIT:COLOUR] (the built-in moving-digit clip)")
    parser.add_argument("--source_prompt", default=None, help="caption of the source clip (default for embedded)")
    parser.add_argument("--target_prompt", required=True, help="the edited caption")
    parser.add_argument("--n_frames", type=int, default=8, help="frames to edit")
    parser.add_argument("--start_frame", type=int, default=0, help="first frame taken from the video")
    parser.add_argument("--frame_stride", type=int, default=1, help="take every n-th frame")
    add_flag(parser, "--num_inference_steps", "--steps", dest="steps", type=int, default=25,
             help="DDIM steps for inversion and sampling")
    parser.add_argument("--guidance_scale", type=float, default=3.0, help="classifier-free guidance of the edit")
    parser.add_argument("--train_steps", type=int, default=60, help="one-shot tuning steps on the source clip")
    parser.add_argument("--learning_rate", type=float, default=1e-4,
                        help="tuning learning rate (AdamW, constant; 1e-3 made late frames drift, bench/results.md)")
    parser.add_argument("--output_dir", required=True)
    add_flag(parser, "--checkpoint", "--model_dir", dest="model_dir", default=DEFAULT_MODEL,
             help="ContextDiff checkpoint folder (image model)")
    parser.add_argument("--shift", choices=("all", "train", "none"), default="all",
                        help="where the contextual shift is used: all (paper), train (released code), none")
    parser.add_argument("--no_shift", action="store_true", help="same as --shift none: the equal-budget ablation")
    parser.add_argument("--fixed_point_iters", type=int, default=2, help="fixed-point refinements per inversion step")
    parser.add_argument("--no_sparse_causal", action="store_true", help="per-frame self-attention instead")
    parser.add_argument("--resolution", type=int, default=None, help="frame side fed to the model (default: native)")
    parser.add_argument("--max_frames", type=int, default=None,
                        help="refuse more frames than this (default: measured from free memory)")
    parser.add_argument("--fps", type=float, default=4.0, help="frame rate of the written GIF / MP4")
    parser.add_argument("--display_scale", type=int, default=1, help="enlarge the written GIF / MP4 / strip by this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Every flag checked before anything loads (one-line UserError)."""
    for name in ("n_frames", "steps", "frame_stride", "display_scale"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("start_frame", "train_steps", "fixed_point_iters"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.max_frames is not None and args.max_frames < 1:
        raise UserError(f"--max_frames must be >= 1, got {args.max_frames}")
    if args.fps <= 0:
        raise UserError(f"--fps must be > 0, got {args.fps}")
    if args.guidance_scale < 1:
        raise UserError(f"--guidance_scale must be >= 1, got {args.guidance_scale}")
    if args.learning_rate <= 0:
        raise UserError(f"--learning_rate must be > 0, got {args.learning_rate}")
    if not args.target_prompt.strip():
        raise UserError("--target_prompt is empty: give the edited caption")
    if args.no_shift:
        args.shift = "none"
    from common.io import check_output_dir

    check_output_dir(args.output_dir)  # a folder we may not write is refused before the edit runs


def parse_embedded(spec: str):
    """``embedded`` / ``embedded:7:red`` -> the built-in clip's (digit, colour)."""
    parts = spec.split(":")
    if parts[0] != EMBEDDED or len(parts) not in (1, 3):
        raise UserError(f"--video {spec!r}: write embedded or embedded:DIGIT:COLOUR (e.g. embedded:7:red)")
    if len(parts) == 1:
        return 7, "red"
    try:
        return int(parts[1]), parts[2]
    except ValueError:
        raise UserError(f"--video {spec!r}: the digit must be 0..9 (e.g. embedded:7:red)") from None


def load_frames(args, resolution: int):
    """The clip as uint8 ``[F, R, R, 3]`` and the source prompt."""
    import numpy as np

    from common.video_io import read_video, resize_clip

    if args.video.split(":")[0] == EMBEDDED:
        from common.video_clip import digit_clip

        digit, color = parse_embedded(args.video)
        clip = digit_clip(digit, color, n_frames=args.start_frame + args.n_frames * args.frame_stride)
        frames = clip.frames[args.start_frame::args.frame_stride][: args.n_frames]
        prompt = args.source_prompt or clip.caption
    else:
        if not args.source_prompt:
            raise UserError("--source_prompt is required for a video file or folder: give the clip's caption")
        frames = read_video(args.video, args.n_frames, start=args.start_frame, stride=args.frame_stride)
        prompt = args.source_prompt
    return np.ascontiguousarray(resize_clip(frames, resolution)), prompt


def strip_image(source, edited, scale: int = 1):
    """Source frames in the top row, edited frames below (2 px black gaps)."""
    import numpy as np
    from PIL import Image

    f, h, w, _ = source.shape
    pad = 2
    canvas = np.zeros((2 * h + 3 * pad, f * (w + pad) + pad, 3), dtype=np.uint8)
    for row, clip in enumerate((source, edited)):
        for i, frame in enumerate(clip):
            y, x = pad + row * (h + pad), pad + i * (w + pad)
            canvas[y:y + h, x:x + w] = frame
    image = Image.fromarray(canvas)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image


def scores_for(source, edited, target_prompt: str) -> dict:
    """Frame consistency and structure kept always; the digits judge when the target names a digit or colour."""
    from common.judge import parse_prompt
    from contextdiff.video import frame_consistency, judge_video, structure_scores

    scores = {"frame_consistency": frame_consistency(edited), "source_frame_consistency": frame_consistency(source),
              **structure_scores(source, edited)}
    digit, color = parse_prompt(target_prompt)
    if digit is not None or color is not None:
        scores.update(judge_video(edited, digit, color))
    return scores


def run(args: argparse.Namespace) -> dict:
    import torch

    from common.io import atomic_write_dir
    from common.pipeline import encode_clip
    from common.video_io import av_available, write_frame_folder, write_gif, write_mp4
    from contextdiff.checkpoint import load_contextdiff, read_sd_configs
    from contextdiff.video import (
        VideoEditConfig,
        activation_bytes_per_frame,
        available_memory_bytes,
        check_frame_budget,
        edit_video,
        inflate,
        max_frames_for_memory,
    )

    check_args(args)
    start = time.perf_counter()
    model_dir = Path(args.model_dir)
    if not model_dir.is_absolute() and not model_dir.exists() and (REPO / model_dir).exists():
        model_dir = REPO / model_dir
    configs = read_sd_configs(model_dir)  # folder checks before any weight loads
    factor = vae_scale_factor(configs["vae"])
    resolution = args.resolution or int(configs["unet"]["sample_size"]) * factor
    if resolution % (2 * factor):
        raise UserError(f"--resolution {resolution} must be a multiple of {2 * factor} (VAE factor {factor} times the "
                        "adapter's patch size)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = VideoEditConfig(steps=args.steps, guidance_scale=args.guidance_scale, train_steps=args.train_steps,
                             learning_rate=args.learning_rate, seed=args.seed, shift=args.shift,
                             fixed_point_iters=args.fixed_point_iters, sparse_causal=not args.no_sparse_causal)
    if args.max_frames is not None:  # an explicit limit is checked before anything loads
        check_frame_budget(args.n_frames, args.max_frames, " set by --max_frames")
    torch.manual_seed(args.seed)
    model = load_contextdiff(model_dir, require_adapter=args.shift != "none", device=device)
    video = inflate(model, config)
    latent = resolution // factor
    if args.max_frames is not None:
        limit, detail = args.max_frames, " set by --max_frames"
    else:
        text = encode_clip(model.text_encoder, model.tokenizer, [""])
        per_frame = activation_bytes_per_frame(video[0], video[1], (latent, latent), text)
        free = available_memory_bytes(device)
        limit = max_frames_for_memory(per_frame, free)
        detail = (f" that memory allows ({per_frame / 2**20:.1f} MiB of activations per {resolution}x{resolution} "
                  f"frame in a tuning step, {free / 2**30:.1f} GiB free on {device}, half of it usable)")
    check_frame_budget(args.n_frames, limit, detail)
    frames, source_prompt = load_frames(args, resolution)
    print(f"editing {len(frames)} frames {resolution}x{resolution}: {source_prompt!r} -> {args.target_prompt!r} "
          f"(shift: {args.shift})")
    out = edit_video(model, frames, source_prompt, args.target_prompt, config, video=video)
    scores = scores_for(out.source, out.edited, args.target_prompt)
    seconds = round(time.perf_counter() - start, 2)
    settings = {**{k: v for k, v in vars(args).items()}, "model_dir": str(model_dir), "source_prompt": source_prompt,
                "resolution": resolution, "frame_limit": limit, "device": device, "seconds": seconds,
                "final_train_loss": (sum(out.train_losses[-10:]) / len(out.train_losses[-10:])
                                     if out.train_losses else None),
                "scores": scores}
    scale = args.display_scale
    with atomic_write_dir(args.output_dir) as tmp:
        write_gif(out.edited, tmp / "edited.gif", fps=args.fps, scale=scale)
        if av_available():
            write_mp4(out.edited, tmp / "edited.mp4", fps=args.fps, scale=scale)
        write_gif(out.source, tmp / "source.gif", fps=args.fps, scale=scale)
        strip_image(out.source, out.edited, scale).save(tmp / "strip.png")
        (tmp / "frames").mkdir()
        write_frame_folder(out.edited, tmp / "frames")
        (tmp / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    return settings


@cli_entry
def main(argv=None) -> int:
    from common import limits

    args = limits.check_namespace(build_parser().parse_args(argv))
    settings = run(args)
    parts = [f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in settings["scores"].items()]
    print(f"wrote {args.output_dir}/ (edited.gif, strip.png, settings.json) in {settings['seconds']} s: "
          + ", ".join(parts))
    return 0
