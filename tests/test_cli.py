"""The ``synpo`` entry point itself: --version, and the version defined consistently."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

import synpo
import synpo_kernels

ROOT = Path(__file__).resolve().parents[1]


def test_version_flag_prints_the_package_version():
    proc = subprocess.run(
        [sys.executable, "-m", "synpo", "--version"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"synpo-kernels {synpo.__version__}"


def test_one_version_everywhere():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert synpo.__version__ == synpo_kernels.__version__ == project
