"""Media of a preference pair: videos are checked and sampled by THE frame sampler,
:func:`synpo.video.sample_video` (so training sees the frames the pairs pipeline captioned);
images are read with PIL. Failures are :class:`~synpo.data.records.DataError`."""

from __future__ import annotations

import os
from collections.abc import Sequence

from synpo.data.records import DataError, PreferenceExample

__all__ = ["check_video", "example_frames", "load_images"]


def check_video(path: str | os.PathLike) -> None:
    """Open and probe a video up front; :class:`DataError` if unusable."""
    from synpo.video import VideoError, probe

    try:
        probe(path)
    except VideoError as exc:
        raise DataError(f"cannot open video: {exc}") from exc


def load_images(paths: Sequence[str]) -> list:
    """The images at ``paths`` as RGB PIL images; :class:`DataError` naming the unreadable one."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"{path}: cannot read image ({exc})") from exc
    return images


def example_frames(example: PreferenceExample, *, fps: float, min_frames: int, max_frames: int) -> list:
    """What the model sees of ``example``: its video's sampled frames (RGB arrays) or its images."""
    if example.video is not None:
        from synpo.video import VideoError, sample_video

        try:
            sample = sample_video(example.video, fps=fps, min_frames=min_frames, max_frames=max_frames)
        except VideoError as exc:
            raise DataError(f"cannot decode video: {exc}") from exc
        return sample.frames
    return load_images(example.images)
