#!/usr/bin/env bash
# Prepare, on the CPU machine (network, no GPU), everything one GPU call of benchmarks/gpu_suite.sh
# needs, so that the GPU machine spends its minutes on tests and benchmarks rather than on a build:
#
#   bash scripts/prepare_gpu_run.sh               # from anywhere; works in the repository root
#
#   1. builds synpo_kernels._C with the CUDA kernels in place (python setup.py build_ext --inplace)
#      for the GPU image: CPython 3.12, torch 2.11+cu130, arch 9.0a (H200); strips its debug info;
#   2. checks that it imports there with HAS_CUDA_KERNELS true and the compiled CUDA kernel registered
#      for synpo_kernels::token_logprobs_fwd (torch._C._dispatch_dump), and that the ELF holds sm_90a code;
#   3. downloads the peer wheels (liger-kernel, cut-cross-entropy: pure Python) into .whl/ (ignored);
#   4. measures what travels (tracked + untracked-not-ignored files + carried paths; limit 64 MiB)
#      and prints the carry list and the exact `run` call.
#
# Idempotent: with sources, setup.py, torch, nvcc and the arch list unchanged and the stripped library
# still in place (a stamp in build/prepare_gpu_run/), the build is skipped; wheels already in .whl/
# are not downloaded again. FORCE_BUILD=1 rebuilds.
#
# Environment:
#   GPU_PYTHON            Python of a venv matching the GPU image (default: the GPU gate's, made or reused
#                         by scripts/gpu_env.sh; the first time that is a ~4.7 GB download, several minutes)
#   CUDA_HOME             CUDA toolkit (default /usr/local/cuda; a wrapper nvcc on PATH misleads torch's guess)
#   SYNPO_CUDA_ARCH_LIST  CUDA archs (default 9.0a: Hopper only, what the H200 runs)
#   MAX_JOBS              parallel compile jobs (default: number of cores)
#   PEER_WHEELS           wheels to download (default "liger-kernel cut-cross-entropy"); SKIP_WHEELS=1 skips
#   FORCE_BUILD=1         rebuild even when the stamp says the build is up to date
#   SUITE_TIMEOUT_S       timeout_s printed for the run call (default 540: the suite's 500 s + margin)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

if [ -z "${GPU_PYTHON:-}" ]; then
  echo "== GPU_PYTHON: the GPU gate's environment (scripts/gpu_env.sh)"
  GPU_PYTHON=$(bash scripts/gpu_env.sh)
fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
ARCHS=${SYNPO_CUDA_ARCH_LIST:-9.0a}
export SYNPO_CUDA_ARCH_LIST=$ARCHS TORCH_CUDA_ARCH_LIST=$ARCHS SYNPO_BUILD_CUDA=1 SYNPO_BUILD_EXT=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
PEER_WHEELS=${PEER_WHEELS:-liger-kernel cut-cross-entropy}
LIMIT_BYTES=$((64 * 1024 * 1024))
STAMP_DIR=build/prepare_gpu_run
T0=$SECONDS

say() { echo "== [$((SECONDS - T0))s] $*"; }
die() { echo "prepare_gpu_run: ERROR: $*" >&2; exit 1; }
human() { numfmt --to=iec-i --suffix=B --format='%.2f' "$1"; }

# --- 0. the toolchain ------------------------------------------------------------------------------
[ -x "$GPU_PYTHON" ] || die "GPU_PYTHON=$GPU_PYTHON is not an executable Python (a venv matching the GPU image)"
[ -x "$CUDA_HOME/bin/nvcc" ] || die "no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)"
export PATH="$CUDA_HOME/bin:$PATH"
say "toolchain"
read -r PY_TAG TORCH_V TORCH_CUDA EXT_SUFFIX NV_INC < <("$GPU_PYTHON" - <<'EOF'
import os, sys, sysconfig, torch
inc = os.path.abspath(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu13", "include"))
print(f"cp{sys.version_info.major}{sys.version_info.minor}", torch.__version__, torch.version.cuda,
      sysconfig.get_config_var("EXT_SUFFIX"), inc if os.path.isdir(inc) else "-")
EOF
) || die "$GPU_PYTHON cannot import torch"
NVCC_V=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')
echo "python $PY_TAG ($GPU_PYTHON), torch $TORCH_V (CUDA $TORCH_CUDA), nvcc $NVCC_V at $CUDA_HOME, archs $ARCHS, jobs $MAX_JOBS"
[ "$TORCH_CUDA" != "None" ] || die "torch $TORCH_V in $GPU_PYTHON has no CUDA: it cannot build the CUDA kernels"
[ "$PY_TAG" = "cp312" ] || echo "WARNING: the GPU image runs CPython 3.12; this Python is $PY_TAG"
case "$TORCH_V" in 2.11.*+cu130) ;; *) echo "WARNING: the GPU image runs torch 2.11.0+cu130; this one is $TORCH_V" ;; esac
if [ "$NV_INC" != "-" ]; then  # cuBLAS headers of the pip CUDA wheels (setup.py adds them too)
  export CPATH="$NV_INC${CPATH:+:$CPATH}"
fi
SO="synpo_kernels/_C$EXT_SUFFIX"

# --- 1. the build (skipped when up to date) --------------------------------------------------------
inputs_hash() {
  {
    printf '%s\n' "$PY_TAG" "$TORCH_V" "$TORCH_CUDA" "$NVCC_V" "$ARCHS"
    sha256sum setup.py csrc/*
  } | sha256sum | cut -d' ' -f1
}
so_hash() { sha256sum "$SO" | cut -d' ' -f1; }
want="$(inputs_hash)"
if [ "${FORCE_BUILD:-0}" != "1" ] && [ -f "$SO" ] && [ -f "$STAMP_DIR/stamp" ] \
    && [ "$(cat "$STAMP_DIR/stamp")" = "$want $(so_hash)" ]; then
  say "build: up to date ($SO; inputs unchanged since the last run)"
  SIZE_BEFORE=$(cat "$STAMP_DIR/size_before" 2> /dev/null || echo 0)
else
  say "build: python setup.py build_ext --inplace (CUDA archs $ARCHS)"
  mkdir -p "$STAMP_DIR"
  rm -f "$STAMP_DIR/stamp"
  build_start=$SECONDS
  # Its own build-temp, so a CPU-only build of the same Python elsewhere in the tree never mixes in.
  if ! "$GPU_PYTHON" setup.py -q build_ext --inplace --build-temp "build/gpu-temp-$PY_TAG" \
      > "$STAMP_DIR/build.log" 2>&1; then
    tail -n 40 "$STAMP_DIR/build.log"
    die "the build failed (full log: $STAMP_DIR/build.log)"
  fi
  grep -E '^\[synpo-kernels build\]|warning: .*deprecat' "$STAMP_DIR/build.log" | grep -v '^ ' | head -n 5 || true
  if ! grep -q 'CUDA kernels enabled' "$STAMP_DIR/build.log"; then
    grep -n 'synpo-kernels build' "$STAMP_DIR/build.log" || true
    die "setup.py built without the CUDA kernels (see the [synpo-kernels build] lines above, $STAMP_DIR/build.log)"
  fi
  [ -f "$SO" ] || die "the build succeeded but wrote no $SO"
  echo "built in $((SECONDS - build_start)) s"
  SIZE_BEFORE=$(stat -c %s "$SO")
  strip --strip-debug "$SO"
  echo "$SIZE_BEFORE" > "$STAMP_DIR/size_before"
fi
SIZE_AFTER=$(stat -c %s "$SO")
echo "$SO: $(human "$SIZE_BEFORE") before strip --strip-debug, $(human "$SIZE_AFTER") after"

# --- 2. checks: sm_90a code in the ELF, imports with the CUDA kernels registered from C++ ------------
say "checks"
if [ -x "$CUDA_HOME/bin/cuobjdump" ]; then
  elfs=$("$CUDA_HOME/bin/cuobjdump" --list-elf "$SO" 2> /dev/null | grep -o 'sm_[0-9a-z]*' | sort -u | tr '\n' ' ' || true)
  echo "device code in $SO: ${elfs:-none}"
  for arch in ${ARCHS//;/ }; do
    arch=${arch%+PTX}
    sm="sm_${arch//./}"
    case " $elfs " in *" $sm "*) ;; *) die "$SO holds no $sm code (cuobjdump --list-elf: ${elfs:-none})" ;; esac
  done
fi
# From /tmp: the package must come from this tree (PYTHONPATH), not from an installed copy.
(cd /tmp && PYTHONPATH="$ROOT" SYNPO_REQUIRE_CPP_EXT=1 "$GPU_PYTHON" - "$ROOT") <<'EOF' || die "import check failed"
import os, sys
import torch
import synpo_kernels as sk
root = sys.argv[1]
assert os.path.dirname(os.path.abspath(sk.__file__)) == os.path.join(root, "synpo_kernels"), sk.__file__
print("synpo_kernels from", os.path.dirname(sk.__file__), "HAS_CPP_EXT", sk.HAS_CPP_EXT,
      "HAS_CUDA_KERNELS", sk.HAS_CUDA_KERNELS)
if not sk.HAS_CUDA_KERNELS:
    sys.exit(f"HAS_CUDA_KERNELS is False ({sk.EXT_IMPORT_ERROR or 'built without CUDA'})")
dump = torch._C._dispatch_dump("synpo_kernels::token_logprobs_fwd")
cuda = [l.strip() for l in dump.splitlines() if l.startswith("CUDA:")]
print("dispatch key:", *cuda or ["CUDA: none"])
if not any("token_logprobs_cuda.cpp" in l for l in cuda):
    sys.exit("synpo_kernels::token_logprobs_fwd has no compiled CUDA kernel:\n" + dump)
EOF
mkdir -p "$STAMP_DIR"
echo "$want $(so_hash)" > "$STAMP_DIR/stamp"  # a rerun with nothing changed skips the build

# --- 3. the peer wheels ------------------------------------------------------------------------------
git check-ignore -q .whl/x.whl || die ".whl/ is not ignored by git (add /.whl/ to .gitignore or .git/info/exclude)"
if [ "${SKIP_WHEELS:-0}" = "1" ]; then
  say "wheels: skipped (SKIP_WHEELS=1)"
else
  say "wheels: $PEER_WHEELS"
  mkdir -p .whl
  for name in $PEER_WHEELS; do
    if compgen -G ".whl/${name//-/_}-*.whl" > /dev/null; then
      echo "already there: $(cd .whl && ls "${name//-/_}"-*.whl)"
      continue
    fi
    "$GPU_PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "$name" || die "pip download $name failed"
    echo "downloaded: $(cd .whl && ls "${name//-/_}"-*.whl)"
  done
  for whl in .whl/*.whl; do
    case "$whl" in *-none-any.whl) ;; *) echo "WARNING: $whl is not pure Python" ;; esac
  done
  # One version of each: two would stop the install there.
  dups=$(for f in .whl/*.whl; do b=${f##*/}; echo "${b%%-[0-9]*}"; done | sort | uniq -d)
  [ -z "$dups" ] || die "several versions in .whl/ of: $dups (keep one)"
fi

# --- 4. what travels -------------------------------------------------------------------------------
CARRY=("$SO")
[ -d .whl ] && compgen -G ".whl/*.whl" > /dev/null && CARRY+=(".whl")
say "what travels"
tree_bytes=$(git ls-files -z -co --exclude-standard | xargs -0 stat -c %s -- 2> /dev/null | awk '{s += $1} END {print s + 0}')
carry_bytes=$(du -sb "${CARRY[@]}" | awk '{s += $1} END {print s + 0}')
total=$((tree_bytes + carry_bytes))
echo "tracked + untracked-not-ignored files: $(human "$tree_bytes") ($(git ls-files -co --exclude-standard | wc -l) files)"
for c in "${CARRY[@]}"; do echo "carried $c: $(human "$(du -sb "$c" | cut -f1)")"; done
echo "total: $(human "$total") of $(human "$LIMIT_BYTES")"
if [ "$total" -gt "$LIMIT_BYTES" ]; then
  echo "largest travelling files:"
  git ls-files -z -co --exclude-standard | xargs -0 stat -c '%s %n' -- 2> /dev/null | sort -rn | head -n 10
  die "what travels is over 64 MiB"
fi

carry_json=$(printf '"%s", ' "${CARRY[@]}")
say "ready. The GPU call (device time: 1-3 min start + at most 8.3 min of suite):"
cat << EOF
  run(carry=[${carry_json%, }],
      command="SKIP_BUILD=1 bash benchmarks/gpu_suite.sh",
      timeout_s=${SUITE_TIMEOUT_S:-540})
Afterwards, on this machine: tar -xzf <files_at>/kernels_gpu.tar.gz and trainer_gpu.tar.gz in the repository
root (they hold benchmarks/results/*_gpu.{json,csv}), then python benchmarks/plot.py and
python scripts/update_readme_results.py.
EOF
