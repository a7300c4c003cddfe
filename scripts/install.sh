#!/usr/bin/env bash
# Creates a virtual environment with everything synpo-kernels needs and builds its extension.
#
#   bash scripts/install.sh                 # CPU machine: .venv with CPU torch 2.13 (no CUDA downloads)
#   SYNPO_VENV=/path/venv bash scripts/install.sh
#   SYNPO_EXTRAS=train,test bash scripts/install.sh
#
# On a GPU machine, install into an environment that already has a CUDA torch (2.11-2.13) instead:
#   pip install --no-build-isolation ".[train]"   (builds the CUDA kernels too; see README)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${SYNPO_VENV:-.venv}
EXTRAS=${SYNPO_EXTRAS:-train,pairs,bench,test,dev}
PYTHON=${PYTHON:-python3}

# The CPU torch wheel only wins while torch is pinned: an unpinned torch pulls CUDA torch and
# several GB of nvidia-* packages. Constrain runtime and isolated-build installs alike.
export PIP_CONSTRAINT="$PWD/.ci/constraints.txt"
export PIP_BUILD_CONSTRAINT="$PWD/.ci/constraints.txt"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" "torch==2.13.0" "triton==3.7.1" numpy "setuptools>=77" wheel ninja pybind11 cmake
# Build against the torch just installed (torch is not a build requirement on purpose).
# --build-constraint cannot be combined with --no-build-isolation, so unset it for this command.
env -u PIP_BUILD_CONSTRAINT "${PIP[@]}" --no-build-isolation --editable ".[${EXTRAS}]"
"$VENV/bin/python" - <<'PY'
import synpo_kernels as sk
print(f"synpo-kernels installed: compiled kernels={sk.HAS_CPP_EXT} (CUDA kernels={sk.HAS_CUDA_KERNELS})"
      + ("" if sk.HAS_CPP_EXT else f"; fallback because {sk.EXT_IMPORT_ERROR}"))
PY
