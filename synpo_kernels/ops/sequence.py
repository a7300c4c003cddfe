"""Sequence-level ops on full logits, built on the fused token op: per-row log-probs and the
preference losses (SynPO and the comparison family) of a ``[chosen; rejected]`` batch.

Order: statistics helper -> public functions -> ``nn.Module``s. The kernels are the token op's; the
loss itself is a function of per-row (sum logp, sum p, count), evaluated in fp32 with the formulas in
:mod:`synpo_kernels.loss_registry`, so autograd through those few scalars per row gives every token its
``a_row + b_row * p_t`` gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from synpo_kernels._validation import check_nonempty_rows, check_pairs
from synpo_kernels.losses import (
    TENSOR_OPTIONS,
    check_tensor_options,
    empty_row_reason,
    loss_spec,
    make_loss_spec,
    pair_losses,
)
from synpo_kernels.ops.token_logprobs import token_logprobs
from synpo_kernels.reference import IGNORE_INDEX, RowStats, response_mask, row_stats_from_token_logprobs

__all__ = [
    "PreferenceLoss",
    "SynPOLoss",
    "preference_loss",
    "row_stats",
    "sequence_logprobs",
    "synpo_loss",
]


def row_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    shift: bool = True,
) -> RowStats:
    """Per-row fp32 (sum logp, sum p, count) of ``(rows, T, V)`` logits; differentiable."""
    if logits.dim() != 3:
        raise ValueError(f"logits: expected (rows, T, V), got shape {tuple(logits.shape)}")
    token_logp = token_logprobs(logits, labels, ignore_index=ignore_index, shift=shift)
    return row_stats_from_token_logprobs(token_logp, response_mask(labels, ignore_index, shift))


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    shift: bool = True,
    average: bool = True,
) -> torch.Tensor:
    """Per-row mean (``average=True``) or sum of the response tokens' log-probs, fp32.

    ``logits`` ``(..., T, V)``, ``labels`` ``(..., T)``; returns ``labels.shape[:-1]``. A row with no
    response token raises ``ValueError`` when averaging (its mean is undefined).
    """
    token_logp = token_logprobs(logits, labels, ignore_index=ignore_index, shift=shift)
    mask = response_mask(labels, ignore_index, shift)
    total = token_logp.sum(-1)  # ignored positions hold exact zeros
    if not average:
        return total
    count = mask.sum(-1)
    check_nonempty_rows("labels", count.reshape(-1))
    return total / count.to(total.dtype)


def preference_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss: str = "synpo",
    ignore_index: int = IGNORE_INDEX,
    shift: bool = True,
    **loss_kwargs,
) -> torch.Tensor:
    """Mean over pairs of a preference loss on ``(2B, T, V)`` logits (rows = [chosen; rejected]).

    ``loss`` is a loss of :data:`synpo_kernels.loss_registry.LOSSES` (``synpo, dpo, ipo, simpo, cpo,
    orpo``); ``loss_kwargs`` are that loss's options (``ref_logps=`` summed reference log-probs for
    dpo/ipo). See docs/losses.md for the formulas, options and defaults.
    """
    spec, tensors = make_loss_spec(loss, **loss_kwargs)
    if logits.dim() != 3:
        raise ValueError(f"logits: expected (2B, T, V), got shape {tuple(logits.shape)}")
    check_pairs("logits", logits.shape[0])
    check_tensor_options(tensors, logits.shape[0], logits.device)
    stats = row_stats(logits, labels, ignore_index=ignore_index, shift=shift)
    check_nonempty_rows("labels", stats.count, empty_row_reason(spec, logits.shape[0] // 2))
    return pair_losses(stats, spec, tensors).mean()


def synpo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 30.0,
    beta: float = 0.2,
    ignore_index: int = IGNORE_INDEX,
    shift: bool = True,
) -> torch.Tensor:
    """SynPO loss ``mean_b[-sigmoid(alpha (G_w - G_l)) - beta P(y_w)]`` on ``(2B, T, V)`` logits."""
    return preference_loss(
        logits, labels, loss="synpo", ignore_index=ignore_index, shift=shift, alpha=alpha, beta=beta
    )


class PreferenceLoss(nn.Module):
    """Module form of :func:`preference_loss`; ``forward(logits, labels, **per_call_kwargs)``."""

    def __init__(self, loss: str = "synpo", ignore_index: int = IGNORE_INDEX, shift: bool = True, **options):
        super().__init__()
        loss_spec(loss, **{k: v for k, v in options.items() if k not in TENSOR_OPTIONS})  # validate now
        self.loss = loss
        self.ignore_index = ignore_index
        self.shift = shift
        self.options = options

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, **per_call) -> torch.Tensor:
        return preference_loss(
            logits,
            labels,
            loss=self.loss,
            ignore_index=self.ignore_index,
            shift=self.shift,
            **self.options,
            **per_call,
        )

    def extra_repr(self) -> str:
        return f"loss={self.loss!r}, ignore_index={self.ignore_index}, shift={self.shift}, {self.options}"


class SynPOLoss(PreferenceLoss):
    """Module form of :func:`synpo_loss`."""

    def __init__(
        self, alpha: float = 30.0, beta: float = 0.2, ignore_index: int = IGNORE_INDEX, shift: bool = True
    ):
        super().__init__("synpo", ignore_index=ignore_index, shift=shift, alpha=alpha, beta=beta)
