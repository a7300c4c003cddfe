#!/usr/bin/env bash
# One call on a GPU machine: check that the compiled CUDA kernels are loaded, run the GPU tests, then
# the kernel and trainer benchmarks at their GPU presets. At most SUITE_BUDGET_S (default 500 s; the first H100 run: 423 s, a 60 s start).
#
#   bash scripts/prepare_gpu_run.sh                        # first, on the CPU machine (build, wheels)
#   SKIP_BUILD=1 bash benchmarks/gpu_suite.sh              # then on the GPU machine, from anywhere
#
# Stages (each with its own timeout, capped by what is left of the budget; each log in $OUT at once):
#   1 setup    device, peers from .whl/, the build (unless SKIP_BUILD=1), and the GATE: it stops the
#              suite at once (exit 3) unless torch sees a CUDA device, synpo_kernels.HAS_CUDA_KERNELS is
#              true, synpo_kernels::token_logprobs_fwd has a compiled CUDA kernel (not the PyTorch
#              fallback) and that kernel runs on this device, so a failed build is never benchmarked;
#   2 tests    pytest tests/kernels and tests/test_prefix_sharing.py (all of it: Triton kernels compiled, the
#              CUDA C++ op, the shared-prefix attention on CUDA sdpa kernels; no interpreter;
#              only that folder is collected, so no module importing av/deepspeed is imported);
#   3 tune     python benchmarks/tune_kernels.py --quick --write (bf16 row passes; rewrites this tree's
#              synpo_kernels/ops/kernel_configs.json, so the benchmarks run the tuned configurations;
#              skipped when less than TUNE_TIMEOUT_S + 200 s are left, the table's defaults then stay)
#   4 kernels  synpo bench kernels --preset gpu   (also after failed tests: the summary says so)
#   5 trainer  synpo bench trainer --preset gpu --profile-top 8 (and each method's top kernels and host ops)
#
# $OUT (a fresh /tmp/gpu_suite.* without it) receives at most 8 files, the device tool's limit:
# gpu_suite.log (everything), 1_setup.log ... 5_trainer.log, and after each benchmark stage
# kernels_gpu.tar.gz / trainer_gpu.tar.gz holding benchmarks/results/<name>.{json,csv} (the kernels'
# also holds the tuned synpo_kernels/ops/kernel_configs.json when stage 3 wrote one).
# A call cut short still returns the stages that finished. On the CPU machine afterwards, from the
# repository root: `tar -xzf <dir>/kernels_gpu.tar.gz; tar -xzf <dir>/trainer_gpu.tar.gz`, then
# `python benchmarks/plot.py benchmarks/results/kernels_gpu.json benchmarks/results/trainer_gpu.json`
# and `python scripts/update_readme_results.py` (charts and README are made there, not on the GPU).
#
# Expects the project's GPU image (CUDA torch 2.11+cu130, Triton 3.6, transformers, peft, pytest; no
# network). Peers (liger-kernel, cut-cross-entropy) travel as wheels in ./.whl (ignored by git; made by
# scripts/prepare_gpu_run.sh) and are installed with pip --no-index --no-deps --target /tmp/site;
# without them they are reported as missing in the results.
#
# Environment: PYTHON (default python3); SKIP_BUILD=1 (use the carried synpo_kernels/_C*.so);
# SUITE_BUDGET_S (default 500); TESTS_TIMEOUT_S (default 170); TEST_WORKERS (default 8, pytest-xdist);
# TUNE_TIMEOUT_S (default 90);
# KERNELS_SHARE (percent of the time left
# after the tests for the kernel sweep, default 55); SYNPO_CUDA_ARCH_LIST (default 9.0a) and MAX_JOBS
# for the build. Exit status: 0 all passed, 3 the gate stopped the suite, 1 another stage failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD

PYTHON=${PYTHON:-python3}
BUDGET=${SUITE_BUDGET_S:-500}
TESTS_TIMEOUT=${TESTS_TIMEOUT_S:-170}
TUNE_TIMEOUT=${TUNE_TIMEOUT_S:-90}
TEST_WORKERS=${TEST_WORKERS:-8}  # pytest-xdist workers for stage 2 (1: one process)
TUNED=""      # set once stage 3 rewrote the kernel-config table
KERNELS_SHARE=${KERNELS_SHARE:-55}
END_RESERVE=10     # seconds kept for the summary at the end
BENCH_OVERHEAD=40  # seconds a benchmark driver needs beyond its --budget-s (imports, report, writing)
if [ -n "${OUT:-}" ]; then OUT_DIR=$OUT; else OUT_DIR=$(mktemp -d /tmp/gpu_suite.XXXXXX); fi
mkdir -p "$OUT_DIR"
RESULTS_ROOT=$(mktemp -d /tmp/gpu_suite_results.XXXXXX)  # fresh: never ship stale results of the tree
RESULTS="$RESULTS_ROOT/benchmarks/results"
mkdir -p "$RESULTS"

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this tree's packages, with the carried build
unset TRITON_INTERPRET SYNPO_DISABLE_CPP_EXT  # the Triton kernels compile for the GPU; the extension loads

exec > >(tee -a "$OUT_DIR/gpu_suite.log") 2>&1
TEE_PID=$!

STAGES=()     # "name: verdict (seconds)"
FAILED=()
STAGE_LOG=/dev/null
stamp() { echo "=== [${SECONDS}s/${BUDGET}s] $*"; }
left() { echo $((BUDGET - SECONDS)); }

finish() {  # finish <exit status>: summary, then flush the combined log
  stamp "summary"
  printf '  %s\n' "${STAGES[@]}"
  echo "files in $OUT_DIR:"
  (cd "$OUT_DIR" && ls -l)
  n=$(find "$OUT_DIR" -type f | wc -l)
  [ "$n" -le 8 ] || echo "WARNING: $n files in \$OUT; only 8 come back"
  stamp "done (exit $1)${FAILED[*]:+; failed: ${FAILED[*]}}"
  rm -rf "$RESULTS_ROOT"  # packed into $OUT already
  exec >&- 2>&-
  wait "$TEE_PID" 2> /dev/null
  exit "$1"
}

begin_stage() {  # begin_stage <n> <name> <what>
  STAGE_NAME=$2
  STAGE_START=$SECONDS
  STAGE_LOG="$OUT_DIR/$1_$2.log"
  : > "$STAGE_LOG"
  stamp "stage $1 $2: $3" | tee -a "$STAGE_LOG"
}

end_stage() {  # end_stage <verdict>
  STAGES+=("$STAGE_NAME: $1 ($((SECONDS - STAGE_START)) s)")
  stamp "end of $STAGE_NAME: $1" | tee -a "$STAGE_LOG"
  STAGE_LOG=/dev/null
}

step() {  # step <timeout s> <command...>: output to the stage log and the combined log; its status
  local limit=$1 cap=$(($(left) - END_RESERVE))
  shift
  [ "$cap" -lt 5 ] && cap=5
  [ "$limit" -gt "$cap" ] && limit=$cap  # never past the suite's budget
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$STAGE_LOG"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    printf '\n!!! timed out after %s s: %s\n' "$limit" "$*" | tee -a "$STAGE_LOG"
  fi
  return "$rc"
}

note() { echo "$*" | tee -a "$STAGE_LOG"; }

# pack_results <stem> [tree file...]: $OUT/<stem>.tar.gz with benchmarks/results/<stem>.{json,csv}
pack_results() {
  local stem=$1 files=() ext
  shift
  for ext in json csv; do
    [ -f "$RESULTS/$stem.$ext" ] && files+=("benchmarks/results/$stem.$ext")
  done
  if [ ${#files[@]} -eq 0 ]; then
    note "no $stem results were written"
    return 1
  fi
  # Tree files (the tuned table) go in under their repository path, next to the results.
  for f in "$@"; do
    mkdir -p "$RESULTS_ROOT/$(dirname "$f")" && cp "$ROOT/$f" "$RESULTS_ROOT/$f" && files+=("$f")
  done
  tar -czf "$OUT_DIR/$stem.tar.gz" -C "$RESULTS_ROOT" "${files[@]}" && note "copied to \$OUT/$stem.tar.gz: ${files[*]}"
}

# ---------------------------------------------------------------------------------------------------
begin_stage 1 setup "device, peers, build, gate"
note "repository: $ROOT; python: $(command -v "$PYTHON" || echo "$PYTHON (not found)"); out: $OUT_DIR"
step 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || note "(no nvidia-smi answer)"
step 60 "$PYTHON" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "| CUDA device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")'

if [ -d .whl ] && compgen -G ".whl/*.whl" > /dev/null; then
  note "peers from .whl/: $(cd .whl && echo ./*.whl)"
  if step 90 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl; then
    export PYTHONPATH="$PYTHONPATH:/tmp/site"  # after this tree's packages
  else
    FAILED+=("peer wheels")
  fi
else
  note "no .whl/ folder: Liger-Kernel and Cut Cross-Entropy will be reported as missing"
fi

if [ "${SKIP_BUILD:-0}" != "1" ]; then
  note "building synpo_kernels._C with the CUDA kernels (python setup.py build_ext --inplace)"
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}  # a wrapper nvcc on PATH misleads torch's detection
  NV_INC=$("$PYTHON" -c 'import os, torch; print(os.path.abspath(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu13", "include")))')
  [ -d "$NV_INC" ] && export CPATH="$NV_INC${CPATH:+:$CPATH}"  # cuBLAS headers of the pip CUDA wheels
  export SYNPO_CUDA_ARCH_LIST=${SYNPO_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
  export TORCH_CUDA_ARCH_LIST=$SYNPO_CUDA_ARCH_LIST
  build_limit=$(($(left) - 150))
  [ "$build_limit" -gt 300 ] && build_limit=300
  if [ "$build_limit" -lt 60 ]; then
    note "not enough time left for the build"
  else
    step "$build_limit" "$PYTHON" setup.py -q build_ext --inplace || FAILED+=("build")
  fi
else
  note "SKIP_BUILD=1: using the carried build: $(ls -l synpo_kernels/_C*.so 2> /dev/null || echo 'no synpo_kernels/_C*.so in the tree')"
fi

note "gate: the compiled CUDA kernels must be loaded and run on this device"
step 90 "$PYTHON" - << 'EOF'
import os, sys

import torch

import synpo_kernels as sk

problems = []
print(f"synpo_kernels from {os.path.dirname(sk.__file__)}: HAS_CPP_EXT={sk.HAS_CPP_EXT} "
      f"HAS_CUDA_KERNELS={sk.HAS_CUDA_KERNELS}" + (f" ({sk.EXT_IMPORT_ERROR})" if sk.EXT_IMPORT_ERROR else ""))
if not torch.cuda.is_available():
    problems.append(f"torch {torch.__version__} sees no CUDA device")
if not sk.HAS_CUDA_KERNELS:
    problems.append("synpo_kernels.HAS_CUDA_KERNELS is False: "
                    + (sk.EXT_IMPORT_ERROR or "synpo_kernels._C was built without the CUDA kernels"))
dump = torch._C._dispatch_dump("synpo_kernels::token_logprobs_fwd")
cuda = [line.strip() for line in dump.splitlines() if line.startswith("CUDA:")]
print("dispatch:", *(cuda or ["no CUDA key"]))
# The compiled kernel is registered from csrc/*.cpp; the PyTorch fallback from torch/library.py.
if not any(".py:" not in line and (".cpp:" in line or ".cu:" in line) for line in cuda):
    problems.append("synpo_kernels::token_logprobs_fwd has no compiled CUDA kernel "
                    f"({cuda[0] if cuda else 'no CUDA key'})")
if not problems:
    from synpo_kernels.reference import token_logprobs_ref

    logits = torch.randn(37, 1000, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, 1000, (37,), device="cuda")
    labels[3] = -100
    try:
        logp, _ = torch.ops.synpo_kernels.token_logprobs_fwd(logits, labels, -100)
        torch.cuda.synchronize()
        ref = token_logprobs_ref(logits, labels, shift=False, dtype=torch.float32)
        err = (logp.float() - ref.float()).abs().max().item()
        print(f"smoke call on {torch.cuda.get_device_name()}: max |error| vs reference {err:.2e}")
        if not err < 1e-2:
            problems.append(f"the CUDA kernel's output differs from the reference (max error {err:.3g})")
    except Exception as exc:  # e.g. "no kernel image is available": built for another arch
        problems.append(f"the CUDA kernel fails on this device: {type(exc).__name__}: {exc}")
if problems:
    print("GATE FAILED:", *problems, sep="\n  - ")
    sys.exit(3)
print("gate passed: compiled CUDA kernels loaded and running")
EOF
gate_rc=$?
if [ "$gate_rc" -ne 0 ]; then
  note "STOP at the gate (exit $gate_rc, reasons above): no tests and no benchmarks, so the PyTorch fallback"
  note "is never benchmarked as synpo_kernels. Missing or CPU-only build: run scripts/prepare_gpu_run.sh on"
  note "the CPU machine and carry the synpo_kernels/_C*.so it names (SKIP_BUILD=1), or build here (SKIP_BUILD=0)."
  FAILED+=("gate")
  end_stage "STOPPED at the gate"
  finish 3
fi
end_stage "ok${FAILED[*]:+ (but: ${FAILED[*]})}"

# ---------------------------------------------------------------------------------------------------
begin_stage 2 tests "pytest tests/kernels tests/test_prefix_sharing.py (compiled Triton, CUDA C++ op, prefix sharing)"
tests_limit=$(($(left) - 150))  # the benchmarks keep at least 150 s
if [ "$tests_limit" -lt 30 ]; then
  note "not enough time left for the tests and the benchmarks ($(left) s)"
  FAILED+=("tests (no time)")
  end_stage "not run"
  finish 1
fi
[ "$tests_limit" -gt "$TESTS_TIMEOUT" ] && tests_limit=$TESTS_TIMEOUT
# Compiling the Triton kernels for each tested specialization dominates this stage: with pytest-xdist
# (in the GPU image) TEST_WORKERS processes compile side by side on the host's cores, one GPU shared.
XDIST=()
if [ "$TEST_WORKERS" -gt 1 ] && "$PYTHON" -c 'import xdist' 2> /dev/null; then XDIST=(-n "$TEST_WORKERS"); fi
note "TRITON_INTERPRET=${TRITON_INTERPRET:-unset} (Triton compiles for the GPU); ${XDIST[*]:-one process}; timeout ${tests_limit} s"
if step "$tests_limit" "$PYTHON" -m pytest tests/kernels tests/test_prefix_sharing.py -q -rfEs -p no:cacheprovider \
    --durations=10 "${XDIST[@]}"; then
  end_stage "passed"
else
  # The gate already proved the compiled kernels load and agree with the reference; the benchmarks
  # still run so one lent call returns timings too, and the summary and exit status say the tests failed.
  FAILED+=("tests")
  end_stage "FAILED (the benchmarks still run; their results come from a tree with failing GPU tests)"
fi

# ---------------------------------------------------------------------------------------------------
# The two sweeps share what is left; each stops at its --budget-s and records the rest as skipped.
bench_stage() {  # bench_stage <n> <benchmark> <timeout s> [args]: `synpo bench <benchmark> --preset gpu [args]`
  local n=$1 bench=$2 limit=$3 verdict="done"
  shift 3
  local budget=$((limit - BENCH_OVERHEAD))
  begin_stage "$n" "$bench" "synpo bench $bench --preset gpu (budget ${budget} s, timeout ${limit} s)"
  if [ "$budget" -lt 30 ]; then
    note "not enough time left"
    FAILED+=("bench $bench (no time)")
    end_stage "not run"
    return
  fi
  step "$limit" "$PYTHON" -m synpo bench "$bench" --preset gpu --budget-s "$budget" --output-dir "$RESULTS" "$@" \
    || { FAILED+=("bench $bench"); verdict=FAILED; }
  local extra=()
  [ "$bench" = kernels ] && [ -n "$TUNED" ] && extra+=("$TUNED")
  pack_results "${bench}_gpu" "${extra[@]}" || FAILED+=("$bench results")
  end_stage "$verdict"
}

begin_stage 3 tune "benchmarks/tune_kernels.py --quick --write (timeout ${TUNE_TIMEOUT} s)"
if [ "$(left)" -lt $((TUNE_TIMEOUT + 200)) ]; then
  note "not enough time left: the table's defaults stay"
  end_stage "not run"
elif step "$TUNE_TIMEOUT" "$PYTHON" benchmarks/tune_kernels.py --quick --write; then
  TUNED=synpo_kernels/ops/kernel_configs.json
  end_stage "done"
else
  FAILED+=("tune")
  end_stage "FAILED (the table's defaults stay)"
fi

bench_stage 4 kernels $((($(left) - END_RESERVE) * KERNELS_SHARE / 100))
# One profiled step per method after the timed ones: where a step's time goes (kernels and host).
bench_stage 5 trainer $(($(left) - END_RESERVE)) --profile-top 8

[ ${#FAILED[@]} -eq 0 ] && finish 0
finish 1
