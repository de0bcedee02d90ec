"""Versatile Diffusion: does the flow machinery cost anything? A flow's sampling step vs a plain UNet of its size.

For each flow the multi-flow diffuser (``configs/versatile/digits.yaml``, the shipped tiny size, random weights)
routed to that flow is compared with the plain diffusers network of exactly the same active layers and weights:
``UNet2DConditionModel`` for the image flows (t2i, iv) and ``UNetFlatConditionModel`` (diffusers' deprecated VD text
UNet) for the text flows (i2t, tv), loaded through ``versatile.convert.export_state_dict(model, "diffusers")``
and checked to give the same eps first. A "sampling step" is one classifier-free-guided DDIM step of
``common.samplers.sample_ddim`` (batch doubled inside the network); both arms run the same loop, timesteps and
contexts, interleaved repetition by repetition; medians of wall and CPU time are compared (target <= 1.05x).
Peak memory: each arm runs alone in a child process (peak RSS above its state after building the model; on CUDA,
``max_memory_allocated``). Dual guidance (two context sets per slot) is reported against t2i, without a target.

    python bench/bench_versatile.py [--steps 10 --reps 9 --batch 8] [--no_write]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


REPO = Path(__file__).resolve().parent.parent

COMMAND = "OMP_NUM_THREADS=1 python bench/bench_versatile.py"
SECTION = "versatile: flow machinery overhead"
PLAIN = {"t2i": "image_unet", "iv": "image_unet", "i2t": "text_unet", "tv": "text_unet"}


def build(seed: int = 0):
    """``(diffuser, {flow: plain diffusers network with exactly that flow's weights})``."""
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel

    from versatile.config import VersatileConfig
    from versatile.convert import export_state_dict
    from versatile.multiflow import build_diffuser

    cfg = VersatileConfig.load("digits").diffuser
    torch.manual_seed(seed)
    model = build_diffuser(dataclasses.replace(cfg, zero_init=False)).eval()
    widths = tuple(cfg.model_channels * m for m in cfg.channel_mult)
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels))
    common = dict(block_out_channels=widths, layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
                  attention_head_dim=cfg.num_heads, norm_num_groups=cfg.norm_num_groups, norm_eps=1e-5)
    image = UNet2DConditionModel(sample_size=8, in_channels=cfg.image_latent_channels,
                                 out_channels=cfg.image_latent_channels, down_block_types=down, up_block_types=up,
                                 **common).eval()
    text = UNetFlatConditionModel(
        in_channels=(cfg.text_latent_dim, 1, 1), out_channels=(cfg.text_latent_dim, 1, 1),
        down_block_types=tuple(b.replace("2D", "Flat") for b in down),
        up_block_types=tuple(b.replace("2D", "Flat") for b in up), **common).eval()
    # The hub layout keeps image-context transformers in image_unet and text-context ones in text_unet (iv, tv);
    # t2i / i2t are the same networks with the other context set, as [D]'s pipelines swap them in.
    state = model.state_dict()
    swapped = {k.replace("context.image.", "context.@.").replace("context.text.", "context.image.")
               .replace("context.@.", "context.text."): v for k, v in state.items()}
    twin = build_diffuser(dataclasses.replace(cfg, zero_init=False)).eval()
    twin.load_state_dict(swapped, strict=True)
    plain = {}
    for flows, source in ((("iv", "tv"), model), (("t2i", "i2t"), twin)):
        exported = export_state_dict(source, "diffusers")
        for flow in flows:
            name = PLAIN[flow]
            unet = copy.deepcopy(image if name == "image_unet" else text)
            part = {k[len(name) + 1 :]: v for k, v in exported.items() if k.startswith(name + ".")}
            unet.load_state_dict(part, strict=True)
            plain[flow] = unet
    return model, plain


def inputs(flow: str, batch: int, generator: torch.Generator):
    """``(shape, cond, uncond)`` for a flow at the digits size (text 77 x 64 tokens, image 65 x 64)."""
    from versatile.multiflow import FLOWS

    f = FLOWS[flow]
    shape = (batch, 4, 8, 8) if f.xtype == "image" else (batch, 16)
    lengths = {"text": 77, "image": 65}
    cond = {k: torch.randn(batch, lengths[k], 64, generator=generator) for k in f.ctypes}
    uncond = {k: torch.randn(batch, lengths[k], 64, generator=generator) for k in f.ctypes}
    return shape, cond, uncond


def denoisers(model, plain, flow: str, cond, uncond, scale: float = 7.5):
    """The two arms as CFG denoisers (``ours`` routed by flow; ``plain`` the diffusers network; None for dual)."""
    from common.denoisers import CFGDenoiser
    from versatile.multiflow import FLOWS

    ours = CFGDenoiser(functools.partial(model.apply_flow, flow=flow), cond, uncond, scale)
    if flow not in PLAIN:
        return ours, None
    unet = plain[flow]
    kind = FLOWS[flow].ctypes[0]
    flat = FLOWS[flow].xtype == "text"

    def call(x, t, encoder_hidden_states):
        x4 = x[:, :, None, None] if flat else x
        out = unet(x4, t, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        return out[:, :, 0, 0] if flat else out

    plain_denoiser = CFGDenoiser(call, {"encoder_hidden_states": cond[kind]},
                                 {"encoder_hidden_states": uncond[kind]}, scale)
    return ours, plain_denoiser


def run(denoiser, shape, x_T, steps: int):
    from common.samplers import sample_ddim
    from versatile.pipeline import vd_plan, vd_schedule

    return sample_ddim(denoiser, vd_schedule(), vd_plan(steps), shape, x_T=x_T, progress=False)


@torch.no_grad()
def child(flow: str, arm: str, steps: int, batch: int, device: str) -> dict:
    """One arm alone: its peak memory above the state after building (bytes on CUDA, RSS on CPU)."""
    model, plain = build()
    model.to(device)
    for unet in plain.values():
        unet.to(device)
    g = torch.Generator().manual_seed(1)
    shape, cond, uncond = inputs(flow, batch, g)
    cond = {k: v.to(device) for k, v in cond.items()}
    uncond = {k: v.to(device) for k, v in uncond.items()}
    ours, plain_d = denoisers(model, plain, flow, cond, uncond)
    den = ours if arm == "ours" else plain_d
    x_T = torch.randn(shape, generator=g).to(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run(den, shape, x_T, steps)
        torch.cuda.synchronize()
        return {"peak_mb": (torch.cuda.max_memory_allocated() - base) / 2**20, "kind": "CUDA allocated"}
    import gc

    gc.collect()
    # Reset the kernel's peak-RSS mark (VmHWM) to the current RSS, so building the models does not count.
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kb("VmRSS")
    run(den, shape, x_T, steps)
    return {"peak_mb": (_status_kb("VmHWM") - before) / 1024, "kind": "RSS"}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_memory(flow: str, arm: str, args) -> float:
    cmd = [sys.executable, __file__, "--_child", f"{flow}:{arm}", "--steps", str(args.steps), "--batch",
           str(args.batch), "--device", args.device]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]


@torch.no_grad()
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps per timed run")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--batch", type=int, default=8, help="samples (the network sees 2x with CFG)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no_write", action="store_true", help="print only, do not update bench/results.json")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        flow, arm = args._child.split(":")
        print(json.dumps(child(flow, arm, args.steps, args.batch, args.device)))
        return 0

    model, plain = build()
    model.to(args.device)
    for unet in plain.values():
        unet.to(args.device)
    g = torch.Generator().manual_seed(1)
    records, flows = [], ("t2i", "iv", "i2t", "tv", "dual")
    setups = {}
    for flow in flows:
        shape, cond, uncond = inputs(flow, args.batch, g)
        cond = {k: v.to(args.device) for k, v in cond.items()}
        uncond = {k: v.to(args.device) for k, v in uncond.items()}
        ours, plain_d = denoisers(model, plain, flow, cond, uncond)
        x_T = torch.randn(shape, generator=g).to(args.device)
        if plain_d is not None:  # same network: the same eps (and samples), or the comparison means nothing
            t = torch.full((args.batch,), 981, device=args.device)
            diff = (ours(x_T, t) - plain_d(x_T, t)).abs().max().item()
            assert diff < 1e-4, f"{flow}: ours and the plain UNet disagree by {diff}"
        setups[flow] = (ours, plain_d, shape, x_T)
        run(ours, shape, x_T, 2)  # warm-up
        if plain_d is not None:
            run(plain_d, shape, x_T, 2)

    times = {(f, arm): {"wall": [], "cpu": []} for f in flows for arm in ("ours", "plain")}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for _ in range(args.reps):
        for flow in flows:
            ours, plain_d, shape, x_T = setups[flow]
            for arm, den in (("ours", ours), ("plain", plain_d)):
                if den is None:
                    continue
                sync()
                w, c = time.perf_counter(), time.process_time()
                run(den, shape, x_T, args.steps)
                sync()
                times[(flow, arm)]["wall"].append((time.perf_counter() - w) / args.steps)
                times[(flow, arm)]["cpu"].append((time.process_time() - c) / args.steps)

    def med(flow, arm, what):
        return statistics.median(times[(flow, arm)][what])

    threads = torch.get_num_threads()
    where = f"{args.device}, {threads} thread(s), batch {args.batch} (x2 CFG), {args.steps} DDIM steps x {args.reps} reps"
    for flow in flows:
        if flow in PLAIN:
            for what in ("wall", "cpu"):
                ratio = med(flow, "ours", what) / med(flow, "plain", what)
                records.append({"name": f"versatile {flow}: sampling step, ours / plain diffusers "
                                        f"{'UNet2DConditionModel' if PLAIN[flow] == 'image_unet' else 'UNetFlatConditionModel'}"
                                        f" ({'wall' if what == 'wall' else 'CPU'} time)",
                                "value": round(ratio, 4), "unit": "x", "target": "<= 1.05"})
            records.append({"name": f"versatile {flow}: ms per sampling step, ours ({where})",
                            "value": round(1000 * med(flow, "ours", "wall"), 2), "unit": "ms"})
            records.append({"name": f"versatile {flow}: ms per sampling step, plain ({where})",
                            "value": round(1000 * med(flow, "plain", "wall"), 2), "unit": "ms"})
    records.append({"name": f"versatile dual (text ratio 0.5): ms per sampling step ({where})",
                    "value": round(1000 * med("dual", "ours", "wall"), 2), "unit": "ms"})
    records.append({"name": "versatile dual / t2i: sampling step cost (two context sets per slot)",
                    "value": round(med("dual", "ours", "wall") / med("t2i", "ours", "wall"), 4), "unit": "x"})
    for flow in ("iv", "tv"):
        for arm in ("ours", "plain"):
            mb = peak_memory(flow, arm, args)
            records.append({"name": f"versatile {flow}: peak memory of sampling above the built model, {arm} "
                                    f"({'CUDA allocated' if args.device.startswith('cuda') else 'RSS'})",
                            "value": round(mb, 1), "unit": "MB"})
    for r in records:
        r.update({"command": COMMAND, "section": SECTION})
        print(f"{r['name']}: {r['value']} {r['unit']}")
    if not args.no_write:
        from records import write_records

        write_records(records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
