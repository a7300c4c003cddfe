"""Synthetic test videos: moving coloured shapes encoded with PyAV.

Used by ``scripts/make_sample_video.py`` (the bundled samples under ``synpo/assets/videos/``) and by the
tests, which make their own short videos. The content is deterministic for a seed: a red square sliding
left to right, a blue disc bouncing vertically, a green bar sweeping downwards, over a background whose
brightness changes halfway through (a visible scene change).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def render_frame(t: float, duration: float, width: int, height: int, rng_phase: float) -> np.ndarray:
    """RGB frame (height, width, 3) uint8 of the scene at time ``t`` seconds."""
    progress = t / duration
    # The background switches from dark blue-grey to lighter grey halfway: a visible "scene change".
    background = (30, 30, 50) if progress < 0.5 else (110, 110, 110)
    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[:] = background
    ys, xs = np.mgrid[0:height, 0:width]

    side = max(4, height // 4)
    square_x = int((width - side) * progress)
    square_y = height // 6
    frame[square_y : square_y + side, square_x : square_x + side] = (220, 40, 40)

    radius = max(3, height // 8)
    bounce = abs(np.sin(2 * np.pi * (t / 2.0) + rng_phase))
    disc_x, disc_y = width * 2 // 3, int(radius + (height - 2 * radius) * bounce)
    frame[(xs - disc_x) ** 2 + (ys - disc_y) ** 2 <= radius**2] = (40, 80, 230)

    bar_y = int((height - 3) * ((2 * progress) % 1.0))
    frame[bar_y : bar_y + 3, : width // 3] = (40, 200, 60)
    return frame


def write_shapes_video(
    path: str | Path,
    *,
    seconds: float = 6.0,
    fps: int = 10,
    width: int = 64,
    height: int = 48,
    seed: int = 0,
    codec: str = "libx264",
) -> Path:
    """Write the moving-shapes video to ``path`` and return it."""
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    if fps <= 0:
        raise ValueError(f"fps must be a positive int, got {fps}")
    if width < 16 or height < 16 or width % 2 or height % 2:
        raise ValueError(f"width and height must be even and >= 16 (yuv420p), got {width}x{height}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    phase = float(np.random.default_rng(seed).uniform(0, np.pi))
    n_frames = round(seconds * fps)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            # Single-threaded, no B-frames look-ahead randomness: the bytes are reproducible.
            stream.options = {"crf": "28", "preset": "veryslow", "threads": "1"}
        for index in range(n_frames):
            image = render_frame(index / fps, seconds, width, height, phase)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
