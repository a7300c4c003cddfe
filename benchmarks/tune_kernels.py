"""Kernel autotuner: ``python benchmarks/tune_kernels.py [--quick] [--write]`` on a CUDA GPU.

The implementation is :mod:`synpo.benchmarking.tune` (importable from an installed package); it
rewrites ``synpo_kernels/ops/kernel_configs.json`` with ``--write``. See ``--help``.
"""

from __future__ import annotations

import sys

from synpo.benchmarking.tune import main

if __name__ == "__main__":
    sys.exit(main())
