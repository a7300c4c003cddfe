"""``synpo train``: train with SynPO (or DPO/IPO/SimPO/CPO/ORPO) from a YAML config.

    synpo train                                   # the embedded tiny model on the bundled sample
    synpo train --config cfg.yaml --optim.lr 1e-5 --loss.name dpo
    synpo train --config cfg.yaml --resume        # continue from the latest checkpoint
    torchrun --nproc_per_node 2 -m synpo train --config cfg.yaml --deepspeed synpo/configs/zero3.json

Any config key can be overridden as ``--section.key value`` (values are YAML: ``true``, ``1e-5``,
``[a, b]``); unknown keys are errors.
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["add_parser", "run"]


class _TrainArgumentParser(argparse.ArgumentParser):
    """Collects every unknown ``--section.key value`` into ``overrides`` instead of rejecting it:
    the config keys are validated by :mod:`synpo.config`, which names the bad key."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        namespace.overrides = list(getattr(namespace, "overrides", None) or []) + list(extras)
        return namespace, []


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="train a model with SynPO (or DPO/SimPO/IPO/CPO/ORPO)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        epilog="overrides: any config key as --section.key VALUE (e.g. --train.max_steps 20)",
    )
    parser.__class__ = _TrainArgumentParser  # the subparsers action builds a plain ArgumentParser
    parser.add_argument("--config", "-c", default=None, help="YAML config (default: the bundled tiny demo)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="CHECKPOINT",
        help="resume from CHECKPOINT (a checkpoint or output directory), or the latest one in "
        "checkpoint.output_dir when no path is given",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(func=run, overrides=[])
    return parser


def run(args: argparse.Namespace) -> int:
    import json

    from synpo.config import ConfigError, config_to_dict, load_config, parse_override_args

    try:
        overrides = parse_override_args(list(args.overrides))
        if args.resume is not None:
            overrides["checkpoint.resume"] = args.resume
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"synpo train: config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config_to_dict(config), indent=2))
        return 0

    import os

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from synpo.checkpoint import CheckpointError
    from synpo.data import DataError
    from synpo.trainer import Trainer

    try:
        result = Trainer(config).train()
    except (ConfigError, DataError, CheckpointError) as exc:
        print(f"synpo train: {exc}", file=sys.stderr)
        return 2
    if rank == 0:
        status = "stopped by SIGTERM" if result.interrupted else "finished"
        print(f"synpo train: {status} at step {result.global_step}/{result.total_steps}")
        print(f"  metrics log: {result.metrics_file}")
        if result.last_checkpoint is not None:
            print(f"  checkpoint:  {result.last_checkpoint}")
        if result.final_model_dir is not None:
            print(f"  final model: {result.final_model_dir}")
        if result.history:
            first, last = result.history[0], result.history[-1]
            loss_line = (
                f"  loss: {first['loss']:.4f} (step {first['step']}) "
                f"-> {last['loss']:.4f} (step {last['step']})"
            )
            print(loss_line)
    return 0
