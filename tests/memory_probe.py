"""Child process of tests/test_memory.py: run requests on the shipped tiny baseline and print, as JSON lines, the
peak resident memory each added (measured) beside the estimate of ``common.memory`` for the path it ran.

    python tests/memory_probe.py '[{"batch": 2, "side": 256, "mode": "sliced"}, {"batch": 2, "side": 512,
                                    "budget_gb": 0.3}]'

``mode`` (plain | sliced | tiled) forces the VAE's path: one denoiser forward and the decode run by hand. Without
it the whole pipeline runs (one step) within ``budget_gb`` and reports the plan it chose. A case with ``method``
(codiff | versatile | shifted | sdg) runs one step of that method's tiny checkpoint through its own planned path. The parent sets
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


def method_runner(method: str):
    """``run(batch, side, budget_gb) -> (images, MemoryPlan)``: one sampling step of a method's shipped tiny
    checkpoint through its planned path (``side`` None: the model's own size)."""
    from common.methods import REPO, get

    folder = REPO / get(method).default_checkpoint
    if method == "codiff":
        import functools

        from codiff import sample_cli
        from codiff.checkpoint import load_collaboration
        from codiff.sample_cli import CoDiffSettings, generate_collaboration

        # the digits world's test masks are recomputed on every call otherwise (seconds, outside any measurement)
        sample_cli.digits_test_masks = functools.lru_cache(maxsize=None)(sample_cli.digits_test_masks)
        collab = load_collaboration(folder)

        def run(batch, side, budget_gb):
            settings = CoDiffSettings(prompts=["a red seven"] * batch, num_inference_steps=1, guidance_scale=3.0,
                                      max_memory_gb=budget_gb)
            settings.check()
            gen = generate_collaboration(collab, settings, record=True)
            return gen.images, gen.memory_plan
    elif method == "versatile":
        from versatile.checkpoint import load_pipeline

        pipe, _ = load_pipeline(folder)

        def run(batch, side, budget_gb):
            out = pipe("t2i", prompt=["a red seven"] * batch, num_inference_steps=1, height=side, width=side,
                       generator=torch.Generator().manual_seed(0), max_memory_gb=budget_gb)
            return out.images, out.memory_plan
    elif method == "shifted":
        from shifted.system import load_system, text_to_image

        system = load_system(folder)

        def run(batch, side, budget_gb):
            prompts = ["a red seven"] * batch
            plan = system.decoder.memory_plan(batch, side, 2.0, budget_gb)
            images, _ = text_to_image(system, prompts, decoder_kwargs=dict(
                num_inference_steps=1, guidance_scale=2.0, resolution=side, max_memory_gb=budget_gb))
            return images, plan
    elif method == "sdg":
        from sdg.checkpoint import load_diffusion_model, load_noise_aware_clip_folder
        from sdg.sample_cli import plan_memory, run_loaded

        unet, flags = load_diffusion_model(folder)
        bundle = load_noise_aware_clip_folder(folder / "clip", "cpu")

        def run(batch, side, budget_gb):
            plan = plan_memory(unet, bundle.clip, batch, guided=True, max_memory_gb=budget_gb, chunk=batch)
            images = run_loaded(unet, flags, bundle, ["a red seven"] * batch, respacing="1", memory_plan=plan,
                                chunk=batch)
            return images, plan
    else:
        raise SystemExit(f"unknown method {method}")
    return run


def run_guidance_case(case: dict) -> dict:
    """SDG's guidance phase alone (``"phase": "guidance"``): one language-guidance gradient through the shipped
    noise-aware CLIP on a batch, against its estimate (the kept activations counted on the meta device, times the
    backward's margin)."""
    from common import memory
    from common.methods import REPO
    from common.schedule import NoiseSchedule
    from sdg.checkpoint import load_noise_aware_clip_folder
    from sdg.sample_cli import BACKWARD_PEAK
    from sdg.scores import SemanticGuidance

    clip = load_noise_aware_clip_folder(REPO / "ckpt/tiny/sdg/clip", "cpu").clip
    size, batch = clip.image_size, int(case["batch"])
    per_sample = memory.saved_activation_bytes(clip, torch.zeros(1, 3, size, size), torch.zeros(1, dtype=torch.long))
    dim = clip(torch.zeros(1, 3, size, size), torch.zeros(1, dtype=torch.long)).embedding.shape[-1]
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(batch, 3, size, size, generator=g), torch.full((batch,), 500)
    guidance = SemanticGuidance(clip, NoiseSchedule.named("linear", 1000),
                                text_embedding=torch.randn(batch, dim, generator=g), text_weight=1.0)
    guidance(x, t)  # warm up
    reset_peak()
    before = resident_bytes()
    guidance(x, t)
    return {**case, "measured": peak_bytes() - before, "estimate": int(BACKWARD_PEAK * per_sample * batch)}


def run_method_case(runners: dict, plain: dict, case: dict) -> dict:
    """``"frugal": true``: the budget is one byte below the previous (plain) case's estimate, so the plan must take
    a frugal path; the images are compared with that case's (``max_difference``)."""
    method = case["method"]
    if method not in runners:
        runners[method] = method_runner(method)
        runners[method](1, None, None)  # warm up
    budget_gb = case.get("budget_gb")
    if case.get("frugal"):
        budget_gb = (plain[method][1].estimate - 1) / 2**30
    reset_peak()
    before = resident_bytes()
    images, plan = runners[method](int(case["batch"]), case.get("side"), budget_gb)
    peak = peak_bytes()
    row = {**case, "measured": peak - before, "estimate": plan.estimate - plan.weights, "weights": plan.weights,
           "plan": plan.describe(), "tiled": bool(plan.vae and plan.vae.tile), "images": list(images.shape)}
    if case.get("frugal"):
        row["max_difference"] = float((images - plain[method][0]).abs().max())
    else:
        plain[method] = (images, plan)
    return row


def main(argv: list[str]) -> None:
    from common.methods import REPO
    from common.pipeline import LatentTextToImage

    torch.set_num_threads(1)
    cases = json.loads(argv[0])
    runners: dict = {}
    plain: dict = {}
    pipe = None
    for case in cases:
        if case.get("phase") == "guidance":
            print(json.dumps(run_guidance_case(case)), flush=True)
            continue
        if "method" in case:
            print(json.dumps(run_method_case(runners, plain, case)), flush=True)
            continue
        if pipe is None:
            pipe = LatentTextToImage.from_pretrained(str(REPO / "ckpt/tiny/baseline"))
            pipe(["a seven"], num_inference_steps=1, progress=False)  # warm up: lazy buffers, kernels, the tokenizer
        print(json.dumps(run_case(pipe, case)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
