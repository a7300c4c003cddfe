"""The pairs CLI's contract with its outputs: settings recorded and checked, honest exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_pairs_select import scored

from synpo.cli import main
from synpo.pairs.io import read_records, settings_path


def _scores_file(tmp_path: Path) -> Path:
    scores = tmp_path / "scores.jsonl"
    records = [scored("gap8", [12.0, 4.0]), scored("gap5", [9.0, 4.0]), scored("gap2", [6.0, 4.0])]
    scores.write_text("".join(json.dumps(r) + "\n" for r in records))
    return scores


def test_select_rerun_with_other_settings_is_refused_unless_overwrite(tmp_path, capsys):
    scores, out = _scores_file(tmp_path), tmp_path / "pairs.jsonl"
    assert main(["pairs", "select", "--scores", str(scores), "--out", str(out), "--no-progress"]) == 0
    assert sorted(r["id"] for r in read_records(out)) == ["gap5", "gap8"]
    assert json.loads(settings_path(out).read_text())["min_score_gap"] == 4.0
    # Same settings: a resume, nothing new.
    assert main(["pairs", "select", "--scores", str(scores), "--out", str(out), "--no-progress"]) == 0
    assert len(list(read_records(out))) == 2
    capsys.readouterr()

    stricter = ["pairs", "select", "--scores", str(scores), "--out", str(out), "--min-score-gap", "6"]
    assert main([*stricter, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "min_score_gap: 4.0 -> 6.0" in err and "--overwrite" in err
    assert len(list(read_records(out))) == 2  # untouched

    assert main([*stricter, "--no-progress", "--overwrite"]) == 0
    assert [r["id"] for r in read_records(out)] == ["gap8"]
    assert json.loads(settings_path(out).read_text())["min_score_gap"] == 6.0


def test_select_reports_invalid_lines_of_the_scores_file(tmp_path, capsys):
    scores, out = _scores_file(tmp_path), tmp_path / "pairs.jsonl"
    lines = scores.read_text().splitlines()
    scores.write_text("\n".join([lines[0], "{not json", lines[1], '["no id"]', lines[2]]) + "\n")
    assert main(["pairs", "select", "--scores", str(scores), "--out", str(out), "--no-progress"]) == 0
    assert "ignored 2 invalid line(s): 2, 4" in capsys.readouterr().out


def test_stage_where_every_item_failed_exits_nonzero(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = ["pairs", "clips", str(tmp_path / "nonexistent.mp4"), "--model", "tiny", "--device", "cpu"]
    proc = subprocess.run(
        [sys.executable, "-m", "synpo", *args, "--out", str(tmp_path / "clips.jsonl"), "--no-progress"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "no item succeeded (1 failed" in proc.stderr
    assert "not found" in next(read_records(tmp_path / "clips.jsonl"))["error"]
