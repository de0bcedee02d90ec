#!/usr/bin/env bash
# Checks that need GPUs, for a machine that has them: `bash scripts/ci/gpu_check.sh` from the repository root runs
# every section; `bash scripts/ci/gpu_check.sh engines` (or `benchmarks`) one of them. Each section is delimited by
# "# ===== <name>" / "# ===== end ..." lines, so sections can be added without touching each other; each fails the
# script on its first error. Figures go to bench/results.json / results.md in sections named after the device.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python}
PYTHON="$PY"
ACCELERATE=("$PY" -m accelerate.commands.launch)
ONLY="${1:-}"

has_cuda() {
    "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
}

wants() {
    [ -z "$ONLY" ] || [ "$ONLY" = "$1" ]
}

# ===== section: engines =============================================================================================
# One short training (a tiny text-conditioned UNet + a projection, two trainable modules) through common/train.py on
# each engine accelerate offers: stop after step 3 with a checkpoint, resume to step 4, validation on gathered
# weights, export reloaded with from_pretrained (scripts/ci/engine_step.py checks all of it and that the run header
# names the expected engine). The CPU suite covers FSDP2 over gloo (tests/test_engines.py); FSDP1 and DeepSpeed need
# CUDA. DeepSpeed is not in requirements.txt: install it first (`DS_BUILD_OPS=0 pip install deepspeed`).
engines_check() {
    local gpus nproc work
    gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
    if [ "$gpus" -lt 1 ]; then
        echo "engines: no CUDA GPU here; skipped (the CPU suite covers FSDP2 over gloo: tests/test_engines.py)"
        return 0
    fi
    nproc=$(( gpus >= 2 ? 2 : 1 ))
    work=$(mktemp -d "${TMPDIR:-/tmp}/engine-check.XXXXXX")
    "$PY" -c "import deepspeed" || { echo "engines: pip install deepspeed (DS_BUILD_OPS=0) for the ZeRO checks" >&2; return 1; }
    run_engine() {  # name, expected engine, accelerate launch arguments...
        local name=$1 expect=$2; shift 2
        echo "== engines: $name ($nproc process(es))"
        for phase in stop resume; do
            "${ACCELERATE[@]}" "$@" --num_processes "$nproc" scripts/ci/engine_step.py \
                --output_dir "$work/$name" --expect "$expect" --phase "$phase"
        done
    }
    if [ "$nproc" -ge 2 ]; then
        run_engine ddp DDP --config_file configs/accelerate/multi_gpu.yaml
    else
        run_engine single plain --config_file configs/accelerate/single_gpu.yaml
    fi
    run_engine fsdp2 FSDP --config_file configs/accelerate/fsdp.yaml
    run_engine fsdp1 FSDP --config_file configs/accelerate/fsdp.yaml --fsdp_version 1
    run_engine zero2 DeepSpeed --config_file configs/accelerate/deepspeed_zero2.yaml
    run_engine zero3 DeepSpeed --config_file configs/accelerate/deepspeed_zero3.yaml
    rm -rf "$work"
    echo "== engines: all passed"
}
if wants engines; then engines_check; fi
# ===== end of section: engines ======================================================================================

# ===== benchmarks =====
# The compiled-path benchmarks of bench/bench_sampler.py --compiled and bench/bench_trainer.py --compiled on the
# GPU: ours eager / compiled vs diffusers eager / torch.compile(pipe.unet), in fp16 and bf16 (attention is
# PyTorch's scaled_dot_product_attention in both stacks), at 256 / 512 / 1024 px on the SD-shaped UNet (width 320
# is Stable Diffusion 1.x's own), then the trainer step eager vs compiled under bf16 autocast (tiny UNet; SD-shaped
# UNet at width 320 on 512 px latents' 64x64). Wall time and the
# GPU's peak allocated memory are the figures (CPU time is recorded but means little here).
if wants benchmarks; then
    if has_cuda; then
        for dtype in fp16 bf16; do
            for side in 256 512 1024; do
                "$PYTHON" bench/bench_sampler.py --compiled --device cuda --dtype "$dtype" --models sd \
                    --sd_width 320 --sd_resolution "$side" --batch 1 --steps 25 --reps 5 --memory_resolutions
            done
            "$PYTHON" bench/bench_sampler.py --compiled --device cuda --dtype "$dtype" --models tiny \
                --batch 4 --steps 25 --reps 5 --memory_resolutions
        done
        "$PYTHON" bench/bench_sampler.py --compiled --device cuda --dtype fp16 --models sd --sd_width 320 \
            --sd_resolution 512 --batch 1 --steps 5 --reps 1 --impls ours_eager ours_compiled --memory_resolutions \
            --profile
        "$PYTHON" bench/bench_trainer.py --compiled --mixed_precision bf16 --reps 5 --steps 20 --threads 4
        "$PYTHON" bench/bench_trainer.py --compiled --mixed_precision bf16 --model sd --sd_width 320 \
            --latent_side 64 --batch 2 --reps 5 --steps 10 --threads 4
    else
        echo "benchmarks: no CUDA GPU here; skipped (the CPU figures come from the same scripts without --device)"
    fi
fi
# ===== end benchmarks =====
