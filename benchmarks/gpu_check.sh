#!/usr/bin/env bash
# Issue 11's GPU checks as one command, for a session whose task is lent a GPU (the `device` tool's `run`):
#
#   here, once:  make gpu-wheels         # .whl/: the wheels the device's image lacks (git-ignored)
#   device run:  command "bash benchmarks/gpu_check.sh", carry [".whl"], timeout_s 600
#
# On the device, python3 already holds torch and triton (its image; no package index is reachable there):
# the carried wheels go to /tmp/site, src/ and benchmarks/ onto PYTHONPATH. Then, each under a timeout
# that leaves the whole run inside one 10-minute call:
#   1. benchmarks/check_triton_gpu.py: the Triton kernels against the unfold reference on the GPU (float64
#      and float32, one step and T steps through propagate); exit 1 on a failed check;
#   2. benchmarks/bench_triton_gpu.py: Triton vs the shifted-slice path and the HBM floor (the table that
#      issue 11's closing note copies).
# Everything printed also lands in $OUT (the device tool's folder that comes back; runs/gpu_check
# elsewhere): env.txt, check.txt / check.json, bench.txt / bench.json. Exit status: 0 where both passed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu_check}
mkdir -p "$out"
py=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_check: installing the carried wheels failed" | tee "$out/env.txt"; exit 1; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
    "$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$out/env.txt"
timeout 180 "$py" benchmarks/check_triton_gpu.py --json "$out/check.json" 2>&1 | tee "$out/check.txt"
check=$?
timeout 330 "$py" benchmarks/bench_triton_gpu.py --json "$out/bench.json" 2>&1 | tee "$out/bench.txt"
bench=$?
echo "gpu_check: check exit $check, bench exit $bench" | tee -a "$out/env.txt"
[ "$check" -eq 0 ] && [ "$bench" -eq 0 ]
