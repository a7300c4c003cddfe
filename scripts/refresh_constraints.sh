#!/usr/bin/env bash
# Rewrites constraints/cpu.txt and constraints/gpu-gate.txt with the newest releases the project's
# requirements allow (torch and triton stay at the versions the environments are defined by).
#
#   bash scripts/refresh_constraints.sh && bash .ci/run    # then commit constraints/ only if CI is green
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "[refresh] CPU test environment (Python 3.11, torch 2.13.0+cpu, triton 3.7.1)"
SYNPO_VENV="$work/cpu" SYNPO_CONSTRAINTS=none bash scripts/install.sh
{
  echo "# Every package CI installs into the CPU test environment (.venv, Python 3.11), pinned to versions known"
  echo "# to pass. Regenerate with scripts/refresh_constraints.sh (see README, Development)."
  "$work/cpu/bin/python" -m pip freeze --all --exclude-editable
} > constraints/cpu.txt

echo "[refresh] GPU gate environment (CPython 3.12, torch 2.11.0 = cu130, triton 3.6.0)"
PY=$(ls -d /root/.pyenv/versions/3.12*/bin/python 2> /dev/null | tail -1)
PY=${PY:-$(command -v python3.12 || command -v python3)}
"$PY" -m venv "$work/gpu"
PIP_CONFIG_FILE=/dev/null "$work/gpu/bin/python" -m pip install --quiet --upgrade pip
PIP_CONFIG_FILE=/dev/null "$work/gpu/bin/python" -m pip install --quiet torch==2.11.0 triton==3.6.0 \
  numpy ninja pybind11 "setuptools>=77" wheel pytest expecttest cmake
{
  echo "# The GPU gate's environment (.ci/gpu_gate.sh): the GPU machine's versions (CPython 3.12, torch 2.11.0"
  echo "# = cu130 on PyPI, triton 3.6.0) plus the build and test tools. Regenerate with scripts/refresh_constraints.sh."
  "$work/gpu/bin/python" -m pip freeze --all
} > constraints/gpu-gate.txt
git --no-pager diff --stat constraints/
