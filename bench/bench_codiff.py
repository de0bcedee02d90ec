"""Collaborative Diffusion: the cost of one collaborative sampling step against its members, and peak memory.

Speed: one call of the collaborative denoiser (2 uni-modal UNets + 2 dynamic diffusers + softmax + weighted sum,
as the sampler calls it) against the SUM of the four member forwards timed one by one on the same inputs; target
<= 1.15x (the collaboration should cost no more than its parts). Interleaved repetitions, medians; with and without
classifier-free guidance on both members (each member then runs on a doubled batch). The models are the shipped
``ckpt/tiny/codiff`` (0.8M-parameter members on 8x8x4 latents, the mask one concat-conditioned; 0.2-0.25M-parameter
diffusers), or tiny random ones of the same sizes when it is missing.

Memory: peak resident memory of a fresh process that samples 50 DDIM steps with the collaboration (recording the
influence maps and x0 of every step, as ``generate.py --return_influence_function --display_x_inter`` does)
against one that samples with the text member alone; on a GPU, ``torch.cuda.max_memory_allocated`` instead. Also the
parameter memory of the paper-size collaboration (``configs/codiff/paper.yaml`` built on the meta device).

    OMP_NUM_THREADS=1 python bench/bench_codiff.py [--reps 200 --batch 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


REPO = Path(__file__).resolve().parent.parent

from codiff.batching import call_unet  # noqa: E402
from codiff.collaborate import CollaborativeDenoiser  # noqa: E402
from codiff.tiny import tiny_collaboration  # noqa: E402


def benchmark_models(model_dir: Path | None, batch: int, device: str):
    """``(model, conds, nulls, label)``: the shipped collaboration when ``model_dir`` holds one (its architecture:
    a concat mask member, diffusers attending to 256-d one-hot / 32-d text tokens), else the tiny random one."""
    if model_dir is not None and (model_dir / "codiff.json").is_file():
        from codiff.checkpoint import load_collaboration

        collab = load_collaboration(model_dir, device=device)
        ids = torch.zeros(batch, 32, 32, dtype=torch.long)
        ids[:, 8:24, 12:20] = 1
        conds = {"mask": collab.members["mask"].encode(ids),
                 "text": collab.members["text"].encode(["a red handwritten seven"] * batch)}
        return collab.model, conds, collab.null_conditions(1), "shipped ckpt/tiny/codiff"
    model = tiny_collaboration(("mask", "text"), seed=0, zero_init=False, logit_scale=0.5).to(device)
    g = torch.Generator().manual_seed(0)
    conds = {"mask": torch.randn(batch, 2, 32, generator=g).to(device),
             "text": torch.randn(batch, 77, 32, generator=g).to(device)}
    nulls = {"mask": torch.randn(1, 2, 32, generator=g).to(device), "text": torch.randn(1, 77, 32, generator=g).to(device)}
    return model, conds, nulls, "tiny random models (codiff.tiny)"


def step_timings(batch: int, reps: int, cfg: bool, device: str = "cpu", model_dir: Path | None = None) -> dict:
    model, conds, nulls, label = benchmark_models(model_dir, batch, device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 8, 8, generator=g).to(device)
    t = torch.full((batch,), 501, dtype=torch.long, device=device)
    scales = {"mask": 3.0, "text": 3.0} if cfg else None
    denoiser = CollaborativeDenoiser(model, conds, uncond=nulls if cfg else None, guidance_scales=scales)
    k = 2 if cfg else 1
    xm, tm = torch.cat([x] * k), torch.cat([t] * k)
    member_inputs = {name: torch.cat(([nulls[name].expand(batch, -1, -1)] if cfg else []) + [conds[name]])
                     for name in ("mask", "text")}

    def sync():
        if device != "cpu":
            torch.cuda.synchronize()

    parts = {
        "unet[mask]": lambda: call_unet(model.unets["mask"], xm, tm, member_inputs["mask"]),
        "unet[text]": lambda: call_unet(model.unets["text"], xm, tm, member_inputs["text"]),
        "diffuser[mask]": lambda: call_unet(model.diffusers["mask"], x, t, conds["mask"]),
        "diffuser[text]": lambda: call_unet(model.diffusers["text"], x, t, conds["text"]),
        "collaborative step": lambda: denoiser(x, t),
    }
    times: dict[str, list[float]] = {name: [] for name in parts}
    with torch.no_grad():
        for fn in parts.values():
            for _ in range(5):
                fn()
        for _ in range(reps):
            for name, fn in parts.items():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(v) for name, v in times.items()}
    members = sum(v for name, v in med.items() if name != "collaborative step")
    return {**med, "sum of members": members, "ratio": med["collaborative step"] / members, "label": label}


PROBE = r"""
import json, resource, torch
torch.set_num_threads(1)
from bench_codiff import benchmark_models
from codiff.pipeline import CollaborativePipeline
from codiff.checkpoint import load_collaboration
from pathlib import Path
mode, batch, model_dir = {mode!r}, {batch}, {model_dir!r}
device = "cuda" if torch.cuda.is_available() else "cpu"
model, conds, nulls, label = benchmark_models(Path(model_dir) if model_dir else None, 1, device)
if Path(model_dir or "/nonexistent", "codiff.json").is_file():
    collab = load_collaboration(model_dir, device=device, modalities=None if mode == "collaborative" else ["text"])
    model, vae = collab.model, collab.vae
else:
    from common.tiny import tiny_vae
    from codiff.tiny import tiny_collaboration
    model = tiny_collaboration(("mask", "text") if mode == "collaborative" else ("text",), seed=0).to(device)
    vae = tiny_vae(0).to(device)
names = model.modalities
from codiff.pipeline import ldm_schedule
pipe = CollaborativePipeline(model, vae, ldm_schedule(), {{}})
def rss_now():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
before = rss_now()
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
gen = pipe({{n: conds[n].to(device) for n in names}}, batch_size=batch, num_inference_steps=50,
           generator=torch.Generator().manual_seed(0), record=(mode == "collaborative"), progress=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
print(json.dumps({{"rss_mb": peak, "rss_before_mb": before, "cuda_mb": cuda_peak, "label": label}}))
"""


def memory_probe(mode: str, batch: int, model_dir: Path | None) -> dict:
    code = PROBE.format(mode=mode, batch=batch, model_dir=str(model_dir) if model_dir else "")
    # A fresh interpreter (so its peak RSS is this probe's): the repository and bench/ on its import path.
    path = os.pathsep.join([str(REPO), str(REPO / "bench")])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": path})
    return json.loads(out.stdout.strip().splitlines()[-1])


def paper_parameter_memory_gb() -> float:
    from codiff.config import build_models, load_config

    models = build_models(load_config(REPO / "configs" / "codiff" / "paper.yaml"), device="meta")
    counts = models.parameter_counts()
    total = sum(v for k, v in counts.items() if not k.startswith("trainable"))
    return total * 4 / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--memory_batch", type=int, default=256,
                        help="batch of the memory probes (large enough that activations show above the imports)")
    parser.add_argument("--model_dir", default=str(REPO / "ckpt" / "tiny" / "codiff"),
                        help="a collaboration checkpoint to take the architecture from (else tiny random models)")
    parser.add_argument("--no_write", action="store_true", help="print only, do not update bench/results.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_dir = Path(args.model_dir) if args.model_dir else None
    plain = step_timings(args.batch, args.reps, cfg=False, device=device, model_dir=model_dir)
    guided = step_timings(args.batch, args.reps, cfg=True, device=device, model_dir=model_dir)
    for label, r in (("no CFG", plain), ("CFG on both members", guided)):
        print(f"[{label}] batch {args.batch}, median of {args.reps}: " + ", ".join(
            f"{k} {v * 1e3:.2f} ms" for k, v in r.items() if k not in ("ratio", "label"))
            + f"; ratio {r['ratio']:.3f}x ({r['label']})")
    collab_mem = memory_probe("collaborative", args.memory_batch, model_dir)
    text_mem = memory_probe("text_only", args.memory_batch, model_dir)
    paper_gb = paper_parameter_memory_gb()
    print(f"peak RSS, 50-step sampling batch {args.memory_batch}: collaborative (recording maps/x0) "
          f"{collab_mem['rss_mb']:.0f} MB (+{collab_mem['rss_mb'] - collab_mem['rss_before_mb']:.1f} MB while "
          f"sampling), text member alone {text_mem['rss_mb']:.0f} MB "
          f"(+{text_mem['rss_mb'] - text_mem['rss_before_mb']:.1f} MB); "
          f"paper-size parameters (fp32) {paper_gb:.2f} GB")
    if args.no_write:
        return
    from records import write_records

    command = "OMP_NUM_THREADS=1 python bench/bench_codiff.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = "codiff: speed and memory"
    unit_note = f"{plain['label']}, batch {args.batch}, 1 thread, {device}"
    records = [
        dict(name=f"codiff: collaborative step / sum of member forwards ({unit_note})",
             value=round(plain["ratio"], 4), unit="x", target="<= 1.15", command=command, section=section),
        dict(name=f"codiff: collaborative step / sum of member forwards, CFG on both members ({unit_note})",
             value=round(guided["ratio"], 4), unit="x", target="<= 1.15", command=command, section=section),
        dict(name=f"codiff: collaborative step, ms ({unit_note})", value=round(plain["collaborative step"] * 1e3, 3),
             unit="ms", command=command, section=section),
        dict(name=f"codiff: sum of the 4 member forwards, ms ({unit_note})",
             value=round(plain["sum of members"] * 1e3, 3), unit="ms", command=command, section=section),
        dict(name=f"codiff: peak RSS, 50-step collaborative sampling recording maps and x0 (batch {args.memory_batch})",
             value=round(collab_mem["rss_mb"]), unit="MB", command=command, section=section),
        dict(name=f"codiff: peak RSS, 50-step sampling with the text member alone (batch {args.memory_batch})",
             value=round(text_mem["rss_mb"]), unit="MB", command=command, section=section),
        dict(name=f"codiff: peak RSS growth during 50-step collaborative sampling + VAE decode, recording maps and x0 (above the loaded models, batch {args.memory_batch})",
             value=round(collab_mem["rss_mb"] - collab_mem["rss_before_mb"], 1), unit="MB", command=command,
             section=section),
        dict(name=f"codiff: peak RSS growth during 50-step sampling + VAE decode with the text member alone (batch {args.memory_batch})",
             value=round(text_mem["rss_mb"] - text_mem["rss_before_mb"], 1), unit="MB", command=command,
             section=section),
        dict(name="codiff: paper-size collaboration parameter memory (fp32, configs/codiff/paper.yaml)",
             value=round(paper_gb, 3), unit="GB", command=command, section=section),
    ]
    if collab_mem.get("cuda_mb") is not None:
        records.append(dict(name="codiff: peak CUDA memory, collaborative sampling", value=round(collab_mem["cuda_mb"]),
                            unit="MB", command=command, section=section))
    write_records(records, replace_section=section)


if __name__ == "__main__":
    main()
