"""Bounded memory: the estimate against measured peaks, the frugal paths against the plain ones, the refusals.

The peaks are measured in a child process (``tests/memory_probe.py``) on the shipped tiny checkpoints, as the growth
of resident memory over the request with glibc returning freed blocks at once, so the peak is that of live tensors.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from common import memory
from common.attention import ChunkedAttnProcessor, chunked_attention, chunked_attention_in
from common.errors import UserError
from common.latents import VaeMode, decode_latents, encode_images, vae_scale_factor
from common.methods import REPO
from common.tiny import tiny_unet2d_condition, tiny_vae


sys.path.insert(0, os.path.dirname(__file__))
from script_loading import load_script  # noqa: E402


# The estimate may exceed the measured peak by this factor (it is a bound, fitted to stay close) and may fall below
# it by at most UNDER (allocator granularity, interpreter buffers the model does not see).
OVER = 2.0
UNDER = 0.85
SLACK = 8 * 2**20


def probe(cases: list[dict]) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    run = subprocess.run([sys.executable, str(REPO / "tests" / "memory_probe.py"), json.dumps(cases)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


# The other methods' tiny checkpoints, one step each through their planned paths (codiff and sdg make 32 px images
# only: their batch grows instead).
METHOD_CASES = [
    {"method": "codiff", "batch": 32},
    {"method": "versatile", "batch": 2, "side": 192},
    {"method": "shifted", "batch": 2, "side": 192},
    {"method": "sdg", "batch": 32},  # pixel space: the UNet, and the CLIP's guidance gradient
]


@pytest.fixture(scope="module")
def probed():
    """One child process for every measurement (the imports and the shared models load once)."""
    return probe([
        {"batch": 2, "side": 256, "mode": "plain"},
        {"batch": 2, "side": 256, "mode": "sliced"},
        {"batch": 2, "side": 256, "mode": "tiled"},
        {"batch": 1, "side": 256, "budget_gb": 1.0},  # fits as it is
        {"batch": 2, "side": 384, "budget_gb": 0.15},  # the whole batch would need ~0.3 GB, one image ~0.16 GB
        # each method as it plans with the machine's memory, then with one byte less than that plan's estimate
        *(dict(case, **extra) for case in METHOD_CASES for extra in ({}, {"frugal": True})),
        {"method": "sdg", "phase": "guidance", "batch": 128},  # the CLIP's gradient alone (the UNet dominates above)
    ])


@pytest.fixture(scope="module")
def measured(probed):
    """The baseline: forced VAE paths, then two requests the pipeline plans within a budget itself."""
    return [row for row in probed if "method" not in row]


@pytest.fixture(scope="module")
def methods_measured(probed):
    return {(row["method"], bool(row.get("frugal"))): row for row in probed if "method" in row and "phase" not in row}


def test_guidance_gradient_estimate_tracks_measured_peak(probed):
    """SDG's guidance phase: the activations autograd keeps, counted on the meta device, against the measured peak of
    one gradient through the shipped noise-aware CLIP."""
    row = next(row for row in probed if row.get("phase") == "guidance")
    assert row["estimate"] >= UNDER * row["measured"] - SLACK, row
    assert row["estimate"] <= OVER * row["measured"] + SLACK, row


def test_estimate_tracks_measured_peaks(measured):
    for row in measured:
        assert row["estimate"] >= UNDER * row["measured"] - SLACK, row  # never far below what was used
        assert row["estimate"] <= OVER * row["measured"] + SLACK, row  # and not a uselessly loose bound


def test_frugal_paths_lower_the_measured_peak(measured):
    plain, sliced, tiled = measured[:3]
    assert sliced["measured"] < 0.8 * plain["measured"], (plain, sliced)
    assert tiled["measured"] <= sliced["measured"], (sliced, tiled)


def test_large_request_takes_the_frugal_path_within_budget(measured):
    roomy, tight = measured[3:]
    assert roomy["vae"] == "whole batch" and tight["vae"] != "whole batch", (roomy, tight)
    assert tight["vae"].startswith("sliced, tiles of") and tight["images"] == [2, 3, 384, 384]
    # what the budget covers (the weights and the request) stayed within it
    assert tight["weights"] + tight["measured"] <= tight["budget_gb"] * 2**30, tight


# ------------------------------------------------------------------------------------------------ VAE modes


@pytest.fixture(scope="module")
def vae():
    return tiny_vae(seed=3)


def test_scale_factor_from_model_config_or_dict(vae):
    assert vae_scale_factor(vae) == vae_scale_factor(vae.config) == vae_scale_factor(dict(vae.config)) == 4


def test_sliced_decode_equals_whole_batch(vae):
    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    whole = decode_latents(vae, latents, 1.0)
    torch.testing.assert_close(decode_latents(vae, latents, 1.0, VaeMode(slicing=True)), whole, atol=1e-5, rtol=0)
    assert vae.use_slicing is False and vae.use_tiling is False  # the VAE's own settings are restored


def test_tiled_decode_close_to_untiled():
    """The shipped tiny VAE on a 4x4 sheet of digits (its own kind of content, 128 px = 32 latent cells): tiles
    differ from the whole only where the decoder's receptive field and group norms are cut, which the linear blend
    over the overlap smooths; the difference stays below the VAE's own reconstruction error and shrinks with the
    tile."""
    from sklearn.datasets import load_digits

    from common.digits import upsample
    from common.models import load_vae

    vae = load_vae(str(REPO / "ckpt/tiny/baseline"), subfolder="vae").eval()
    digits = [torch.from_numpy(upsample(d, 32)) for d in load_digits().images[:16]]
    sheet = torch.cat([torch.cat(digits[4 * i : 4 * i + 4], dim=1) for i in range(4)], dim=0).float()
    image = sheet[None, None] * torch.tensor([1.0, 0.3, 0.1])[None, :, None, None]
    latents = encode_images(vae, image)
    whole = decode_latents(vae, latents)
    reconstruction = (whole - image).abs().mean()
    differences = {}
    for tile in (8, 16):
        tiled = decode_latents(vae, latents, mode=VaeMode(slicing=True, tile=tile))
        assert tiled.shape == whole.shape == (1, 3, 128, 128)
        differences[tile] = (tiled - whole).abs().mean()
        assert differences[tile] < 0.65 * reconstruction, (tile, differences[tile], reconstruction)
    assert differences[16] < 0.6 * differences[8] and differences[16] < 0.015, differences
    shifted = decode_latents(vae, latents.roll(8, dims=-1))
    assert (shifted - whole).abs().mean() > 5 * differences[16]  # the tolerance is tight against other images


def test_encode_modes_agree(vae):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    whole = encode_images(vae, images)
    torch.testing.assert_close(encode_images(vae, images, mode=VaeMode(slicing=True)), whole, atol=1e-5, rtol=0)
    direct = vae.encode(images * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(whole, direct, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ attention


@pytest.mark.parametrize("masked", [False, True])
def test_chunked_attention_equals_full_attention(masked):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 50, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(50, 50, generator=g) > 0.3 if masked else None
    if mask is not None:
        mask.fill_diagonal_(True)  # no fully masked row
    scores = q @ k.transpose(-1, -2) / 8**0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    reference = torch.softmax(scores, dim=-1) @ v
    for chunk in (1, 7, 50, None):
        torch.testing.assert_close(chunked_attention(q, k, v, chunk, attn_mask=mask), reference)
    q32, k32, v32 = q.float(), k.float(), v.float()
    torch.testing.assert_close(chunked_attention(q32, k32, v32, 7, attn_mask=mask),
                               F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask), atol=1e-6, rtol=1e-5)


def test_chunked_processor_keeps_the_unet_output():
    unet = tiny_unet2d_condition(seed=1)
    g = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 500])
    default = dict(unet.attn_processors)
    with torch.no_grad():
        full = unet(x, t, context).sample
        with chunked_attention_in(unet, 17):
            assert all(isinstance(p, ChunkedAttnProcessor) for p in unet.attn_processors.values())
            chunked = unet(x, t, context).sample
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
    assert {n: type(p) for n, p in unet.attn_processors.items()} == {n: type(p) for n, p in default.items()}


# ------------------------------------------------------------------------------------------------ planning

SD_UNET = dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=8, in_channels=4,
               down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
SD_VAE = dict(block_out_channels=[128, 256, 512, 512], sample_size=512, mid_block_add_attention=True)
SD_WEIGHTS = int(1.07e9 * 4)  # UNet + VAE + CLIP text encoder in float32


def test_plan_goes_from_fast_to_frugal_as_the_budget_shrinks():
    request = memory.Request(batch=2, height=1024, width=1024)
    roomy = memory.plan(SD_UNET, SD_VAE, request, 64 * 2**30, weights=SD_WEIGHTS)
    assert roomy.vae == VaeMode() and roomy.estimate <= 64 * 2**30
    sliced_needs = memory.estimate(SD_UNET, SD_VAE, request, VaeMode(slicing=True), weights=SD_WEIGHTS)
    sliced = memory.plan(SD_UNET, SD_VAE, request, sliced_needs, weights=SD_WEIGHTS)
    assert sliced.vae == VaeMode(slicing=True)
    tight = memory.plan(SD_UNET, SD_VAE, request, sliced_needs - 1, weights=SD_WEIGHTS)
    assert tight.vae.tile is not None and tight.estimate < sliced_needs
    # where SDPA would hold the L x L scores, attention is chunked before the VAE is tiled
    on_math_kernel = memory.Request(batch=1, height=1024, width=1024, device="mps")
    whole = memory.estimate(SD_UNET, SD_VAE, on_math_kernel, weights=SD_WEIGHTS)
    chunked = memory.plan(SD_UNET, SD_VAE, on_math_kernel, whole - 1, weights=SD_WEIGHTS)
    assert chunked.attention_chunk is not None and chunked.vae.tile is None


def test_impossible_plan_is_one_line_with_estimate_budget_and_fix():
    with pytest.raises(UserError) as caught:
        memory.plan(SD_UNET, SD_VAE, memory.Request(batch=1, height=100000, width=100000), 16 * 2**30,
                    weights=SD_WEIGHTS)
    message = str(caught.value)
    assert "\n" not in message and "16.00 GB limit" in message and "--max_memory_gb" in message
    assert float(re.search(r"estimated ([\d.]+) GB", message).group(1)) > 100  # 1e10 pixels: >100 GB of images


def sample_refused(argv: list[str], capsys) -> tuple[int, int, list[str]]:
    """``scripts/sample.py argv`` in this process: its exit code, how much the resident peak grew meanwhile, and the
    lines it printed to stderr."""
    sample = load_script("scripts/sample.py")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    try:
        code = sample.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    with open("/proc/self/status") as f:
        peak = int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading" not in line]
    return code, peak - before, lines


def test_sample_script_refuses_before_allocating(tmp_path, capsys):
    """``--resolution 100000`` on the real entry point: one line, and the process barely grew while refusing."""
    code, grew, lines = sample_refused(["--prompt", "a seven", "--resolution", "100000", "--no_progress",
                                        "--output_dir", str(tmp_path / "never")], capsys)
    assert code != 0 and len(lines) == 1 and "estimated" in lines[0] and "--max_memory_gb" in lines[0], lines
    # what grew is the imports and the tiny models (~0.4 GB), not any of the request's thousands of GB
    assert grew < 2**30
    assert not (tmp_path / "never").exists()


def test_contextdiff_plans_its_memory_like_the_baseline(tmp_path, capsys):
    """ContextDiff through sample.py: a small budget takes a frugal VAE path (recorded in settings.json) and gives
    images within float tolerance of the plain path; an impossible request is one line before x_T is allocated."""
    from PIL import Image

    sample = load_script("scripts/sample.py")
    base = ["--method", "contextdiff", "--prompt", "a red seven", "--prompt", "a blue two", "--num_inference_steps",
            "2", "--no_progress"]
    assert sample.main([*base, "--output_dir", str(tmp_path / "plain")]) == 0
    assert sample.main([*base, "--max_memory_gb", "0.015", "--output_dir", str(tmp_path / "frugal")]) == 0
    plain = json.loads((tmp_path / "plain" / "settings.json").read_text())["memory_plan"]
    frugal = json.loads((tmp_path / "frugal" / "settings.json").read_text())["memory_plan"]
    assert "VAE whole batch" in plain and "VAE sliced" in frugal, (plain, frugal)
    for name in ("0000.png", "0001.png"):  # slicing decodes one image at a time: the same pixels up to rounding
        a, b = (torch.tensor(list(Image.open(tmp_path / run / "images" / name).getdata()), dtype=torch.float32)
                for run in ("plain", "frugal"))
        assert (a - b).abs().max() <= 1
    try:
        code = sample.main([*base, "--resolution", "100000", "--output_dir", str(tmp_path / "never")])
    except SystemExit as exit_:
        code = exit_.code
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading" not in line]
    assert code != 0 and "estimated" in lines[-1] and "--max_memory_gb" in lines[-1], lines
    assert not (tmp_path / "never").exists()


# ------------------------------------------------------------------------------------------------ micro-batches


def test_micro_batched_unet_equals_one_call():
    """The CFG batch [uncond; cond] split into halves, then into single samples: the same output as one call, and
    the UNet's own forward is back afterwards (hooks and the module's call run around the split, once)."""
    unet = tiny_unet2d_condition(seed=4)
    g = torch.Generator().manual_seed(5)
    x, context = torch.randn(6, 4, 16, 16, generator=g), torch.randn(6, 77, 32, generator=g)
    t = torch.tensor([10, 500, 999] * 2)
    with torch.no_grad():
        whole = unet(x, t, encoder_hidden_states=context, return_dict=False)[0]
        for size in (3, 1):
            calls: list[int] = []
            handle = unet.conv_in.register_forward_pre_hook(
                lambda module, args, calls=calls: calls.append(args[0].shape[0]))
            with memory.micro_batched(unet, size):
                split = unet(x, t, encoder_hidden_states=context, return_dict=False)[0]
                as_output = unet(x, t, encoder_hidden_states=context).sample  # the output class is rebuilt too
            handle.remove()
            assert calls == [size] * (12 // size), calls
            torch.testing.assert_close(split, whole, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(as_output, whole, atol=1e-5, rtol=1e-5)
    assert "forward" not in vars(unet)


def test_plan_splits_the_denoiser_only_when_the_step_is_the_floor():
    """SD shapes at 2 x 1024 px with CFG: once the VAE is tiled, the UNet step on the doubled batch is the floor. A
    budget below every unsplit path but above the CFG halves takes the halves; a budget the unsplit frugal path
    fits never splits."""
    request = memory.Request(batch=2, height=1024, width=1024)
    modes = memory.vae_modes(SD_VAE, request, tiling=True)
    unsplit = min(memory.estimate(SD_UNET, SD_VAE, request, mode, weights=SD_WEIGHTS) for mode in modes)
    halves = min(memory.estimate(SD_UNET, SD_VAE, request, mode, weights=SD_WEIGHTS, micro_batch=2)
                 for mode in modes)
    assert halves < unsplit
    fits_unsplit = memory.plan(SD_UNET, SD_VAE, request, unsplit, weights=SD_WEIGHTS)
    assert fits_unsplit.micro_batch is None and fits_unsplit.vae.tile is not None
    only_split = memory.plan(SD_UNET, SD_VAE, request, unsplit - 1, weights=SD_WEIGHTS)
    assert only_split.micro_batch == 2 and only_split.estimate <= unsplit - 1
    assert "micro-batches of 2" in only_split.describe()
    assert memory.micro_batches(request) == [2, 1]
    assert memory.micro_batches(memory.Request(batch=5, height=64, width=64, guided=False)) == [3, 2, 1]


def test_baseline_takes_micro_batches_with_the_same_latents():
    """The tiny baseline at a budget only the split UNet fits: the plan splits the CFG batch and the sampled latents
    equal the plain path's to float tolerance."""
    from common.pipeline import LatentTextToImage

    pipe = LatentTextToImage.from_pretrained(str(REPO / "ckpt/tiny/baseline"))
    request = memory.Request(batch=2, height=128, width=128)
    weights = memory.weight_bytes(pipe.unet, pipe.vae, pipe.text_encoder)
    modes = memory.vae_modes(pipe.vae.config, request, tiling=True)
    unsplit = min(memory.estimate(pipe.unet.config, pipe.vae.config, request, mode, weights=weights)
                  for mode in modes)
    kwargs = dict(num_inference_steps=2, height=128, width=128, progress=False)
    plain = pipe(["a red seven", "a blue two"], generator=torch.Generator().manual_seed(0), **kwargs)
    split = pipe(["a red seven", "a blue two"], generator=torch.Generator().manual_seed(0),
                 max_memory_gb=(unsplit - 1) / 2**30, **kwargs)
    assert plain.memory_plan.micro_batch is None and split.memory_plan.micro_batch is not None, split.memory_plan
    torch.testing.assert_close(split.latents, plain.latents, atol=1e-4, rtol=1e-4)


def first_split_budget(plan_at) -> float:
    """The budget (GB) at which ``plan_at(budget_gb)`` first splits the denoiser, walking down one byte under each
    plan's estimate from the machine's memory."""
    budget = None
    for _ in range(64):
        taken = plan_at(budget)
        if taken.micro_batch:
            return budget
        budget = (taken.estimate - 1) / 2**30
    raise AssertionError("the plan never split the denoiser")


def test_versatile_and_codiff_micro_batches_keep_the_latents():
    """The multi-flow diffuser's CFG call and CoDiff's member / diffuser forwards split into micro-batches at the
    first budget that needs it: the sampled latents equal the unsplit ones."""
    from codiff.checkpoint import load_collaboration
    from codiff.sample_cli import CoDiffSettings, generate_collaboration
    from versatile.checkpoint import load_pipeline

    pipe, _ = load_pipeline(REPO / "ckpt/tiny/versatile/pipeline")
    # 64 px: once the VAE is tiled, the diffuser's CFG batch is the floor (at 32 px the decode always is)
    budget = first_split_budget(lambda gb: pipe.memory_plan("t2i", 2, 64, 64, 3.0, gb))
    runs = [pipe("t2i", prompt=["a red seven", "a blue two"], guidance_scale=3.0, num_inference_steps=2, height=64,
                 width=64, generator=torch.Generator().manual_seed(0), max_memory_gb=gb) for gb in (None, budget)]
    assert runs[0].memory_plan.micro_batch is None and runs[1].memory_plan.micro_batch == 2, runs[1].memory_plan
    torch.testing.assert_close(runs[1].latents, runs[0].latents, atol=1e-5, rtol=1e-5)

    collab = load_collaboration(REPO / "ckpt/tiny/codiff")
    prompts = ["a red seven", "a blue two", "a green four", "a red one"]
    budget = first_split_budget(lambda gb: collab.pipeline().memory_plan(len(prompts), guided=collab.modalities,
                                                                        steps=2, max_memory_gb=gb))
    gens = []
    for gb in (None, budget):
        settings = CoDiffSettings(prompts=prompts, num_inference_steps=2, max_memory_gb=gb)
        settings.check()
        gens.append(generate_collaboration(collab, settings))
    assert gens[0].memory_plan.micro_batch is None and gens[1].memory_plan.micro_batch, gens[1].memory_plan
    torch.testing.assert_close(gens[1].latents, gens[0].latents, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ other methods

@pytest.mark.parametrize("method", [case["method"] for case in METHOD_CASES])
def test_method_estimate_tracks_measured_peak(methods_measured, method):
    for frugal in (False, True):
        row = methods_measured[(method, frugal)]
        assert row["estimate"] >= UNDER * row["measured"] - SLACK, row
        assert row["estimate"] <= OVER * row["measured"] + SLACK, row


@pytest.mark.parametrize("method", [case["method"] for case in METHOD_CASES])
def test_method_frugal_path_gives_the_plain_images(methods_measured, method):
    """One byte under the plain estimate, the plan slices the VAE or splits the batch (never tiles: no pixel may
    change) and the images equal the plain ones to float tolerance, at a lower measured peak."""
    plain, frugal = methods_measured[(method, False)], methods_measured[(method, True)]
    assert plain["plan"] != frugal["plan"] and not frugal["tiled"], (plain, frugal)
    assert frugal["estimate"] < plain["estimate"] and frugal["measured"] < plain["measured"], (plain, frugal)
    assert frugal["images"] == plain["images"] and frugal["max_difference"] < 1e-4, frugal


@pytest.mark.parametrize("method, flags", [
    ("codiff", ["--num_images", "100000"]),
    ("versatile", ["--resolution", "100000"]),
    ("shifted", ["--resolution", "100000"]),
    ("sdg", ["--num_images", "100000"]),
])
def test_method_refuses_an_impossible_request_before_allocating(method, flags, tmp_path, capsys):
    """Through scripts/sample.py: one line naming the estimate and the fix, before x_T (the process barely grew:
    the imports and the tiny models)."""
    code, grew, lines = sample_refused(["--method", method, "--prompt", "a red seven", *flags, "--num_inference_steps",
                                        "2", "--max_memory_gb", "2", "--no_progress", "--output_dir",
                                        str(tmp_path / "never")], capsys)
    assert code != 0 and len(lines) == 1, lines
    assert "estimated" in lines[0] and "2.00 GB limit" in lines[0] and "--max_memory_gb" in lines[0], lines
    assert grew < 2**30
    assert not (tmp_path / "never").exists()
