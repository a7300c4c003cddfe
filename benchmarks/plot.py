"""Charts from benchmark result files: ``python benchmarks/plot.py [FILE.json ...] [--out-dir DIR]``.

Without files: every ``kernels_*.json`` and ``trainer_*.json`` in ``benchmarks/results/`` (smoke
runs excluded). PNGs go to a ``plots/`` folder next to each result file (so the committed charts in
``benchmarks/results/plots/`` change only when their own results do), or to ``--out-dir``: time and
memory vs size per implementation for the kernels, step time and peak memory per method for the
trainer. The chart code is :mod:`synpo.benchmarking.plots`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from synpo.benchmarking.common import default_results_dir
from synpo.benchmarking.plots import charts_for


def result_files(results_dir: Path) -> list[Path]:
    files = sorted(results_dir.glob("kernels_*.json")) + sorted(results_dir.glob("trainer_*.json"))
    return [f for f in files if not f.stem.endswith("_smoke")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="*", type=Path, help="result JSON files (default: benchmarks/results)")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: plots/ next to each result file")
    args = parser.parse_args(argv)
    results_dir = default_results_dir()
    files = args.files or result_files(results_dir)
    if not files:
        print(f"no result files in {results_dir}; run `synpo bench kernels` first", file=sys.stderr)
        return 1
    for path in files:
        for png in charts_for(path, args.out_dir or path.parent / "plots"):
            print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
