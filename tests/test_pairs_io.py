"""Append-only JSONL, resume bookkeeping and the shared stage loop."""

from __future__ import annotations

import json

import pytest

from synpo.pairs.io import JsonlWriter, latest_by_id, load_progress, read_records
from synpo.pairs.runner import RecordError, run_stage
from synpo.video import VideoError


def test_writer_appends_one_line_per_record(tmp_path):
    path = tmp_path / "out" / "x.jsonl"
    with JsonlWriter(path) as writer:
        writer.write({"id": "a", "text": "é ✓"})
    with JsonlWriter(path) as writer:
        writer.write({"id": "b"})
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["a", "b"]
    assert "é ✓" in lines[0]  # UTF-8, not \\u escapes
    with JsonlWriter(path) as writer, pytest.raises(ValueError, match="'id'"):
        writer.write({"text": "no id"})


def test_progress_repairs_a_partial_last_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(
        '{"id": "a", "status": "ok"}\n{"id": "b", "status": "failed", "error": "e"}\n{"id": "c", "sta'
    )
    progress = load_progress(path)
    assert progress.done == {"a"} and progress.failed == {"b"} and progress.truncated_lines == 1
    assert path.read_text().endswith('"error": "e"}\n')  # the partial line is gone
    with JsonlWriter(path) as writer:
        writer.write({"id": "c"})
    assert [r["id"] for r in read_records(path)] == ["a", "b", "c"]
    assert load_progress(path).truncated_lines == 0


def test_progress_reports_bad_lines_and_latest_record_wins(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(
        '{"id": "a", "status": "failed", "error": "timeout"}\n'
        "not json\n"
        '["a list"]\n'
        '{"no_id": 1}\n'
        '{"id": "a", "status": "ok", "v": 2}\n'
        '{"id": "b", "status": "ok"}\n'
        '{"id": "b", "status": "failed", "error": "later failure"}\n'
    )
    progress = load_progress(path)
    assert progress.bad_lines == [2, 3, 4]
    assert progress.done == {"a"} and progress.failed == {"b"}
    assert progress.should_skip("a", retry_failed=True)
    assert progress.should_skip("b", retry_failed=False) and not progress.should_skip("b", retry_failed=True)
    latest = latest_by_id(path)
    assert latest["a"]["v"] == 2 and latest["b"]["error"] == "later failure"


def test_missing_file_is_empty_progress_but_read_raises(tmp_path):
    assert load_progress(tmp_path / "none.jsonl").done == set()
    with pytest.raises(FileNotFoundError):
        list(read_records(tmp_path / "none.jsonl"))


def test_run_stage_records_input_errors_and_resumes(tmp_path):
    out = tmp_path / "stage.jsonl"
    calls = []

    def process(item):
        calls.append(item)
        if item == "missing":
            raise VideoError("video file not found: missing.mp4")
        if item == "empty":
            raise RecordError("clip 1: the model gave an empty caption")
        return {"id": item, "status": "ok", "value": item.upper()}

    summary = run_stage("t", ["a", "missing", "empty", "b"], out, process, item_id=str, progress=False)
    assert (summary.ok, summary.failed) == (2, 2)
    records = latest_by_id(out)
    assert records["missing"] == {
        "id": "missing",
        "status": "failed",
        "error": "video file not found: missing.mp4",
    }
    assert "empty caption" in records["empty"]["error"]

    calls.clear()
    summary = run_stage("t", ["a", "missing", "empty", "b", "c"], out, process, item_id=str, progress=False)
    assert calls == ["c"] and summary.skipped_done == 2 and summary.skipped_failed == 2
    calls.clear()
    run_stage("t", ["a", "missing", "c"], out, process, item_id=str, progress=False, retry_failed=True)
    assert calls == ["missing"]


def test_run_stage_lets_bugs_through_and_keeps_finished_work(tmp_path):
    out = tmp_path / "stage.jsonl"

    def process(item):
        if item == "boom":
            raise KeyError("a bug, not bad input")
        return {"id": item}

    with pytest.raises(KeyError):
        run_stage("t", ["a", "boom", "b"], out, process, item_id=str, progress=False)
    assert [r["id"] for r in read_records(out)] == ["a"]


def test_run_stage_records_out_of_memory_and_goes_on(tmp_path):
    import torch

    def process(item):
        if item == "huge":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB\nmore detail")
        return {"id": item}

    summary = run_stage("t", ["huge", "small"], tmp_path / "o.jsonl", process, item_id=str, progress=False)
    records = latest_by_id(tmp_path / "o.jsonl")
    assert (summary.ok, summary.failed) == (1, 1)
    assert (
        records["huge"]["error"]
        == "out of accelerator memory: CUDA out of memory. Tried to allocate 80.00 GiB"
    )
