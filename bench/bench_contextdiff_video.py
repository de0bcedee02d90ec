"""ContextDiff video editing on the embedded moving-digit clips, with and without the contextual shift.

    OMP_NUM_THREADS=1 python bench/bench_contextdiff_video.py                 # records into bench/results.md
    OMP_NUM_THREADS=1 python bench/bench_contextdiff_video.py --no_write --seeds 0

For every (digit, source colour -> target colour) clip of ``CLIPS`` and every seed, the shipped tiny ContextDiff
checkpoint is inflated, tuned on the clip and edited (``contextdiff.video.edit_video``) in three arms at the same
budget (same tuning steps, same trainable UNet parameters, same DDIM steps and guidance):

- ``shift`` (paper): the contextual shift in tuning, inversion and sampling;
- ``train-only shift`` (the released code): tuned with the shift, inverted and sampled without it;
- ``no shift`` (Tune-A-Video): k = 0 everywhere.

Scores per arm (means over clips x seeds x frames): the digits judge on the edited frames (target colour, source
digit kept), frame consistency (``common.metrics.frames``: pixel mode 1 - mean |f_t - f_t+1|, and the papers' CLIP
mode, mean cosine of consecutive frames' image embeddings, with the project's tiny CLIP ``ckpt/tiny/clip``), CLIP
text alignment of the edited frames with the target prompt (same CLIP), structure kept from the source (stroke-mask IoU and brightness correlation with the source frames), and the reconstruction error (the
source prompt sampled from the inverted latents, guidance 1: mean |error| in 0..255 pixel units). Paired wins /
losses of the shift arm against the no-shift arm on the per-clip colour accuracy are reported too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


REPO = Path(__file__).resolve().parent.parent



def section_name(train_steps: int, learning_rate: float) -> str:
    """One results section per tuning budget, so runs at another learning rate sit beside, not over, each other."""
    return f"contextdiff video: {train_steps} tuning steps at lr {learning_rate:g}"
CLIPS = (  # digit, source colour, target colour
    (7, "red", "blue"),
    (3, "green", "magenta"),
    (0, "blue", "yellow"),
    (5, "cyan", "red"),
    (2, "yellow", "green"),
    (8, "magenta", "cyan"),
)
ARMS = {"shift": "all", "train-only shift": "train", "no shift": "none"}
METRICS = ("color_accuracy", "digit_accuracy", "both_accuracy", "frame_consistency", "clip_frame_consistency",
           "clip_text_alignment", "stroke_iou", "brightness_corr", "reconstruction_mae")


def clip_models() -> dict:
    from common.eval_cli import load_clip_triple

    name, triple = load_clip_triple(f"local-dir:{REPO / 'ckpt' / 'tiny' / 'clip'}")
    return {name: triple}


def run_one(digit: int, color: str, target: str, seed: int, shift: str, args, clips=None) -> dict:
    from common.video_clip import digit_clip, edit_caption
    from contextdiff.checkpoint import load_contextdiff
    from contextdiff.video import VideoEditConfig, edit_video, video_scores

    clip = digit_clip(digit, color, args.n_frames, index=seed)
    model = load_contextdiff(REPO / "ckpt" / "tiny" / "contextdiff")
    config = VideoEditConfig(steps=args.steps, guidance_scale=args.guidance_scale, train_steps=args.train_steps,
                             learning_rate=args.learning_rate, seed=seed, shift=shift, progress=False)
    start = time.perf_counter()
    torch.manual_seed(seed)
    out = edit_video(model, clip.frames, clip.caption, edit_caption(clip, color=target), config, reconstruct=True)
    seconds = time.perf_counter() - start
    target_prompt = edit_caption(clip, color=target)
    scores = video_scores(clip.frames, out.edited, digit, target, clips, target_prompt)
    scores["reconstruction_mae"] = float(np.abs(out.reconstruction.astype(np.float64) - clip.frames).mean())
    scores["seconds"] = seconds
    return scores


def vae_round_trip_mae(digit: int, color: str, seed: int, n_frames: int) -> float:
    """Mean |decode(encode(frames)) - frames| (0..255): the floor under any reconstruction error."""
    from common.video_clip import digit_clip
    from contextdiff.checkpoint import load_contextdiff
    from contextdiff.video import decode_video, encode_video

    clip = digit_clip(digit, color, n_frames, index=seed)
    vae = load_contextdiff(REPO / "ckpt" / "tiny" / "contextdiff").vae
    return float(np.abs(decode_video(vae, encode_video(vae, clip.frames)).astype(np.float64) - clip.frames).mean())


def paired(runs: list[dict], key: str, cfg: float) -> tuple[int, int]:
    """Wins / losses of the shift arm over the no-shift arm on ``key``, edit by edit (same clip, seed, cfg)."""
    by_key = {(r["digit"], r["seed"], r["guidance_scale"], r["arm"]): r[key] for r in runs}
    wins = losses = 0
    for digit, seed, g, arm in by_key:
        if arm == "shift" and g == cfg:
            a, b = by_key[(digit, seed, g, "shift")], by_key[(digit, seed, g, "no shift")]
            wins += a > b + 1e-9
            losses += a < b - 1e-9
    return wins, losses


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seed = also the clip's digit sample")
    parser.add_argument("--n_frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=[3.0, 1.5],
                        help="one full comparison per guidance scale (3 = the demo's; 1.5 = a weaker edit)")
    parser.add_argument("--train_steps", type=int, default=60)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--output", default="outputs/bench_contextdiff_video.json", help="per-run scores")
    parser.add_argument("--no_write", action="store_true", help="print only, do not touch bench/results.*")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    command = "OMP_NUM_THREADS=1 python bench/bench_contextdiff_video.py " + " ".join(argv or sys.argv[1:])
    section = section_name(args.train_steps, args.learning_rate)
    runs, clips = [], clip_models()
    for cfg in args.guidance_scales:
        args.guidance_scale = cfg
        for digit, color, target in CLIPS:
            for seed in args.seeds:
                for arm, shift in ARMS.items():
                    scores = run_one(digit, color, target, seed, shift, args, clips)
                    runs.append({"arm": arm, "guidance_scale": cfg, "digit": digit, "color": color, "target": target,
                                 "seed": seed, **scores})
                    print(f"cfg {cfg} {digit} {color}->{target} seed {seed} {arm:17s} " + " ".join(
                        f"{k} {scores[k]:.3f}" for k in METRICS), flush=True)
    out = REPO / args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(runs, indent=2) + "\n")

    n_edits = len(CLIPS) * len(args.seeds)
    floor = statistics.mean(vae_round_trip_mae(d, c, s, args.n_frames) for d, c, _ in CLIPS for s in args.seeds)
    records = [dict(name="contextdiff video: VAE round-trip error of the source clips (floor of reconstruction)",
                    value=round(floor, 3), unit="0..255", command=command, section=section)]
    print(f"VAE round trip (encode, decode) of the source clips: {floor:.3f}")
    for cfg in args.guidance_scales:
        for arm in ARMS:
            rows = [r for r in runs if r["arm"] == arm and r["guidance_scale"] == cfg]
            summary = {k: statistics.mean(r[k] for r in rows) for k in (*METRICS, "seconds")}
            print(f"cfg {cfg} {arm:17s} " + " ".join(f"{k} {v:.3f}" for k, v in summary.items()))
            for key in METRICS:
                percent = key.endswith("accuracy")
                value = summary[key]
                records.append(dict(
                    name=f"contextdiff video, cfg {cfg:g}, {arm}: {key.replace('_', ' ')}",
                    value=round(100 * value, 1) if percent else round(value, 4),
                    unit="%" if percent else ("0..255" if key == "reconstruction_mae" else "mean"),
                    command=command, section=section))
            records.append(dict(name=f"contextdiff video, cfg {cfg:g}, {arm}: seconds per edit",
                                value=round(summary["seconds"], 2), unit="s", command=command, section=section))
        for key in ("color_accuracy", "clip_text_alignment", "stroke_iou", "clip_frame_consistency"):
            wins, losses = paired(runs, key, cfg)
            print(f"cfg {cfg} shift vs no shift, paired {key} over {n_edits} edits: {wins} wins / {losses} losses")
            records.append(dict(name=f"contextdiff video, cfg {cfg:g}, shift vs no shift: paired wins / losses, "
                                     f"{key.replace('_', ' ')}",
                                value=f"{wins} / {losses} of {n_edits}", unit="edits", command=command,
                                section=section))
    if not args.no_write:
        from records import write_records

        write_records(records, replace_section=section)


if __name__ == "__main__":
    main()
