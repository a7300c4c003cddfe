"""Stage 4: the best and the worst candidate of each video become a chosen/rejected training pair.

Chosen = highest combined score (the lowest index among ties), rejected = lowest (the highest index among
ties). The pair is kept only if ``chosen_score - rejected_score >= min_score_gap`` (upstream: 4 on the
0-13.5 scale): a small gap is mostly judge noise. Equal scores never make a pair, even with a gap of 0.

Videos whose scoring failed are left out, unless ``allow_partial``: then a failed video's successfully
scored candidates compete (at least two are needed). Records (one per kept video) carry the trainer's
fields and the upstream ones::

    {"id", "prompt", "chosen", "rejected", "video", "chosen_score", "rejected_score", "score_gap",
     "scores": {"chosen": {"hallucination", "harmony", "consistency"}, "rejected": {...}},
     "chosen_index", "rejected_index",
     "video_name", "pos_pre", "neg_pre", "pos_score", "neg_score"}

``prompt`` is the plain instruction (no chat template, no image tokens): the trainer formats it.
``video`` is written relative to the output file's folder (the trainer resolves relative media paths
there), so the pairs file and the videos can move together.
"""

from __future__ import annotations

import os
import zlib
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from synpo.pairs.io import STATUS_FAILED, STATUS_OK, JsonlWriter, invalid_lines, latest_by_id, load_progress
from synpo.pairs.runner import StageSummary

DEFAULT_MIN_SCORE_GAP = 4.0
_DIMENSIONS = ("hallucination", "harmony", "consistency")


def is_heldout(record_id: str, fraction: float) -> bool:
    """Whether ``record_id`` belongs to the held-out split: a hash of the id alone, so the split does not
    depend on which other ids exist or on their order (``fraction`` of ids, on average)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {fraction}")
    return zlib.crc32(record_id.encode("utf-8")) / 2**32 < fraction


# Why an item gives no pair (Selection.reason), for the two reasons that depend on the candidates.
TIED = "all candidates scored the same"
BELOW_GAP = "score gap below min_score_gap"


def no_pairs_advice(dropped: dict[str, int], gaps: list[float], min_score_gap: float) -> str:
    """Why a selection wrote no pair and what to change (the ``dropped`` counts per reason are listed
    before it), from the best-worst ``gaps`` of the items below ``min_score_gap``."""
    if gaps:
        largest = max(gaps)
        keeps = sum(g >= largest for g in gaps)
        why = (
            f"no pairs written: {len(gaps)} best-worst gaps below --min-score-gap {min_score_gap:g} (the "
            f"largest is {largest:g}; --min-score-gap {largest:g} keeps {keeps}, a weaker preference)"
        )
    elif dropped.get(TIED):
        why = "no pairs written: the judge scored all candidates of an item the same"
    else:
        return "no pairs written"
    return (
        f"{why}\n  candidates that differ more make pairs: more of them (candidates --num-candidates), "
        "complete answers (--max-new-tokens), a real model rather than --model tiny, or more items"
    )


@dataclass(frozen=True)
class Selection:
    record: dict | None  # the training pair, or None
    reason: str  # why no pair, or "kept"
    gap: float | None = None  # the best-worst score gap, when there was one


def select_pair(
    scores_record: dict,
    *,
    min_score_gap: float = DEFAULT_MIN_SCORE_GAP,
    allow_partial: bool = False,
    media_root: str | Path | None = None,
) -> Selection:
    """The training pair for one video's scores record, or why there is none.

    ``media_root``: write ``video`` relative to this folder (None: as in the scores record).
    """
    if min_score_gap < 0:
        raise ValueError(f"min_score_gap must be >= 0, got {min_score_gap}")
    if scores_record.get("status") == STATUS_FAILED and not allow_partial:
        return Selection(None, "scoring failed")
    scored = [
        c
        for c in scores_record.get("candidates") or []
        if isinstance(c, dict) and c.get("status") == STATUS_OK and isinstance(c.get("score"), (int, float))
    ]
    if len(scored) < 2:
        return Selection(None, "fewer than 2 scored candidates")
    chosen = max(scored, key=lambda c: (c["score"], -c["index"]))
    rejected = min(scored, key=lambda c: (c["score"], -c["index"]))
    gap = round(chosen["score"] - rejected["score"], 6)
    if gap <= 0:
        return Selection(None, TIED)  # no preference to learn, whatever the gap
    if gap < min_score_gap:
        return Selection(None, BELOW_GAP, gap)
    video = scores_record.get("video")
    if video and media_root is not None:
        video = os.path.relpath(os.path.abspath(video), os.path.abspath(media_root))
    record = {
        "id": scores_record["id"],
        "prompt": scores_record["prompt"],
        "chosen": chosen["text"],
        "rejected": rejected["text"],
        "video": video,
        "chosen_score": chosen["score"],
        "rejected_score": rejected["score"],
        "score_gap": gap,
        "scores": {
            "chosen": {k: chosen.get(k) for k in _DIMENSIONS},
            "rejected": {k: rejected.get(k) for k in _DIMENSIONS},
        },
        "chosen_index": chosen["index"],
        "rejected_index": rejected["index"],
        # Upstream SynPO field names.
        "video_name": Path(video).name if video else scores_record["id"],
        "pos_pre": chosen["text"],
        "neg_pre": rejected["text"],
        "pos_score": chosen["score"],
        "neg_score": rejected["score"],
    }
    return Selection(record, "kept")


def run_select(
    scores_path: str | Path,
    output: str | Path,
    *,
    min_score_gap: float = DEFAULT_MIN_SCORE_GAP,
    allow_partial: bool = False,
    progress: bool = True,
    heldout_output: str | Path | None = None,
    heldout_fraction: float = 0.0,
) -> StageSummary:
    """Append a pair for each scored video not yet in ``output`` that passes the rules.

    With ``heldout_output``, pairs whose id :func:`is_heldout` go there instead of to ``output``.
    """
    if min_score_gap < 0:
        raise ValueError(f"min_score_gap must be >= 0, got {min_score_gap}")
    if (heldout_output is None) != (heldout_fraction == 0):
        raise ValueError("heldout_output and heldout_fraction > 0 go together")
    is_heldout("", heldout_fraction)  # validates the fraction
    if heldout_output is not None and Path(heldout_output).resolve() == Path(output).resolve():
        raise ValueError(f"heldout_output must differ from output ({output})")
    scores = latest_by_id(scores_path)
    bad_input = invalid_lines(scores_path)
    outputs = [Path(output)] + ([Path(heldout_output)] if heldout_output is not None else [])
    states = [load_progress(path) for path in outputs]
    summary = StageSummary(
        "select",
        str(output) + (f" + {heldout_output} (held out)" if heldout_output is not None else ""),
        truncated_lines=sum(state.truncated_lines for state in states),
        bad_lines=[line for state in states for line in state.bad_lines],
    )
    done = set().union(*(state.done for state in states))
    dropped: dict[str, int] = {}
    gaps: list[float] = []  # of the items below min_score_gap
    kept = [0, 0]
    with ExitStack() as stack:
        writers = [stack.enter_context(JsonlWriter(path)) for path in outputs]
        # Text scenes have no video: count what the records are.
        unit = "video" if any(record.get("video") for record in scores.values()) else "scene"
        for record_id, record in tqdm(scores.items(), desc="pairs select", unit=unit, disable=not progress):
            summary.total += 1
            if record_id in done:
                summary.skipped_done += 1
                continue
            split = int(heldout_output is not None and is_heldout(record_id, heldout_fraction))
            selection = select_pair(
                record,
                min_score_gap=min_score_gap,
                allow_partial=allow_partial,
                media_root=outputs[split].parent,
            )
            if selection.record is None:
                dropped[selection.reason] = dropped.get(selection.reason, 0) + 1
                if selection.gap is not None:
                    gaps.append(selection.gap)
                continue
            writers[split].write(selection.record)
            kept[split] += 1
            summary.ok += 1
    if heldout_output is not None:
        summary.notes.append(f"written: {kept[0]} to {output}, {kept[1]} held out to {heldout_output}")
    summary.notes.extend(f"dropped ({reason}): {count}" for reason, count in sorted(dropped.items()))
    if dropped and not summary.ok and not summary.skipped_done:
        summary.notes.append(no_pairs_advice(dropped, gaps, min_score_gap))
    if bad_input:
        shown = ", ".join(map(str, bad_input[:10])) + (", ..." if len(bad_input) > 10 else "")
        summary.notes.append(f"{scores_path}: ignored {len(bad_input)} invalid line(s): {shown}")
    return summary
