"""Preference data, from JSONL records to training batches.

Pipeline: :func:`read_preference_jsonl` (``records``: both record formats, the ``min_score_gap``
filter, malformed lines reported as ``file:line``) -> :class:`PairEncoder` (``encode``: chat template
or a plain Vicuna-style one, truncation counted; video frames from ``media``) ->
:class:`PreferenceDataset` -> :class:`PairBatchPlan` (the deterministic, resumable order of
micro-batches per rank) -> :class:`PreferenceCollator` (``batching``: ``[chosen; rejected]`` rows,
padded or packed, plus the response windows the fused loss reads).
"""

from synpo.data.batching import (
    IGNORE_INDEX,
    PairBatchPlan,
    PreferenceCollator,
    PreferenceDataset,
    response_windows,
)
from synpo.data.encode import PLAIN_SYSTEM_PROMPT, EncodedPair, EncodeStats, PairEncoder
from synpo.data.records import (
    DEFAULT_PROMPT,
    SAMPLE_PAIRS_PATH,
    DataError,
    PreferenceExample,
    ReadReport,
    read_preference_jsonl,
    split_eval_examples,
)

__all__ = [
    "DEFAULT_PROMPT",
    "IGNORE_INDEX",
    "PLAIN_SYSTEM_PROMPT",
    "SAMPLE_PAIRS_PATH",
    "DataError",
    "EncodeStats",
    "EncodedPair",
    "PairBatchPlan",
    "PairEncoder",
    "PreferenceCollator",
    "PreferenceDataset",
    "PreferenceExample",
    "ReadReport",
    "read_preference_jsonl",
    "response_windows",
    "split_eval_examples",
]
