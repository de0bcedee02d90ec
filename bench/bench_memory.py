"""Peak memory of one generation at 256 / 512 / 1024 px: ``scripts/sample.py`` (the baseline method, which plans
its memory) against diffusers' plain ``StableDiffusionPipeline`` on the same checkpoint, each in its own process.

Every request is batch 1 with classifier-free guidance (one UNet forward over the doubled batch) and ONE inference
step: the peak is that of a single denoiser step or of the VAE decode, whichever is larger, and neither depends on
how many steps run, so more steps would only add time. Ours runs exactly as a user runs it (``scripts/sample.py
--method baseline ... --max_memory_gb B``, images written to a temporary folder) under each budget of
``--budgets`` (``default``: the machine's memory); diffusers runs ``pipe(prompt, height, width)`` to PIL images.

Measured per process: its peak resident memory (``VmHWM``: ``ru_maxrss`` from ``wait4`` would also count the
forked parent's pages before ``exec``), and the peak
above the resident memory after the libraries were imported (torch, diffusers, transformers and the project are
imported before the clock starts in both), which is what the estimate of ``common.memory`` covers: the weights
plus the request. Both are recorded beside the estimate of the plan ours took (for diffusers: the estimate of the
plain path) and the budget. Budgets whose plan equals one already measured at that size are not run again (the
same code path; the row says which). The children run with ``MALLOC_MMAP_THRESHOLD_`` low, so freed tensors go back
to the system and the peak is that of live tensors, as in ``tests/test_memory.py``. A parent thread polls each
child's resident memory and kills it above ``--cap_gb`` or after ``--timeout_s``, and records that it did.

``--models sd`` uses the SD-shaped UNet of ``bench/bench_sampler.py`` (Stable Diffusion 1.x's block structure at
``--sd_width`` channels, a factor-8 VAE) in a pipeline folder written for the run.
Usage: ``OMP_NUM_THREADS=1 python bench/bench_memory.py --models tiny --sides 256 512 1024``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


REPO = Path(__file__).resolve().parent.parent
PROMPT = "a red handwritten seven"
GUIDANCE = 7.5
MB = 2**20


def status_bytes(key: str, pid: str = "self") -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``) in bytes."""
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) * 1024


@dataclass
class Capped:
    """How a child process ended under :func:`run_capped`."""

    returncode: Optional[int]
    polled_peak_bytes: int  # the largest resident memory the poller saw (before exec: the forked parent's pages)
    killed: str = ""  # "" or why it was stopped ("memory above ... GB", "time above ... s")
    report: dict[str, Any] = field(default_factory=dict)  # the child's last JSON line
    stderr_tail: str = ""


def run_capped(command: list[str], cap_bytes: int, timeout_s: float, env: Optional[dict] = None,
               poll_s: float = 0.1) -> Capped:
    """Run ``command``, killing it when its resident memory exceeds ``cap_bytes`` or it runs past ``timeout_s``."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=str(REPO))
    killed, peak, start = [""], [0], time.monotonic()

    def poll() -> None:
        while proc.returncode is None:
            try:
                rss = status_bytes("VmRSS", str(proc.pid))
            except (OSError, AttributeError):  # exited (or a zombie without VmRSS)
                return
            peak[0] = max(peak[0], rss)
            reason = (f"memory above {cap_bytes / 2**30:.1f} GB" if rss > cap_bytes else
                      f"time above {timeout_s:.0f} s" if time.monotonic() - start > timeout_s else "")
            if reason:
                killed[0] = reason
                proc.kill()
                return
            time.sleep(poll_s)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    out = proc.stdout.read()
    err = proc.stderr.read()
    proc.wait()
    watcher.join()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return Capped(proc.returncode, peak[0], killed[0], json.loads(lines[-1]) if lines else {}, err[-2000:])


# ------------------------------------------------------------------------------------------------ the child


def worker(config: dict) -> None:
    """One request in this process; prints the resident memory after the imports, the peak, and the times."""
    import diffusers  # noqa: F401  (both implementations import the same libraries before the baseline is read)
    import torch
    import transformers  # noqa: F401

    import common.pipeline  # noqa: F401
    import common.sample_command  # noqa: F401

    torch.set_num_threads(1)
    imported = status_bytes("VmRSS")
    start, start_cpu = time.perf_counter(), time.process_time()
    side = config["side"]
    if config["impl"] == "ours":
        import runpy

        with tempfile.TemporaryDirectory() as out:
            sys.argv = ["scripts/sample.py", "--method", "baseline", "--checkpoint", config["checkpoint"],
                        "--prompt", PROMPT, "--resolution", str(side), "--num_inference_steps", "1",
                        "--guidance_scale", str(GUIDANCE), "--output_dir", out, "--no_progress"]
            if config.get("budget_gb") is not None:
                sys.argv += ["--max_memory_gb", str(config["budget_gb"])]
            try:
                runpy.run_path(str(REPO / "scripts" / "sample.py"), run_name="__main__")
            except SystemExit as done:  # the script ends with sys.exit(main())
                if done.code:
                    raise
            plan = json.loads((Path(out) / "settings.json").read_text()).get("memory_plan")
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(config["checkpoint"], safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(PROMPT, height=side, width=side, num_inference_steps=1, guidance_scale=GUIDANCE,
                      generator=torch.Generator().manual_seed(0)).images
        assert images[0].size == (side, side)
        plan = None
    print(json.dumps({"imported": imported, "peak": status_bytes("VmHWM"), "plan": plan,
                      "wall": time.perf_counter() - start, "cpu": time.process_time() - start_cpu}), flush=True)


# ----------------------------------------------------------------------------------------------- the parent


def plans_for(checkpoint: str, side: int, budgets: list[Optional[float]]) -> tuple[dict, int]:
    """Ours' plan (or the refusal) per budget, and the estimate of the plain path, from the models' configs."""
    from common import memory
    from common.errors import UserError
    from common.pipeline import LatentTextToImage

    pipe = LatentTextToImage.from_pretrained(checkpoint)
    plans: dict[Optional[float], Any] = {}
    for budget in budgets:
        try:
            plans[budget] = pipe.memory_plan(1, side, side, GUIDANCE, budget)
        except UserError as refusal:
            plans[budget] = refusal
    weights = memory.weight_bytes(pipe.unet, pipe.vae, pipe.text_encoder)
    plain = memory.estimate(pipe.unet.config, pipe.vae.config, memory.Request(1, side, side), weights=weights)
    return plans, plain


def budget_value(text: str) -> Optional[float]:
    """``--budgets`` entry: "default" (the flag left out) or a positive number of GB."""
    if text == "default":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not 'default' or a positive number of GB")
    return value


def budget_label(budget: Optional[float]) -> str:
    return "default budget (the machine's memory)" if budget is None else f"--max_memory_gb {budget:g}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny"], choices=("tiny", "sd"))
    parser.add_argument("--sides", nargs="+", type=int, default=[256, 512, 1024])
    parser.add_argument("--budgets", nargs="+", type=budget_value, default=[None, 4.0, 1.0],
                        help="ours' --max_memory_gb values; 'default': the flag left out (default: default 4 1)")
    parser.add_argument("--impls", nargs="+", default=["ours", "diffusers"], choices=("ours", "diffusers"))
    parser.add_argument("--sd_width", type=int, default=32)
    parser.add_argument("--cap_gb", type=float, default=12.0, help="kill a child whose resident memory passes this")
    parser.add_argument("--timeout_s", type=float, default=900.0, help="kill a child that runs longer")
    parser.add_argument("--no_write", action="store_true", help="print only, do not update bench/results.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    budgets = args.budgets
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])))
    command = "OMP_NUM_THREADS=1 python bench/bench_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def save(rows: list[dict]) -> None:  # after every process, so a later timeout or kill keeps what was measured
        if not args.no_write and rows:
            from records import write_records

            write_records([dict(r, command=command, section="peak memory") for r in rows])

    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            if model == "tiny":
                checkpoint, label = str(REPO / "ckpt" / "tiny" / "baseline"), "tiny baseline"
            else:
                from bench_sampler import make_sd_shaped_folder  # bench/ is on sys.path: this script's folder

                checkpoint = str(make_sd_shaped_folder(Path(tmp) / "sd", args.sd_width))
                label = f"SD-shaped UNet width {args.sd_width}"
            for side in args.sides:
                measure_side(args, model, checkpoint, label, side, budgets, env, save)


def measure_side(args, model: str, checkpoint: str, label: str, side: int, budgets: list[Optional[float]],
                 env: dict, save: Callable[[list[dict]], None]) -> None:
    plans, plain_estimate = plans_for(checkpoint, side, budgets)
    what = f"{label}, {side} px, batch 1, CFG, 1 step"
    measured_by_plan: dict[str, tuple[Optional[float], Capped]] = {}

    def run(config: dict) -> Capped:
        result = run_capped([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(config)],
                            int(args.cap_gb * 2**30), args.timeout_s, env)
        report = result.report
        who = "ours, " + budget_label(config["budget_gb"]) if config["impl"] == "ours" else "diffusers, plain"
        print(f"{what}: {who}: "
              + (f"stopped: {result.killed}" if result.killed else
                 f"exit {result.returncode}" if result.returncode else
                 f"peak {report['peak'] / MB:.0f} MB, above imports {(report['peak'] - report['imported']) / MB:.0f}"
                 f" MB, {report['cpu']:.1f} CPU s, {report['wall']:.1f} s wall") + f" (largest RSS polled "
              f"{result.polled_peak_bytes / MB:.0f} MB)", flush=True)
        if result.returncode and not result.killed:
            print(result.stderr_tail, file=sys.stderr)
        return result

    def figures(name: str, result: Capped, estimate: int, budget_bytes: Optional[int], target: str,
                budget_name: str = "budget") -> list[dict]:
        if result.killed:
            return [dict(name=f"{name}: stopped ({result.killed}); largest resident memory seen",
                         value=round(result.polled_peak_bytes / MB), unit="MB")]
        if result.returncode:
            return [dict(name=f"{name}: failed (exit {result.returncode})", value=result.returncode, unit="exit")]
        report = result.report
        above = report["peak"] - report["imported"]
        out = [
            dict(name=f"{name}: peak RSS of the process", value=round(report["peak"] / MB), unit="MB"),
            dict(name=f"{name}: peak RSS above the imported libraries (weights + request)", value=round(above / MB),
                 unit="MB"),
            dict(name=f"{name}: estimate (common.memory, weights + request)", value=round(estimate / MB), unit="MB"),
            dict(name=f"{name}: CPU seconds (load + 1 step + decode)", value=round(report["cpu"], 1), unit="s"),
        ]
        if budget_bytes is not None:
            out.append(dict(name=f"{name}: (peak above the libraries) / {budget_name}",
                            value=round(above / budget_bytes, 4), unit="x", target=target))
        return out

    if "ours" in args.impls:
        for budget, plan in plans.items():
            name = f"{what}: ours, {budget_label(budget)}"
            if isinstance(plan, Exception):
                save([dict(name=f"{name}: refused up front", value=str(plan), unit="message")])
                continue
            described = plan.describe().split(":")[0]
            save([dict(name=f"{name}: plan", value=described, unit="plan")])
            if described in measured_by_plan:
                first, result = measured_by_plan[described]
                save([dict(name=f"{name}: not run again, the same plan as {budget_label(first)}",
                           value=round(result.report.get("peak", 0) / MB), unit="MB")])
                above = result.report["peak"] - result.report["imported"] if result.report else None
                if above is not None:
                    save([dict(name=f"{name}: (peak above the libraries) / budget",
                               value=round(above / plan.budget, 4), unit="x", target="<= 1")])
                continue
            result = run(dict(impl="ours", checkpoint=checkpoint, side=side, budget_gb=budget))
            measured_by_plan[described] = (budget, result)
            save(figures(name, result, plan.estimate, plan.budget, "<= 1"))
    if "diffusers" in args.impls:
        name = f"{what}: diffusers StableDiffusionPipeline, plain"
        result = run(dict(impl="diffusers", checkpoint=checkpoint, side=side))
        fixed = [b for b in budgets if b is not None]
        save(figures(name, result, plain_estimate, int(fixed[0] * 2**30) if fixed else None, "",
                     f"ours' --max_memory_gb {fixed[0]:g}" if fixed else ""))


if __name__ == "__main__":
    main()
