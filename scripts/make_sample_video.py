#!/usr/bin/env python
"""Write a small synthetic video of moving coloured shapes (H.264 in MP4) with PyAV.

The bundled samples under ``synpo/assets/videos/`` were made with::

    python scripts/make_sample_video.py synpo/assets/videos/shapes_short.mp4 --seconds 6 --seed 0
    python scripts/make_sample_video.py synpo/assets/videos/shapes_long.mp4 --seconds 21 --seed 1

(6 s gives the minimum of 2 clips; 21 s gives floor(21 / 10) + 1 = 3.) The scene is described in
``synpo.pairs.synthetic``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from synpo.pairs.synthetic import write_shapes_video


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="output .mp4 path")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--fps", type=int, default=10)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--height", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_shapes_video(
        args.output, seconds=args.seconds, fps=args.fps, width=args.width, height=args.height, seed=args.seed
    )
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
