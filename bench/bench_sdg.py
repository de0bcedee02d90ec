"""SDG: guided-step overhead and the paper's claims measured on the digits world with the independent judge.

    OMP_NUM_THREADS=1 python bench/bench_sdg.py --perf          # one guided step vs (UNet forward + CLIP fwd/bwd)
    OMP_NUM_THREADS=1 python bench/bench_sdg.py --claims        # weight sweeps on ckpt/tiny/sdg (~25 min, 1 thread)
    OMP_NUM_THREADS=1 python bench/bench_sdg.py --evaluate      # sdg.sample_cli.evaluate_digits on 60 prompts

Perf: the same UNet, noise-aware CLIP, batch and steps, interleaved repetition by repetition, medians:
(a) ``sample_sdg`` with language guidance (our whole guided DDPM step: UNet, learned variance, CLIP forward and
backward, mean shift, noise), (b) the floor: a bare loop of ``unet(x, t)`` under no_grad plus
``autograd.grad(cos(E'(x, t), text).sum(), x)``, nothing else. Target: (a) / (b) <= 1.2. Memory: bytes the
autograd graph of one guidance call saves (exact, from saved-tensor hooks) and the process's peak RSS.

Claims (ckpt/tiny/sdg; every image judged by common.judge, never by the guiding CLIP):
1. language guidance "a handwritten <digit>" raises the judged digit accuracy above the unguided ~10 % (sweep of
   the text weight), and full captions "a <colour> handwritten <digit>" also steer the colour;
2. image content guidance reproduces the reference's digit (and colour), sweep of the image weight;
3. style guidance (Gram matrices) reproduces the reference's colour rather than its digit;
4. the noise-aware CLIP beats the plain CLIP (same tower, no time modulation) as the guide at equal weight;
plus the zero-shot probe: digit read off E'(x_t, t) vs the ten digit texts, noise-aware vs plain, per t.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


REPO = Path(__file__).resolve().parent.parent

from records import write_records  # noqa: E402


SECTION = "sdg: semantic diffusion guidance"
CKPT = REPO / "ckpt" / "tiny" / "sdg"
PERF_CMD = "OMP_NUM_THREADS=1 python bench/bench_sdg.py --perf"
CLAIMS_CMD = "OMP_NUM_THREADS=1 python bench/bench_sdg.py --claims"


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_models():
    """The shipped tiny checkpoint if present, else tiny random models of the same architecture."""
    from sdg.checkpoint import load_diffusion_model, load_noise_aware_clip_folder

    if (CKPT / "unet").is_dir() and (CKPT / "clip").is_dir():
        unet, flags = load_diffusion_model(CKPT)
        bundle = load_noise_aware_clip_folder(CKPT / "clip")
        return unet, flags, bundle, "ckpt/tiny/sdg"
    import tempfile

    from sdg.tiny import make_tiny_sdg_folder

    folder = make_tiny_sdg_folder(Path(tempfile.mkdtemp()) / "sdg", attention_resolutions="", channel_mult="1,2,2")
    unet, flags = load_diffusion_model(folder)
    return unet, flags, load_noise_aware_clip_folder(folder / "clip"), "tiny random (no ckpt/tiny/sdg yet)"


def floor_loop(unet, clip, text, plan, x):
    """The floor: per step one UNet forward (no grad) and one CLIP forward + backward w.r.t. x."""
    from sdg.scores import cosine

    for t in plan.timesteps:
        tt = torch.full((x.shape[0],), t, dtype=torch.long)
        with torch.no_grad():
            out = unet(x, tt, return_dict=False)[0]
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(cosine(clip(xg, tt).embedding, text).sum(), xg)
        x = x + 1e-3 * (out[:, :3] + grad)  # use both results so nothing is optimised away
    return x


def saved_tensor_bytes(fn) -> int:
    """Bytes of every tensor autograd saves for backward while ``fn`` runs (the activation memory of guidance)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def perf(args) -> list[dict]:
    from common.schedule import make_plan
    from sdg.adm import noise_schedule
    from sdg.pipeline import sample_sdg
    from sdg.scores import SemanticGuidance

    unet, flags, bundle, source = load_models()
    schedule = noise_schedule(flags)
    plan = make_plan(schedule, str(args.steps))
    text = bundle.encode_text(["a handwritten seven"])
    clip = bundle.clip.eval()
    shape = (args.batch, 3, unet.config.sample_size, unet.config.sample_size)
    rss0 = peak_rss_mb()
    ours, floor = [], []
    for rep in range(args.reps):
        x_T = torch.randn(shape, generator=torch.Generator().manual_seed(rep))
        start = time.perf_counter()
        floor_loop(unet, clip, text, plan, x_T)
        floor.append(time.perf_counter() - start)
        start = time.perf_counter()
        sample_sdg(unet, schedule, plan, batch_size=args.batch, clip=clip, text_embedding=text, text_weight=30.0,
                   x_T=x_T, generator=torch.Generator().manual_seed(rep))
        ours.append(time.perf_counter() - start)
    per_step_ours = statistics.median(ours) / args.steps
    per_step_floor = statistics.median(floor) / args.steps
    guidance = SemanticGuidance(clip, schedule, text_embedding=text, text_weight=30.0)
    x = torch.randn(shape)
    t = torch.full((args.batch,), 500, dtype=torch.long)
    saved = saved_tensor_bytes(lambda: guidance(x, t))
    params = sum(p.numel() for p in unet.parameters()), sum(p.numel() for p in clip.parameters())
    what = f"{source}: UNet {params[0] / 1e6:.2f}M + noise-aware CLIP {params[1] / 1e6:.2f}M, batch {args.batch}, " \
           f"{unet.config.sample_size}px, 1 thread"
    cmd = PERF_CMD
    rows = [
        dict(name="sdg: guided DDPM step / (UNet fwd + CLIP fwd+bwd), time ratio", value=round(per_step_ours /
             per_step_floor, 3), unit="x", target="<= 1.2", command=cmd),
        dict(name=f"sdg: guided DDPM step, seconds ({what})", value=round(per_step_ours, 4), unit="s", command=cmd),
        dict(name=f"sdg: UNet fwd + CLIP fwd+bwd floor, seconds ({what})", value=round(per_step_floor, 4), unit="s",
             command=cmd),
        dict(name="sdg: autograd memory saved by one guidance call (CLIP activations)", value=round(saved / 2**20, 2),
             unit="MB", command=cmd),
        dict(name="sdg: peak RSS of the benchmark process", value=round(peak_rss_mb()), unit="MB", command=cmd),
        dict(name="sdg: peak RSS above the models' load", value=round(peak_rss_mb() - rss0), unit="MB", command=cmd),
    ]
    return rows


# --------------------------------------------------------------------------------------------------------------- claims


def judged(images, targets):
    from common.judge import judge_images
    from common.metrics.images import tensor_to_uint8

    return judge_images(list(tensor_to_uint8(images).permute(0, 2, 3, 1).numpy()), targets)


def claims(args) -> list[dict]:
    from common.digits import COLORS, caption
    from sdg.adm import noise_schedule
    from sdg.checkpoint import load_diffusion_model, load_noise_aware_clip_folder, plain_clip_guide
    from sdg.digits_eval import digit_prompts, labelled_images, zero_shot_accuracy
    from sdg.sample_cli import run

    if not (CKPT / "unet").is_dir():
        raise SystemExit("ckpt/tiny/sdg is missing: train it first (ckpt/tiny/sdg/README.md)")
    start = time.time()
    _, flags = load_diffusion_model(CKPT)
    schedule = noise_schedule(flags)
    bundle = load_noise_aware_clip_folder(CKPT / "clip")
    plain = plain_clip_guide(bundle.model)
    k, steps, cmd = args.per_class, str(args.claim_steps), CLAIMS_CMD
    rows = []
    note = f"{10 * k} samples, DDPM {steps} steps"

    # zero-shot probe of the encoders on noised test digits
    images, labels, colors = labelled_images(REPO / "data" / "digits" / "test", 32)
    text = bundle.encode_text(digit_prompts())
    for name, enc in (("noise-aware", bundle.clip), ("plain", plain)):
        for t, acc in zero_shot_accuracy(enc, text, images, labels, schedule).items():
            rows.append(dict(name=f"sdg probe: zero-shot digit accuracy of the {name} CLIP on x_t, t={t}",
                             value=round(acc, 3), unit="", command=cmd))

    # 1. language guidance sweep, digit only ("a handwritten seven"), and the plain-CLIP ablation
    prompts = [digit_prompts()[i % 10] for i in range(10 * k)]
    targets = [(i % 10, None) for i in range(10 * k)]
    for w in args.text_weights:
        for name, guide in (("noise-aware", None), ("plain", plain)):
            if w == 0 and name == "plain":
                continue
            imgs = run(CKPT, prompts, text_weight=w, clip_path=CKPT / "clip", respacing=steps, guide=guide, seed=0)
            acc = judged(imgs, targets)["digit_accuracy"]
            label = "unguided" if w == 0 else f"{name} CLIP, text weight {w:g}"
            rows.append(dict(name=f"sdg claim 1: judged digit accuracy, 'a handwritten <digit>', {label} ({note})",
                             value=round(acc, 3), unit="", target="> 0.1 (unguided)" if w else "", command=cmd))
            print(rows[-1]["name"], rows[-1]["value"], f"{time.time() - start:.0f}s", flush=True)

    # 1b. full captions: digit + colour
    color_names = list(COLORS)
    cap_targets = [(i % 10, color_names[(i // 10) % 6]) for i in range(10 * k)]
    cap_prompts = [caption(d, c) for d, c in cap_targets]
    runs = [(w, "noise-aware", None, "ddpm") for w in args.caption_weights]
    runs += [(w, "plain", plain, "ddpm") for w in args.caption_weights if w]
    runs += [(args.ddim_weight, "noise-aware", None, "ddim")]
    for w, name, guide, sampler in runs:
        scores = judged(run(CKPT, cap_prompts, text_weight=w, clip_path=CKPT / "clip", respacing=steps, seed=0,
                            guide=guide, sampler=sampler), cap_targets)
        label = "unguided" if w == 0 else f"{name} CLIP, text weight {w:g}"
        how = note if sampler == "ddpm" else note.replace("DDPM", "DDIM (eta 0, composition)")
        for key in ("digit_accuracy", "color_accuracy", "both_accuracy"):
            rows.append(dict(name=f"sdg claim 1b: judged {key.replace('_', ' ')}, 'a <colour> handwritten <digit>', "
                                  f"{label} ({how})", value=round(scores[key], 3), unit="", command=cmd))
        print(rows[-3]["name"], rows[-3]["value"], rows[-2]["value"], f"{time.time() - start:.0f}s", flush=True)

    # 2./3. image guidance: references = test digits (one per sample, digits and colours balanced)
    picks = []
    for i in range(10 * k):
        want_d, want_c = i % 10, color_names[(i // 10) % 6]
        idx = [j for j in range(len(labels)) if int(labels[j]) == want_d and colors[j] == want_c]
        idx = idx or [j for j in range(len(labels)) if int(labels[j]) == want_d]
        picks.append(idx[(i // 60) % len(idx)])
    refs = images[picks]
    ref_targets = [(int(labels[j]), colors[j]) for j in picks]
    for loss, weights in (("semantic", args.content_weights), ("style", args.style_weights)):
        for w in weights:
            for name, guide in (("noise-aware", None), ("plain", plain)):
                imgs = run(CKPT, ["x"] * len(picks), text_weight=0.0, image_weight=w, image_loss=loss,
                           references=refs, clip_path=CKPT / "clip", respacing=steps, guide=guide, seed=0)
                scores = judged(imgs, ref_targets)
                claim = "2 (content)" if loss == "semantic" else "3 (style)"
                for key in ("digit_accuracy", "color_accuracy"):
                    rows.append(dict(
                        name=f"sdg claim {claim}: judged {key.split('_')[0]} agreement with the reference, "
                             f"{name} CLIP, image weight {w:g} ({note})",
                        value=round(scores[key], 3), unit="", command=cmd))
                print(rows[-2]["name"], rows[-2]["value"], rows[-1]["value"], f"{time.time() - start:.0f}s",
                      flush=True)
    rows.append(dict(name="sdg claims: wall seconds of the claims run", value=round(time.time() - start), unit="s",
                     command=cmd))
    return rows


def evaluate(args) -> list[dict]:
    """``sdg.sample_cli.evaluate_digits``: what scripts/demo.py and the cross-method table report for SDG."""
    from sdg.sample_cli import DEFAULT_TEXT_WEIGHT, evaluate_digits

    scores = evaluate_digits(REPO / "outputs" / "sdg_evaluate_digits", n=60, seed=0)
    cmd = "OMP_NUM_THREADS=1 python bench/bench_sdg.py --evaluate  (sdg.sample_cli.evaluate_digits, n=60)"
    what = f"60 evaluation prompts 'a <colour> handwritten <digit>', text weight {DEFAULT_TEXT_WEIGHT:g}, DDPM 50 steps"
    rows = [dict(name=f"sdg evaluate_digits: judged {key.replace('_', ' ')} ({what})", value=round(scores[key], 3),
                 unit="", command=cmd)
            for key in ("digit_accuracy", "color_accuracy", "both_accuracy", "unguided_digit_accuracy",
                        "unguided_color_accuracy")]
    rows.append(dict(name="sdg evaluate_digits: wall seconds", value=scores["seconds"], unit="s", command=cmd))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--perf", action="store_true")
    parser.add_argument("--claims", action="store_true")
    parser.add_argument("--evaluate", action="store_true", help="run sdg.sample_cli.evaluate_digits (n=60)")
    parser.add_argument("--steps", type=int, default=10, help="perf: sampling steps per repetition")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--per_class", type=int, default=5, help="claims: samples per digit")
    parser.add_argument("--claim_steps", type=int, default=50)
    parser.add_argument("--text_weights", type=float, nargs="*", default=[0.0, 100.0, 300.0, 1000.0, 3000.0])
    parser.add_argument("--caption_weights", type=float, nargs="*", default=[0.0, 300.0, 1000.0, 3000.0])
    parser.add_argument("--content_weights", type=float, nargs="*", default=[300.0, 1000.0, 3000.0])
    parser.add_argument("--style_weights", type=float, nargs="*", default=[3e-4, 1e-3, 3e-3])
    parser.add_argument("--ddim_weight", type=float, default=1000.0, help="claims: text weight of the DDIM run")
    parser.add_argument("--no_write", action="store_true", help="print only, do not update bench/results.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if not (args.perf or args.claims or args.evaluate):
        args.perf = args.claims = args.evaluate = True
    rows = (perf(args) if args.perf else []) + (claims(args) if args.claims else [])
    rows += evaluate(args) if args.evaluate else []
    for row in rows:
        print(f"{row['name']}: {row['value']} {row.get('unit', '')}")
    if not args.no_write:
        write_records([{**row, "section": SECTION} for row in rows])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
