"""Stage 1: split each video into uniform clips and caption each, with a self-retrospective pass.

Per video: ``N = clamp(floor(duration / 10 s) + 1, 2, 16)`` equal clips; each clip is shown as 8 uniform
frames and described greedily (:data:`~synpo.pairs.prompts.CLIP_CAPTION`: only what is certain); then
the clip is shown again with that description and the model writes an enhanced, more accurate, more
temporal one (:data:`~synpo.pairs.prompts.CLIP_REFINE`). The refined captions are the judge's ground
truth for hallucination.

Record (one per video)::

    {"id", "video", "status": "ok", "duration", "clips": [{"index", "start", "end", "frame_times",
     "draft", "caption"}], "settings": {...}}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from synpo.pairs import prompts
from synpo.pairs.io import STATUS_OK, VideoItem, video_fields
from synpo.pairs.runner import RecordError, item_stage
from synpo.pairs.vlm import VideoCaptioner, greedy
from synpo.video import (
    DEFAULT_CLIP_FRAMES,
    DEFAULT_CLIP_SECONDS,
    DEFAULT_MAX_CLIPS,
    DEFAULT_MIN_CLIPS,
    clip_bounds,
    clip_count,
    probe,
    read_frames,
    uniform_timestamps,
)


@dataclass(frozen=True)
class ClipSettings:
    clip_seconds: float = DEFAULT_CLIP_SECONDS
    min_clips: int = DEFAULT_MIN_CLIPS
    max_clips: int = DEFAULT_MAX_CLIPS
    frames_per_clip: int = DEFAULT_CLIP_FRAMES
    max_new_tokens: int = 800
    refine: bool = True
    max_side: int | None = None

    def __post_init__(self):
        if not isinstance(self.frames_per_clip, int) or self.frames_per_clip < 1:
            raise ValueError(f"frames_per_clip must be a positive int, got {self.frames_per_clip!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        clip_count(1.0, clip_seconds=self.clip_seconds, min_clips=self.min_clips, max_clips=self.max_clips)


def caption_video_clips(captioner: VideoCaptioner, item: VideoItem, settings: ClipSettings) -> dict:
    info = probe(item.video)
    n_clips = clip_count(
        info.duration,
        clip_seconds=settings.clip_seconds,
        min_clips=settings.min_clips,
        max_clips=settings.max_clips,
    )
    decoding = greedy(settings.max_new_tokens)
    clips = []
    for index, (start, end) in enumerate(clip_bounds(info.duration, n_clips)):
        times = uniform_timestamps(start, end, settings.frames_per_clip)
        frames = read_frames(item.video, times, max_side=settings.max_side)
        draft = captioner.generate(frames, prompts.CLIP_CAPTION, decoding)[0]
        if not draft:
            raise RecordError(
                f"clip {index + 1}/{n_clips} ({start:.1f}-{end:.1f} s): the model gave an empty caption"
            )
        caption = draft
        if settings.refine:
            refined = captioner.generate(frames, prompts.CLIP_REFINE.format(previous=draft), decoding)[0]
            # An empty refinement adds nothing; the draft is still a valid, certain description.
            caption = refined or draft
        clips.append(
            {
                "index": index,
                "start": round(start, 3),
                "end": round(end, 3),
                "frame_times": [round(t, 3) for t in times],
                "draft": draft,
                "caption": caption,
            }
        )
    return {
        "id": item.id,
        "video": item.video,
        "status": STATUS_OK,
        "duration": round(info.duration, 3),
        "clips": clips,
        "settings": asdict(settings),
    }


run_clips = item_stage("clips", caption_video_clips, failure_fields=video_fields)
