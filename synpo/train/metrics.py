"""The metric vectors that the training loop and evaluation sum, all-reduce and reduce to logged rows.

Both start with the objective's per-micro-batch sums, laid out as :data:`synpo.objective.METRIC_NAMES`
(sums over pairs; ``pairs`` divides them into means), followed by the loop's (or evaluation's) own
sums, named here once so that no other module addresses the vector by position.
"""

from __future__ import annotations

import torch

from synpo.objective import METRIC_NAMES
from synpo.train.engine import peak_memory_mb

__all__ = [
    "EVAL_LOSS",
    "EVAL_SKIPPED",
    "EVAL_SUMS",
    "FINITE",
    "LOSS",
    "MEAN_METRICS",
    "OBJECTIVE",
    "PAIRS",
    "SKIPPED",
    "STEP_SUMS",
    "TOKENS",
    "step_row",
    "zeros",
]

# The objective's part of either vector, and the pair count in it.
OBJECTIVE = slice(0, len(METRIC_NAMES))
PAIRS = METRIC_NAMES.index("pairs")
# (index, name) of the objective's metrics that are logged as means over pairs, in logging order.
MEAN_METRICS = tuple((i, name) for i, name in enumerate(METRIC_NAMES) if i != PAIRS)

# Per-optimizer-step sums of one rank: the objective's, then the summed loss of the finite
# micro-batches, their number, the tokens seen and the skipped micro-batches.
STEP_SUMS = (*METRIC_NAMES, "loss", "finite_micro_batches", "tokens", "skipped_micro_batches")
LOSS, FINITE, TOKENS, SKIPPED = (STEP_SUMS.index(name) for name in STEP_SUMS[len(METRIC_NAMES) :])

# Evaluation sums: the objective's, then loss x pairs and the skipped micro-batches.
EVAL_SUMS = (*METRIC_NAMES, "loss_x_pairs", "skipped_micro_batches")
EVAL_LOSS, EVAL_SKIPPED = (EVAL_SUMS.index(name) for name in EVAL_SUMS[len(METRIC_NAMES) :])


def zeros(names: tuple[str, ...]) -> torch.Tensor:
    """An all-zero float64 vector laid out as ``names`` (:data:`STEP_SUMS` or :data:`EVAL_SUMS`)."""
    return torch.zeros(len(names), dtype=torch.float64)


def step_row(step, epoch, sums, grad_norm, lr, seconds, counters, device: torch.device) -> dict:
    """The metrics row of optimizer step ``step`` from its all-reduced :data:`STEP_SUMS`."""
    pairs = float(sums[PAIRS])
    finite_micro = float(sums[FINITE])
    tokens = float(sums[TOKENS])
    row = {
        "step": step,
        "epoch": epoch,
        "loss": float(sums[LOSS]) / finite_micro if finite_micro else float("nan"),
    }
    for i, name in MEAN_METRICS:
        row[name] = float(sums[i]) / pairs if pairs else float("nan")
    row.update(
        {
            "grad_norm": grad_norm,
            "lr": lr,
            "pairs": int(pairs),
            "tokens": int(tokens),
            "tokens_per_s": tokens / seconds if seconds > 0 else None,
            "step_time_s": seconds,
            "peak_memory_mb": peak_memory_mb(device),
            "skipped_batches": counters["skipped_nonfinite"] + counters["skipped_empty"],
            "skipped_in_step": int(sums[SKIPPED]),
        }
    )
    return row
