#!/usr/bin/env bash
# Checks that need GPUs, for a machine that has them: `bash scripts/ci/gpu_check.sh` from the repository root.
# Each section is self-contained and fails the script on its first error.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python}
ACCELERATE=("$PY" -m accelerate.commands.launch)

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
        echo "engines: no CUDA GPU visible; this section needs one" >&2
        return 1
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
engines_check
# ===== end of section: engines ======================================================================================
