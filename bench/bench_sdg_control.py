"""SDG's control: classifier guidance with a supervised noisy digit classifier through the same guidance hook.

    OMP_NUM_THREADS=1 python bench/bench_sdg_control.py [--train_steps 1500 --scales 0 1 3 10 --per_class 6]

SDG's language guidance on the shipped tiny model reaches 46 % judged digit accuracy at text weight 3000 (chance
10 %), and its noise-aware CLIP reads the digit off x_t at near chance from t = 600 on. Two suspects: the guidance
path (learned-variance DDPM, the mean shift, the hook) or the encoder. This benchmark trains a small ADM-style noisy
classifier p(y | x_t, t) with labels (``sdg.classifier``), probes it exactly as the CLIP is probed (accuracy on the
noised held-out digits at t = 0 .. 800, same noise seeds), then guides the same unconditional UNet
(``ckpt/tiny/sdg/unet``) with ``s * grad log p(y | x_t, t)`` through ``common.guidance.energy_guidance`` and
``common.samplers.sample_ddpm`` (learned range, 100 steps, x0 clamp: SDG's sampler), judged by the independent
digits judge. High guided accuracy clears the sampler and points at the encoder.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from common.metrics.intervals import wilson


REPO = Path(__file__).resolve().parent.parent
CKPT = REPO / "ckpt" / "tiny" / "sdg"
SECTION = "sdg control: classifier guidance through the same hook"
COMMAND = "OMP_NUM_THREADS=1 python bench/bench_sdg_control.py"


def train_classifier(images: torch.Tensor, labels: torch.Tensor, schedule, steps: int, batch: int, seed: int):
    from sdg.classifier import NoisyClassifier, noisy_classification_loss

    torch.manual_seed(seed)
    model = NoisyClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, cosine decay
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="noisy classifier")
    for _ in bar:
        idx = torch.randint(0, images.shape[0], (batch,), generator=gen)
        loss = noisy_classification_loss(model, images[idx], labels[idx], schedule, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


@torch.no_grad()
def probe(model, images: torch.Tensor, labels: torch.Tensor, schedule, timesteps=(0, 200, 400, 600, 800)) -> dict:
    """Accuracy on noised held-out digits per t, with the CLIP probe's noise (seed 0 + t)."""
    from common.process import q_sample_standard

    out = {}
    for t in timesteps:
        gen = torch.Generator().manual_seed(int(t))
        tt = torch.full((images.shape[0],), int(t), dtype=torch.long)
        x_t = q_sample_standard(images, schedule.abar(tt, like=images), torch.randn(images.shape, generator=gen))
        out[int(t)] = float((model(x_t, tt).argmax(-1) == labels).float().mean())
    return out


def guided_accuracy(unet, model, schedule, scale: float, per_class: int, steps: int, seed: int) -> tuple[int, int]:
    from common.guidance import energy_guidance
    from common.io import to_pil
    from common.judge import judge_images
    from common.samplers import sample_ddpm
    from common.schedule import make_plan
    from sdg.classifier import log_probability_energy
    from sdg.pipeline import sdg_denoiser

    labels = torch.arange(10).repeat_interleave(per_class)
    guidance = energy_guidance([(scale, log_probability_energy(model, labels))]) if scale else None
    x = sample_ddpm(sdg_denoiser(unet), schedule, make_plan(schedule, str(steps)), (len(labels), 3, 32, 32),
                    generator=torch.Generator().manual_seed(seed), variance_type="learned_range", clip_x0=1.0,
                    guidance=guidance, progress=True)
    scores = judge_images([to_pil(im) for im in x], [(int(y), None) for y in labels])
    return round(scores["digit_accuracy"] * len(labels)), len(labels)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train_steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 3.0, 10.0])
    parser.add_argument("--per_class", type=int, default=6, help="guided images per digit and scale")
    parser.add_argument("--steps", type=int, default=100, help="DDPM steps (the paper's 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", default=str(REPO / "data" / "digits"))
    parser.add_argument("--no_write", action="store_true", help="print only, do not update bench/results.json")
    parser.add_argument("--unet", default=None,
                        help="guide this unconditional model folder instead of ckpt/tiny/sdg/unet (its rows go to "
                             "their own section)")
    parser.add_argument("--unet_label", default=None, help="its name in the records (default: the folder's name)")
    args = parser.parse_args(argv)
    if args.unet and not args.unet_label:
        args.unet_label = Path(args.unet).name

    from records import write_records

    from common.digits import build_digits
    from sdg.adm import noise_schedule
    from sdg.checkpoint import load_diffusion_model
    from sdg.digits_eval import labelled_images

    start_cpu, start = time.process_time(), time.time()
    data = build_digits(args.data_dir)
    unet, flags = load_diffusion_model(args.unet or CKPT)
    schedule = noise_schedule(flags)
    train_x, train_y, _ = labelled_images(data / "train", 32)
    test_x, test_y, _ = labelled_images(data / "test", 32)
    model = train_classifier(train_x, train_y, schedule, args.train_steps, args.batch_size, args.seed)
    train_cpu = time.process_time() - start_cpu
    rows = []
    note = f"{args.train_steps} steps, batch {args.batch_size}, seed {args.seed}"
    guided_note = f", guiding the UNet {args.unet_label}" if args.unet else ""
    section = SECTION + (f" (UNet {args.unet_label})" if args.unet else "")
    for t, acc in probe(model, test_x, test_y, schedule).items():
        rows.append(dict(name=f"sdg control probe: noisy classifier accuracy on x_t, t={t} ({note})",
                         value=round(acc, 3), unit="", command=COMMAND))
        print(rows[-1]["name"], rows[-1]["value"], flush=True)
    for scale in args.scales:
        k, n = guided_accuracy(unet, model, schedule, scale, args.per_class, args.steps, args.seed)
        lo, hi = wilson(k, n)
        label = "unguided" if scale == 0 else f"classifier scale {scale:g}"
        rows.append(dict(name=f"sdg control: judged digit accuracy, {label}{guided_note} (DDPM {args.steps}, "
                              f"{n} images, 95% CI {lo:.2f}-{hi:.2f})", value=round(k / n, 3), unit="",
                         command=COMMAND + (f" --unet {args.unet}" if args.unet else "")))
        print(rows[-1]["name"], rows[-1]["value"], f"{time.time() - start:.0f}s", flush=True)
    rows.append(dict(name="sdg control: classifier training CPU time", value=round(train_cpu, 1), unit="s",
                     command=COMMAND))
    if not args.no_write:
        prefix = f"[UNet {args.unet_label}] " if args.unet else ""  # names are global keys: keep the default's rows
        write_records([{**row, "name": prefix + row["name"], "section": section} for row in rows],
                      replace_section=section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
