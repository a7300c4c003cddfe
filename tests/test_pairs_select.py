"""The selection rule on crafted scores, and the training JSONL it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from synpo.pairs.io import latest_by_id, read_records
from synpo.pairs.select import run_select, select_pair


def scored(
    record_id: str, scores: list[float | None], *, status: str = "ok", video: str | None = None
) -> dict:
    candidates = []
    for index, score in enumerate(scores):
        entry = {"index": index, "text": f"caption {index} of {record_id}"}
        if score is None:
            entry.update(status="failed", score=None, error="harmony: call failed: HTTP 503")
        else:
            entry.update(status="ok", score=score, hallucination=3, harmony=index % 6, consistency=2)
        candidates.append(entry)
    return {
        "id": record_id,
        "video": video or f"/videos/{record_id}.mp4",
        "status": status,
        "prompt": "Describe this video in detail.",
        "candidates": candidates,
    }


def test_best_and_worst_with_gap():
    selection = select_pair(scored("v", [7.3, 12.5, 3.2, 9.0]))
    pair = selection.record
    assert selection.reason == "kept"
    assert (pair["chosen_index"], pair["rejected_index"]) == (1, 2)
    assert (pair["chosen_score"], pair["rejected_score"], pair["score_gap"]) == (12.5, 3.2, 9.3)
    assert pair["chosen"] == "caption 1 of v" and pair["rejected"] == "caption 2 of v"
    assert pair["scores"] == {
        "chosen": {"hallucination": 3, "harmony": 1, "consistency": 2},
        "rejected": {"hallucination": 3, "harmony": 2, "consistency": 2},
    }
    # Upstream field names carry the same pair.
    assert (pair["video_name"], pair["pos_pre"], pair["neg_pre"]) == (
        "v.mp4",
        pair["chosen"],
        pair["rejected"],
    )
    assert (pair["pos_score"], pair["neg_score"]) == (12.5, 3.2)
    assert pair["prompt"] == "Describe this video in detail." and pair["video"] == "/videos/v.mp4"


@pytest.mark.parametrize(
    "scores, gap, kept",
    [
        ([10.0, 6.0], 4.0, True),  # exactly the gap: kept (>=)
        ([10.0, 6.1], 4.0, False),
        ([9.3, 5.3], 4.0, True),  # 1.1-weighted sums: float noise must not drop an exact 4.0
        ([5.0, 5.0, 5.0], 0.0, False),  # all equal: best and worst would be the same quality
        ([13.5, 0.0], 13.5, True),
    ],
)
def test_min_score_gap(scores, gap, kept):
    selection = select_pair(scored("v", scores), min_score_gap=gap)
    assert (selection.record is not None) == kept, selection.reason


def test_ties_pick_first_best_and_last_worst():
    pair = select_pair(scored("v", [11.0, 2.0, 11.0, 2.0]), min_score_gap=4).record
    assert (pair["chosen_index"], pair["rejected_index"]) == (0, 3)


def test_failed_scoring_is_skipped_unless_partial_allowed():
    record = scored("v", [12.0, None, 3.0], status="failed")
    assert select_pair(record).reason == "scoring failed"
    pair = select_pair(record, allow_partial=True).record
    assert (pair["chosen_index"], pair["rejected_index"]) == (0, 2)
    lonely = scored("w", [12.0, None, None], status="failed")
    assert select_pair(lonely, allow_partial=True).reason == "fewer than 2 scored candidates"
    with pytest.raises(ValueError, match="min_score_gap"):
        select_pair(record, min_score_gap=-1)


def test_run_select_writes_training_jsonl_and_resumes(tmp_path):
    scores = tmp_path / "scores.jsonl"
    with scores.open("w") as handle:
        for record in [
            scored("keep", [12.0, 4.0], video=str(tmp_path / "media" / "keep.mp4")),
            scored("small_gap", [8.0, 6.0]),
            scored("failed", [12.0, None, 1.0], status="failed"),
        ]:
            handle.write(json.dumps(record) + "\n")
    out = tmp_path / "train" / "pairs.jsonl"
    summary = run_select(scores, out, progress=False)
    assert summary.ok == 1
    assert summary.notes == ["dropped (score gap below min_score_gap): 1", "dropped (scoring failed): 1"]
    pair = latest_by_id(out)["keep"]
    assert pair["video"] == "../media/keep.mp4"  # relative to the pairs file's folder
    assert (out.parent / pair["video"]).resolve() == (tmp_path / "media" / "keep.mp4").resolve()

    summary = run_select(scores, out, progress=False, allow_partial=True)
    assert summary.skipped_done == 1 and summary.ok == 1
    assert [r["id"] for r in read_records(out)] == ["keep", "failed"]


def test_trainer_reads_the_selected_pairs(tmp_path):
    from synpo import data

    media = tmp_path / "media"
    media.mkdir()
    (media / "keep.mp4").write_bytes(b"placeholder: the reader only checks that the file exists")
    scores = tmp_path / "scores.jsonl"
    scores.write_text(json.dumps(scored("keep", [12.0, 4.0], video=str(media / "keep.mp4"))) + "\n")
    out = tmp_path / "train" / "pairs.jsonl"
    run_select(scores, out, progress=False)
    examples, _report = data.read_preference_jsonl(out)
    assert len(examples) == 1
    example = examples[0]
    assert (example.chosen, example.rejected) == ("caption 0 of keep", "caption 1 of keep")
    assert (example.chosen_score, example.rejected_score) == (12.0, 4.0)
    assert Path(example.video).resolve() == (media / "keep.mp4").resolve()
