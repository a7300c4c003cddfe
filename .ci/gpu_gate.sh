#!/usr/bin/env bash
# The GPU gate, with no GPU: proves on a CPU machine what can be proven about the GPU path.
#
#   bash .ci/gpu_gate.sh          # from a checkout; .ci/run calls it
#
# In an environment with the GPU machine's versions (scripts/gpu_env.sh: CPython 3.12 when present,
# torch 2.11.0 from PyPI = the cu130 build, triton 3.6.0; pinned in constraints/gpu-gate.txt), cached
# outside the checkout (SYNPO_CI_CACHE, default ~/.cache/synpo-ci) so that reruns on one machine skip
# the multi-GB download, it:
#   1. builds the wheel with the CUDA kernels (SYNPO_CUDA_ARCH_LIST, default 8.0;9.0a;9.0+PTX),
#      installs it, and checks that it imports with the CUDA kernels registered for the CUDA key
#      and a cubin per arch plus PTX embedded (scripts/check_cuda_build.py);
#   2. builds the same sources with CMake against that CUDA torch and smoke-tests the module;
#   3. runs the kernel tests (tests/kernels) against the installed wheel, Triton in the
#      interpreter, under torch 2.11 / triton 3.6;
#   4. compiles every Triton kernel ahead of time for sm_90 and sm_80 with the launchers' real
#      configurations, and the CUDA kernels with nvcc -Xptxas -v, and prints registers, spills,
#      shared memory and 128-bit loads per kernel (scripts/aot_report.py); fails on any spill.
# What it cannot prove: that the kernels run, are right or fast on a GPU (benchmarks/gpu_suite.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
start=$(date +%s)
stamp() { echo "=== [gpu gate $(( $(date +%s) - start ))s] $*"; }

stamp "environment (scripts/gpu_env.sh)"
GATE_PY=$(bash scripts/gpu_env.sh)
VENV=$(dirname "$(dirname "$GATE_PY")")
echo "$VENV"
"$VENV/bin/python" -c 'import torch, triton; print("torch", torch.__version__, "CUDA", torch.version.cuda, "triton", triton.__version__)'

stamp "wheel with the CUDA kernels (archs ${SYNPO_CUDA_ARCH_LIST:=8.0;9.0a;9.0+PTX})"
OUTDIR=$ROOT/build/gpu-gate
rm -rf "$OUTDIR/dist" && mkdir -p "$OUTDIR"
# CUDA_HOME is left to setup.py's detection on purpose: the gate checks that it finds the toolkit.
SYNPO_CUDA_ARCH_LIST=$SYNPO_CUDA_ARCH_LIST MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  "$VENV/bin/python" -m pip wheel --quiet --no-build-isolation --no-deps -w "$OUTDIR/dist" . \
  > "$OUTDIR/wheel.log" 2>&1 || { cat "$OUTDIR/wheel.log"; exit 1; }
grep -h "synpo-kernels build" "$OUTDIR/wheel.log" || true
"$VENV/bin/python" -m pip install --quiet --no-deps --force-reinstall "$OUTDIR"/dist/*.whl
ls -l "$OUTDIR"/dist/*.whl
(cd "$OUTDIR" && "$VENV/bin/python" "$ROOT/scripts/check_cuda_build.py" --archs sm_80,sm_90 --ptx sm_90)

stamp "CMake build of the CUDA kernels against the pip CUDA torch"
rm -rf "$OUTDIR/cmake"  # a clean build: the gate checks the sources as they are
"$VENV/bin/cmake" -S . -B "$OUTDIR/cmake" -DSYNPO_WITH_CUDA=ON -DPython3_EXECUTABLE="$VENV/bin/python" \
  > "$OUTDIR/cmake.log" 2>&1 && "$VENV/bin/cmake" --build "$OUTDIR/cmake" -j "$(nproc)" >> "$OUTDIR/cmake.log" 2>&1 \
  || { cat "$OUTDIR/cmake.log"; exit 1; }
(cd "$OUTDIR" && "$VENV/bin/python" "$ROOT/scripts/smoke_cmake_build.py" "$OUTDIR"/cmake/_C*.so --expect-cuda)

stamp "kernel tests under torch 2.11 / triton 3.6 (Triton interpreter, the installed wheel)"
# The venv's pytest script (not `python -m pytest`) keeps the checkout off sys.path, so the tests
# import the wheel just built; SYNPO_REQUIRE_CPP_EXT makes a wheel whose module fails to load fail.
SYNPO_REQUIRE_CPP_EXT=1 TRITON_INTERPRET=1 "$VENV/bin/pytest" -q -p no:cacheprovider tests/kernels

stamp "ahead-of-time compile report (Triton for sm_90/sm_80, nvcc -Xptxas -v)"
(cd "$OUTDIR" && env -u TRITON_INTERPRET "$VENV/bin/python" "$ROOT/scripts/aot_report.py" --json "$OUTDIR/aot_report.json")
stamp "gpu gate passed"
