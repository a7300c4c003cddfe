"""Video probing, uniform clip splitting and frame sampling with PyAV.

Sampling follows upstream SynPO: a video is split into ``N = clamp(floor(duration / 10 s) + 1, 2, 16)``
equal clips, each clip is shown to the captioner as 8 frames taken uniformly across it, and the whole
video is shown as ``clamp(round(duration * 0.5 fps), 8, 16)`` uniform frames. "Uniform" means the centre
of each of n equal bins, so the first and last frames are never the (often black) boundary frames.

:func:`sample_video` is the project's one whole-video sampler: the candidates stage captions its frames
and training (:mod:`synpo.data`) shows the model the same frames, so a pair's captions describe exactly
what the trained model sees. It lives below both :mod:`synpo.pairs` and :mod:`synpo.data` so that
neither depends on the other; it imports nothing from ``synpo``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

DEFAULT_CLIP_SECONDS = 10.0
DEFAULT_MIN_CLIPS = 2
DEFAULT_MAX_CLIPS = 16
DEFAULT_CLIP_FRAMES = 8
DEFAULT_VIDEO_FPS = 0.5
DEFAULT_MIN_VIDEO_FRAMES = 8
DEFAULT_MAX_VIDEO_FRAMES = 16

# Forward decoding is cheaper than a seek when the next wanted frame is this close (seconds).
_SEEK_THRESHOLD_S = 2.0


class VideoError(ValueError):
    """A video that cannot be used: missing, unreadable, without a video stream, or empty."""


@dataclass(frozen=True)
class VideoInfo:
    path: str
    duration: float  # seconds
    fps: float
    width: int
    height: int


def _open(path: str | Path):
    path = Path(path)
    if not path.exists():
        raise VideoError(f"video file not found: {path}")
    if not path.is_file():
        raise VideoError(f"video path is not a file: {path}")
    try:
        container = av.open(str(path))
    except av.FFmpegError as exc:
        raise VideoError(f"unreadable video {path}: {exc}") from exc
    if not container.streams.video:
        container.close()
        raise VideoError(f"no video stream in {path}")
    return container


def _stream_duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def probe(path: str | Path) -> VideoInfo:
    """Duration, frame rate and size of the first video stream.

    When the container does not store a duration, the frames are decoded to measure it. Raises
    :class:`VideoError` for a missing, unreadable or empty video.
    """
    container = _open(path)
    try:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        duration = _stream_duration(container, stream)
        if duration is None or duration <= 0:
            last_time, count = None, 0
            try:
                for frame in container.decode(stream):
                    count += 1
                    if frame.time is not None:
                        last_time = frame.time
            except av.FFmpegError as exc:
                raise VideoError(f"unreadable video {path}: {exc}") from exc
            if count == 0:
                raise VideoError(f"video has no decodable frames: {path}")
            frame_period = 1.0 / fps if fps > 0 else 0.0
            duration = (last_time + frame_period) if last_time is not None else count * frame_period
        if duration <= 0:
            raise VideoError(f"video has zero duration: {path}")
        return VideoInfo(
            str(path), float(duration), fps, stream.codec_context.width, stream.codec_context.height
        )
    finally:
        container.close()


def _check_duration(duration: float) -> None:
    if not (duration > 0 and math.isfinite(duration)):
        raise ValueError(f"duration must be positive and finite, got {duration}")


def _clamp_count(count: int, low: int, high: int, low_name: str, high_name: str) -> int:
    """``clamp(count, low, high)`` after checking ``1 <= low <= high`` (a ``ValueError`` naming both)."""
    if not 1 <= low <= high:
        raise ValueError(f"need 1 <= {low_name} <= {high_name}, got {low_name}={low}, {high_name}={high}")
    return min(max(count, low), high)


def clip_count(
    duration: float,
    *,
    clip_seconds: float = DEFAULT_CLIP_SECONDS,
    min_clips: int = DEFAULT_MIN_CLIPS,
    max_clips: int = DEFAULT_MAX_CLIPS,
) -> int:
    """``clamp(floor(duration / clip_seconds) + 1, min_clips, max_clips)`` (upstream: 10 s, 2, 16)."""
    _check_duration(duration)
    if not clip_seconds > 0:
        raise ValueError(f"clip_seconds must be positive, got {clip_seconds}")
    return _clamp_count(
        math.floor(duration / clip_seconds) + 1, min_clips, max_clips, "min_clips", "max_clips"
    )


def clip_bounds(duration: float, n_clips: int) -> list[tuple[float, float]]:
    """``n_clips`` equal, contiguous (start, end) intervals covering [0, duration]."""
    if n_clips < 1:
        raise ValueError(f"n_clips must be >= 1, got {n_clips}")
    edges = [duration * i / n_clips for i in range(n_clips + 1)]
    return list(itertools.pairwise(edges))


def uniform_timestamps(start: float, end: float, n_frames: int) -> list[float]:
    """Centres of ``n_frames`` equal bins of [start, end)."""
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    if not end > start:
        raise ValueError(f"need end > start, got start={start}, end={end}")
    step = (end - start) / n_frames
    return [start + (i + 0.5) * step for i in range(n_frames)]


def video_frame_count(
    duration: float,
    *,
    fps: float = DEFAULT_VIDEO_FPS,
    min_frames: int = DEFAULT_MIN_VIDEO_FRAMES,
    max_frames: int = DEFAULT_MAX_VIDEO_FRAMES,
) -> int:
    """Frames for a whole-video view: ``clamp(round(duration * fps), min_frames, max_frames)``."""
    _check_duration(duration)
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return _clamp_count(round(duration * fps), min_frames, max_frames, "min_frames", "max_frames")


@dataclass(frozen=True)
class VideoSample:
    """A whole-video view: the probed video, the chosen times (seconds) and the RGB frames shown then."""

    info: VideoInfo
    times: list[float]
    frames: list[np.ndarray]  # uint8 (H, W, 3), one per time


def sample_video(
    path: str | Path,
    *,
    fps: float = DEFAULT_VIDEO_FPS,
    min_frames: int = DEFAULT_MIN_VIDEO_FRAMES,
    max_frames: int = DEFAULT_MAX_VIDEO_FRAMES,
    max_side: int | None = None,
) -> VideoSample:
    """The frames of a whole video, as shown to the captioner (candidates) and to the trained model.

    Rule: ``n = clamp(round(duration * fps), min_frames, max_frames)`` times at the centres of n equal
    bins of [0, duration) (Python's ``round``: halves go to the even number), and at each time the last
    frame shown at or before it. Raises :class:`VideoError` for a missing, unreadable or empty video.
    """
    info = probe(path)
    n_frames = video_frame_count(info.duration, fps=fps, min_frames=min_frames, max_frames=max_frames)
    times = uniform_timestamps(0.0, info.duration, n_frames)
    return VideoSample(info, times, read_frames(path, times, max_side=max_side))


def read_frames(
    path: str | Path, timestamps: list[float], *, max_side: int | None = None
) -> list[np.ndarray]:
    """RGB uint8 frames (H, W, 3) shown at each of ``timestamps`` (seconds), in the given order.

    The frame shown at time t is the last frame whose presentation time is <= t (the first frame for t
    before it). Timestamps past the end give the last frame. Decoding moves forward and seeks only when
    the next wanted time is far ahead, so sampling a long video does not decode all of it.
    ``max_side`` downscales frames (aspect kept) so that long, high-resolution videos stay cheap in memory.
    """
    if not timestamps:
        raise ValueError("timestamps must not be empty")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be positive, got {max_side}")
    order = sorted(range(len(timestamps)), key=lambda i: timestamps[i])
    result: list[np.ndarray | None] = [None] * len(timestamps)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = _decode_at(container, stream, [timestamps[i] for i in order], path)
    finally:
        container.close()
    for index, frame in zip(order, frames):
        result[index] = _to_rgb(frame, max_side)
    return result  # type: ignore[return-value]


def _decode_at(container, stream, sorted_times: list[float], path) -> list:
    picked: list = []
    state = {"decoder": None}
    previous = None  # last decoded frame shown at or before the current target
    pending = None  # a decoded frame later than the last target, kept for the next one

    def restart(at: float) -> None:
        # Seeking lands on the keyframe at or before `at`; decoding forward from there is exact.
        container.seek(max(0, int(at / stream.time_base)), stream=stream, backward=True, any_frame=False)
        state["decoder"] = container.decode(stream)

    restart(0.0)
    try:
        for target in sorted_times:
            frontier = (
                pending.time if pending is not None else (previous.time if previous is not None else 0.0)
            )
            if frontier is not None and target - frontier > _SEEK_THRESHOLD_S:
                restart(target)
                previous = pending = None
            while True:
                frame = pending if pending is not None else next(state["decoder"], None)
                pending = None
                if frame is None:
                    break  # end of stream: later targets get the last frame
                if frame.time is None or frame.time <= target:
                    previous = frame
                    continue
                pending = frame
                break
            shown = previous if previous is not None else pending  # target before the first frame
            if shown is None:
                raise VideoError(f"video has no decodable frames: {path}")
            picked.append(shown)
    except av.FFmpegError as exc:
        raise VideoError(f"unreadable video {path}: {exc}") from exc
    return picked


def _to_rgb(frame, max_side: int | None) -> np.ndarray:
    if max_side is not None and max(frame.width, frame.height) > max_side:
        scale = max_side / max(frame.width, frame.height)
        width = max(2, round(frame.width * scale))
        height = max(2, round(frame.height * scale))
        return frame.to_ndarray(format="rgb24", width=width, height=height)
    return frame.to_ndarray(format="rgb24")
