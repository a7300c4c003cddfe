"""Clip captions and candidates from the tiny random VLM on generated videos; contrastive decoding;
resuming after an interruption (in-process and a real killed process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from synpo import tiny
from synpo.pairs import prompts
from synpo.pairs.candidates import CandidateSettings, generate_candidates, run_candidates, video_seed
from synpo.pairs.clips import ClipSettings, run_clips
from synpo.pairs.io import VideoItem, latest_by_id, load_progress, read_records
from synpo.pairs.synthetic import write_shapes_video
from synpo.pairs.vlm import Contrastive, FrameContrastLogitsProcessor, Sampling, VideoCaptioner, greedy
from synpo.video import read_frames

SAMPLING = Sampling(do_sample=True, temperature=0.9, top_p=0.95, top_k=32, max_new_tokens=8)
FAST_CANDIDATES = CandidateSettings(num_candidates=3, sampling=SAMPLING, min_frames=2, max_frames=4, seed=5)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def captioner():
    model, processor = tiny.build_tiny_vlm(seed=0)
    return VideoCaptioner(model, processor)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    return {
        "a": write_shapes_video(root / "a.mp4", seconds=3.0, seed=0),
        "b": write_shapes_video(root / "b.mp4", seconds=2.0, seed=1),
        "c": write_shapes_video(root / "c.mp4", seconds=2.5, seed=2),
    }


def items_for(videos, *names) -> list[VideoItem]:
    return [VideoItem(name, str(videos[name])) for name in names]


def test_captioner_builds_chat_inputs_with_one_image_per_frame(captioner, videos):
    frames = read_frames(videos["a"], [0.1, 1.0, 2.0])
    inputs = captioner.build_inputs(frames, "Describe the clip.")
    assert captioner.frames_as == "images"
    assert (inputs["input_ids"] == captioner.model.config.image_token_id).sum().item() == 3 * 16
    assert inputs["pixel_values"].shape[0] == 3
    with pytest.raises(ValueError, match="frames"):
        captioner.build_inputs([], "x")
    with pytest.raises(ValueError, match="instruction"):
        captioner.build_inputs(frames, "  ")


def test_sampling_rejects_bad_settings():
    with pytest.raises(ValueError, match="top_p"):
        Sampling(do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Sampling(max_new_tokens=0)
    with pytest.raises(ValueError, match="weak_fraction"):
        Contrastive(weak_fraction=1.0)
    with pytest.raises(ValueError, match="num_candidates"):
        CandidateSettings(num_candidates=1)
    with pytest.raises(ValueError, match="sampling"):
        CandidateSettings(sampling=greedy(8))


@pytest.mark.parametrize("n_frames, expected", [(2, [0]), (3, [1]), (8, [2, 4, 5]), (16, [2, 5, 8, 10, 12])])
def test_contrastive_weak_frames_are_a_spread_third(n_frames, expected):
    assert Contrastive().weak_indices(n_frames) == expected


def test_contrastive_processor_matches_uncached_formula(captioner, videos):
    model = captioner.model
    frames = read_frames(videos["a"], [0.2, 0.8, 1.4, 2.0, 2.6, 2.9])
    strong = captioner.build_inputs(frames, "Describe.")
    weak = captioner.build_inputs([frames[i] for i in Contrastive().weak_indices(6)], "Describe.")
    processor = FrameContrastLogitsProcessor(
        model, weak, prompt_length=strong["input_ids"].shape[1], strong_weight=1.5, weak_weight=0.5
    )
    with torch.no_grad():
        sequence = strong["input_ids"]
        for _ in range(3):
            scores = model(
                pixel_values=strong["pixel_values"],
                input_ids=sequence,
                attention_mask=torch.ones_like(sequence),
            ).logits[:, -1]
            mixed = processor(sequence, scores)
            # Reference without any cache: the weak prompt plus everything generated so far.
            generated = sequence[:, strong["input_ids"].shape[1] :]
            weak_ids = torch.cat([weak["input_ids"], generated], dim=1)
            reference_weak = model(
                pixel_values=weak["pixel_values"],
                input_ids=weak_ids,
                attention_mask=torch.ones_like(weak_ids),
            ).logits[:, -1]
            torch.testing.assert_close(mixed, 1.5 * scores - 0.5 * reference_weak, rtol=1e-4, atol=1e-4)
            sequence = torch.cat([sequence, mixed.argmax(-1, keepdim=True)], dim=1)
        assert processor._consumed == 2  # tokens fed incrementally to the weak context's cache


def test_contrastive_with_unit_weights_equals_plain_sampling(captioner, videos):
    frames = read_frames(videos["a"], [0.3, 1.0, 1.7, 2.4])
    torch.manual_seed(11)
    plain = captioner.generate(frames, "Describe.", SAMPLING)
    torch.manual_seed(11)
    neutral = captioner.generate(frames, "Describe.", SAMPLING, contrastive=Contrastive(1.0, 0.0))
    assert plain == neutral  # same tokens: the warpers run once, after the contrast, in generate's order
    torch.manual_seed(11)
    contrasted = captioner.generate(frames, "Describe.", greedy(12), contrastive=Contrastive())
    assert contrasted != captioner.generate(frames, "Describe.", greedy(12))


def test_clips_stage_records(captioner, videos, tmp_path):
    out = tmp_path / "clips.jsonl"
    settings = ClipSettings(frames_per_clip=2, max_new_tokens=6)
    summary = run_clips(items_for(videos, "a"), captioner, out, settings, progress=False)
    assert (summary.ok, summary.failed) == (1, 0)
    record = latest_by_id(out)["a"]
    assert record["status"] == "ok" and record["duration"] == 3.0 and record["video"] == str(videos["a"])
    clips = record["clips"]
    assert [(c["start"], c["end"]) for c in clips] == [(0.0, 1.5), (1.5, 3.0)]
    assert clips[1]["frame_times"] == [1.875, 2.625]
    assert all(c["caption"] and c["draft"] for c in clips)
    assert record["settings"]["frames_per_clip"] == 2


def test_clips_refinement_pass_sees_the_draft(captioner, videos, tmp_path):
    seen = []
    original = captioner.generate

    def spy(frames, instruction, sampling, **kwargs):
        seen.append((len(frames), instruction, sampling.do_sample))
        return original(frames, instruction, sampling, **kwargs)

    captioner.generate = spy
    try:
        run_clips(
            items_for(videos, "b"),
            captioner,
            tmp_path / "c.jsonl",
            ClipSettings(3, 1, 4, 3, 5),
            progress=False,
        )
    finally:
        del captioner.generate
    record = latest_by_id(tmp_path / "c.jsonl")["b"]
    assert len(record["clips"]) == 1 and len(seen) == 2
    assert seen[0] == (3, prompts.CLIP_CAPTION, False)
    assert (
        seen[1][1] == prompts.CLIP_REFINE.format(previous=record["clips"][0]["draft"]) and seen[1][2] is False
    )


def test_clips_stage_reports_bad_videos(captioner, videos, tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00not a video\x00" * 100)
    items = [VideoItem("gone", str(tmp_path / "gone.mp4")), VideoItem("garbage", str(garbage))]
    summary = run_clips(
        items, captioner, tmp_path / "c.jsonl", ClipSettings(max_new_tokens=4), progress=False
    )
    assert summary.failed == 2
    records = latest_by_id(tmp_path / "c.jsonl")
    assert records["gone"]["status"] == "failed" and records["gone"]["error"].startswith(
        "video file not found"
    )
    assert records["garbage"]["error"].startswith("unreadable video")
    assert records["gone"]["video"] == str(tmp_path / "gone.mp4")


def test_candidates_record_and_refinement(captioner, videos, tmp_path):
    out = tmp_path / "cand.jsonl"
    run_candidates(items_for(videos, "a"), captioner, out, FAST_CANDIDATES, progress=False)
    record = latest_by_id(out)["a"]
    assert record["status"] == "ok" and record["prompt"] == prompts.VIDEO_CAPTION
    assert len(record["frame_times"]) == 2  # clamp(round(3 s * 0.5 fps), 2, 4)
    assert [c["index"] for c in record["candidates"]] == [0, 1, 2]
    assert all(c["text"] and c["draft"] for c in record["candidates"])
    assert record["settings"]["sampling"]["top_k"] == 32 and record["settings"]["decoding"] == "sample"
    # Sampled: the drafts differ from one another.
    assert len({c["draft"] for c in record["candidates"]}) > 1


def test_candidates_are_deterministic_per_video_regardless_of_order(captioner, videos):
    settings = FAST_CANDIDATES
    alone = generate_candidates(captioner, items_for(videos, "b")[0], settings)
    generate_candidates(captioner, items_for(videos, "a")[0], settings)  # consumes RNG in between
    again = generate_candidates(captioner, items_for(videos, "b")[0], settings)
    assert alone["candidates"] == again["candidates"]
    assert video_seed(5, "b") != video_seed(5, "a") and video_seed(5, "b") != video_seed(6, "b")


def test_candidates_contrastive_option(captioner, videos, tmp_path):
    settings = CandidateSettings(
        num_candidates=2,
        sampling=SAMPLING,
        contrastive=Contrastive(),
        refine=False,
        min_frames=3,
        max_frames=3,
    )
    out = tmp_path / "cand.jsonl"
    run_candidates(items_for(videos, "c"), captioner, out, settings, progress=False)
    record = latest_by_id(out)["c"]
    assert (
        record["settings"]["decoding"] == "contrastive"
        and record["settings"]["contrastive"]["strong_weight"] == 1.5
    )
    assert all(c["text"] == c["draft"] for c in record["candidates"])  # refine=False


class Interrupt(BaseException):
    """Stands in for Ctrl-C / a kill arriving while a video is being processed."""


def test_resume_after_interruption_matches_uninterrupted_run(captioner, videos, tmp_path):
    items = items_for(videos, "a", "b", "c")
    reference = tmp_path / "reference.jsonl"
    run_candidates(items, captioner, reference, FAST_CANDIDATES, progress=False)

    out = tmp_path / "resumed.jsonl"
    original = captioner.generate
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # inside the second video (video 1 takes 1 + 3 refinement calls)
            raise Interrupt()
        return original(*args, **kwargs)

    captioner.generate = flaky
    try:
        with pytest.raises(Interrupt):
            run_candidates(items, captioner, out, FAST_CANDIDATES, progress=False)
    finally:
        del captioner.generate
    assert [r["id"] for r in read_records(out)] == ["a"]
    with out.open("a") as handle:  # and a kill in the middle of writing a line
        handle.write('{"id": "b", "status": "ok", "cand')

    done_before = [r["id"] for r in read_records(out)]
    summary = run_candidates(items, captioner, out, FAST_CANDIDATES, progress=False)
    assert done_before == ["a"] and summary.truncated_lines == 1
    assert summary.skipped_done == 1 and summary.ok == 2
    resumed = list(read_records(out))
    assert [r["id"] for r in resumed] == ["a", "b", "c"]
    assert {r["id"]: r for r in resumed} == latest_by_id(reference)


def test_killed_process_resumes_without_redoing_or_losing_work(tmp_path, capsys):
    root = tmp_path / "videos"
    for i in range(6):
        write_shapes_video(root / f"v{i}.mp4", seconds=2.0, seed=i)
    out = tmp_path / "cand.jsonl"
    arguments = (
        f"pairs candidates {root} --model tiny --device cpu --num-candidates 2 --max-new-tokens 24 "
        f"--min-frames 2 --max-frames 2 --out {out} --no-progress"
    ).split()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "synpo", *arguments],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and process.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 1:
                break
            time.sleep(0.01)
        assert process.poll() is None, "the run ended before it could be interrupted"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
        process.stderr.close()
    killed_lines = [json.loads(line) for line in out.read_text().splitlines() if line.endswith("}")]
    assert 1 <= len(killed_lines) < 6
    before = out.read_bytes()
    first_complete = before[: before.index(b"\n") + 1]

    # Resume (in-process: the same CLI entry point, without paying a second interpreter start-up).
    from synpo.cli import main

    assert main(arguments) == 0
    records = list(read_records(out))
    assert sorted(r["id"] for r in records) == [f"v{i}" for i in range(6)]  # each exactly once
    assert out.read_bytes().startswith(first_complete)  # finished work untouched
    assert f"skipped {len(killed_lines)} done" in capsys.readouterr().out
    assert load_progress(out).truncated_lines == 0
