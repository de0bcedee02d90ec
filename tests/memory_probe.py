"""Child process of tests/test_memory.py: run requests on the shipped tiny baseline and print, as JSON lines, the
peak resident memory each added (measured) beside the estimate of ``common.memory`` for the path it ran.

    python tests/memory_probe.py '[{"batch": 2, "side": 256, "mode": "sliced"}, {"batch": 2, "side": 512,
                                    "budget_gb": 0.3}]'

``mode`` (plain | sliced | tiled) forces the VAE's path: one denoiser forward and the decode run by hand. Without
it the whole pipeline runs (one step) within ``budget_gb`` and reports the plan it chose. The parent sets
``MALLOC_MMAP_THRESHOLD_`` low so that freed tensors go back to the system: the resident peak is then the peak of
live tensors, not of glibc's arenas. The peak is reset between requests through ``/proc/self/clear_refs``.
"""

from __future__ import annotations

import json
import re
import resource
import sys

import torch


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set size (VmHWM) to the current one


def peak_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


def run_case(pipe, case: dict) -> dict:
    from common import memory
    from common.latents import VaeMode

    batch, side = int(case["batch"]), int(case["side"])
    prompts = ["a seven"] * batch
    weights = memory.weight_bytes(pipe.unet, pipe.vae, pipe.text_encoder)
    forced = case.get("mode")
    reset_peak()
    before = resident_bytes()
    if forced:
        mode = {"plain": VaeMode(), "sliced": VaeMode(slicing=True), "tiled": VaeMode(slicing=True, tile=8)}[forced]
        estimate = memory.estimate(pipe.unet.config, pipe.vae.config, memory.Request(batch, side, side), mode,
                                   None, weights)
        latents = torch.randn(pipe.latent_shape(batch, side, side), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            context = torch.cat([pipe.encode_prompt([""] * batch), pipe.encode_prompt(prompts)])
            pipe.unet(torch.cat([latents] * 2), torch.tensor([500] * 2 * batch), context)
        images = pipe.decode(latents, mode)
        described = mode.describe()
    else:
        out = pipe(prompts, num_inference_steps=1, height=side, width=side, progress=False,
                   max_memory_gb=case["budget_gb"])
        images, estimate, described = out.images, out.memory_plan.estimate, out.memory_plan.vae.describe()
    peak = peak_bytes()
    return {**case, "measured": peak - before, "estimate": estimate - weights, "weights": weights,
            "vae": described, "images": list(images.shape)}


def main(argv: list[str]) -> None:
    from common.methods import REPO
    from common.pipeline import LatentTextToImage

    torch.set_num_threads(1)
    pipe = LatentTextToImage.from_pretrained(str(REPO / "ckpt/tiny/baseline"))
    pipe(["a seven"], num_inference_steps=1, progress=False)  # warm up: lazy buffers, kernels, the tokenizer
    for case in json.loads(argv[0]):
        print(json.dumps(run_case(pipe, case)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
