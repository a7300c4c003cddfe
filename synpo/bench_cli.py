"""``synpo bench``: the kernel and trainer benchmarks (the project's only benchmark harness).

    synpo bench kernels                       # CPU sweep (default preset 'cpu'); --preset gpu on a GPU
    synpo bench kernels --preset smoke        # seconds (CI)
    synpo bench kernels --preset cpu-large    # ours vs naive at n=4096 and a video batch, ~10 min
    synpo bench trainer                       # DPO+reference vs SynPO, naive vs fused, tiny/small models
    synpo bench trainer --preset cpu-interleaved   # the methods timed in turn in one process
    synpo bench trainer --preset gpu          # a 7B-class model with LoRA on one GPU
    synpo bench quality                       # SynPO vs DPO vs SimPO on SmolLM2-135M, pre-registered,
                                              # resumable (--max-runs 0: the plan; --budget-s: in parts)

Results go to benchmarks/results/ (in a checkout; else ./synpo-bench-results, or --output-dir) as
long-format JSON and CSV with device, driver, versions, commit and date; a smoke preset's go to
./runs/bench-smoke/ unless --output-dir says otherwise. Charts and the README
table: ``python benchmarks/plot.py`` and ``python scripts/update_readme_results.py``.
"""

from __future__ import annotations

import argparse
import importlib

__all__ = ["add_parser"]

BENCHMARKS = {
    "kernels": "ops vs naive path and peers: time, memory, TFLOP/s, %% of floor",
    "trainer": "DPO with a reference model vs SynPO, naive vs fused: steps/s, tokens/s, memory",
    "quality": "SynPO vs DPO vs SimPO on SmolLM2: judged captions, pair accuracy, perplexity, speed",
}


def _run(args: argparse.Namespace) -> int:
    return importlib.import_module(f"synpo.benchmarking.{args.bench_command}").run(args)


def add_parser(subparsers) -> argparse.ArgumentParser:
    # The argument definitions live next to each benchmark; importing them pulls no torch.
    parser = subparsers.add_parser(
        "bench",
        help="run the kernel and trainer benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    for name, help_text in BENCHMARKS.items():
        module = importlib.import_module(f"synpo.benchmarking.{name}")
        child = sub.add_parser(
            name,
            help=help_text,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(child)
        child.set_defaults(func=_run)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
    return parser
