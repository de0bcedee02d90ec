"""Speed-up of training on cached latents + text states vs encoding every batch on the fly.

Same tiny UNet (the baseline's config), VAE and CLIP text encoder (the tiny builders' sizes), same digits images,
batch 64; both loops do identical optimizer work and differ only in where latents/text states come from.
Repetitions are interleaved; medians compared. ``python bench/bench_caching.py [--steps 20 --reps 5]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


REPO = Path(__file__).resolve().parent.parent

from common.digits import build_digits  # noqa: E402
from common.process import q_sample  # noqa: E402
from common.schedule import NoiseSchedule  # noqa: E402
from common.tiny import clip_tokenizer, tiny_clip_text, tiny_vae  # noqa: E402


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None):
    from diffusers import UNet2DConditionModel

    from common.data import image_text_dataset
    from common.latent_data import LatentTextEncoder

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--no_write", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    data = build_digits(REPO / "data" / "digits")
    dataset = image_text_dataset(data / "train", 32)
    encoder = LatentTextEncoder(tiny_vae(), tiny_clip_text(), clip_tokenizer())
    unet = UNet2DConditionModel.from_config(json.loads((REPO / "configs/baseline/unet.json").read_text()))
    opt = torch.optim.AdamW(unet.parameters(), 1e-4)
    schedule = NoiseSchedule.named("scaled_linear", 1000, 0.00085, 0.012)
    cached = encoder.cache(dataset)
    g = torch.Generator().manual_seed(0)

    def step(batch):
        latents, states = encoder.encode_batch(batch, "cpu")
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],))
        pred = unet(q_sample(latents, schedule.abar(t, like=latents), noise), t, encoder_hidden_states=states).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        opt.step()
        opt.zero_grad()

    def run(source):
        start = time.perf_counter()
        for _ in range(args.steps):
            idx = torch.randint(0, len(source), (args.batch,), generator=g).tolist()
            step(LatentTextEncoder.collate([source[i] for i in idx]))
        return (time.perf_counter() - start) / args.steps

    runs = {"on the fly": dataset, "cached": cached}
    for source in runs.values():
        run(source)  # warm-up
    times = {k: [] for k in runs}
    for _ in range(args.reps):
        for name, source in runs.items():
            times[name].append(run(source))
    med = {k: statistics.median(v) for k, v in times.items()}
    speedup = med["on the fly"] / med["cached"]
    print(f"seconds per step (median of {args.reps}x{args.steps}): "
          + ", ".join(f"{k} {v:.4f}" for k, v in med.items()) + f"; speed-up {speedup:.2f}x; "
          f"peak RSS {peak_rss_mb():.0f} MB; threads {torch.get_num_threads()}")
    if args.no_write:
        return
    from records import write_records

    command = "python bench/bench_caching.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = "training data"
    write_records([
        dict(name="latent + text-state caching: training speed-up over on-the-fly encoding", value=round(speedup, 3),
             unit="x", target=">= 1.3", command=command, section=section),
        dict(name="training step, on-the-fly encoding (tiny baseline, batch 64)", value=round(med["on the fly"], 4),
             unit="s", target="", command=command, section=section),
        dict(name="training step, cached encodings (tiny baseline, batch 64)", value=round(med["cached"], 4),
             unit="s", target="", command=command, section=section),
        dict(name="caching benchmark: peak RSS", value=round(peak_rss_mb()), unit="MB", target="", command=command,
             section=section),
    ])


if __name__ == "__main__":
    main()
