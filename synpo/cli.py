"""The ``synpo`` command line: ``synpo train``, ``synpo bench ...``, ``synpo plot``, ``synpo pairs ...``.

Each command group lives in its own module and exposes ``add_parser(subparsers)``; its parser sets
``func`` to a callable taking the parsed namespace and returning an exit code. A group whose module
cannot be imported (an optional dependency missing) is reported, not hidden.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (command, module, help line) for each command group, in the order `synpo --help` lists them.
COMMAND_GROUPS = (
    (
        "train",
        "synpo.train_cli",
        "train a model with SynPO or a comparison preference loss (losses: synpo train --help)",
    ),
    ("bench", "synpo.bench_cli", "run the kernel and trainer benchmarks"),
    ("plot", "synpo.plot_cli", "draw a training run's curves (metrics.jsonl) to a PNG"),
    ("pairs", "synpo.pairs.cli", "build preference pairs: clips, candidates, score, select"),
)


def add_group_parser(subparsers, module_name: str, **kwargs) -> argparse.ArgumentParser:
    """The parser of the command group that module ``module_name`` defines: its command and help line
    from :data:`COMMAND_GROUPS`, the module's docstring as its description (line breaks kept)."""
    for command, module, help_line in COMMAND_GROUPS:
        if module == module_name:
            return subparsers.add_parser(
                command,
                help=help_line,
                description=sys.modules[module_name].__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter,
                **kwargs,
            )
    raise ValueError(f"module_name: {module_name!r} is not a module of COMMAND_GROUPS")


def _version() -> str:
    """``synpo-kernels X`` and what is compiled in (no torch import: --version stays instant)."""
    from importlib import metadata

    try:
        version = metadata.version("synpo-kernels")
    except metadata.PackageNotFoundError:  # a source checkout that was never installed
        from synpo import __version__ as version
    return f"synpo-kernels {version}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synpo", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    # `deepspeed --module synpo train ...` runs `python -m synpo --local_rank=N train ...`: the launcher
    # puts its flag before the command (LOCAL_RANK in the environment says the same; not used).
    parser.add_argument(
        "--local_rank",
        "--local-rank",
        dest="launcher_local_rank",
        type=int,
        default=None,
        help=argparse.SUPPRESS,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _command, module_name, _help in COMMAND_GROUPS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # that group is not part of this install yet
            raise
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # e.g. to print the command that resumes
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
