"""Preference records: the JSONL reader (both record formats, the ``min_score_gap`` filter, malformed
lines reported as ``file:line``) and the held-out evaluation split.

Record formats (one JSON object per line; extra keys are ignored):

- generic: ``prompt``, ``chosen``, ``rejected``; optional ``video`` (path), ``images`` (path or list),
  ``chosen_score``, ``rejected_score``, ``id``.
- upstream SynPO: ``video_name``, ``pos_pre``, ``neg_pre``, ``pos_score``, ``neg_score``; the prompt is
  ``data.default_prompt`` unless the record has ``prompt``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from synpo.config import json_error_text

# The bundled demo pairs (both record formats); the default config trains on them.
SAMPLE_PAIRS_PATH = Path(__file__).resolve().parent.parent / "assets" / "sample_pairs.jsonl"
DEFAULT_PROMPT = "Describe the video in detail."

__all__ = [
    "DEFAULT_PROMPT",
    "SAMPLE_PAIRS_PATH",
    "DataError",
    "PreferenceExample",
    "ReadReport",
    "read_preference_jsonl",
    "split_eval_examples",
]


class DataError(ValueError):
    """A data record or media file is invalid; the message names the file and line."""


@dataclass(frozen=True)
class PreferenceExample:
    prompt: str
    chosen: str
    rejected: str
    video: str | None = None
    images: tuple[str, ...] = ()
    chosen_score: float | None = None
    rejected_score: float | None = None
    id: str | None = None
    source: str = ""  # "file:line", for error messages

    @property
    def has_media(self) -> bool:
        return self.video is not None or bool(self.images)


@dataclass
class ReadReport:
    path: str
    lines: int = 0  # non-blank lines read
    kept: int = 0
    malformed_skipped: int = 0
    filtered_score_gap: int = 0
    first_errors: list[str] = field(default_factory=list)  # the first few skipped lines' messages

    def summary(self) -> str:
        text = (
            f"{self.path}: {self.kept} pairs kept of {self.lines} lines "
            f"({self.filtered_score_gap} below min_score_gap, {self.malformed_skipped} malformed skipped)"
        )
        if self.first_errors:
            text += "; first malformed: " + " | ".join(self.first_errors)
        return text


def _require_text(record: dict, key: str, where: str) -> str:
    if key not in record:
        raise DataError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value


def _optional_score(record: dict, key: str, where: str) -> float | None:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: field {key!r} must be a finite number or null, got {value!r}")
    return float(value)


def _resolve_media(path_value: Any, key: str, where: str, media_dir: Path) -> str:
    if not isinstance(path_value, str) or not path_value:
        raise DataError(f"{where}: field {key!r} must be a non-empty path string, got {path_value!r}")
    path = Path(path_value).expanduser()
    if not path.is_absolute():
        path = media_dir / path
    if not path.is_file():
        raise DataError(f"{where}: {key} file not found: {path}")
    return str(path)


def _parse_record(record: Any, where: str, default_prompt: str, media_dir: Path) -> PreferenceExample:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    upstream = "chosen" not in record and ("pos_pre" in record or "video_name" in record)
    if upstream:
        chosen = _require_text(record, "pos_pre", where)
        rejected = _require_text(record, "neg_pre", where)
        prompt = _require_text(record, "prompt", where) if "prompt" in record else default_prompt
        chosen_score = _optional_score(record, "pos_score", where)
        rejected_score = _optional_score(record, "neg_score", where)
        video_value = record.get("video", record.get("video_name"))
    else:
        prompt = _require_text(record, "prompt", where)
        chosen = _require_text(record, "chosen", where)
        rejected = _require_text(record, "rejected", where)
        chosen_score = _optional_score(record, "chosen_score", where)
        rejected_score = _optional_score(record, "rejected_score", where)
        video_value = record.get("video")
    video = None if video_value is None else _resolve_media(video_value, "video", where, media_dir)
    images_value = record.get("images")
    if images_value is None:
        images: tuple[str, ...] = ()
    else:
        if isinstance(images_value, str):
            images_value = [images_value]
        if not isinstance(images_value, list):
            raise DataError(f"{where}: field 'images' must be a path or a list of paths")
        images = tuple(_resolve_media(p, "images", where, media_dir) for p in images_value)
    if video is not None and images:
        raise DataError(f"{where}: a record has either 'video' or 'images', not both")
    record_id = record.get("id")
    return PreferenceExample(
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        video=video,
        images=images,
        chosen_score=chosen_score,
        rejected_score=rejected_score,
        id=None if record_id is None else str(record_id),
        source=where,
    )


def read_preference_jsonl(
    path: str | os.PathLike,
    *,
    default_prompt: str = DEFAULT_PROMPT,
    min_score_gap: float | None = 4.0,
    on_error: str = "raise",
    media_dir: str | os.PathLike | None = None,
) -> tuple[list[PreferenceExample], ReadReport]:
    """Read a preference JSONL file (generic or upstream format) into examples and a report.

    A malformed line (bad JSON, missing/empty/mistyped field, missing media file) raises
    :class:`DataError` naming ``file:line``, or with ``on_error="skip"`` is counted in the report and
    skipped. Pairs whose ``chosen_score - rejected_score < min_score_gap`` are filtered (counted);
    records without both scores are kept. Everything is checked here, before training starts.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error: must be 'raise' or 'skip', got {on_error!r}")
    if not isinstance(default_prompt, str) or not default_prompt.strip():
        raise ValueError("default_prompt: must be a non-empty string")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: preference file not found")
    base = Path(media_dir) if media_dir is not None else path.parent
    report = ReadReport(path=str(path))
    examples: list[PreferenceExample] = []
    with path.open("r", encoding="utf-8", errors="strict") as handle:
        lineno = 0
        while True:
            try:
                line = handle.readline()
            except UnicodeDecodeError as exc:
                # The rest of the file cannot be read reliably after a decoding error.
                raise DataError(f"{path}:{lineno + 1}: not valid UTF-8 ({exc.reason})") from exc
            if not line:
                break
            lineno += 1
            if not line.strip():
                continue
            report.lines += 1
            where = f"{path}:{lineno}"
            try:
                try:
                    # Without its line break: a last line cut inside a string is not "a control character".
                    record = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: invalid JSON ({json_error_text(exc)})") from exc
                example = _parse_record(record, where, default_prompt, base)
            except DataError as exc:
                if on_error == "raise":
                    raise
                report.malformed_skipped += 1
                if len(report.first_errors) < 3:
                    report.first_errors.append(str(exc))
                continue
            if (
                min_score_gap is not None
                and example.chosen_score is not None
                and example.rejected_score is not None
                and example.chosen_score - example.rejected_score < min_score_gap
            ):
                report.filtered_score_gap += 1
                continue
            examples.append(example)
    report.kept = len(examples)
    return examples, report


def split_eval_examples(
    examples: Sequence[PreferenceExample], fraction: float, seed: int
) -> tuple[list[PreferenceExample], list[PreferenceExample]]:
    """``(train, eval)``: ``round(fraction * n)`` pairs (at least one) held out for evaluation, chosen
    by a private generator seeded with ``seed`` (the global RNG is not touched); both keep the file
    order. :class:`DataError` when no training pair would be left."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction: must be in (0, 1), got {fraction}")
    n = len(examples)
    n_eval = max(1, round(fraction * n))
    if n_eval >= n:
        raise DataError(
            f"data.eval_split: {fraction} of {n} pairs holds out {n_eval}, leaving none to train on"
        )
    generator = torch.Generator().manual_seed(seed)
    held_out = set(torch.randperm(n, generator=generator)[:n_eval].tolist())
    train = [ex for i, ex in enumerate(examples) if i not in held_out]
    evaluation = [ex for i, ex in enumerate(examples) if i in held_out]
    return train, evaluation
