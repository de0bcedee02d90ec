"""Trainer overhead: ``common.train.Trainer`` vs a plain hand-written accelerate loop doing the same work.

Both train the project's tiny ``UNet2DConditionModel`` (``common.tiny``, ~0.8M parameters) on 8x8x4 latents with
77x32 text embeddings, batch 64, epsilon-prediction MSE at random timesteps, AdamW with the same settings,
gradient clipping at 1.0, a constant LR schedule, fp32. The trainer runs as scripts use it (tensorboard logging,
tqdm, per-batch loss all-gather, RNG-scoped data fetching), with EMA and checkpoints off because the plain loop has
neither. Repetitions alternate ABAB / BABA so machine noise (a shared 2-core CPU) hits both alike.

Speed comes from timestamps taken when the shared loss function starts, so each interval between two of them is
one full cycle of either loop (data fetch, forward, backward, optimizer, bookkeeping). Steps after ``--warmup``
are used; a repetition's figure is its *median* interval (a burst of load from other processes on a shared
machine hits a few steps, not the median), and the ratio is the median over repetitions of the ratio of the two
adjacent runs. Wall clock gives steps/s; ``time.process_time`` gives CPU seconds per step, which other processes
barely disturb, so the CPU ratio is the steadier overhead figure on a busy machine. One intra-op thread by
default (``--threads``): oversubscribed OpenMP threads spin and make wall times swing by 10x.

Memory: before each loop the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``); the loop's peak RSS and
its peak above the RSS it started from are reported (where the reset is not allowed, the process peak
``ru_maxrss`` for both). Usage: ``python bench/bench_trainer.py [--reps 9 --steps 10 --threads 1]``.

``--compiled``: the trainer eager vs the trainer with ``compile=True`` (``--compile`` of every training script), each
in its own worker process (``bench/worker_pool.py``) running one long ``fit``; the loss function pauses every
``--steps`` steps until the parent says go, so blocks of steps of the two alternate (interleaved); a block's
figure is its median step interval, the ratio the median over blocks of eager / compiled. ``--model sd`` trains the
SD-shaped UNet of ``bench/bench_sampler.py`` (Stable Diffusion 1.x's block structure at ``--sd_width`` channels)
on ``--latent_side`` latents with ``--batch`` samples instead of the tiny UNet.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.tiny import tiny_unet2d_condition  # noqa: E402
from common.train import TrainConfig, Trainer  # noqa: E402


BATCH = 64
TOKENS, TEXT_DIM = 77, 32
LR, BETAS, WEIGHT_DECAY, EPS, MAX_GRAD_NORM = 1e-4, (0.9, 0.999), 1e-2, 1e-8, 1.0


def make_dataset(num_batches: int, batch: int = BATCH, side: int = 8) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    n = batch * num_batches
    return TensorDataset(torch.randn(n, 4, side, side, generator=g), torch.randn(n, TOKENS, TEXT_DIM, generator=g))


def make_unet(model: str = "tiny", sd_width: int = 32) -> nn.Module:
    """The trained network: the tiny UNet, or the SD-shaped one of ``bench/bench_sampler.py``."""
    if model == "tiny":
        return tiny_unet2d_condition(seed=0)
    from bench_sampler import sd_shaped_unet_config
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**sd_shaped_unet_config(sd_width, TEXT_DIM))


def model_description(model: str, sd_width: int, side: int, batch: int, threads: int) -> str:
    if model == "tiny":  # the tiny UNet's rows keep their names, so a rerun replaces them
        return f"tiny UNet2DCondition 0.8M, 8x8x4 latents, batch {BATCH}, {threads} thread(s)"
    params = sum(p.numel() for p in make_unet(model, sd_width).parameters()) / 1e6
    return f"SD-shaped UNet width {sd_width} {params:.1f}M, {side}x{side}x4 latents, batch {batch}, {threads} thread(s)"


class DiffusionLoss:
    """Epsilon-prediction MSE on the SD scaled-linear schedule; records when each call starts (the step clock)."""

    def __init__(self) -> None:
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __call__(self, unet: nn.Module, latents: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],), device=latents.device)
        abar = self.alphas_cumprod.to(latents.device)[t].view(-1, 1, 1, 1)
        noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
        pred = unet(noisy, t, encoder_hidden_states=text).sample
        return nn.functional.mse_loss(pred.float(), noise.float())

    def median_interval(self, warmup: int, clock: str) -> float:
        """Median length of the full step cycles after ``warmup`` steps, on the ``wall`` or ``cpu`` clock."""
        stamps = getattr(self, clock)[warmup:]
        return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def run_trainer(steps: int, out_dir: str) -> DiffusionLoss:
    loss = DiffusionLoss()
    config = TrainConfig(
        output_dir=out_dir, seed=0, train_batch_size=BATCH, max_train_steps=steps, learning_rate=LR,
        lr_scheduler="constant", lr_warmup_steps=0, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
        adam_weight_decay=WEIGHT_DECAY, adam_epsilon=EPS, max_grad_norm=MAX_GRAD_NORM,
        checkpointing_steps=10**9, validation_steps=10**9, report_to="tensorboard",
    )  # fmt: skip
    with Trainer(config) as trainer:
        unet = tiny_unet2d_condition(seed=0)
        trainer.fit({"unet": unet}, lambda batch, ctx: loss(ctx.models["unet"], *batch), make_dataset(steps))
    return loss


def run_plain(steps: int) -> DiffusionLoss:
    """The reference: what a diffusers example script's loop does, minus everything optional."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    loss = DiffusionLoss()
    accelerator = Accelerator(cpu=not torch.accelerator.is_available())
    set_seed(0)
    unet = tiny_unet2d_condition(seed=0).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, eps=EPS)
    dataloader = DataLoader(make_dataset(steps), batch_size=BATCH, shuffle=True)
    lr_scheduler = get_scheduler("constant", optimizer, num_warmup_steps=0, num_training_steps=steps)
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)
    for latents, text in dataloader:
        with accelerator.accumulate(unet):
            accelerator.backward(loss(unet, latents, text))
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(unet.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    accelerator.end_training()
    return loss


def reset_peak_rss() -> float | None:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); returns the RSS now (MB), None if refused."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None
    return _status_mb("VmRSS:")


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def measure(run, rep: int, start_rss: float | None) -> tuple[DiffusionLoss, float, float | None]:
    """Run one loop; returns its clocks, its peak RSS (MB) and its peak above the starting RSS (None if unknown)."""
    loss = run(rep)
    if start_rss is None:
        return loss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, None
    peak = _status_mb("VmHWM:")
    return loss, peak, peak - start_rss


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per repetition and loop")
    parser.add_argument("--warmup", type=int, default=2, help="steps of each repetition left out of the timing")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--no_write", action="store_true", help="print only, do not update bench/results.json")
    parser.add_argument("--compiled", action="store_true", help="the trainer eager vs compiled (see above)")
    parser.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"),
                        help="--compiled: the trainer's autocast (fp16 needs a GPU)")
    parser.add_argument("--model", default="tiny", choices=("tiny", "sd"), help="--compiled: the trained UNet")
    parser.add_argument("--sd_width", type=int, default=32, help="--model sd: first-level channels (SD: 320)")
    parser.add_argument("--latent_side", type=int, default=8, help="--compiled: latent side (tiny: 8)")
    parser.add_argument("--batch", type=int, default=BATCH, help="--compiled: samples per step")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return compiled_worker(json.loads(args.worker))
    if args.compiled:
        return compiled_main(args, argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("common.train").setLevel(logging.WARNING)

    names = ("trainer", "plain")
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    peak: dict[str, list[float]] = {n: [] for n in names}
    growth: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        loops = {
            "trainer": lambda rep: run_trainer(args.steps, os.path.join(tmp, f"rep{rep}")),
            "plain": lambda rep: run_plain(args.steps),
        }
        run_trainer(args.warmup + 2, os.path.join(tmp, "warmup"))  # first-use costs (imports, allocator) once
        run_plain(args.warmup + 2)
        for rep in range(args.reps):
            for name in names if rep % 2 == 0 else names[::-1]:
                loss, peak_mb, grown_mb = measure(loops[name], rep, reset_peak_rss())
                wall[name].append(loss.median_interval(args.warmup, "wall"))
                cpu[name].append(loss.median_interval(args.warmup, "cpu"))
                peak[name].append(peak_mb)
                if grown_mb is not None:
                    growth[name].append(grown_mb)
                print(f"rep {rep} {name:7s} {1 / wall[name][-1]:.3f} steps/s  {cpu[name][-1]:.3f} CPU s/step  "
                      f"peak RSS {peak_mb:.0f} MB", flush=True)  # fmt: skip

    steps_per_s = {n: 1 / statistics.median(wall[n]) for n in names}
    cpu_per_step = {n: statistics.median(cpu[n]) for n in names}
    wall_ratio = statistics.median(p / t for t, p in zip(wall["trainer"], wall["plain"]))  # >1: trainer faster
    cpu_ratio = statistics.median(p / t for t, p in zip(cpu["trainer"], cpu["plain"]))
    print(f"median over {args.reps} reps ({args.threads} thread(s)): trainer {steps_per_s['trainer']:.3f} steps/s "
          f"({cpu_per_step['trainer']:.4f} CPU s/step), plain accelerate loop {steps_per_s['plain']:.3f} steps/s "
          f"({cpu_per_step['plain']:.4f} CPU s/step); speed ratio trainer/plain: wall {wall_ratio:.3f}, "
          f"CPU {cpu_ratio:.3f} (target >= 0.95)")  # fmt: skip
    if growth["trainer"]:
        print(f"peak RSS: trainer {max(peak['trainer']):.0f} MB (+{max(growth['trainer']):.0f} MB over its start), "
              f"plain {max(peak['plain']):.0f} MB (+{max(growth['plain']):.0f} MB)")  # fmt: skip
    if args.no_write:
        return
    from records import write_records

    command = ("python bench/bench_trainer.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    section = "core trainer"
    what = f"tiny UNet2DCondition 0.8M, 8x8x4 latents, batch {BATCH}, {args.threads} thread(s)"
    if torch.cuda.is_available():
        what += f", {torch.cuda.get_device_name(0)}, mixed precision {args.mixed_precision}"
    rows = [
        ("trainer: ours / plain accelerate loop, speed ratio (wall clock)", round(wall_ratio, 4), "x", ">= 0.95"),
        ("trainer: ours / plain accelerate loop, speed ratio (CPU time)", round(cpu_ratio, 4), "x", ">= 0.95"),
        (f"trainer: ours, steps/s ({what})", round(steps_per_s["trainer"], 4), "steps/s", ""),
        (f"trainer: plain accelerate loop, steps/s ({what})", round(steps_per_s["plain"], 4), "steps/s", ""),
        (f"trainer: ours, samples/s ({what})", round(steps_per_s["trainer"] * BATCH, 1), "samples/s", ""),
        ("trainer: ours, CPU seconds per step", round(cpu_per_step["trainer"], 4), "s", ""),
        ("trainer: plain accelerate loop, CPU seconds per step", round(cpu_per_step["plain"], 4), "s", ""),
        ("trainer: ours, peak RSS of the benchmark process", round(max(peak["trainer"])), "MB", ""),
        ("trainer: plain accelerate loop, peak RSS of the benchmark process", round(max(peak["plain"])), "MB", ""),
    ]
    if growth["trainer"]:
        rows += [
            ("trainer: ours, peak RSS above the loop's start", round(max(growth["trainer"])), "MB", ""),
            ("trainer: plain accelerate loop, peak RSS above the loop's start", round(max(growth["plain"])), "MB", ""),
        ]
    write_records([
        dict(name=name, value=value, unit=unit, target=target, command=command, section=section)
        for name, value, unit, target in rows
    ], replace_section=section)  # fmt: skip


# ------------------------------------------------------------------------------------------ --compiled


class PausingLoss(DiffusionLoss):
    """The diffusion loss of a worker: after ``warmup`` steps and then every ``block`` steps it reports the median
    step interval of the block just run and waits for the parent's next command."""

    def __init__(self, warmup: int, block: int, blocks: int) -> None:
        super().__init__()
        self.warmup, self.block, self.blocks, self.calls = warmup, block, blocks, 0
        self.block_start = 0

    def __call__(self, unet: nn.Module, latents: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        from worker_pool import peak_rss_mb, reply

        n = self.calls
        self.calls += 1
        if n >= self.warmup and (n - self.warmup) % self.block == 0:
            wall, cpu = time.perf_counter(), time.process_time()
            if n == self.warmup:  # set-up done: the first steps (eager probe step + compile) are behind us
                reply({"ready": True, "first_wall": wall - self.start_wall, "first_cpu": cpu - self.start_cpu})
            else:
                walls, cpus = self.wall[self.block_start:] + [wall], self.cpu[self.block_start:] + [cpu]
                reply({"wall": statistics.median(b - a for a, b in zip(walls, walls[1:])),
                       "cpu": statistics.median(b - a for a, b in zip(cpus, cpus[1:]))})
            command = sys.stdin.readline().strip()
            if command == "quit":
                reply({"peak_rss_mb": peak_rss_mb()})
            self.block_start = len(self.wall)
        return super().__call__(unet, latents, text)


def compiled_worker(config: dict) -> None:
    torch.set_num_threads(config["threads"])
    logging.getLogger("common.train").setLevel(logging.WARNING)
    loss = PausingLoss(config["warmup"], config["block"], config["blocks"])
    steps = config["warmup"] + config["block"] * config["blocks"] + 1
    batch = config.get("batch", BATCH)
    with tempfile.TemporaryDirectory() as tmp:
        train_config = TrainConfig(
            output_dir=os.path.join(tmp, "run"), seed=0, train_batch_size=batch, max_train_steps=steps,
            learning_rate=LR, lr_scheduler="constant", lr_warmup_steps=0, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
            adam_weight_decay=WEIGHT_DECAY, adam_epsilon=EPS, max_grad_norm=MAX_GRAD_NORM,
            checkpointing_steps=10**9, validation_steps=10**9, report_to="none", compile=config["compile"],
            mixed_precision=config["mixed_precision"],
        )  # fmt: skip
        loss.start_wall, loss.start_cpu = time.perf_counter(), time.process_time()
        with Trainer(train_config) as trainer:
            unet = make_unet(config.get("model", "tiny"), config.get("sd_width", 32))
            trainer.fit({"unet": unet}, lambda batch, ctx: loss(ctx.models["unet"], *batch),
                        make_dataset(steps, batch, config.get("latent_side", 8)))


def compiled_main(args, argv) -> None:
    from worker_pool import Worker, interleave

    config = dict(threads=args.threads, warmup=args.warmup + 2, block=args.steps, blocks=args.reps,
                  mixed_precision=args.mixed_precision, model=args.model, sd_width=args.sd_width,
                  latent_side=args.latent_side, batch=args.batch)
    workers = [Worker("bench_trainer.py", name, dict(config, compile=name == "compiled"), threads=args.threads)
               for name in ("eager", "compiled")]
    for w in workers:
        print(f"trainer {w.name}: ready after {w.ready['first_cpu']:.1f} CPU s", flush=True)
    blocks = interleave(workers, args.reps)
    peaks = {w.name: w.quit()["peak_rss_mb"] for w in workers}
    cpu_ratio = statistics.median(e["cpu"] / c["cpu"] for e, c in zip(blocks["eager"], blocks["compiled"]))
    wall_ratio = statistics.median(e["wall"] / c["wall"] for e, c in zip(blocks["eager"], blocks["compiled"]))
    cpu_step = {n: statistics.median(b["cpu"] for b in bs) for n, bs in blocks.items()}
    wall_step = {n: statistics.median(b["wall"] for b in bs) for n, bs in blocks.items()}
    first = {w.name: w.ready["first_cpu"] for w in workers}
    print(f"speed compiled / eager: CPU {cpu_ratio:.3f}, wall {wall_ratio:.3f} (target >= 1.2); CPU s/step "
          f"eager {cpu_step['eager']:.4f} compiled {cpu_step['compiled']:.4f}; first steps (incl. compile) "
          f"{first['eager']:.1f} / {first['compiled']:.1f} CPU s; peak RSS {peaks['eager']:.0f} / "
          f"{peaks['compiled']:.0f} MB")  # fmt: skip
    if args.no_write:
        return
    from records import write_records

    command = ("python bench/bench_trainer.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    what = model_description(args.model, args.sd_width, args.latent_side, args.batch, args.threads)
    suffix = "" if args.model == "tiny" else f" ({what})"
    rows = [
        (f"trainer compiled / eager, speed ratio (CPU time; {what})", round(cpu_ratio, 4), "x", ">= 1.2"),
        (f"trainer compiled / eager, speed ratio (wall clock; {what})", round(wall_ratio, 4), "x", ">= 1.2"),
    ]
    for n in ("eager", "compiled"):
        rows += [
            (f"trainer {n}: CPU seconds per step ({what})", round(cpu_step[n], 4), "s", ""),
            (f"trainer {n}: wall seconds per step ({what})", round(wall_step[n], 4), "s", ""),
            (f"trainer {n}: first {config['warmup']} steps incl. compile (CPU s){suffix}", round(first[n], 2), "s",
             ""),
            (f"trainer {n}: peak RSS of its process{suffix}", round(peaks[n]), "MB", ""),
        ]
    write_records([dict(name=name, value=value, unit=unit, target=target, command=command,
                        section="compiled trainer") for name, value, unit, target in rows])


if __name__ == "__main__":
    main()
