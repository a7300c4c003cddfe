"""Append-only JSONL with resume, and the list of videos a stage works on.

Every stage writes one JSON object per line, keyed by ``id``, and never rewrites earlier lines. A
killed run leaves at most one partial last line (records are written whole, then flushed and fsynced);
:func:`load_progress` cuts it off, counts it, and returns the ids already done so that a restart skips
them. When an id appears more than once (a failed record retried later), the last record wins.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from synpo.config import json_error_text

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".gif")

STATUS_OK = "ok"
STATUS_FAILED = "failed"


@dataclass
class Progress:
    """What an output file already holds."""

    done: set[str] = field(default_factory=set)  # ids whose latest record is ok
    failed: set[str] = field(default_factory=set)  # ids whose latest record is failed
    truncated_lines: int = 0  # partial last line from a killed writer, removed
    bad_lines: list[int] = field(default_factory=list)  # 1-based numbers of complete but invalid lines

    def should_skip(self, record_id: str, retry_failed: bool) -> bool:
        return record_id in self.done or (record_id in self.failed and not retry_failed)


def _parse_lines(path: Path) -> tuple[list[tuple[int, dict]], list[int], int]:
    """(line number, record) for valid lines, bad line numbers, byte offset after the last full line."""
    records, bad = [], []
    data = path.read_bytes()
    complete_end = data.rfind(b"\n") + 1  # 0 when there is no newline at all
    for number, raw in enumerate(data[:complete_end].split(b"\n")[:-1], start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            bad.append(number)
            continue
        if not isinstance(record, dict) or not isinstance(record.get("id"), str):
            bad.append(number)
            continue
        records.append((number, record))
    return records, bad, complete_end


def load_progress(path: str | Path, *, repair: bool = True) -> Progress:
    """Ids already in ``path`` and the state of the file; cuts off a partial last line when ``repair``.

    A partial last line is what an interrupted write leaves behind: it is removed (so the next append
    starts on a fresh line) and counted in ``truncated_lines``. Complete lines that are not JSON objects
    with a string ``id`` are reported in ``bad_lines`` and otherwise ignored.
    """
    path = Path(path)
    progress = Progress()
    if not path.exists():
        return progress
    records, progress.bad_lines, complete_end = _parse_lines(path)
    if path.stat().st_size > complete_end:
        progress.truncated_lines = 1
        if repair:
            with path.open("r+b") as handle:
                handle.truncate(complete_end)
                handle.flush()
                os.fsync(handle.fileno())
    for _, record in records:
        record_id = record["id"]
        if record.get("status", STATUS_OK) == STATUS_FAILED:
            progress.done.discard(record_id)
            progress.failed.add(record_id)
        else:
            progress.failed.discard(record_id)
            progress.done.add(record_id)
    return progress


def invalid_lines(path: str | Path) -> list[int]:
    """1-based numbers of complete lines of ``path`` that are not JSON objects with a string ``id``."""
    return _parse_lines(Path(path))[1]


def settings_path(output: str | Path) -> Path:
    """Where a stage records the settings that produced ``output``: ``<output>.settings.json``."""
    output = Path(output)
    return output.with_name(output.name + ".settings.json")


def claim_output(output: str | Path, stage: str, settings: dict, *, overwrite: bool = False) -> None:
    """Tie ``output`` to the stage and settings that write it, before any record is appended.

    A stage resumes an existing output only if it was made with the same settings: otherwise the old
    records would silently stand for the new settings (a rerun of ``select --min-score-gap 100`` would
    keep pairs selected with gap 4). A mismatch raises ``ValueError`` naming the changed settings;
    ``overwrite`` removes the old output first. An output without a settings record (older versions)
    is adopted with the given settings.
    """
    output, meta = Path(output), settings_path(output)
    wanted = {"stage": stage, **json.loads(json.dumps(settings, default=str))}
    if overwrite:
        for path in (output, meta):
            path.unlink(missing_ok=True)
    if output.exists() and output.stat().st_size and meta.exists():
        recorded = json.loads(meta.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k))
        if changed:
            diff = "; ".join(f"{k}: {recorded.get(k)!r} -> {wanted.get(k)!r}" for k in changed)
            raise ValueError(
                f"--out {output} was made with other settings ({diff}); use another --out, or pass "
                "--overwrite to discard it and start over"
            )
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = meta.with_name(meta.name + ".tmp")
    tmp.write_text(json.dumps(wanted, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, meta)


def read_records(path: str | Path) -> Iterator[dict]:
    """Valid records of a JSONL file in order (a partial last line and invalid lines are skipped)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"JSONL file not found: {path}")
    records, _, _ = _parse_lines(path)
    for _, record in records:
        yield record


def latest_by_id(path: str | Path) -> dict[str, dict]:
    """The last record of each id, in order of first appearance."""
    latest: dict[str, dict] = {}
    for record in read_records(path):
        latest[record["id"]] = record
    return latest


class JsonlWriter:
    """Appends records as single lines; each write is flushed and fsynced so a kill loses nothing done."""

    def __init__(self, path: str | Path, *, fsync: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._handle = self.path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if not isinstance(record.get("id"), str):
            raise ValueError(f"record needs a string 'id', got {record.get('id')!r}")
        # One write call per line: an interrupted process leaves a partial last line at worst.
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        if self._fsync:
            os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class VideoItem:
    id: str
    video: str


def video_fields(item: VideoItem) -> dict:
    """What a failed record of a video stage keeps besides its id."""
    return {"video": item.video}


def _id_for(path: Path, root: Path | None) -> str:
    relative = path.relative_to(root) if root is not None else Path(path.name)
    return relative.with_suffix("").as_posix()


def resolve_videos(paths: Iterable[str | Path] = (), manifest: str | Path | None = None) -> list[VideoItem]:
    """The videos to process, from files, directories (searched recursively) and/or a manifest.

    Video paths are made absolute, so later stages do not depend on the working directory. Ids: a
    file's stem; inside a directory, its path relative to the directory without the extension
    (``cooking/egg`` for ``DIR/cooking/egg.mp4``). A manifest is JSONL with ``video`` and optional ``id``
    (relative video paths are resolved against the manifest's folder) or a text file with one path per
    line. Missing files are kept (the stage records them as failed); duplicate ids are an error.
    """
    items: list[VideoItem] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
            if not found:
                raise ValueError(f"videos: no video files ({', '.join(VIDEO_EXTENSIONS)}) under {path}")
            items.extend(VideoItem(_id_for(p, path), os.path.abspath(p)) for p in found)
        else:
            items.append(VideoItem(_id_for(path, None), os.path.abspath(path)))
    if manifest is not None:
        items.extend(_read_manifest(Path(manifest)))
    if not items:
        raise ValueError("videos: give at least one video file, folder or --manifest")
    seen: dict[str, str] = {}
    for item in items:
        if item.id in seen:
            raise ValueError(f"videos: duplicate id {item.id!r} for {seen[item.id]} and {item.video}")
        seen[item.id] = item.video
    return items


def _read_manifest(path: Path) -> list[VideoItem]:
    if not path.is_file():
        raise ValueError(f"manifest: file not found: {path}")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"manifest {path}:{number}: invalid JSON ({json_error_text(exc)})") from exc
            video = entry.get("video")
            if not isinstance(video, str) or not video:
                raise ValueError(f"manifest {path}:{number}: needs a non-empty string 'video'")
            video_path = Path(video) if Path(video).is_absolute() else path.parent / video
            record_id = entry.get("id", _id_for(video_path, None))
            if not isinstance(record_id, str) or not record_id:
                raise ValueError(f"manifest {path}:{number}: 'id' must be a non-empty string")
        else:
            video_path = Path(line) if Path(line).is_absolute() else path.parent / line
            record_id = _id_for(video_path, None)
        items.append(VideoItem(record_id, os.path.abspath(video_path)))
    return items
