"""One frame sampler for the whole project: training shows the model exactly the frames (same count,
same times, same pixels) that the candidates stage captioned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from synpo import video
from synpo.config import DataConfig
from synpo.data import PairEncoder, PreferenceDataset, PreferenceExample
from synpo.pairs.candidates import CandidateSettings, generate_candidates
from synpo.pairs.io import VideoItem
from synpo.pairs.synthetic import write_shapes_video

DURATIONS = [float(s) for s in range(1, 121)] + [0.4, 2.5, 15.99, 16.5, 19.0, 19.5, 20.49, 20.5, 31.0, 33.3]


class FakeTokenizer:
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 50 for c in text]}


class SpyProcessor:
    """Records the images training hands the processor."""

    image_token = "<image>"

    def __init__(self):
        self.calls: list[list] = []

    def __call__(self, *, text, images, return_tensors):
        self.calls.append(list(images))
        return {"input_ids": torch.ones(1, 8, dtype=torch.long)}


class SpyCaptioner:
    """Records the frames the candidates stage hands the captioner."""

    def __init__(self):
        self.calls: list[list] = []

    def generate(self, frames, instruction, sampling, num_return_sequences=1, contrastive=None):
        self.calls.append(list(frames))
        return [f"caption {i}" for i in range(num_return_sequences)]


def training_encoder(processor) -> PairEncoder:
    """The encoder as the trainer builds it, with the default data config."""
    data = DataConfig()
    return PairEncoder(
        FakeTokenizer(),
        processor,
        template="plain",
        fps=data.fps,
        min_frames=data.min_frames,
        max_frames=data.max_frames,
    )


def candidate_settings() -> CandidateSettings:
    return CandidateSettings(num_candidates=2, refine=False)


def test_training_and_pairs_defaults_agree():
    data, settings = DataConfig(), candidate_settings()
    defaults = (video.DEFAULT_VIDEO_FPS, video.DEFAULT_MIN_VIDEO_FRAMES, video.DEFAULT_MAX_VIDEO_FRAMES)
    assert (data.fps, data.min_frames, data.max_frames) == defaults == (0.5, 8, 16)
    assert (settings.fps, settings.min_frames, settings.max_frames) == defaults


def test_training_and_candidates_choose_the_same_times_for_every_duration(monkeypatch):
    # Probing and decoding are faked so that any duration can be tried: both paths ask the decoder
    # for their times, and the fake records them.
    durations = {f"/videos/{d}s.mp4": d for d in DURATIONS}
    requested: list[list[float]] = []

    def fake_probe(path):
        return video.VideoInfo(str(path), durations[str(path)], 10.0, 4, 4)

    def fake_read_frames(path, timestamps, *, max_side=None):
        requested.append(list(timestamps))
        return [np.full((4, 4, 3), i, dtype=np.uint8) for i in range(len(timestamps))]

    monkeypatch.setattr(video, "probe", fake_probe)
    monkeypatch.setattr(video, "read_frames", fake_read_frames)
    encoder = training_encoder(SpyProcessor())
    settings = candidate_settings()
    counts = {}
    for path, duration in durations.items():
        requested.clear()
        pair = encoder.encode(PreferenceExample("Describe.", "c", "r", video=path), index=0)
        assert pair is not None
        record = generate_candidates(SpyCaptioner(), VideoItem("v", path), settings)
        training_times, candidate_times = requested
        assert training_times == candidate_times, duration
        assert record["frame_times"] == [round(t, 3) for t in training_times]
        assert len(encoder.processor.calls[-1]) == len(training_times)
        step = duration / len(training_times)
        assert training_times == pytest.approx([(i + 0.5) * step for i in range(len(training_times))])
        counts[duration] = len(training_times)
    # clamp(round(duration * 0.5), 8, 16); 19 s used to be 9 frames in training and 10 in the pipeline.
    assert [counts[d] for d in (0.4, 1.0, 16.0, 16.5, 19.0, 19.5, 20.0, 20.49, 20.5, 21.0, 31.0, 120.0)] == [
        8, 8, 8, 8, 10, 10, 10, 10, 10, 10, 16, 16
    ]  # fmt: skip
    assert all(counts[a] <= counts[b] for a, b in zip(sorted(counts), sorted(counts)[1:]))


@pytest.fixture(scope="module")
def short_videos(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("sampling")
    return [
        write_shapes_video(root / "a.mp4", seconds=3.0, fps=10, seed=0),
        write_shapes_video(root / "b.mp4", seconds=2.5, fps=8, seed=1),
        write_shapes_video(root / "c.mp4", seconds=19.0, fps=2, seed=2),  # 19 s: 10 frames
    ]


def test_training_frames_are_pixel_identical_to_candidate_frames(short_videos):
    processor = SpyProcessor()
    examples = [PreferenceExample("Describe.", "c", "r", video=str(p)) for p in short_videos]
    dataset = PreferenceDataset(examples, training_encoder(processor))  # the trainer's data path
    assert dataset.lazy
    for index, path in enumerate(short_videos):
        assert dataset[index] is not None
        training_frames = processor.calls[-1]
        captioner = SpyCaptioner()
        record = generate_candidates(captioner, VideoItem(path.stem, str(path)), candidate_settings())
        candidate_frames = captioner.calls[0]
        assert len(training_frames) == len(candidate_frames) == len(record["frame_times"])
        assert len(training_frames) == (10 if path.stem == "c" else 8)
        for a, b in zip(training_frames, candidate_frames):
            assert isinstance(a, np.ndarray) and a.dtype == np.uint8 and a.shape == (48, 64, 3)
            assert np.array_equal(a, b)
        assert len({f.tobytes() for f in training_frames}) > 1  # real, changing content


def test_sample_video_is_uniform_timestamps_then_read_frames(short_videos):
    path = short_videos[2]
    sample = video.sample_video(path)
    assert sample.info == video.probe(path) and sample.info.duration == pytest.approx(19.0)
    assert sample.times == video.uniform_timestamps(0.0, sample.info.duration, 10)
    expected = video.read_frames(path, sample.times)
    assert all(np.array_equal(a, b) for a, b in zip(sample.frames, expected, strict=True))
    small = video.sample_video(path, min_frames=2, max_frames=4, max_side=32)
    assert len(small.times) == 4 and small.frames[0].shape == (24, 32, 3)
    with pytest.raises(video.VideoError, match="not found"):
        video.sample_video(path.parent / "missing.mp4")
