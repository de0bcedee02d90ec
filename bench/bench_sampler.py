"""Sampler overhead: (a) a bare UNet + DDIM loop, (b) our ``sample_ddim``, (c) diffusers' StableDiffusionPipeline.

All three run the same tiny SD UNet with CFG (batch doubled inside the UNet), the same number of DDIM steps and the
same prompt embeddings, interleaved repetition by repetition so machine noise hits them alike; medians of wall
time and of process CPU time are compared (with OMP_NUM_THREADS=1 the CPU time is steadier on a loaded machine).
The pipeline runs with ``output_type="latent"`` and precomputed embeddings, so text encoding and VAE decoding are
outside every measurement. Usage: ``python bench/bench_sampler.py [--steps 50 --reps 7]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from common.denoisers import guided_unet  # noqa: E402
from common.pipeline import LatentTextToImage  # noqa: E402
from common.samplers import sample_ddim  # noqa: E402
from common.schedule import plan_like_diffusers  # noqa: E402
from common.tiny import make_tiny_sd_folder  # noqa: E402


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bare_loop(unet, plan, steps_alphas, cond, uncond, latents, scale):
    """The floor: UNet calls plus the DDIM update written inline with precomputed float coefficients."""
    x = latents
    both = torch.cat([uncond, cond])
    for t, (a, ap) in zip(plan.timesteps, steps_alphas):
        out_u, out_c = unet(torch.cat([x, x]), t, encoder_hidden_states=both, return_dict=False)[0].chunk(2)
        eps = out_u + scale * (out_c - out_u)
        x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
        x = ap**0.5 * x0 + (1 - ap) ** 0.5 * eps
    return x


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64, help="image side; latents are side/4")
    parser.add_argument("--no_write", action="store_true", help="print only, do not update bench/results.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    from diffusers import StableDiffusionPipeline

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_sd_folder(Path(tmp) / "sd")
        ours = LatentTextToImage.from_pretrained(str(folder))
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    unet = ours.unet
    cond = ours.encode_prompt(["a red handwritten seven"] * args.batch)
    uncond = ours.encode_prompt([""] * args.batch)
    shape = ours.latent_shape(args.batch, args.resolution, args.resolution)
    plan = plan_like_diffusers(ours.schedule, ours.scheduler_config, args.steps, "ddim")
    abars, prevs = plan.alphas(ours.schedule)
    scale = 7.5

    def run_bare():
        return bare_loop(unet, plan, list(zip(abars, prevs)), cond, uncond,
                         torch.randn(shape, generator=torch.Generator().manual_seed(0)), scale)

    def run_ours():
        den = guided_unet(unet, cond, uncond, scale)
        return sample_ddim(den, ours.schedule, plan, shape, generator=torch.Generator().manual_seed(0),
                           progress=False)

    def run_diffusers():
        return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=args.steps,
                    guidance_scale=scale, height=args.resolution, width=args.resolution, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    runs = {"bare": run_bare, "ours": run_ours, "diffusers": run_diffusers}
    with torch.no_grad():
        for fn in runs.values():  # warm-up
            fn()
        agree = (run_ours() - run_diffusers()).abs().max().item()
        times: dict[str, list[float]] = {k: [] for k in runs}
        cpu: dict[str, list[float]] = {k: [] for k in runs}
        names = list(runs)
        for rep in range(args.reps):
            # rotate the order every repetition so no method always runs first (or after the same neighbour)
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                start, start_cpu = time.perf_counter(), time.process_time()
                runs[name]()
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"median seconds over {args.reps} reps ({args.steps} DDIM steps, batch {args.batch}, CFG): "
          + ", ".join(f"{k} {v:.3f}" for k, v in med.items()))
    print(f"wall: ours/bare {med['ours'] / med['bare']:.3f}  ours/diffusers {med['ours'] / med['diffusers']:.3f}; "
          f"CPU time: ours/bare {med_cpu['ours'] / med_cpu['bare']:.3f}  "
          f"ours/diffusers {med_cpu['ours'] / med_cpu['diffusers']:.3f}; "
          f"max |ours - diffusers| latents {agree:.2e}  peak RSS {peak_rss_mb():.0f} MB")
    if args.no_write:
        return
    from records import write_records

    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    command = threads + "python bench/bench_sampler.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = "core sampler"
    write_records([
        dict(name="sampler: ours / bare UNet loop (time ratio)", value=round(med["ours"] / med["bare"], 4),
             unit="x", target="<= 1.03", command=command, section=section),
        dict(name="sampler: ours / diffusers StableDiffusionPipeline (time ratio)",
             value=round(med["ours"] / med["diffusers"], 4), unit="x", target="<= 1.00", command=command,
             section=section),
        dict(name="sampler: ours / bare UNet loop (CPU-time ratio; steadier than wall time on a shared machine)",
             value=round(med_cpu["ours"] / med_cpu["bare"], 4), unit="x", target="<= 1.03", command=command,
             section=section),
        dict(name="sampler: ours / diffusers StableDiffusionPipeline (CPU-time ratio)",
             value=round(med_cpu["ours"] / med_cpu["diffusers"], 4), unit="x", target="<= 1.00", command=command,
             section=section),
        dict(name="sampler: ours, seconds per DDIM step (tiny SD, CFG, batch 4)",
             value=round(med["ours"] / args.steps, 5), unit="s", target="", command=command, section=section),
        dict(name="sampler: max |ours - diffusers| final latents", value=float(f"{agree:.3e}"), unit="abs",
             target="<= 1e-5", command=command, section=section),
        dict(name="sampler: peak RSS of the benchmark process", value=round(peak_rss_mb()), unit="MB", target="",
             command=command, section=section),
    ])


if __name__ == "__main__":
    main()
