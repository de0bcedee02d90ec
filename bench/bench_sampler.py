"""Sampler overhead: (a) a bare UNet + DDIM loop, (b) our ``sample_ddim``, (c) diffusers' StableDiffusionPipeline.

All three run the same tiny SD UNet with CFG (batch doubled inside the UNet), the same number of DDIM steps and the
same prompt embeddings, interleaved repetition by repetition so machine noise hits them alike; medians of wall
time and of process CPU time are compared (with OMP_NUM_THREADS=1 the CPU time is steadier on a loaded machine).
The pipeline runs with ``output_type="latent"`` and precomputed embeddings, so text encoding and VAE decoding are
outside every measurement. Usage: ``python bench/bench_sampler.py [--steps 50 --reps 7]``.

``--compiled``: ours eager, ours compiled (``common.compile``, what ``scripts/sample.py --compile`` does),
diffusers eager and diffusers with ``pipe.unet = torch.compile(pipe.unet)``, each in its own worker process
(``bench/worker_pool.py``: compiled graphs and peak RSS per configuration), interleaved repetition by repetition,
on the tiny baseline (``ckpt/tiny/baseline``) and on an SD-shaped UNet (Stable Diffusion 1.x's block structure,
``--sd_width`` channels at the first level instead of 320); then peak memory of one eager step at
``--memory_resolutions``, and a profile of one UNet call (``torch.profiler``, top operators).
"""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--compiled", action="store_true", help="eager vs compiled, ours vs diffusers (see above)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    add_compiled_arguments(parser)
    args = parser.parse_args(argv)
    if args.worker:
        return compiled_worker(json.loads(args.worker))
    if args.compiled:
        return compiled_main(args, argv)
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


# ------------------------------------------------------------------------------------------ --compiled


IMPLS = ("ours_eager", "ours_compiled", "diffusers_eager", "diffusers_compiled")
TARGETS = {  # speed ratio (>1: the first is faster) -> target
    ("ours_compiled", "diffusers_eager"): ">= 1.3",
    ("ours_compiled", "diffusers_compiled"): ">= 1.0",
}


def add_compiled_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--compiled")
    group.add_argument("--models", nargs="+", default=["tiny", "sd"], choices=("tiny", "sd"))
    group.add_argument("--impls", nargs="+", default=list(IMPLS),
                       choices=IMPLS + ("ours_eager_channels_last", "ours_compiled_channels_last"))
    group.add_argument("--sd_width", type=int, default=32, help="first-level channels of the SD-shaped UNet")
    group.add_argument("--sd_resolution", type=int, default=256, help="image side of the timed SD-shaped runs")
    group.add_argument("--memory_resolutions", nargs="*", type=int, default=[256, 512],
                       help="image sides at which one eager step of the SD-shaped UNet measures peak memory")
    group.add_argument("--profile", action="store_true", help="profile one UNet call of the SD-shaped model")
    group.add_argument("--device", default="cpu", help="cpu, or cuda (then the wall time and the GPU's peak "
                       "allocated memory are the figures; CPU time is still recorded)")
    group.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))


def sd_shaped_unet_config(width: int = 32, text_dim: int = 32) -> dict:
    """Stable Diffusion 1.x's UNet layout (4 levels, 2 layers each, cross-attention on the first 3, 8 heads) with
    ``width`` channels at the first level (SD: 320) and a ``text_dim`` context (SD: 768)."""
    return dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=min(32, width),
        block_out_channels=(width, 2 * width, 4 * width, 4 * width), attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=text_dim,
    )  # fmt: skip


def make_sd_shaped_folder(path: Path, width: int) -> Path:
    """A pipeline folder: the SD-shaped UNet, a 4-level (factor 8, as SD's) tiny VAE, the tiny CLIP text tower."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from common.tiny import seeded, tiny_sd_components, tiny_vae, write_clip_vocab_files

    components = tiny_sd_components(0)
    with seeded(0):
        components["unet"] = UNet2DConditionModel(**sd_shaped_unet_config(width)).eval()
    components["vae"] = tiny_vae(1, down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 64, 64))
    StableDiffusionPipeline(**components).save_pretrained(path, safe_serialization=True)
    write_clip_vocab_files(Path(path) / "tokenizer")
    return Path(path)


def compiled_worker(config: dict) -> None:
    """One configuration in its own process: set up, warm up (compiles), then one sampling run per ``run``."""
    from safetensors.torch import save_file
    from worker_pool import serve

    from common.compile import compiling, default_options

    torch.manual_seed(0)
    impl, batch, steps, side, scale = config["impl"], config["batch"], config["steps"], config["resolution"], 7.5
    device = torch.device(config.get("device", "cpu"))
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.get("dtype", "fp32")]
    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        if config["model"] == "tiny":
            folder = Path(__file__).resolve().parent.parent / "ckpt" / "tiny" / "baseline"
        else:
            folder = make_sd_shaped_folder(Path(tmp) / "sd", config["sd_width"])
        prompts = ["a red handwritten seven"] * batch
        if impl.startswith("ours"):
            ours = LatentTextToImage.from_pretrained(str(folder), dtype=dtype, device=device)
            unet = ours.unet
            cond, uncond = ours.encode_prompt(prompts), ours.encode_prompt([""] * batch)
            shape = ours.latent_shape(batch, side, side)
            plan = plan_like_diffusers(ours.schedule, ours.scheduler_config, steps, "ddim")
            channels_last = impl.endswith("channels_last")
            # what scripts/sample.py --compile uses (inductor, weights frozen into the graph)
            options = default_options(freeze=True, channels_last=channels_last) if "compiled" in impl else None
            if channels_last and options is None:
                unet.to(memory_format=torch.channels_last)

            def run():
                with compiling(options):
                    den = guided_unet(unet, cond, uncond, scale)
                    return sample_ddim(den, ours.schedule, plan, shape, generator=torch.Generator().manual_seed(0),
                                       progress=False, device=device, dtype=dtype)
        else:
            from diffusers import StableDiffusionPipeline

            pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, dtype=dtype)
            pipe = pipe.to(device)
            pipe.set_progress_bar_config(disable=True)
            cond, uncond = pipe.encode_prompt(prompts, device, 1, True, [""] * batch)
            if impl == "diffusers_compiled":
                pipe.unet = torch.compile(pipe.unet)  # the recipe of diffusers' docs
            unet = pipe.unet

            def run():
                return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps,
                            guidance_scale=scale, height=side, width=side, output_type="latent",
                            generator=torch.Generator().manual_seed(0)).images

        def timed() -> dict:
            if cuda:
                torch.cuda.synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            with torch.no_grad():
                out = run()
            if cuda:
                torch.cuda.synchronize(device)
            return {"wall": time.perf_counter() - start, "cpu": time.process_time() - start_cpu, "out": out}

        first = timed()  # the warm-up: compiles (the compiled configurations), first-use costs (all)
        save_file({"latents": first.pop("out").float().cpu().contiguous()}, config["latents_file"])

        def run_once() -> dict:
            result = timed()
            result.pop("out")
            return result

        def profile() -> dict:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            x = torch.randn((2 * batch, 4, side // 8, side // 8), device=device, dtype=dtype)
            t = torch.full((2 * batch,), 500, device=device)
            text = torch.cat([uncond, cond])
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with torch.no_grad():
                unet(x, t, encoder_hidden_states=text, return_dict=False)
                with torch_profile(activities=activities) as prof:
                    unet(x, t, encoder_hidden_states=text, return_dict=False)
                    if cuda:
                        torch.cuda.synchronize(device)
            table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                              row_limit=12, max_name_column_width=50)
            return {"table": table}

        def gpu_peak() -> dict:
            return {"gpu_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None}

        serve({"run": run_once, "profile": profile, "gpu_peak": gpu_peak},
              {"first_wall": first["wall"], "first_cpu": first["cpu"]})


def compiled_main(args, argv) -> None:
    from safetensors.torch import load_file
    from worker_pool import Worker, interleave

    rows: list[dict] = []
    command = "OMP_NUM_THREADS=1 python bench/bench_sampler.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = "compiled sampler" + ("" if args.device == "cpu" else f" ({args.device}, {args.dtype})")
    setting = "1 thread" if args.device == "cpu" else f"{args.device} {args.dtype}"
    profiles: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            side = args.resolution if model == "tiny" else args.sd_resolution
            label = ("tiny baseline" if model == "tiny" else f"SD-shaped UNet width {args.sd_width}") + f", {side} px"
            workers = []
            for impl in args.impls:
                config = dict(model=model, impl=impl, batch=args.batch, steps=args.steps, resolution=side,
                              device=args.device, dtype=args.dtype,
                              sd_width=args.sd_width, latents_file=str(Path(tmp) / f"{model}-{impl}.safetensors"))
                workers.append(Worker("bench_sampler.py", impl, config))
                print(f"{label}: {impl} ready (first run {workers[-1].ready['first_wall']:.1f} s wall, "
                      f"{workers[-1].ready['first_cpu']:.1f} s CPU)", flush=True)
            results = interleave(workers, args.reps)
            if args.profile and model == "sd":
                for w in workers:
                    if w.name in ("ours_eager", "ours_compiled"):
                        profiles.append(f"### {label}: {w.name}, one UNet call (CFG batch {2 * args.batch})\n\n"
                                        "```\n" + w.ask("profile")["table"] + "```\n")
            gpu_peaks = {w.name: w.ask("gpu_peak")["gpu_peak_mb"] for w in workers}
            peaks = {w.name: w.quit()["peak_rss_mb"] for w in workers}
            latents = {w.name: load_file(w.config["latents_file"])["latents"]
                       for w in workers}
            med_wall = {n: statistics.median(r["wall"] for r in res) for n, res in results.items()}
            med_cpu = {n: statistics.median(r["cpu"] for r in res) for n, res in results.items()}
            what = f"{label}, batch {args.batch}, CFG, {args.steps} DDIM steps, {setting}"
            for w in workers:
                n = w.name
                print(f"  {n:28s} {med_wall[n]:.3f} s wall  {med_cpu[n]:.3f} s CPU  first run "
                      f"{w.ready['first_cpu']:.1f} s CPU  peak RSS {peaks[n]:.0f} MB", flush=True)
                rows += [
                    dict(name=f"{what}: {n}, CPU seconds per run", value=round(med_cpu[n], 4), unit="s"),
                    dict(name=f"{what}: {n}, wall seconds per run", value=round(med_wall[n], 4), unit="s"),
                    dict(name=f"{what}: {n}, first run incl. compile (CPU s of the worker; inductor's compile "
                                           "subprocesses not counted)", value=round(w.ready["first_cpu"], 2),
                         unit="s"),
                    dict(name=f"{what}: {n}, peak RSS of its process", value=round(peaks[n]), unit="MB"),
                ]
                if gpu_peaks[n] is not None:
                    rows.append(dict(name=f"{what}: {n}, peak GPU memory allocated", value=round(gpu_peaks[n]),
                                     unit="MB"))
            reference = latents.get("diffusers_eager")
            for n, lat in latents.items():
                if reference is not None and n != "diffusers_eager":
                    rows.append(dict(name=f"{what}: max |{n} - diffusers_eager| final latents",
                                     value=float(f"{(lat - reference).abs().max().item():.3e}"), unit="abs",
                                     target="<= 1e-4"))
            for a in workers:
                for b in workers:
                    pair = (a.name, b.name)
                    if pair in TARGETS or (a.name == "ours_compiled" and b.name == "ours_eager") or (
                            a.name.endswith("channels_last") and b.name == a.name.replace("_channels_last", "")):
                        target = TARGETS.get(pair, "")
                        cpu_ratio = med_cpu[b.name] / med_cpu[a.name]
                        wall_ratio = med_wall[b.name] / med_wall[a.name]
                        print(f"  speed {a.name} / {b.name}: CPU {cpu_ratio:.3f}  wall {wall_ratio:.3f}  "
                              f"target {target or '-'}", flush=True)
                        rows += [
                            dict(name=f"{what}: speed {a.name} / {b.name} (CPU time)", value=round(cpu_ratio, 4),
                                 unit="x", target=target),
                            dict(name=f"{what}: speed {a.name} / {b.name} (wall time)", value=round(wall_ratio, 4),
                                 unit="x", target=target),
                        ]
        for side in args.memory_resolutions:
            for impl in ("ours_eager", "diffusers_eager"):
                config = dict(model="sd", impl=impl, batch=1, steps=1, resolution=side, sd_width=args.sd_width,
                              device=args.device, dtype=args.dtype,
                              latents_file=str(Path(tmp) / f"mem-{side}-{impl}.safetensors"))
                worker = Worker("bench_sampler.py", impl, config)
                gpu_peak = worker.ask("gpu_peak")["gpu_peak_mb"]
                peak = worker.quit()["peak_rss_mb"]
                what = f"SD-shaped UNet width {args.sd_width}, {side} px, batch 1, CFG, one DDIM step, {setting}"
                if gpu_peak is not None:
                    rows.append(dict(name=f"{what}: {impl}, peak GPU memory allocated", value=round(gpu_peak),
                                     unit="MB"))
                print(f"{what}: {impl} peak RSS {peak:.0f} MB, {worker.ready['first_cpu']:.1f} s CPU", flush=True)
                rows += [dict(name=f"{what}: {impl}, peak RSS of its process", value=round(peak), unit="MB"),
                         dict(name=f"{what}: {impl}, CPU seconds (first step)",
                              value=round(worker.ready["first_cpu"], 2), unit="s")]
    if not args.no_write:  # before the profile file: a new file would make the records' commit "uncommitted"
        from records import write_records

        write_records([dict(r, command=command, section=section) for r in rows])
    if profiles:
        text = f"# One UNet call, profiled ({args.device})\n\nWritten by `{command}`.\n\n" + "\n".join(profiles)
        (Path(__file__).resolve().parent / f"profile_sampler_{args.device}.md").write_text(text)


if __name__ == "__main__":
    main()
