#!/usr/bin/env bash
# The one definition of the GPU image's Python environment on a CPU machine: CPython 3.12 when
# present, the versions pinned in constraints/gpu-gate.txt (torch 2.11.0 from PyPI = the cu130
# build, triton 3.6.0, plus the build and test tools). Creates it, or reuses it, and prints its
# Python on stdout (progress goes to stderr):
#
#   PY=$(bash scripts/gpu_env.sh)     # .ci/gpu_gate.sh and scripts/prepare_gpu_run.sh do this
#
# The venv lives outside the checkout, under SYNPO_CI_CACHE (default ~/.cache/synpo-ci), named
# gpu-gate-<hash of the constraints and the Python version>, so every checkout on one machine shares
# it and a rerun skips the ~4.7 GB download (several minutes the first time).
#
# Environment:
#   SYNPO_CI_CACHE      where the venvs live (default ~/.cache/synpo-ci)
#   SYNPO_GATE_PYTHON   the base Python (default: the newest pyenv 3.12, else python3.12, else python3)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PIP_DISABLE_PIP_VERSION_CHECK=1

CACHE=${SYNPO_CI_CACHE:-$HOME/.cache/synpo-ci}
CONSTRAINTS=$ROOT/constraints/gpu-gate.txt
PY=${SYNPO_GATE_PYTHON:-$(ls -d /root/.pyenv/versions/3.12*/bin/python 2> /dev/null | tail -1)}
PY=${PY:-$(command -v python3.12 || command -v python3)}
key=$( (cat "$CONSTRAINTS"; "$PY" -c 'import sys; print(sys.version)') | sha256sum | cut -c1-12)
VENV=$CACHE/gpu-gate-$key
mkdir -p "$CACHE"

if [ ! -f "$VENV/.complete" ]; then
  echo "gpu_env: creating $VENV ($("$PY" --version); ~4.7 GB download)" >&2
  # One creator at a time: the gate and prepare_gpu_run.sh may start together on one machine.
  exec 9> "$CACHE/.gpu-gate.lock"
  flock 9
  if [ ! -f "$VENV/.complete" ]; then
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    # The machine's pip config may cap torch or add local wheel folders; the constraints say it all.
    PIP_CONFIG_FILE=/dev/null PIP_CONSTRAINT="$CONSTRAINTS" "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
    PIP_CONFIG_FILE=/dev/null PIP_CONSTRAINT="$CONSTRAINTS" "$VENV/bin/python" -m pip install --quiet \
      torch triton numpy ninja pybind11 setuptools wheel pytest expecttest cmake >&2
    touch "$VENV/.complete" # written last: an interrupted install is redone, never half-used
    # Keep only the newest two environments: each is ~4.7 GB.
    ls -dt "$CACHE"/gpu-gate-* 2> /dev/null | tail -n +3 | xargs -r rm -rf
  fi
  exec 9>&-
fi
echo "$VENV/bin/python"
