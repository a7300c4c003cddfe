#!/usr/bin/env python
"""Write the bundled sample preference file ``synpo/assets/sample_pairs.jsonl``.

Deterministic (a fixed seed): video-caption-like scenes, each with a detailed, accurate caption
(chosen) and a short caption with a hallucinated detail (rejected), judge-style scores, and the
prompt a captioning run would use. Most lines use the generic format (``prompt``, ``chosen``,
``rejected``, ``chosen_score``, ``rejected_score``); every fourth uses the upstream SynPO format
(``video_name``, ``pos_pre``, ``neg_pre``, ``pos_score``, ``neg_score``, without a video file on disk,
so ``video_name`` is omitted there). Some pairs have a score gap below 4 and are filtered by the
default ``min_score_gap``.

    python scripts/make_sample_pairs.py                 # rewrites the bundled file
    python scripts/make_sample_pairs.py out.jsonl --pairs 200
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "synpo" / "assets" / "sample_pairs.jsonl"

PROMPTS = (
    "Describe the video in detail.",
    "Please describe what happens in this clip.",
    "Give a detailed, temporally ordered description of the video.",
)
SUBJECTS = (
    ("a man in a blue jacket", "a woman in a red coat"),
    ("a chef in a white uniform", "a waiter in a black vest"),
    ("two children", "an old man"),
    ("a cyclist", "a runner"),
    ("a cat", "a dog"),
    ("a red square", "a green triangle"),
    ("a woman wearing glasses", "a man wearing a hat"),
    ("a group of singers", "a single guitarist"),
)
PLACES = (
    ("a quiet street at dawn", "a busy market at noon"),
    ("a bright kitchen", "a dark garage"),
    ("a green park with tall trees", "a sandy beach"),
    ("a mountain road near a river", "a city highway"),
    ("a sunny room", "a snowy field"),
    ("a dark background", "a white wall"),
)
ACTIONS = (
    ("walks slowly toward the camera", "runs away from the camera"),
    ("opens a door and steps outside", "closes a window"),
    ("picks up a cup of coffee and drinks from it", "throws a ball across the room"),
    ("moves from the left side of the frame to the right", "spins in place"),
    ("sits down at a desk and types on a laptop", "stands up and leaves"),
    ("waves at someone off screen", "reads a book"),
)
ENDINGS = (
    ("Finally, the camera pans to the left and the scene fades to black.", "The video ends abruptly."),
    ("At the end, the lighting becomes softer and the camera stays still.", "Then it starts raining."),
    ("The clip ends with a close-up of the same subject.", "A car explodes in the background."),
)
DETAILS = (
    "The camera remains mostly still, with small movements.",
    "The lighting is soft and the colors are warm.",
    "Steam rises in the background while the subject moves.",
    "A few people pass by in the distance without stopping.",
    "Text appears briefly in the upper left corner of the screen.",
)


def make_pair(rng: random.Random, index: int) -> dict:
    subject, wrong_subject = rng.choice(SUBJECTS)
    place, wrong_place = rng.choice(PLACES)
    action, wrong_action = rng.choice(ACTIONS)
    ending, wrong_ending = rng.choice(ENDINGS)
    details = rng.sample(DETAILS, k=2)
    chosen = (
        f"The video begins with {subject} in {place}. "
        f"First, {subject} {action}. {details[0]} Then, {subject} pauses for a moment. "
        f"{details[1]} {ending}"
    )
    # Rejected: shorter, and with one hallucinated element (subject, place, action or ending).
    kind = rng.randrange(4)
    if kind == 0:
        rejected = f"The video shows {wrong_subject} in {place}, who {action}."
    elif kind == 1:
        rejected = f"The video shows {subject} in {wrong_place}. {subject.capitalize()} {action}."
    elif kind == 2:
        rejected = f"In {place}, {subject} {wrong_action}. {ending}"
    else:
        rejected = f"{subject.capitalize()} {action} in {place}. {wrong_ending}"
    # Judge-style combined scores (max 13.5); about a quarter of pairs fall below the gap of 4.
    chosen_score = round(rng.uniform(9.0, 13.5), 1)
    gap = rng.uniform(1.0, 3.9) if rng.random() < 0.25 else rng.uniform(4.0, 9.0)
    rejected_score = round(max(0.0, chosen_score - gap), 1)
    if chosen_score - rejected_score < 4.0 <= gap:
        rejected_score = round(chosen_score - 4.0, 1)  # rounding must not move a kept pair under the gap
    prompt = rng.choice(PROMPTS)
    if index % 4 == 3:
        return {
            "id": f"sample-{index:03d}",
            "pos_pre": chosen,
            "neg_pre": rejected,
            "pos_score": chosen_score,
            "neg_score": rejected_score,
            "prompt": prompt,
        }
    return {
        "id": f"sample-{index:03d}",
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "chosen_score": chosen_score,
        "rejected_score": rejected_score,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", nargs="?", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--seed", type=int, default=2506)
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error("--pairs must be >= 1")
    rng = random.Random(args.seed)
    records = [make_pair(rng, i) for i in range(args.pairs)]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("".join(json.dumps(r) + "\n" for r in records))
    kept = sum(
        1
        for r in records
        if r.get("chosen_score", r.get("pos_score")) - r.get("rejected_score", r.get("neg_score")) >= 4.0
    )
    print(f"wrote {args.output}: {len(records)} pairs, {kept} with a score gap >= 4")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
