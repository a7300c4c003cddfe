"""Metric reporters besides ``metrics.jsonl``: TensorBoard and Weights & Biases (``logging.report_to``).

One interface, :class:`Reporter`: ``log(step, metrics)`` and ``close()``. ``metrics`` is a metrics row
as written to the JSONL file: a training row (``loss``, ``lr`` ...) or an evaluation row (``"split":
"eval"``, ``eval_loss`` ...). Every numeric value is reported under ``train/<key>`` or
``eval/<key without eval_>`` (the transformers convention), at the row's optimizer step. Only rank 0
builds reporters.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

from synpo.config import REPORTERS, ConfigError, report_to_names

__all__ = [
    "MultiReporter",
    "Reporter",
    "TensorBoardReporter",
    "WandbReporter",
    "build_reporter",
    "resolve_report_to",
    "scalar_items",
]

# The package each reporter imports.
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
# Row keys that are not metrics.
_NOT_METRICS = frozenset({"step", "split"})


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def resolve_report_to(value: list[str] | str) -> list[str]:
    """The reporters to use: ``all`` means every installed one; a reporter named explicitly whose
    package is not installed is a ``ConfigError`` naming the package."""
    names = report_to_names(value)
    if names == ["all"]:
        return [name for name in REPORTERS if _installed(_PACKAGES[name])]
    for name in names:
        if not _installed(_PACKAGES[name]):
            raise ConfigError(
                f"logging.report_to: {name!r} needs the {_PACKAGES[name]} package, which is not "
                f"installed (pip install {_PACKAGES[name]})"
            )
    return list(dict.fromkeys(names))


def scalar_items(metrics: dict[str, Any]) -> dict[str, float]:
    """``{tag: value}`` of a metrics row's numeric, finite values: ``train/loss``, ``eval/loss`` ..."""
    split = metrics.get("split", "train")
    out = {}
    for key, value in metrics.items():
        if key in _NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            continue
        name = key.removeprefix("eval_") if split == "eval" else key
        out[f"{split}/{name}"] = float(value)
    return out


class Reporter:
    """A metrics sink: ``log(step, metrics)`` for each row, ``close()`` once at the end."""

    def log(self, step: int, metrics: dict[str, Any]) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


class TensorBoardReporter(Reporter):
    """Event files under ``log_dir`` (``<output_dir>/runs``). A resumed run passes the step it
    resumes from as ``purge_step``: TensorBoard hides what a killed run logged after it."""

    def __init__(self, log_dir: str | os.PathLike, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for tag, value in scalar_items(metrics).items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbReporter(Reporter):
    """A wandb run (``WANDB_PROJECT``, default ``synpo``; ``WANDB_MODE=offline`` writes it locally
    under ``<output_dir>/wandb`` for a later ``wandb sync``). A resumed run continues the same run
    (its id is kept in ``<output_dir>/wandb_run_id``)."""

    def __init__(self, output_dir: str | os.PathLike, config: dict, *, resume: bool):
        import wandb

        output_dir = Path(output_dir)
        id_file = output_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "synpo"),
            name=os.environ.get("WANDB_NAME") or output_dir.name,
            dir=str(output_dir),
            config=config,
            id=run_id,
            resume="allow" if run_id else None,
            mode=os.environ.get("WANDB_MODE") or None,
        )
        if run_id is None and getattr(self.run, "id", None):
            id_file.write_text(f"{self.run.id}\n")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.run.log(scalar_items(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class MultiReporter(Reporter):
    """Fans each row out to several reporters (none: a no-op)."""

    def __init__(self, reporters: list[Reporter]):
        self.reporters = reporters

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for reporter in self.reporters:
            reporter.log(step, metrics)

    def close(self) -> None:
        for reporter in self.reporters:
            reporter.close()


def build_reporter(
    names: list[str], output_dir: str | os.PathLike, config: dict, *, resume_step: int | None
) -> MultiReporter:
    """The reporters ``names`` (from :func:`resolve_report_to`) for a run in ``output_dir``;
    ``resume_step`` is the step a resumed run continues from (None for a fresh run)."""
    reporters: list[Reporter] = []
    for name in names:
        if name == "tensorboard":
            purge = resume_step + 1 if resume_step is not None else None
            reporters.append(TensorBoardReporter(Path(output_dir) / "runs", purge_step=purge))
        elif name == "wandb":
            reporters.append(WandbReporter(output_dir, config, resume=resume_step is not None))
    return MultiReporter(reporters)
