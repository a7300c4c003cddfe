"""Prompt templates of the preference-pair pipeline (written for this project after SynPO's recipe).

Captioning prompts (sent with the frames, through the model's own chat template):

- :data:`CLIP_CAPTION` — a clip, described stating only what is certain (upstream: greedy, 800 tokens).
- :data:`CLIP_REFINE` — the self-retrospective pass: the same clip plus the previous description, asking
  for an enhanced, more accurate, more temporally ordered one.
- :data:`VIDEO_CAPTION` — the whole-video instruction for candidates; it is also the ``prompt`` of the
  training pairs, so the policy is trained on the instruction it will be asked.
- :data:`VIDEO_REFINE` — the sampled retrospective pass over each candidate.

Judge prompts (text only, temperature 0). Each asks for one JSON object and nothing else; the answer is
parsed strictly by :mod:`synpo.pairs.judge`:

- :data:`HALLUCINATION` — 0-5 against the clip captions (the judge never sees the video).
- :data:`HARMONY` — 0-5: follows the instruction, natural video language, no subjective judgement.
- :data:`CONSISTENCY` — 0-3 for each of the K candidates of a video, in one call over all of them.

Templates use ``str.format`` fields; literal braces are doubled.
"""

from __future__ import annotations

CLIP_CAPTION = (
    "Describe this video clip in detail. Cover the people, animals and objects, their appearance, their "
    "actions and movements, the setting, and any text on screen, in the order events happen. "
    "State only what you can see with certainty; do not guess or invent anything that is not clearly "
    "visible."
)

CLIP_REFINE = (
    "Here is a previous description of this video clip:\n\n{previous}\n\n"
    "Watch the clip again and write an enhanced description. Correct anything that is not actually "
    "shown, add visible details that were missed, and describe the events in the order they happen, "
    "making changes over time explicit. State only what you can see with certainty. Reply with the new "
    "description only."
)

VIDEO_CAPTION = (
    "Describe this video in detail, from beginning to end. Cover the people, animals and objects, "
    "their appearance, actions and movements, the setting, camera movement, scene changes and any text "
    "on screen, in the order events happen."
)

VIDEO_REFINE = (
    "Here is a description of this video:\n\n{previous}\n\n"
    "Watch the video again and write an improved description: remove anything that is not actually "
    "shown, add details that were missed, and describe the events in their temporal order. Reply with "
    "the new description only."
)

JUDGE_SYSTEM = (
    "You are a meticulous, impartial evaluator of video descriptions. You follow the scoring rules "
    "exactly and answer with a single JSON object, with no other text before or after it."
)

HALLUCINATION = (
    "A video was split into consecutive clips. Reliable descriptions of the clips, in order:\n\n"
    "{clips}\n\n"
    "Candidate description of the whole video:\n\n{candidate}\n\n"
    "Score how free the candidate is of hallucination, using the clip descriptions as the only ground "
    "truth. A hallucination is an object, attribute, action, count, text or event that the clip "
    "descriptions do not support, or that contradicts them, including a wrong order of events. "
    "Omitting details is not a hallucination.\n"
    "5 = no hallucination; 4 = one minor unsupported detail; 3 = a few minor or one notable "
    "hallucination; 2 = several hallucinations; 1 = many hallucinations; 0 = mostly hallucinated or "
    "unrelated to the video.\n\n"
    'Answer with exactly one JSON object: {{"hallucination": <integer 0-5>}}'
)

HARMONY = (
    "Instruction given to a video captioning model:\n\n{instruction}\n\n"
    "The model's answer:\n\n{candidate}\n\n"
    "Score how well the answer is written as a response to the instruction, regardless of factual "
    "accuracy: it follows the instruction, reads as a natural, fluent description of a video, stays "
    "objective (no opinions, emotions or value judgements of its own such as 'beautiful' or "
    "'interesting', no speculation), and is free of repetition, lists of unrelated fragments or text "
    "about being a model.\n"
    "5 = excellent on all points; 4 = one small flaw; 3 = a few flaws; 2 = clearly flawed; 1 = barely "
    "usable; 0 = not a description of a video.\n\n"
    'Answer with exactly one JSON object: {{"harmony": <integer 0-5>}}'
)

CONSISTENCY = (
    "Several independent descriptions of the same video follow, numbered from 1 to {count}:\n\n"
    "{candidates}\n\n"
    "Score each description's self-consistency with the others: details that most descriptions agree on "
    "are probably true, details that only one description states, or that others contradict, are "
    "probably not.\n"
    "3 = agrees with the consensus throughout; 2 = a few claims no other description supports; "
    "1 = many unsupported or contradicted claims; 0 = contradicts the consensus.\n\n"
    "Answer with exactly one JSON object whose list holds {count} integers from 0 to 3, the score of "
    'description 1 first: {{"consistency": [<score of 1>, ..., <score of {count}>]}}'
)


def format_clip_captions(clips: list[dict]) -> str:
    """``Clip 1 (0.0-10.0 s): caption`` lines, one paragraph per clip."""
    return "\n\n".join(
        f"Clip {i} ({clip['start']:.1f}-{clip['end']:.1f} s): {clip['caption'].strip()}"
        for i, clip in enumerate(clips, start=1)
    )


def format_candidates(candidates: list[str]) -> str:
    return "\n\n".join(f"Description {i}:\n{text.strip()}" for i, text in enumerate(candidates, start=1))
