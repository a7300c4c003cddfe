"""The LLM judge: strict parsing, the HTTP back end against a real loopback chat-completions server
(malformed answers, timeouts, 5xx/429 retries, auth errors, bounded concurrency, the key never leaked),
the local back end on a tiny random model, and the score stage on top of them."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from synpo import tiny
from synpo.pairs import prompts
from synpo.pairs.io import latest_by_id
from synpo.pairs.judge import (
    AnswerSpec,
    HTTPJudge,
    JudgeConfigError,
    LocalJudge,
    MalformedAnswer,
    RetryPolicy,
    call_with_retries,
)
from synpo.pairs.score import combined_score, plan_video, run_score

FAST_RETRY = RetryPolicy(max_retries=3, backoff=0.01, backoff_max=0.05)
SECRET = "sk-test-0123456789-never-print-me"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------------
# A real chat-completions server on loopback. `respond(body, call_number)` returns
# (status, payload, headers, delay_seconds); payload is a dict (sent as JSON) or raw text.


class ChatServer:
    def __init__(self, respond):
        self.respond = respond
        self.requests: list[dict] = []
        self.auth_headers: list[str | None] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                with server._lock:
                    server.requests.append(body)
                    server.auth_headers.append(self.headers.get("Authorization"))
                    call_number = len(server.requests)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if self.path != "/v1/chat/completions":
                        status, payload, headers, delay = 404, {"error": "no such route"}, {}, 0.0
                    else:
                        status, payload, headers, delay = server.respond(body, call_number)
                    time.sleep(delay)
                    data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and went away
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def completion(content: str) -> dict:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
    }


def ok(content: str, delay: float = 0.0):
    return 200, completion(content), {}, delay


def scripted(*responses):
    """Respond with the given responses in order (the last one repeats)."""

    def respond(body, call_number):
        return responses[min(call_number, len(responses)) - 1]

    return respond


HALLUCINATION = AnswerSpec("hallucination", 0, 5)
MESSAGES = [{"role": "user", "content": "score this"}]


def make_judge(server, **kwargs):
    kwargs.setdefault("timeout", 2.0)
    return HTTPJudge(server.url, "judge-model", **kwargs)


# ---------------------------------------------------------------------------------------------------
# Strict parsing


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"hallucination": 4}', 4),
        ('  {"hallucination": 0}\n', 0),
        ('```json\n{"hallucination": 5}\n```', 5),
        ('```\n{"hallucination": 3}\n```', 3),
    ],
)
def test_parse_accepts_exactly_the_object(text, expected):
    assert HALLUCINATION.parse(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("4", "not a JSON object"),
        ("Score: 4", "not a single JSON object"),
        ('The score is {"hallucination": 4}', "not a single JSON object"),
        ('{"hallucination": 4} because it is good', "not a single JSON object"),
        ('{"hallucination": 6}', r"in \[0, 5\]"),
        ('{"hallucination": -1}', r"in \[0, 5\]"),
        ('{"hallucination": 4.0}', "integer"),
        ('{"hallucination": "4"}', "integer"),
        ('{"hallucination": true}', "integer"),
        ('{"hallucination": 4, "reason": "fine"}', "exactly the key"),
        ('{"harmony": 4}', "exactly the key"),
        ('{"hallucination": 4}{"hallucination": 5}', "not a single JSON object"),
        ("", "not a single JSON object"),
    ],
)
def test_parse_rejects_anything_else(text, message):
    with pytest.raises(MalformedAnswer, match=message):
        HALLUCINATION.parse(text)


def test_parse_consistency_list():
    spec = AnswerSpec("consistency", 0, 3, count=3)
    assert spec.parse('{"consistency": [3, 0, 2]}') == [3, 0, 2]
    for text, message in [
        ('{"consistency": [3, 0]}', "list of 3 integers, got 2 items"),
        ('{"consistency": 3}', "list of 3 integers, got int"),
        ('{"consistency": [3, 0, 4]}', r"consistency\[2\] must be in \[0, 3\]"),
    ]:
        with pytest.raises(MalformedAnswer, match=message):
            spec.parse(text)


def test_prompts_format_and_ask_for_the_parsed_keys():
    clips = [
        {"start": 0.0, "end": 5.0, "caption": "A red square."},
        {"start": 5, "end": 10, "caption": "It stops."},
    ]
    text = prompts.HALLUCINATION.format(clips=prompts.format_clip_captions(clips), candidate="X")
    assert "Clip 2 (5.0-10.0 s): It stops." in text and '{"hallucination": <integer 0-5>}' in text
    assert '{"harmony": <integer 0-5>}' in prompts.HARMONY.format(instruction="I", candidate="C")
    assert "from 1 to 3" in prompts.CONSISTENCY.format(count=3, candidates="...")
    assert "PREVIOUS" in prompts.CLIP_REFINE.format(previous="PREVIOUS")


def test_combined_score_is_upstream_formula():
    assert combined_score(5, 5, 3) == 13.5
    assert combined_score(3, 2, 1) == pytest.approx(6.3) and combined_score(3, 2, 1) == 6.3


# ---------------------------------------------------------------------------------------------------
# HTTP judge against the loopback server


def test_http_valid_answer_and_request_shape(monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", SECRET)
    with ChatServer(scripted(ok('{"hallucination": 4}'))) as server:
        judge = make_judge(server, api_key_env="MY_JUDGE_KEY", max_tokens=77, json_mode=True)
        result = call_with_retries(judge, MESSAGES, HALLUCINATION, FAST_RETRY)
        judge.close()
    assert (result.value, result.error, result.attempts) == (4, None, 1)
    body = server.requests[0]
    assert body["model"] == "judge-model" and body["temperature"] == 0 and body["max_tokens"] == 77
    assert body["messages"] == MESSAGES and body["response_format"] == {"type": "json_object"}
    assert server.auth_headers == [f"Bearer {SECRET}"]


def test_http_no_key_sends_no_auth_header(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with ChatServer(scripted(ok('{"hallucination": 1}'))) as server:
        judge = make_judge(server)
        assert call_with_retries(judge, MESSAGES, HALLUCINATION, FAST_RETRY).value == 1
    assert server.auth_headers == [None]


def test_http_malformed_then_valid_is_retried():
    with ChatServer(
        scripted(ok("I think it deserves a 4."), ok('{"hallucination": 9}'), ok('{"hallucination": 2}'))
    ) as server:
        result = call_with_retries(make_judge(server), MESSAGES, HALLUCINATION, FAST_RETRY)
    assert (result.value, result.attempts) == (2, 3)


def test_http_timeout_then_ok():
    with ChatServer(scripted(ok('{"hallucination": 5}', delay=1.0), ok('{"hallucination": 3}'))) as server:
        start = time.monotonic()
        result = call_with_retries(make_judge(server, timeout=0.3), MESSAGES, HALLUCINATION, FAST_RETRY)
        elapsed = time.monotonic() - start
    assert (result.value, result.attempts) == (3, 2)
    assert elapsed < 1.0  # the client gave up on the slow answer instead of waiting for it


def test_http_5xx_then_ok_and_429_retry_after_is_honoured():
    sleeps = []
    with ChatServer(
        scripted(
            (500, {"error": "boom"}, {}, 0.0),
            (503, "upstream unavailable", {}, 0.0),
            (429, {"error": "slow down"}, {"Retry-After": "0.04"}, 0.0),
            ok('{"hallucination": 1}'),
        )
    ) as server:
        policy = RetryPolicy(max_retries=4, backoff=0.001, backoff_max=1.0)
        result = call_with_retries(make_judge(server), MESSAGES, HALLUCINATION, policy, sleep=sleeps.append)
    assert (result.value, result.attempts) == (1, 4)
    assert len(sleeps) == 3 and sleeps[2] == pytest.approx(0.04)  # Retry-After beats the tiny backoff


def test_backoff_grows_exponentially_and_is_capped():
    policy = RetryPolicy(max_retries=10, backoff=1.0, backoff_max=5.0)
    for k, upper in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (9, 5.0)]:
        delay = policy.delay(k)
        assert min(upper, 2 ** (k - 1) * 0.5) <= delay <= upper
    assert policy.delay(1, retry_after=100.0) == 5.0


def test_http_persistent_failures_are_reported_not_scored():
    with ChatServer(scripted((500, "internal error", {}, 0.0))) as server:
        result = call_with_retries(make_judge(server), MESSAGES, HALLUCINATION, FAST_RETRY)
    assert result.value is None and result.attempts == 4 and len(server.requests) == 4
    assert result.error == "call failed: HTTP 500: internal error (after 4 attempts)"

    with ChatServer(scripted(ok("no json here"))) as server:
        result = call_with_retries(make_judge(server), MESSAGES, HALLUCINATION, FAST_RETRY)
    assert result.error.startswith("malformed answer: answer is not a single JSON object")

    with ChatServer(scripted((200, "<html>proxy error</html>", {}, 0.0))) as server:
        result = call_with_retries(make_judge(server), MESSAGES, HALLUCINATION, FAST_RETRY)
    assert "not a chat-completions response" in result.error and result.attempts == 4


def test_http_400_is_not_retried():
    with ChatServer(scripted((400, {"error": "context too long"}, {}, 0.0))) as server:
        result = call_with_retries(make_judge(server), MESSAGES, HALLUCINATION, FAST_RETRY)
    assert result.attempts == 1 and "HTTP 400" in result.error and "context too long" in result.error


def test_http_connection_refused_is_retried_then_reported():
    with ChatServer(scripted(ok("{}"))) as server:
        url = server.url
    judge = HTTPJudge(url, "m", timeout=0.5)  # the server is gone now
    result = call_with_retries(judge, MESSAGES, HALLUCINATION, FAST_RETRY)
    assert result.attempts == 4 and result.error.startswith("call failed: connection failed")


def test_http_auth_error_stops_the_run_without_leaking_the_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    body = {"error": f"Incorrect API key provided: {SECRET}"}  # some servers echo the key
    with ChatServer(scripted((401, body, {}, 0.0))) as server, pytest.raises(JudgeConfigError) as info:
        call_with_retries(make_judge(server), MESSAGES, HALLUCINATION, FAST_RETRY)
    message = str(info.value)
    assert "HTTP 401" in message and "$OPENAI_API_KEY" in message and SECRET not in message
    assert len(server.requests) == 1


def test_http_wrong_route_is_a_config_error():
    with ChatServer(scripted(ok("{}"))) as server:
        judge = HTTPJudge(server.url.replace("/v1", "/v2"), "m")
        with pytest.raises(JudgeConfigError, match="404"):
            judge.answer(MESSAGES, HALLUCINATION)


def test_http_judge_rejects_bad_configuration():
    with pytest.raises(ValueError, match="judge_url"):
        HTTPJudge("localhost:8000", "m")
    with pytest.raises(ValueError, match="max_concurrency"):
        HTTPJudge("http://localhost:8000/v1", "m", max_concurrency=0)
    judge = HTTPJudge("http://localhost:8000/v1/chat/completions/", "m")
    assert judge.base_url == "http://localhost:8000/v1"


# ---------------------------------------------------------------------------------------------------
# Local judge on the tiny random model


@pytest.fixture(scope="module")
def tiny_lm():
    return tiny.build_tiny_causal_lm(seed=0)


def test_local_judge_garbage_is_a_failed_parse_not_a_score(tiny_lm):
    model, tokenizer = tiny_lm
    judge = LocalJudge(model, tokenizer, max_new_tokens=12)
    calls = []
    original = judge.answer
    judge.answer = lambda messages, spec: calls.append(1) or original(messages, spec)
    result = call_with_retries(judge, MESSAGES, HALLUCINATION, FAST_RETRY)
    assert result.value is None and result.error.startswith("malformed answer")
    assert len(calls) == 1  # greedy is deterministic: a retry would give the same garbage


def test_local_judge_constrained_always_parses(tiny_lm):
    model, tokenizer = tiny_lm
    judge = LocalJudge(model, tokenizer, constrained=True)
    answer = judge.answer(MESSAGES, HALLUCINATION)
    assert 0 <= HALLUCINATION.parse(answer) <= 5
    spec = AnswerSpec("consistency", 0, 3, count=4)
    values = spec.parse(judge.answer(MESSAGES, spec))
    assert len(values) == 4 and all(0 <= v <= 3 for v in values)
    assert judge.answer(MESSAGES, spec) == spec.render(values)  # deterministic


def test_local_judge_constrained_picks_the_most_likely_answer(tiny_lm):
    model, tokenizer = tiny_lm
    judge = LocalJudge(model, tokenizer, constrained=True)
    prompt = judge._prompt_ids(MESSAGES)
    options = [HALLUCINATION.render(v) for v in range(6)]
    # Brute force: the log-likelihood of each full answer, one sequence at a time.
    totals = []
    with torch.no_grad():
        for text in options:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            logits = model(input_ids=torch.tensor([prompt + ids])).logits[0].log_softmax(-1)
            totals.append(sum(logits[len(prompt) - 1 + j, t].item() for j, t in enumerate(ids)))
    expected = max(range(6), key=lambda i: (totals[i], -i))
    assert HALLUCINATION.parse(judge.answer(MESSAGES, HALLUCINATION)) == expected


def test_local_judge_prompt_longer_than_context_fails_without_retry(tiny_lm):
    model, tokenizer = tiny_lm
    judge = LocalJudge(model, tokenizer, max_new_tokens=8)
    long_messages = [{"role": "user", "content": "word " * 5000}]
    result = call_with_retries(judge, long_messages, HALLUCINATION, FAST_RETRY)
    assert result.attempts == 1 and "exceeds the judge's context (4096)" in result.error


# ---------------------------------------------------------------------------------------------------
# The score stage over the HTTP judge


def fake_judge_answer(body) -> str:
    """A deterministic 'judge': scores follow from the candidate text, so tests can predict them."""
    prompt = body["messages"][-1]["content"]
    if '"consistency"' in prompt:
        count = int(re.search(r"numbered from 1 to (\d+)", prompt).group(1))
        texts = re.findall(r"Description \d+:\n(.*)", prompt)
        return json.dumps({"consistency": [len(t) % 4 for t in texts][:count]})
    candidate = re.search(
        r"(?:Candidate description of the whole video|The model's answer):\n\n(.*?)\n\n", prompt, re.S
    )
    words = len(candidate.group(1).split())
    if '"hallucination"' in prompt:
        return json.dumps({"hallucination": min(words, 5)})
    return json.dumps({"harmony": words % 6})


def expected_score(text: str) -> float:
    words = len(text.split())
    return combined_score(min(words, 5), words % 6, len(text) % 4)


def write_inputs(tmp_path, videos: dict[str, list[str]], clip_caption="A red square slides right."):
    clips, candidates = tmp_path / "clips.jsonl", tmp_path / "candidates.jsonl"
    with clips.open("w") as clips_file, candidates.open("w") as candidates_file:
        for vid, texts in videos.items():
            clip_list = [
                {"index": 0, "start": 0.0, "end": 5.0, "caption": clip_caption},
                {"index": 1, "start": 5.0, "end": 10.0, "caption": "It stops at the edge."},
            ]
            clips_file.write(json.dumps({"id": vid, "status": "ok", "clips": clip_list}) + "\n")
            record = {
                "id": vid,
                "video": f"/data/{vid}.mp4",
                "status": "ok",
                "prompt": "Describe.",
                "candidates": [{"index": i, "text": t} for i, t in enumerate(texts)],
            }
            candidates_file.write(json.dumps(record) + "\n")
    return clips, candidates


CANDIDATES = {
    "v1": ["A red square moves.", "Square.", "A red square slides to the right and stops at the edge."],
    "v2": ["Blue disc.", "A blue disc bounces up and down twice."],
    "v3": ["One", "Two words here", "three"],
}


def test_score_stage_scores_every_candidate_concurrently(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    clips, candidates = write_inputs(tmp_path, CANDIDATES)
    out = tmp_path / "scores.jsonl"

    def respond(body, call_number):
        return ok(fake_judge_answer(body), delay=0.05)

    with ChatServer(respond) as server:
        judge = make_judge(server, max_concurrency=3)
        summary = run_score(clips, candidates, out, judge, FAST_RETRY, progress=False)
        judge.close()
    assert (summary.ok, summary.failed) == (3, 0)
    expected_calls = sum(2 * len(texts) + 1 for texts in CANDIDATES.values())
    assert len(server.requests) == expected_calls
    assert 2 <= server.max_in_flight <= 3  # concurrent, and bounded
    records = latest_by_id(out)
    for vid, texts in CANDIDATES.items():
        record = records[vid]
        assert record["status"] == "ok" and record["video"] == f"/data/{vid}.mp4"
        assert [c["score"] for c in record["candidates"]] == [expected_score(t) for t in texts]
        assert record["judge"] == {"backend": "http", "model": "judge-model", "url": server.url}
        assert record["judge_calls"] == 2 * len(texts) + 1
    assert SECRET not in out.read_text() and SECRET not in caplog.text


def test_score_stage_records_failures_and_retries_them_later(tmp_path):
    clips, candidates = write_inputs(
        tmp_path, {"v1": CANDIDATES["v1"], "v2": ["", "Blue disc.", "A blue disc."]}
    )
    out = tmp_path / "scores.jsonl"
    broken = {"on": True}

    def respond(body, call_number):
        prompt = body["messages"][-1]["content"]
        if broken["on"] and '"harmony"' in prompt and "Square." in prompt:
            return 503, "overloaded", {}, 0.0
        return ok(fake_judge_answer(body))

    with ChatServer(respond) as server:
        judge = make_judge(server)
        summary = run_score(clips, candidates, out, judge, FAST_RETRY, progress=False)
        records = latest_by_id(out)
        v1 = records["v1"]
        assert summary.failed == 2 and v1["status"] == "failed"
        assert v1["error"].startswith(
            "1 of 3 candidates not scored: candidate 1 harmony: call failed: HTTP 503"
        )
        failed = v1["candidates"][1]
        assert failed["status"] == "failed" and failed["score"] is None and failed["harmony"] is None
        assert failed["hallucination"] is not None  # what did succeed is kept
        assert [c["status"] for c in v1["candidates"]] == ["ok", "failed", "ok"]
        v2 = records["v2"]  # an empty candidate: not sent to the judge, recorded as failed
        assert v2["status"] == "failed" and v2["candidates"][0]["error"] == "empty caption"
        assert v2["judge_calls"] == 2 * 2 + 1

        before = len(server.requests)
        run_score(clips, candidates, out, judge, FAST_RETRY, progress=False)
        assert len(server.requests) == before  # failed ids are skipped unless asked
        broken["on"] = False
        summary = run_score(clips, candidates, out, judge, FAST_RETRY, progress=False, retry_failed=True)
    assert latest_by_id(out)["v1"]["status"] == "ok"
    assert summary.ok == 1 and summary.failed == 1  # v2's empty candidate still fails


def test_score_stage_validates_inputs_per_record(tmp_path):
    clips, candidates = write_inputs(tmp_path, {"bad_clip": ["a b", "c d"]}, clip_caption="  ")
    with candidates.open("a") as k:
        k.write(
            json.dumps({"id": "one", "status": "ok", "prompt": "P", "candidates": [{"text": "only"}]}) + "\n"
        )
        k.write(
            json.dumps({"id": "no_clips", "status": "ok", "prompt": "P", "candidates": [{"text": "a"}]})
            + "\n"
        )
        k.write(json.dumps({"id": "upstream", "status": "failed", "error": "video file not found"}) + "\n")
    with clips.open("a") as c:
        c.write(
            json.dumps({"id": "one", "status": "ok", "clips": [{"start": 0, "end": 1, "caption": "x"}]})
            + "\n"
        )
    out = tmp_path / "scores.jsonl"
    with ChatServer(lambda body, n: ok(fake_judge_answer(body))) as server:
        summary = run_score(clips, candidates, out, make_judge(server), FAST_RETRY, progress=False)
    assert server.requests == []
    records = latest_by_id(out)
    assert set(records) == {"bad_clip", "one"}
    assert records["bad_clip"]["error"] == "clip captions: clip 1 has an empty caption"
    assert records["one"]["error"] == "candidates: 1 non-empty candidate(s); a pair needs at least 2"
    notes = "\n".join(summary.notes)
    assert "no usable clip captions yet: no_clips" in notes and "candidates stage failed: upstream" in notes


def test_score_stage_stops_on_rejected_key_and_keeps_finished_videos(tmp_path):
    clips, candidates = write_inputs(tmp_path, CANDIDATES)
    out = tmp_path / "scores.jsonl"

    def respond(body, call_number):
        return (401, {"error": "invalid key"}, {}, 0.0) if call_number > 7 else ok(fake_judge_answer(body))

    with ChatServer(respond) as server:
        judge = make_judge(server, max_concurrency=1)
        with pytest.raises(JudgeConfigError, match="HTTP 401"):
            run_score(clips, candidates, out, judge, FAST_RETRY, progress=False)
    assert list(latest_by_id(out)) == ["v1"]  # 7 calls = all of v1's; nothing half-scored was written


def test_plan_video_sends_one_consistency_call_over_non_empty_candidates():
    clips = {"id": "v", "clips": [{"start": 0, "end": 2, "caption": "c"}]}
    record = {"id": "v", "prompt": "P", "candidates": [{"text": "a"}, {"text": " "}, {"text": "b"}]}
    plan = plan_video(clips, record)
    kinds = [(r.kind, r.candidate) for r in plan.requests]
    assert kinds == [
        ("hallucination", 0),
        ("harmony", 0),
        ("hallucination", 2),
        ("harmony", 2),
        ("consistency", None),
    ]
    assert plan.requests[-1].spec.count == 2 and plan.empty == {1}


# ---------------------------------------------------------------------------------------------------
# The whole pipeline through the CLI: tiny VLM, generated videos, the loopback judge


def cli(command: str) -> int:
    import shlex

    from synpo.cli import main

    return main(shlex.split(command))


def test_cli_end_to_end_with_tiny_models_and_http_judge(tmp_path, capsys, monkeypatch):
    from synpo.pairs.synthetic import write_shapes_video

    monkeypatch.setenv("JUDGE_KEY", SECRET)
    videos = tmp_path / "videos"
    write_shapes_video(videos / "one.mp4", seconds=2.0, seed=0)
    write_shapes_video(videos / "two.mp4", seconds=3.0, seed=1)
    work = tmp_path / "work"
    vlm = "--model tiny --device cpu --no-progress"
    assert (
        cli(f"pairs clips {videos} {vlm} --frames-per-clip 2 --max-new-tokens 6 --out {work}/clips.jsonl")
        == 0
    )
    frames = "--min-frames 2 --max-frames 2"
    command = f"pairs candidates {videos} {vlm} --num-candidates 3 --max-new-tokens 6 {frames}"
    assert cli(f"{command} --out {work}/candidates.jsonl") == 0
    # The judge ranks candidates by a property of their text, so the pipeline's choice is checkable.
    with ChatServer(lambda body, n: ok(fake_judge_answer(body))) as server:
        command = (
            f"pairs score --clips {work}/clips.jsonl --candidates {work}/candidates.jsonl --judge http "
            f"--judge-url {server.url} --judge-model judge-model --api-key-env JUDGE_KEY --concurrency 4 "
            f"--backoff 0.01 --out {work}/scores.jsonl --no-progress"
        )
        assert cli(command) == 0
    assert set(server.auth_headers) == {f"Bearer {SECRET}"}
    assert cli(f"pairs select --scores {work}/scores.jsonl --min-score-gap 0 --out {work}/pairs.jsonl") == 0

    output = capsys.readouterr().out
    assert "clips: 2 ok, 0 failed" in output and "candidates: 2 ok, 0 failed" in output
    assert "score: 2 ok, 0 failed" in output
    candidates = latest_by_id(work / "candidates.jsonl")
    pairs = latest_by_id(work / "pairs.jsonl")
    for vid, pair in pairs.items():
        texts = [c["text"] for c in candidates[vid]["candidates"]]
        scores = [expected_score(t) for t in texts]
        assert pair["chosen"] == texts[scores.index(max(scores))] and pair["chosen_score"] == max(scores)
        assert pair["rejected_score"] == min(scores) and pair["pos_pre"] == pair["chosen"]
        assert (work / pair["video"]).resolve() == (videos / f"{vid}.mp4").resolve()
    distinct = [len({expected_score(c["text"]) for c in r["candidates"]}) > 1 for r in candidates.values()]
    assert len(pairs) == sum(distinct)
    assert all(SECRET not in p.read_text() for p in work.glob("*.jsonl"))

    # Running a stage again with the same settings is a no-op: all ids are done.
    before = {p.name: p.read_bytes() for p in work.glob("*.jsonl")}
    assert (
        cli(f"pairs clips {videos} {vlm} --frames-per-clip 2 --max-new-tokens 6 --out {work}/clips.jsonl")
        == 0
    )
    assert "skipped 2 done" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in work.glob("*.jsonl")} == before
    # With other settings it is refused: the records were made with the old ones.
    assert cli(f"pairs clips {videos} {vlm} --out {work}/clips.jsonl") == 2
    assert "frames_per_clip: 2 -> 8" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in work.glob("*.jsonl")} == before


def test_cli_reports_bad_arguments_clearly(tmp_path, capsys):
    missing = tmp_path / "missing.mp4"
    # A missing file is a failed record; a stage in which nothing succeeded exits 1.
    assert cli(f"pairs clips {missing} --model tiny --device cpu --out {tmp_path}/c.jsonl --no-progress") == 1
    assert "video file not found" in (tmp_path / "c.jsonl").read_text()
    (tmp_path / "empty").mkdir()
    assert cli(f"pairs clips {tmp_path}/empty --model tiny --out {tmp_path}/d.jsonl") == 2
    assert "error: videos: no video files" in capsys.readouterr().err
    command = f"pairs score --clips c --candidates k --judge http --judge-model m --out {tmp_path}/s.jsonl"
    assert cli(command) == 2 and "--judge-url" in capsys.readouterr().err
    assert cli(f"pairs select --scores {tmp_path}/none.jsonl --out {tmp_path}/p.jsonl") == 2
    assert "JSONL file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli("pairs candidates x.mp4 --model tiny --top-k -1 --out o.jsonl")
