"""Video probing, clip splitting, frame sampling (PyAV) and the list of input videos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from synpo import video
from synpo.pairs.io import resolve_videos
from synpo.pairs.synthetic import render_frame, write_shapes_video

SAMPLES = Path(__file__).resolve().parents[1] / "synpo" / "assets" / "videos"


@pytest.fixture(scope="module")
def short_video(tmp_path_factory) -> Path:
    return write_shapes_video(tmp_path_factory.mktemp("videos") / "short.mp4", seconds=3.0, fps=10, seed=3)


@pytest.mark.parametrize(
    "duration, expected",
    [(0.5, 2), (9.99, 2), (10.0, 2), (19.9, 2), (20.0, 3), (21.0, 3), (59.0, 6), (150.0, 16), (1000.0, 16)],
)
def test_clip_count_upstream_rule(duration, expected):
    assert video.clip_count(duration) == expected


def test_clip_count_rejects_bad_arguments():
    with pytest.raises(ValueError, match="duration"):
        video.clip_count(0.0)
    with pytest.raises(ValueError, match="min_clips <= max_clips, got min_clips=4, max_clips=3"):
        video.clip_count(5.0, min_clips=4, max_clips=3)
    with pytest.raises(ValueError, match="duration must be positive and finite"):
        video.clip_count(float("inf"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"duration": 10.0, "min_frames": 0}, "1 <= min_frames <= max_frames, got min_frames=0"),
        ({"duration": 10.0, "min_frames": 9, "max_frames": 8}, "got min_frames=9, max_frames=8"),
        ({"duration": 10.0, "fps": 0.0}, "fps must be positive"),
        ({"duration": float("nan")}, "duration must be positive and finite"),
        ({"duration": -1.0}, "duration must be positive and finite"),
    ],
)
def test_video_frame_count_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        video.video_frame_count(**kwargs)


def test_clip_bounds_and_uniform_timestamps():
    bounds = video.clip_bounds(21.0, 3)
    assert bounds == [(0.0, 7.0), (7.0, 14.0), (14.0, 21.0)]
    times = video.uniform_timestamps(7.0, 14.0, 8)
    assert len(times) == 8 and times[0] == pytest.approx(7.4375) and times[-1] == pytest.approx(13.5625)
    assert times == sorted(set(times))
    with pytest.raises(ValueError, match="n_frames"):
        video.uniform_timestamps(0, 1, 0)


@pytest.mark.parametrize("duration, expected", [(2.0, 8), (16.0, 8), (20.0, 10), (31.0, 16), (600.0, 16)])
def test_video_frame_count_half_fps_clamped(duration, expected):
    assert video.video_frame_count(duration) == expected


def test_probe_bundled_samples():
    short = video.probe(SAMPLES / "shapes_short.mp4")
    long = video.probe(SAMPLES / "shapes_long.mp4")
    assert (short.duration, short.width, short.height, short.fps) == (6.0, 64, 48, 10.0)
    assert long.duration == pytest.approx(21.0)
    assert video.clip_count(short.duration) == 2 and video.clip_count(long.duration) == 3
    # Bundled samples stay small: they ship inside the wheel.
    assert all(p.stat().st_size < 64_000 for p in SAMPLES.glob("*.mp4"))


def test_sample_video_script_is_reproducible(tmp_path):
    # Compares what a viewer sees, never the encoder's bytes (they change between PyAV releases and
    # even between calls): same frame count and size, and every frame within a lossy-codec tolerance.
    fresh = write_shapes_video(tmp_path / "a.mp4", seconds=6, seed=0)
    bundled = SAMPLES / "shapes_short.mp4"
    info_fresh, info_bundled = video.probe(fresh), video.probe(bundled)
    assert (info_fresh.duration, info_fresh.width, info_fresh.height, info_fresh.fps) == (
        info_bundled.duration,
        info_bundled.width,
        info_bundled.height,
        info_bundled.fps,
    )
    times = [i / info_bundled.fps for i in range(round(info_bundled.duration * info_bundled.fps))]
    frames_fresh = video.read_frames(fresh, times)
    frames_bundled = video.read_frames(bundled, times)
    assert len(frames_fresh) == len(frames_bundled) == 60
    for t, a, b in zip(times, frames_fresh, frames_bundled):
        assert a.shape == b.shape == (48, 64, 3)
        error = np.abs(a.astype(float) - b.astype(float)).mean()
        assert error < 3.0, (t, error)  # lossy codec: small (~0.5 on average), not zero
    # The tolerance tells a different scene (another seed) apart: ~5 on average there.
    other = video.read_frames(write_shapes_video(tmp_path / "b.mp4", seconds=6, seed=1), times)
    errors = [np.abs(a.astype(float) - b.astype(float)).mean() for a, b in zip(other, frames_bundled)]
    assert np.mean(errors) > 3.0


def test_read_frames_shows_the_frame_at_each_time(short_video):
    info = video.probe(short_video)
    phase = float(np.random.default_rng(3).uniform(0, np.pi))
    times = [0.05, 1.23, 2.96, 0.5]  # unsorted on purpose: results come back in the given order
    frames = video.read_frames(short_video, times)
    assert [f.shape for f in frames] == [(48, 64, 3)] * 4 and frames[0].dtype == np.uint8
    for t, frame in zip(times, frames):
        shown = np.floor(t * 10) / 10  # the last frame at or before t (10 fps)
        error_here = np.abs(frame.astype(float) - render_frame(shown, info.duration, 64, 48, phase)).mean()
        error_next = np.abs(
            frame.astype(float) - render_frame(shown + 0.1, info.duration, 64, 48, phase)
        ).mean()
        assert error_here < 8.0, (t, error_here)  # lossy codec: small, not zero
        assert error_here < error_next, t


def test_read_frames_past_the_end_and_resized(short_video):
    last = video.read_frames(short_video, [2.95])[0]
    beyond = video.read_frames(short_video, [100.0])[0]
    assert np.array_equal(last, beyond)
    small = video.read_frames(short_video, [1.0], max_side=32)[0]
    assert small.shape == (24, 32, 3)


def test_read_frames_seeks_in_long_video():
    path = SAMPLES / "shapes_long.mp4"
    times = video.uniform_timestamps(0, 21.0, 8)  # 2.6 s apart: beyond the forward-decode threshold
    together = video.read_frames(path, times)
    one_by_one = [video.read_frames(path, [t])[0] for t in times]
    assert all(np.array_equal(a, b) for a, b in zip(together, one_by_one))


def test_missing_and_unreadable_videos_raise_video_error(tmp_path):
    with pytest.raises(video.VideoError, match="not found"):
        video.probe(tmp_path / "nope.mp4")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video" * 50)
    with pytest.raises(video.VideoError, match="unreadable"):
        video.probe(garbage)
    with pytest.raises(video.VideoError, match="not found"):
        video.read_frames(tmp_path / "nope.mp4", [0.0])
    with pytest.raises(ValueError, match="timestamps"):
        video.read_frames(SAMPLES / "shapes_short.mp4", [])


def test_resolve_videos_from_folder_files_and_manifest(tmp_path):
    (tmp_path / "cooking").mkdir()
    a = write_shapes_video(tmp_path / "cooking" / "egg.mp4", seconds=1)
    b = write_shapes_video(tmp_path / "walk.mp4", seconds=1)
    (tmp_path / "notes.txt").write_text("not a video")
    items = resolve_videos([tmp_path])
    assert [(i.id, i.video) for i in items] == [("cooking/egg", str(a)), ("walk", str(b))]
    manifest = tmp_path / "list.jsonl"
    manifest.write_text(
        json.dumps({"id": "custom", "video": "walk.mp4"}) + "\n" + json.dumps({"video": "missing.mp4"}) + "\n"
    )
    items = resolve_videos([], manifest)
    assert [(i.id, Path(i.video).name) for i in items] == [("custom", "walk.mp4"), ("missing", "missing.mp4")]
    assert Path(items[0].video).is_absolute()
    with pytest.raises(ValueError, match="duplicate id 'walk'"):
        resolve_videos([b, tmp_path / "other" / "walk.mp4"])
    with pytest.raises(ValueError, match="at least one"):
        resolve_videos([])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: needs a non-empty string 'video'"):
        resolve_videos([], bad)
