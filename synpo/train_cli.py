"""``synpo train``: train with SynPO (or a comparison preference loss) from a YAML config.

    synpo train                                   # the embedded tiny model on the bundled sample
    synpo train --config cfg.yaml --optim.lr 1e-5 --loss.name dpo
    synpo train --config cfg.yaml --resume        # continue from the latest checkpoint
    torchrun --nproc_per_node 2 -m synpo train --config cfg.yaml --deepspeed zero3

Any config key can be overridden as ``--section.key value`` (values are YAML: ``true``, ``1e-5``,
``[a, b]``); unknown keys are errors.
"""

from __future__ import annotations

import argparse
import logging
import sys

from synpo.cli import add_group_parser

__all__ = ["add_parser", "loss_help", "resume_command", "run"]


class _TrainArgumentParser(argparse.ArgumentParser):
    """Collects every unknown ``--section.key value`` into ``overrides`` instead of rejecting it:
    the config keys are validated by :mod:`synpo.config`, which names the bad key."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        namespace.overrides = list(getattr(namespace, "overrides", None) or []) + list(extras)
        return namespace, []

    def format_help(self) -> str:
        # The loss list comes from synpo_kernels' registry, imported only when help is shown (it
        # imports torch, which the CLI's start-up must not).
        self.epilog = f"{OVERRIDES_HELP}\n\n{loss_help()}"
        return super().format_help()


OVERRIDES_HELP = "overrides: any config key as --section.key VALUE (e.g. --train.max_steps 20)"


def loss_help() -> str:
    """``--loss.name`` values and each loss's ``--loss.*`` hyper-parameters with their defaults."""
    from synpo_kernels.loss_registry import LOSSES

    lines = ["losses (--loss.name NAME; hyper-parameters --loss.KEY VALUE, defaults shown; docs/losses.md):"]
    width = max(len(name) for name in LOSSES)
    for d in LOSSES.values():
        params = ", ".join(f"{p.name}={p.default}" for p in d.params)
        reference = "; needs reference log-probs (loss.reference)" if d.needs_reference else ""
        lines.append(f"  {d.name:<{width}} {params}{reference}")
    lines.append(
        f"  {'A+B+...':<{width}} the weighted sum of those losses (TRL's loss_weights): their options, "
        "and --loss.A_weight, --loss.B_weight ... (default 1.0)"
    )
    return "\n".join(lines)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = add_group_parser(subparsers, __name__, allow_abbrev=False, epilog=OVERRIDES_HELP)
    parser.__class__ = _TrainArgumentParser  # the subparsers action builds a plain ArgumentParser
    from synpo.config import bundled_config_names

    parser.add_argument(
        "--config",
        "-c",
        default=None,
        help="YAML config file, or the name of a bundled config ("
        + ", ".join(bundled_config_names())
        + "; an existing file of that name wins); default: the bundled tiny demo",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="CHECKPOINT",
        help="resume from CHECKPOINT (a checkpoint or output directory), or the latest one in "
        "checkpoint.output_dir when no path is given; never starts over (checkpoint.overwrite: false)",
    )
    parser.add_argument(
        "--resume-allow-changes",
        default=None,
        metavar="KEYS",
        help="comma-separated config keys or sections allowed to differ from the checkpoint's when "
        "resuming (e.g. optim.lr,train.seed); other changes are refused with a diff. Raising "
        "train.max_steps or train.epochs needs no flag",
    )
    parser.add_argument(
        "--deepspeed",
        default=None,
        metavar="DS_CONFIG",
        help="train with DeepSpeed (ZeRO) using this JSON config file, or the name of a bundled one ("
        + ", ".join(bundled_config_names(".json"))
        + "; an existing file of that name wins); overrides the config's deepspeed key. Launch with "
        "torchrun or the deepspeed launcher for several processes (docs/training.md, DeepSpeed)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(func=run, overrides=[])
    return parser


def run(args: argparse.Namespace) -> int:
    import json

    from synpo.config import ConfigError, RawOverride, config_to_dict, load_config, parse_override_args

    try:
        overrides = parse_override_args(list(args.overrides))
        if args.deepspeed is not None:
            overrides["deepspeed"] = RawOverride(args.deepspeed)
        if args.resume is not None:
            overrides["checkpoint.resume"] = args.resume
            # Resuming asked for: a finished run is continued (e.g. with a higher train.max_steps),
            # not replaced, even where the config lets a fresh run replace it.
            overrides.setdefault("checkpoint.overwrite", False)
        if args.resume_allow_changes is not None:
            keys = [key.strip() for key in args.resume_allow_changes.split(",") if key.strip()]
            overrides["checkpoint.resume_allow_changes"] = keys
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
    from synpo.run_lock import RunLockError
    from synpo.train.checkpointing import UnfinishedRunError
    from synpo.train.loop import Trainer

    try:
        result = Trainer(config).train()
    except (ConfigError, DataError, CheckpointError, RunLockError) as exc:
        print(f"synpo train: {exc}", file=sys.stderr)
        if isinstance(exc, UnfinishedRunError):
            print(f"  resume it: {resume_command(args, config)}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the disk filled up while writing the metrics log
        where = f": {exc.filename}" if exc.filename else ""
        print(f"synpo train: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "synpo train: interrupted without saving; the last complete checkpoint, if any, is intact",
            file=sys.stderr,
        )
        print(f"  resume: {resume_command(args, config)}", file=sys.stderr)
        return 130
    if rank == 0:
        status = f"stopped by {result.stop_signal or 'request'}" if result.interrupted else "finished"
        print(f"synpo train: {status} at step {result.global_step}/{result.total_steps}")
        print(f"  metrics log: {result.metrics_file}")
        if result.last_checkpoint is not None:
            print(f"  checkpoint:  {result.last_checkpoint}")
        if result.final_model_dir is not None:
            print(f"  final model: {result.final_model_dir}")
        if result.interrupted:
            print(f"  resume:      {resume_command(args, config)}")
        if result.history:
            first, last = result.history[0], result.history[-1]
            loss_line = (
                f"  loss: {first['loss']:.4f} (step {first['step']}) "
                f"-> {last['loss']:.4f} (step {last['step']})"
            )
            print(loss_line)
            print(f"  {loss_meaning(config.loss.name, config.loss.options())}")
        if result.eval_history:
            last = result.eval_history[-1]
            print(
                f"  eval:        loss {last['eval_loss']:.4f}, reward accuracy "
                f"{last['eval_reward_accuracy']:.3f} (step {last['step']}, {last['eval_pairs']} pairs)"
            )
        best = result.summary.get("best")
        if best is not None:
            print(
                f"  best:        {best['path']} ({best['metric']} {best['value']:.4f} at step {best['step']})"
            )
    # Ctrl-C: the checkpoint is saved, but the run did not finish (128 + SIGINT, as shells report it).
    return 130 if result.stop_signal == "SIGINT" else 0


def resume_command(args: argparse.Namespace, config) -> str:
    """The command line that resumes this run: the same one when the config resumes by itself
    (``checkpoint.resume: auto``), else with ``--resume`` (in place of any ``--resume PATH``)."""
    import shlex

    argv = list(getattr(args, "argv", None) or ["train"])
    if config.checkpoint.resume != "auto":
        kept, skip = [], False
        for i, token in enumerate(argv):
            if skip:
                skip = False
                continue
            if token == "--resume":
                # nargs="?": a following token that is not an option is its path
                skip = i + 1 < len(argv) and not argv[i + 1].startswith("-")
                continue
            if token.startswith("--resume="):
                continue
            kept.append(token)
        argv = [*kept, "--resume"]
    return "synpo " + shlex.join(argv)


def loss_meaning(name: str, options: dict) -> str:
    """One line on how to read the logged loss of ``name`` (with its hyper-parameters ``options``)."""
    try:
        from synpo_kernels.loss_registry import get_loss

        values = {**get_loss(name).defaults(), **options}
    except (ImportError, ValueError):
        values = dict(options)
    if name == "synpo" and "beta" in values:
        beta = float(values["beta"])
        return f"loss (SynPO): lower is better; bounded in [-1-beta, 0] = [{-1 - beta:g}, 0] (beta {beta:g})"
    meanings = {
        "dpo": "DPO): lower is better; >= 0, log 2 = 0.693 while the policy equals the reference",
        "ipo": "IPO): lower is better; >= 0, 0 once the log-ratio margin reaches 1/(2 tau)",
        "simpo": "SimPO): lower is better; >= 0 (plus the NLL term when nll_weight > 0)",
        "cpo": "CPO): lower is better; >= 0 (preference term plus the chosen responses' NLL)",
        "orpo": "ORPO): lower is better; >= 0 (the chosen responses' NLL plus lam x the odds-ratio term)",
    }
    return f"loss ({meanings.get(name, f'{name}): lower is better')}"
