"""The csrc/ naming rule (csrc/README.md) that keeps object files from colliding in the CUDA build."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

CSRC = Path(__file__).resolve().parents[1] / "csrc"
SOURCES = [p for p in CSRC.iterdir() if p.suffix in (".cpp", ".cu")]


def test_source_stems_are_unique():
    stems = Counter(p.stem for p in SOURCES)
    assert SOURCES and not [s for s, n in stems.items() if n > 1], stems


def test_sources_follow_the_naming_rule():
    for path in SOURCES:
        if path.suffix == ".cu":
            assert path.stem.endswith("_kernels"), f"{path.name}: CUDA device code is <op>_kernels.cu"
            assert not re.search(r"#include\s*[<\"](torch|ATen|c10)/", path.read_text()), (
                f"{path.name}: device code includes CUDA headers only (no torch)"
            )
        elif path.stem.endswith("_cuda"):
            assert (CSRC / f"{path.stem[: -len('_cuda')]}_kernels.cu").exists(), path.name


def test_setup_refuses_clashing_stems(tmp_path):
    import shutil
    import subprocess
    import sys

    root = CSRC.parent
    shutil.copy(root / "setup.py", tmp_path / "setup.py")
    shutil.copytree(CSRC, tmp_path / "csrc")
    (tmp_path / "csrc" / "token_logprobs_cpu.cu").write_text("// clashes with token_logprobs_cpu.cpp\n")
    result = subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "same object file (token_logprobs_cpu.o)" in result.stdout + result.stderr
