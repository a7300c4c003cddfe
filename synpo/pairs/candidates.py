"""Stage 2: K whole-video candidate descriptions per video, each with a sampled refinement pass.

The video is shown as ``clamp(round(duration * 0.5 fps), 8, 16)`` uniform frames, sampled by
:func:`~synpo.video.sample_video`, the sampler training uses too. K drafts are sampled
(upstream: K=10, temperature 0.9, top_p 0.95, top_k 32) for :data:`~synpo.pairs.prompts.VIDEO_CAPTION`,
then each draft goes through a sampled retrospective refinement
(:data:`~synpo.pairs.prompts.VIDEO_REFINE`). ``contrastive`` switches both passes to contrastive
decoding over the frames.

Sampling is seeded per video from ``seed`` and the video id, so a resumed run produces the same
candidates as an uninterrupted one, whatever order the videos come in.

Record (one per video)::

    {"id", "video", "status": "ok", "prompt", "duration", "frame_times",
     "candidates": [{"index", "draft", "text"}], "settings": {...}}

``text`` is the refined candidate (the draft when refinement is off or came back empty); ``prompt`` is
the instruction the candidates answer, which becomes the training pairs' prompt.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from synpo.pairs import prompts
from synpo.pairs.io import STATUS_OK, VideoItem, video_fields
from synpo.pairs.runner import item_stage
from synpo.pairs.vlm import Contrastive, Sampling, VideoCaptioner
from synpo.video import (
    DEFAULT_MAX_VIDEO_FRAMES,
    DEFAULT_MIN_VIDEO_FRAMES,
    DEFAULT_VIDEO_FPS,
    sample_video,
    video_frame_count,
)

UPSTREAM_SAMPLING = Sampling(do_sample=True, temperature=0.9, top_p=0.95, top_k=32, max_new_tokens=1024)


@dataclass(frozen=True)
class CandidateSettings:
    num_candidates: int = 10
    sampling: Sampling = UPSTREAM_SAMPLING
    contrastive: Contrastive | None = None
    refine: bool = True
    fps: float = DEFAULT_VIDEO_FPS
    min_frames: int = DEFAULT_MIN_VIDEO_FRAMES
    max_frames: int = DEFAULT_MAX_VIDEO_FRAMES
    max_side: int | None = None
    seed: int = 0
    instruction: str = prompts.VIDEO_CAPTION

    def __post_init__(self):
        if not isinstance(self.num_candidates, int) or self.num_candidates < 2:
            raise ValueError(
                f"num_candidates must be an int >= 2 (a pair needs two), got {self.num_candidates!r}"
            )
        if not self.sampling.do_sample:
            raise ValueError(
                "candidates need sampling (do_sample=True): greedy decoding gives K identical texts"
            )
        if not self.instruction.strip():
            raise ValueError("instruction must not be empty")
        video_frame_count(1.0, fps=self.fps, min_frames=self.min_frames, max_frames=self.max_frames)

    def to_dict(self) -> dict:
        return {
            "num_candidates": self.num_candidates,
            "sampling": self.sampling.to_dict(),
            "decoding": "contrastive" if self.contrastive else "sample",
            "contrastive": self.contrastive.to_dict() if self.contrastive else None,
            "refine": self.refine,
            "fps": self.fps,
            "min_frames": self.min_frames,
            "max_frames": self.max_frames,
            "seed": self.seed,
        }


def video_seed(seed: int, video_id: str) -> int:
    """A per-video seed: independent of processing order, so resumed runs match uninterrupted ones."""
    return (seed * 1_000_003 + zlib.crc32(video_id.encode("utf-8"))) % (2**63)


def generate_candidates(captioner: VideoCaptioner, item: VideoItem, settings: CandidateSettings) -> dict:
    sample = sample_video(
        item.video,
        fps=settings.fps,
        min_frames=settings.min_frames,
        max_frames=settings.max_frames,
        max_side=settings.max_side,
    )
    frames = sample.frames
    torch.manual_seed(video_seed(settings.seed, item.id))
    drafts = captioner.generate(
        frames,
        settings.instruction,
        settings.sampling,
        num_return_sequences=settings.num_candidates,
        contrastive=settings.contrastive,
    )
    candidates = []
    for index, draft in enumerate(drafts):
        text = draft
        if settings.refine and draft:
            refine_prompt = prompts.VIDEO_REFINE.format(previous=draft)
            refined = captioner.generate(
                frames, refine_prompt, settings.sampling, contrastive=settings.contrastive
            )[0]
            text = refined or draft
        candidates.append({"index": index, "draft": draft, "text": text})
    return {
        "id": item.id,
        "video": item.video,
        "status": STATUS_OK,
        "prompt": settings.instruction,
        "duration": round(sample.info.duration, 3),
        "frame_times": [round(t, 3) for t in sample.times],
        "candidates": candidates,
        "settings": settings.to_dict(),
    }


run_candidates = item_stage("candidates", generate_candidates, failure_fields=video_fields)
