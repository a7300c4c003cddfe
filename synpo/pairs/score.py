"""Stage 3: score every candidate with an LLM judge.

Per video, with K non-empty candidates: K hallucination calls (0-5, against the clip captions), K harmony
calls (0-5) and one self-consistency call over all K (0-3 each): ``2K + 1`` calls, run concurrently up to
the back end's ``max_concurrency`` across videos. Combined score (SynPO): ``1.1 * hallucination +
harmony + consistency`` (max 13.5).

A call that still fails after its retries marks its candidate failed, with the reason; the consistency
call failing marks all of them failed. A video is ``ok`` only when every candidate was scored;
otherwise ``failed`` (the scores that did succeed are kept in the record, and ``synpo pairs select
--allow-partial`` can use them). An empty candidate is recorded as a failed candidate without calling
the judge.

Record (one per video)::

    {"id", "video", "status", "error"?, "prompt", "candidates": [{"index", "text", "status",
     "hallucination", "harmony", "consistency", "score", "error"?}], "judge": {...}, "judge_calls"}
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from synpo.pairs import prompts
from synpo.pairs.io import STATUS_FAILED, STATUS_OK, JsonlWriter, latest_by_id, load_progress
from synpo.pairs.judge import AnswerSpec, CallResult, RetryPolicy, call_with_retries
from synpo.pairs.runner import RecordError, StageSummary, failed_record

log = logging.getLogger("synpo.pairs")

WEIGHTS = {"hallucination": 1.1, "harmony": 1.0, "consistency": 1.0}
HALLUCINATION = AnswerSpec("hallucination", 0, 5)
HARMONY = AnswerSpec("harmony", 0, 5)
CONSISTENCY_RANGE = (0, 3)
MAX_SCORE = 5 * WEIGHTS["hallucination"] + 5 * WEIGHTS["harmony"] + 3 * WEIGHTS["consistency"]


def combined_score(hallucination: int, harmony: int, consistency: int) -> float:
    # Rounded so that 1.1 * 3 prints as 3.3 and equal sums compare equal.
    total = (
        WEIGHTS["hallucination"] * hallucination
        + WEIGHTS["harmony"] * harmony
        + WEIGHTS["consistency"] * consistency
    )
    return round(total, 6)


@dataclass
class JudgeRequest:
    kind: str  # "hallucination", "harmony" or "consistency"
    candidate: int | None  # position in the video's candidate list; None for the consistency call
    messages: list[dict]
    spec: AnswerSpec


@dataclass
class VideoPlan:
    id: str
    video: str | None
    prompt: str
    texts: list[str]
    empty: set[int] = field(default_factory=set)
    requests: list[JudgeRequest] = field(default_factory=list)
    scored: list[int] = field(default_factory=list)  # candidate positions sent to the consistency call


def _messages(user: str) -> list[dict]:
    return [{"role": "system", "content": prompts.JUDGE_SYSTEM}, {"role": "user", "content": user}]


def _validated_clips(clips_record: dict) -> list[dict]:
    clips = clips_record.get("clips")
    if not isinstance(clips, list) or not clips:
        raise RecordError("clip captions: the clips record has no clips")
    for number, clip in enumerate(clips, start=1):
        caption = clip.get("caption") if isinstance(clip, dict) else None
        if not isinstance(caption, str) or not caption.strip():
            raise RecordError(f"clip captions: clip {number} has an empty caption")
        for key in ("start", "end"):
            if not isinstance(clip.get(key), (int, float)):
                raise RecordError(f"clip captions: clip {number} has no numeric {key!r}")
    return clips


def candidate_texts(candidates_record: dict) -> tuple[str, list[str]]:
    """The prompt and the whitespace-stripped candidate texts of a candidates record (text or video);
    :class:`RecordError` when either is missing."""
    prompt = candidates_record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RecordError("candidates: the record has no prompt (the instruction the candidates answer)")
    raw = candidates_record.get("candidates")
    if not isinstance(raw, list) or not raw:
        raise RecordError("candidates: the record has no candidates")
    texts = []
    for number, candidate in enumerate(raw, start=1):
        text = candidate.get("text") if isinstance(candidate, dict) else None
        if not isinstance(text, str):
            raise RecordError(f"candidates: candidate {number} has no 'text' string")
        texts.append(text.strip())
    return prompt, texts


def plan_video(clips_record: dict, candidates_record: dict) -> VideoPlan:
    """The judge calls for one video; :class:`RecordError` when its inputs cannot be judged."""
    record_id = candidates_record["id"]
    prompt, texts = candidate_texts(candidates_record)
    clips_text = prompts.format_clip_captions(_validated_clips(clips_record))
    plan = VideoPlan(record_id, candidates_record.get("video"), prompt, texts)
    plan.empty = {i for i, text in enumerate(texts) if not text}
    plan.scored = [i for i in range(len(texts)) if i not in plan.empty]
    if len(plan.scored) < 2:
        raise RecordError(f"candidates: {len(plan.scored)} non-empty candidate(s); a pair needs at least 2")
    for i in plan.scored:
        user = prompts.HALLUCINATION.format(clips=clips_text, candidate=texts[i])
        plan.requests.append(JudgeRequest("hallucination", i, _messages(user), HALLUCINATION))
        user = prompts.HARMONY.format(instruction=prompt, candidate=texts[i])
        plan.requests.append(JudgeRequest("harmony", i, _messages(user), HARMONY))
    count = len(plan.scored)
    user = prompts.CONSISTENCY.format(
        count=count, candidates=prompts.format_candidates([texts[i] for i in plan.scored])
    )
    plan.requests.append(
        JudgeRequest("consistency", None, _messages(user), AnswerSpec("consistency", 0, 3, count))
    )
    return plan


def assemble_record(plan: VideoPlan, results: list[CallResult], judge_info: dict) -> dict:
    """The scores record of one video from its calls' results (same order as ``plan.requests``)."""
    entries = [
        {"index": i, "text": text, "hallucination": None, "harmony": None, "consistency": None, "errors": []}
        for i, text in enumerate(plan.texts)
    ]
    failures: list[str] = []  # one line per failed call (or empty candidate), for the record's error
    for i in sorted(plan.empty):
        entries[i]["errors"].append("empty caption")
        failures.append(f"candidate {i}: empty caption")
    for request, result in zip(plan.requests, results):
        if request.kind == "consistency":
            if result.ok:
                for position, i in enumerate(plan.scored):
                    entries[i]["consistency"] = result.value[position]
            else:
                failures.append(f"consistency: {result.error}")
                for i in plan.scored:
                    entries[i]["errors"].append(f"consistency: {result.error}")
        elif result.ok:
            entries[request.candidate][request.kind] = result.value
        else:
            failures.append(f"candidate {request.candidate} {request.kind}: {result.error}")
            entries[request.candidate]["errors"].append(f"{request.kind}: {result.error}")
    candidates = []
    for entry in entries:
        errors = entry.pop("errors")
        if errors:
            entry.update(status=STATUS_FAILED, score=None, error="; ".join(errors))
        else:
            score = combined_score(entry["hallucination"], entry["harmony"], entry["consistency"])
            entry.update(status=STATUS_OK, score=score)
        candidates.append(entry)
    n_failed = sum(entry["status"] == STATUS_FAILED for entry in candidates)
    record = {
        "id": plan.id,
        "video": plan.video,
        "status": STATUS_FAILED if n_failed else STATUS_OK,
        "prompt": plan.prompt,
        "candidates": candidates,
        "judge": judge_info,
        "judge_calls": sum(result.attempts for result in results),
    }
    if n_failed:
        record["error"] = f"{n_failed} of {len(candidates)} candidates not scored: " + " | ".join(failures)
    return record


def run_score(
    clips_path: str | Path,
    candidates_path: str | Path,
    output: str | Path,
    backend,
    policy: RetryPolicy,
    *,
    retry_failed: bool = False,
    progress: bool = True,
) -> StageSummary:
    """Score every candidates record that has clip captions; append one record per video to ``output``."""
    clips = latest_by_id(clips_path)
    candidates = latest_by_id(candidates_path)
    state = load_progress(output)
    summary = StageSummary(
        "score", str(output), truncated_lines=state.truncated_lines, bad_lines=state.bad_lines
    )
    pending: list[tuple[str, dict, dict]] = []
    not_ready: list[str] = []
    upstream_failed: list[str] = []
    for record_id, record in candidates.items():
        summary.total += 1
        if record_id in state.done:
            summary.skipped_done += 1
        elif record_id in state.failed and not retry_failed:
            summary.skipped_failed += 1
        elif record.get("status") == STATUS_FAILED:
            upstream_failed.append(record_id)
        elif record_id not in clips or clips[record_id].get("status") == STATUS_FAILED:
            not_ready.append(record_id)
        else:
            pending.append((record_id, clips[record_id], record))
    if upstream_failed:
        summary.notes.append(f"not scored, candidates stage failed: {_ids(upstream_failed)}")
    if not_ready:
        summary.notes.append(f"not scored, no usable clip captions yet: {_ids(not_ready)}")

    judge_info = backend.describe()
    stop = threading.Event()
    # Enough videos in flight to keep every worker busy; bounded so memory stays flat on long runs.
    max_in_flight = max(2, backend.max_concurrency)
    window: deque[tuple[VideoPlan, list[Future]]] = deque()
    executor = ThreadPoolExecutor(max_workers=backend.max_concurrency, thread_name_prefix="judge")
    bar = tqdm(total=len(pending), desc="pairs score", unit="video", disable=not progress, file=sys.stderr)

    def finish(writer: JsonlWriter, plan: VideoPlan, futures: list[Future]) -> None:
        record = assemble_record(plan, [future.result() for future in futures], judge_info)
        _count(summary, record)
        writer.write(record)
        bar.update(1)

    try:
        with JsonlWriter(output) as writer:
            for record_id, clips_record, candidates_record in pending:
                try:
                    plan = plan_video(clips_record, candidates_record)
                except RecordError as exc:
                    record = failed_record(record_id, str(exc), video=candidates_record.get("video"))
                    _count(summary, record)
                    writer.write(record)
                    bar.update(1)
                    continue
                futures = [
                    executor.submit(call_with_retries, backend, r.messages, r.spec, policy, stop=stop)
                    for r in plan.requests
                ]
                window.append((plan, futures))
                while len(window) >= max_in_flight:
                    finish(writer, *window.popleft())
            while window:
                finish(writer, *window.popleft())
    finally:
        # On an error (a rejected key) or Ctrl-C: abandon queued calls; finished records are already on disk.
        stop.set()
        executor.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return summary


def _count(summary: StageSummary, record: dict) -> None:
    if record["status"] == STATUS_FAILED:
        summary.failed += 1
        log.warning("score %s failed: %s", record["id"], record.get("error"))
    else:
        summary.ok += 1


def _ids(ids: list[str], limit: int = 5) -> str:
    shown = ", ".join(ids[:limit])
    return f"{shown} (+{len(ids) - limit} more)" if len(ids) > limit else shown
