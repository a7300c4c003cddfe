"""Kernel benchmark: ``python benchmarks/bench_kernels.py [--preset smoke|cpu|gpu] ...``.

The same as ``synpo bench kernels``; the implementation is :mod:`synpo.benchmarking.kernels`
(importable from an installed package). See ``--help`` for the options.
"""

from __future__ import annotations

import sys

from synpo.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "kernels", *sys.argv[1:]]))
