#!/usr/bin/env bash
# GPU check for hyphae.kernels (issue 9) and real models (issue 17): the kernel tests with CUDA
# tensors (compiled Triton against the torch reference), bench/kernels.py on the GPU, then
# bench/gpu_model.py (llama-125m bf16 vs a bare loop, llama-1b memory); prints a compact summary.
#
#     bash bench/gpu_check.sh                 # from anywhere; uses .venv/bin/python if present
#     PYTHON=/path/to/python bash bench/gpu_check.sh
#
# Needs only this repository and a Python with CUDA torch (pytest for the test half). No
# network: if triton is not importable the Triton half is skipped with a message and only the
# torch reference runs (on CUDA). hyphae need not be installed: a shim maps hyphae.kernels to
# ./kernels. Budget: tests <= 180 s (mostly Triton compiles), bench <= 90 s.
# Writes bench/results/kernels_gpu.json and bench/results/kernels_gpu_tests.log.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
unset TRITON_INTERPRET  # the point is the compiled kernels
mkdir -p bench/results

if ! "$PY" -c "import hyphae.kernels, hyphae.training" 2>/dev/null; then
    shim="$(mktemp -d)"
    mkdir -p "$shim/hyphae"
    ln -s "$PWD/kernels" "$shim/hyphae/kernels"
    ln -s "$PWD/training" "$shim/hyphae/training"  # bench/gpu_model.py needs torch + numpy only
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
fi

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device; on CPU run: python -m pytest tests/unit/kernels" >&2
    exit 2
fi
"$PY" - <<'EOF'
import torch
from hyphae.kernels import triton_available
print(f"gpu_check: {torch.cuda.get_device_name()} | torch {torch.__version__} (CUDA {torch.version.cuda})")
if triton_available():
    import triton
    print(f"gpu_check: triton {triton.__version__}: testing and timing the compiled Triton kernels")
else:
    print("gpu_check: triton is NOT importable: skipping the Triton kernels "
          "(pip install 'hyphae[gpu]' where there is network); reference path only")
EOF

status=0
if "$PY" -c "import pytest" 2>/dev/null; then
    timeout 180 "$PY" -m pytest tests/unit/kernels -m "gpu or not gpu" -q -p no:cacheprovider \
        -o addopts="" >bench/results/kernels_gpu_tests.log 2>&1
    status=$?
    tests_line="$(grep -E '(passed|failed|error)' bench/results/kernels_gpu_tests.log | tail -n 1)"
    [ "$status" = 124 ] && tests_line="TIMED OUT after 180 s"
    if [ "$status" != 0 ]; then
        grep -E '^(FAILED|ERROR)' bench/results/kernels_gpu_tests.log | head -n 15
    fi
else
    tests_line="skipped: pytest is not installed in $PY"
fi

timeout 90 "$PY" bench/kernels.py --device cuda --json bench/results/kernels_gpu.json >/dev/null 2>bench/results/kernels_gpu_bench.err
bench_status=$?

echo "== gpu_check summary =="
echo "tests: ${tests_line:-no result} (log: bench/results/kernels_gpu_tests.log)"
if [ "$bench_status" = 0 ]; then
    "$PY" - <<'EOF'
import json
r = json.load(open("bench/results/kernels_gpu.json"))
print(f"bench: {r['device']} path={r['path']} numel={r['params']['numel']} (ratio = copy time / op time, same bytes)")
for name, v in r["results"].items():
    print(f"  {name:<18} {v['median_ms']:8.3f} ms  {v['gb_per_s']:7.0f} GB/s  ratio {v['ratio_vs_copy']:.2f}")
t = r["target"]
print(f"target: {t['op']} ratio {t['ratio_vs_copy']:.2f} >= {t['ratio_vs_copy_min']}: {'met' if t['met'] else 'NOT met'}")
EOF
else
    echo "bench: failed or timed out (exit $bench_status):"
    tail -n 15 bench/results/kernels_gpu_bench.err
    [ "$status" = 0 ] && status=1
fi

# Real models (issue 17): llama-125m bf16 in our loop vs a bare torch loop (tokens/s, MFU), and
# llama-1b's peak GPU memory with DiLoCo's outer state on the CPU. Budget: <= 300 s.
timeout 300 "$PY" bench/gpu_model.py --json bench/results/gpu_model.json >bench/results/gpu_model.log 2>&1
model_status=$?
if [ "$model_status" = 0 ]; then
    tail -n 3 bench/results/gpu_model.log
else
    echo "gpu_model: failed or timed out (exit $model_status):"
    tail -n 15 bench/results/gpu_model.log
    [ "$status" = 0 ] && status=1
fi
exit "$status"
