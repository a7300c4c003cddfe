"""``synpo bench``: the kernel and trainer benchmarks.

    synpo bench kernels                   # CPU sweep (default preset 'cpu'); --preset gpu on a GPU
    synpo bench kernels --preset smoke    # seconds (CI)
    synpo bench trainer                   # DPO+reference vs SynPO, naive vs fused, tiny/small models
    synpo bench trainer --preset gpu      # a 7B-class model with LoRA on one GPU

Results go to benchmarks/results/ (in a checkout; else ./synpo-bench-results, or --output-dir) as
long-format JSON and CSV with device, driver, versions, commit and date. Charts and the README
table: ``python benchmarks/plot.py`` and ``python scripts/update_readme_results.py``.
"""

from __future__ import annotations

import argparse

__all__ = ["add_parser"]


def _run_kernels(args: argparse.Namespace) -> int:
    from synpo.benchmarking import kernels

    return kernels.run(args)


def _run_trainer(args: argparse.Namespace) -> int:
    from synpo.benchmarking import trainer

    return trainer.run(args)


def add_parser(subparsers) -> argparse.ArgumentParser:
    # The argument definitions live next to each benchmark; importing them pulls no torch.
    from synpo.benchmarking import kernels, trainer

    parser = subparsers.add_parser(
        "bench",
        help="run the kernel and trainer benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    k = sub.add_parser(
        "kernels",
        help="ops vs naive path and peers: time, memory, TFLOP/s, %% of floor",
        description=kernels.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kernels.add_arguments(k)
    k.set_defaults(func=_run_kernels)
    t = sub.add_parser(
        "trainer",
        help="DPO with a reference model vs SynPO, naive vs fused: steps/s, tokens/s, memory",
        description=trainer.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    trainer.add_arguments(t)
    t.set_defaults(func=_run_trainer)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
    return parser
