#!/usr/bin/env bash
# One call on a GPU machine: build the CUDA extension, run the GPU tests, run the kernel and trainer
# benchmarks at their GPU presets, and collect the results. Kept under 10 minutes (SUITE_BUDGET_S).
#
#   bash benchmarks/gpu_suite.sh                 # from the repository root, on a machine with a GPU
#
# Expects an environment with a CUDA torch (2.11-2.13), Triton, transformers and peft (the project's
# GPU image: torch 2.11+cu130, triton 3.6; no network). Peers travel as wheels in ./.whl (ignored by
# git). Prepare them on a machine with network, from the repository root:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl liger-kernel cut-cross-entropy
#
# (both are pure-Python wheels whose needs, torch and triton, are already on the GPU image). This
# script installs them with `pip install --no-index --no-deps --target /tmp/site .whl/*.whl` and
# `export PYTHONPATH=/tmp/site`; without .whl they are reported as missing in the results.
#
# Output: benchmarks/results/{kernels,trainer}_gpu.{json,csv} and charts in benchmarks/results/plots/,
# README.md / docs/scaling.md regenerated from them; and, when $OUT is set, copies in $OUT (at most 8
# files: the four result files, gpu_suite.log, and gpu_results.tar.gz holding the charts, the regenerated
# README.md and docs/scaling.md). On the CPU machine afterwards: copy the result files into
# benchmarks/results/, run `python scripts/update_readme_results.py`, commit.
#
# Environment: PYTHON (default python3), SUITE_BUDGET_S (default 570), SYNPO_CUDA_ARCH_LIST (default
# 9.0a: Hopper, one target keeps the build ~80 s), SKIP_BUILD=1 (extension already built).
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
BUDGET=${SUITE_BUDGET_S:-570}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset TRITON_INTERPRET  # the Triton kernels must compile for the GPU, not run in the interpreter
LOG="${OUT:-/tmp}/gpu_suite.log"  # straight into $OUT: complete even if the call is cut short
exec > >(tee "$LOG") 2>&1
failures=()
stamp() { echo "=== [${SECONDS}s] $*"; }
left() { echo $(( BUDGET - SECONDS )); }

stamp "device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PYTHON" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "gpu", torch.cuda.get_device_name())'

if [ -d .whl ] && compgen -G ".whl/*.whl" > /dev/null; then
  stamp "peers from .whl/"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" || failures+=("peer wheels")
else
  stamp "no .whl/ folder: Liger-Kernel and Cut Cross-Entropy will be reported as missing"
fi

if [ "${SKIP_BUILD:-0}" != "1" ]; then
  stamp "build the extension with CUDA kernels"
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}  # a wrapper nvcc on PATH misleads torch's detection
  NV_INC=$("$PYTHON" -c 'import os, torch; print(os.path.abspath(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu13", "include")))')
  [ -d "$NV_INC" ] && export CPATH="$NV_INC${CPATH:+:$CPATH}"  # cuBLAS headers of the pip CUDA wheels
  export SYNPO_CUDA_ARCH_LIST=${SYNPO_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
  timeout 240 "$PYTHON" -m pip install -q --no-build-isolation --no-deps -e . || failures+=("build")
fi
"$PYTHON" -c 'import synpo_kernels as sk; print("compiled kernels:", sk.HAS_CPP_EXT, "CUDA kernels:", sk.HAS_CUDA_KERNELS, sk.EXT_IMPORT_ERROR or "")' \
  || failures+=("import")

stamp "GPU tests: pytest -m cuda, and the Triton kernel tests compiled"
timeout 150 "$PYTHON" -m pytest -q -x -m cuda tests/ -p no:cacheprovider || failures+=("pytest -m cuda")
timeout 120 "$PYTHON" -m pytest -q tests/test_fused_linear_kernels.py -p no:cacheprovider || failures+=("triton kernel tests")

# The two sweeps share what is left; each stops at its budget and records the rest as skipped.
remaining=$(left)
kernels_budget=$(( remaining * 55 / 100 - 30 ))
stamp "kernel benchmarks, --preset gpu (budget ${kernels_budget}s)"
timeout $(( kernels_budget + 60 )) "$PYTHON" -m synpo bench kernels --preset gpu --budget-s "$kernels_budget" \
  || failures+=("bench kernels")

trainer_budget=$(( $(left) - 40 ))
stamp "trainer benchmarks, --preset gpu (budget ${trainer_budget}s)"
timeout $(( trainer_budget + 45 )) "$PYTHON" -m synpo bench trainer --preset gpu --budget-s "$trainer_budget" \
  || failures+=("bench trainer")

stamp "charts, README section, scaling table"
"$PYTHON" benchmarks/plot.py benchmarks/results/kernels_gpu.json benchmarks/results/trainer_gpu.json || failures+=("plots")
"$PYTHON" scripts/update_readme_results.py || failures+=("readme")

if [ -n "${OUT:-}" ]; then
  stamp "copy results to \$OUT"
  for f in kernels_gpu.json kernels_gpu.csv trainer_gpu.json trainer_gpu.csv; do
    [ -f "benchmarks/results/$f" ] && cp "benchmarks/results/$f" "$OUT/"
  done
  tar czf "$OUT/gpu_results.tar.gz" benchmarks/results/plots README.md docs/scaling.md 2> /dev/null || true
fi

stamp "done${failures[*]:+; failed: ${failures[*]}}"
[ ${#failures[@]} -eq 0 ]
