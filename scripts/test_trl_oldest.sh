#!/usr/bin/env bash
# Run the TRL integration tests against the OLDEST supported TRL (the lower bound of the `trl` extra in
# pyproject.toml), installed without dependencies into a throwaway --target directory that is put first
# on PYTHONPATH; the venv itself is not modified. The script checks that the venv satisfies that TRL
# release's requirements before running (it never installs them).
#
#   scripts/test_trl_oldest.sh                 # uses .venv/bin/python
#   PYTHON=/path/to/python scripts/test_trl_oldest.sh [extra pytest args]
#
# Needs the package index (or PIP_FIND_LINKS / PIP_INDEX_URL pointing at a mirror) for one wheel.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
cd "$ROOT"

# The lower bound of the `trl` extra, e.g. "trl>=1.0,<2" -> 1.0 (one source of truth: pyproject.toml).
OLDEST="$("$PYTHON" - <<'PY'
import re, tomllib
extra = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["trl"]
spec = next(s for s in extra if re.match(r"trl\b", s))
print(re.search(r">=\s*([0-9][0-9.]*)", spec).group(1))
PY
)"

TARGET="$(mktemp -d "${TMPDIR:-/tmp}/trl-oldest.XXXXXX")"
trap 'rm -rf "$TARGET"' EXIT

echo "== installing trl==$OLDEST (no deps) into $TARGET"
"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --target "$TARGET" "trl==$OLDEST"

echo "== checking its requirements against $("$PYTHON" -c 'import sys; print(sys.prefix)')"
"$PYTHON" - "$TARGET" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, distributions, version

from packaging.requirements import Requirement

target = sys.argv[1]
(dist,) = [d for d in distributions(path=[target]) if d.metadata["Name"].lower() == "trl"]
bad = []
for line in dist.requires or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # an extra's requirement
    try:
        have = version(req.name)
    except PackageNotFoundError:
        bad.append(f"{req} (not installed)")
        continue
    if have not in req.specifier:
        bad.append(f"{req} (have {have})")
if bad:
    sys.exit("the venv does not satisfy trl " + dist.version + ": " + "; ".join(bad))
print("trl", dist.version, "requirements satisfied")
PY

echo "== tests/test_trl_integration.py with trl==$OLDEST"
PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 "$PYTHON" - <<'PY'
import trl

print("using trl", trl.__version__, "from", trl.__file__)
PY
start=$(date +%s)
PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 \
    "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_trl_integration.py "$@"
echo "== done in $(( $(date +%s) - start )) s"
