#!/usr/bin/env bash
# The GPU check (issue #48) as one command on a GPU machine: about 8 minutes on one H100 or H200.
#
#   bench/gpu_wheels.sh                 # here, once: what the GPU machine lacks, into .gpu/ (git-ignored)
#   bash bench/gpu_check.sh             # there, with .gpu carried beside the tree
#
# It records the card, runs the GPU-marked tests, then `python -m bench.gpu_check --device cuda`
# (training speed in fp32 and bf16, a full Beauty run against the CPU seeds, recommend over a
# 1,000,000-item catalog, and, where Ray is installed, the Ray Data pipeline, `ray-rec train --gpu`
# and the Serve endpoint at concurrency 32). Results go to $OUT (the device tool's folder) or
# bench/results: gpu_card.txt, gpu_tests.log, gpu_check.log, gpu_check.json (its "cuda" entry beside
# the CPU baseline that `python -m bench.gpu_check --device cpu` stores here).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS_DIR=${OUT:-bench/results}
PY=${PYTHON:-python3}
mkdir -p "$RESULTS_DIR"
if ls .gpu/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-site .gpu/*.whl || exit 1
    export PYTHONPATH="/tmp/gpu-site:$PWD"
fi
export PYTHONPATH="${PYTHONPATH:-$PWD}" PYTHONUNBUFFERED=1 RAY_REC_BENCH_RESULTS="$RESULTS_DIR"
[ -f .gpu/Beauty.txt ] && export RAY_REC_SHARED_DATA="$PWD/.gpu"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$RESULTS_DIR/gpu_card.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))" \
    | tee -a "$RESULTS_DIR/gpu_card.txt" || exit 1
timeout 120 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_device.py 2>&1 | tee "$RESULTS_DIR/gpu_tests.log"
timeout 420 "$PY" -m bench.gpu_check --device cuda 2>&1 | tee "$RESULTS_DIR/gpu_check.log"
