"""The loop every stage shares: skip ids already done, process the rest, append one record each.

A record that cannot be made because of its input (missing or unreadable video, empty caption) is
written with ``status: "failed"`` and ``error``; the run goes on. A restart skips ids whose latest
record is ok and, unless ``retry_failed``, also those whose latest record failed. Other exceptions
(bugs, Ctrl-C) stop the run; everything written before stays valid and is not redone.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from synpo.pairs.io import STATUS_FAILED, STATUS_OK, JsonlWriter, load_progress
from synpo.video import VideoError

log = logging.getLogger("synpo.pairs")


class RecordError(ValueError):
    """This record's input is unusable; the message says which and why."""


@dataclass
class StageSummary:
    stage: str
    output: str
    total: int = 0
    skipped_done: int = 0
    skipped_failed: int = 0
    ok: int = 0
    failed: int = 0
    truncated_lines: int = 0
    bad_lines: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        if self.stage == "select":  # selection has no failures, only pairs kept or dropped (see notes)
            parts = [f"select: {self.ok} pairs written"]
        else:
            parts = [f"{self.stage}: {self.ok} ok, {self.failed} failed"]
        if self.skipped_done or self.skipped_failed:
            parts.append(f"skipped {self.skipped_done} done + {self.skipped_failed} failed earlier")
        if self.truncated_lines:
            parts.append(f"removed {self.truncated_lines} partial line left by an interrupted run")
        if self.bad_lines:
            parts.append(f"ignored invalid lines {self.bad_lines[:10]}")
        parts.append(f"-> {self.output}")
        return "; ".join(parts) + "".join(f"\n  {note}" for note in self.notes)


def failed_record(record_id: str, error: str, **fields) -> dict:
    return {"id": record_id, **fields, "status": STATUS_FAILED, "error": error}


def _is_record_error(exc: BaseException) -> bool:
    if isinstance(exc, (RecordError, VideoError)):
        return True
    # Running out of accelerator memory on one long video should not end a run over thousands.
    return type(exc).__name__ == "OutOfMemoryError"


def _release_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _item_id(item) -> str:
    return item.id


def run_stage(
    stage: str,
    items: Iterable,
    output: str | Path,
    process: Callable[[object], dict],
    *,
    item_id: Callable[[object], str] = _item_id,
    failure_fields: Callable[[object], dict] = lambda item: {},
    retry_failed: bool = False,
    progress: bool = True,
    unit: str = "video",
) -> StageSummary:
    """Run ``process`` on each pending item and append its record (or a failed record) to ``output``."""
    output = Path(output)
    state = load_progress(output)
    summary = StageSummary(
        stage, str(output), truncated_lines=state.truncated_lines, bad_lines=state.bad_lines
    )
    if state.truncated_lines:
        log.warning("%s: removed a partial last line left by an interrupted run", output)
    if state.bad_lines:
        log.warning("%s: ignoring invalid lines %s", output, state.bad_lines[:10])
    pending = []
    for item in items:
        summary.total += 1
        record_id = item_id(item)
        if record_id in state.done:
            summary.skipped_done += 1
        elif record_id in state.failed and not retry_failed:
            summary.skipped_failed += 1
        else:
            pending.append(item)
    with (
        JsonlWriter(output) as writer,
        tqdm(
            total=len(pending), desc=f"pairs {stage}", unit=unit, disable=not progress, file=sys.stderr
        ) as bar,
    ):
        for item in pending:
            record_id = item_id(item)
            try:
                record = process(item)
            except Exception as exc:
                if not _is_record_error(exc):
                    raise
                if type(exc).__name__ == "OutOfMemoryError":
                    _release_accelerator_memory()
                    error = f"out of accelerator memory: {exc}".splitlines()[0]
                else:
                    error = str(exc)
                record = failed_record(record_id, error, **failure_fields(item))
            if record.get("status", STATUS_OK) == STATUS_FAILED:
                summary.failed += 1
                log.warning("%s %s failed: %s", stage, record_id, record.get("error"))
            else:
                summary.ok += 1
            writer.write(record)
            bar.update(1)
    return summary


def item_stage(
    stage: str,
    generate: Callable[[object, object, object], dict],
    *,
    failure_fields: Callable[[object], dict] = lambda item: {},
    unit: str = "video",
) -> Callable[..., StageSummary]:
    """A stage that writes ``generate(model, item, settings)`` for each item (ids from ``item.id``):
    ``run(items, model, output, settings, *, retry_failed=False, progress=True) -> StageSummary``."""

    def run(items, model, output, settings, *, retry_failed: bool = False, progress: bool = True):
        return run_stage(
            stage,
            items,
            output,
            lambda item: generate(model, item, settings),
            failure_fields=failure_fields,
            retry_failed=retry_failed,
            progress=progress,
            unit=unit,
        )

    run.__name__ = f"run_{stage}"
    run.__doc__ = f"The {stage} stage: one record per item appended to ``output`` (see :func:`run_stage`)."
    return run
