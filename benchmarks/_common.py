"""Shared benchmark plumbing for the scripts in this folder (timing, provenance, result files).

The implementation lives in :mod:`synpo.benchmarking.common` (so that ``synpo bench`` works from an
installed package); this module keeps the scripts' ``from _common import ...`` working and writes
their results next to them, in ``benchmarks/results/``.
"""

from __future__ import annotations

from pathlib import Path

from synpo.benchmarking.common import (
    device_name,
    git_commit,
    measure,
    provenance,
)
from synpo.benchmarking.common import write_results as _write_results

RESULTS_DIR = Path(__file__).resolve().parent / "results"

__all__ = ["RESULTS_DIR", "device_name", "git_commit", "measure", "provenance", "write_results"]


def write_results(name: str, records: list[dict], meta: dict) -> Path:
    """Long-format JSON: one record per (implementation, size, metric), plus provenance."""
    return _write_results(name, records, meta, RESULTS_DIR)
