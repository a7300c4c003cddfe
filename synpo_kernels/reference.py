"""Pure-PyTorch reference semantics for every op in synpo_kernels.

These functions *define* the ops: the fused kernels are tested against them, and the benchmarks use
them as the naive baseline. They favour clarity over speed: full logits, full log-softmax, float64 by
default. Nothing here is on a hot path.

Conventions (Hugging Face):
- ``labels`` are aligned with ``input_ids``; ``ignore_index`` (-100) marks prompt, video/image tokens
  and padding. With ``shift=True`` the logits at position ``t`` score the label at ``t + 1``; the
  per-token outputs are reported at the *label's* position (entry 0 is always 0 when shifting).
- A preference batch is ``[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]`` along dim 0.

Per-row statistics: every loss in the preference family is a small function of, per row,
``sum_logp = sum_t logp_t``, ``sum_p = sum_t p_t`` and ``count = n`` (response tokens), optionally with
the reference model's *summed* log-probs per row and batch constants (the pooled chosen-token count).
That is what lets the fused kernels write per-token gradients as ``a_row + b_row * p_t``. The loss
formulas themselves are defined once, in :mod:`synpo_kernels.loss_registry` (pure PyTorch as well).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from synpo_kernels.loss_registry import COMBINE, LOSSES, get_loss

IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "PREFERENCE_LOSSES",
    "RowStats",
    "aot_loss_from_stats",
    "aot_unpaired_loss_from_stats",
    "apo_down_loss_from_stats",
    "apo_zero_loss_from_stats",
    "bco_pair_loss_from_stats",
    "cpo_loss_from_stats",
    "discopop_loss_from_stats",
    "dpo_loss_from_stats",
    "exo_pair_loss_from_stats",
    "hinge_loss_from_stats",
    "ipo_loss_from_stats",
    "linear_logits_ref",
    "nca_pair_loss_from_stats",
    "orpo_loss_from_stats",
    "preference_loss_ref",
    "response_mask",
    "robust_loss_from_stats",
    "row_stats_from_token_logprobs",
    "row_stats_ref",
    "sequence_logprobs_ref",
    "sft_loss_from_stats",
    "shift_labels",
    "simpo_loss_from_stats",
    "sppo_hard_loss_from_stats",
    "synpo_loss_from_stats",
    "synpo_loss_ref",
    "synpo_token_grad_ref",
    "token_logprobs_ref",
]


@dataclass
class RowStats:
    """Per-row sufficient statistics of a batch of sequences (shape ``(rows,)`` each)."""

    sum_logp: torch.Tensor  # sum over response tokens of log p(y_t)
    sum_p: torch.Tensor  # sum over response tokens of p(y_t)
    count: torch.Tensor  # number of response tokens (float, for arithmetic)

    @property
    def mean_logp(self) -> torch.Tensor:
        return self.sum_logp / self.count

    @property
    def mean_p(self) -> torch.Tensor:
        return self.sum_p / self.count

    def split_pairs(self) -> tuple[RowStats, RowStats]:
        """Split ``[chosen; rejected]`` rows into (chosen, rejected)."""
        half = self.sum_logp.shape[0] // 2
        chosen = RowStats(self.sum_logp[:half], self.sum_p[:half], self.count[:half])
        rejected = RowStats(self.sum_logp[half:], self.sum_p[half:], self.count[half:])
        return chosen, rejected


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Labels aligned with the logits that score them: ``out[..., t] = labels[..., t + 1]``.

    The last position scores nothing and gets ``ignore_index``.
    """
    out = torch.full_like(labels, ignore_index)
    out[..., :-1] = labels[..., 1:]
    return out


def token_logprobs_ref(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    shift: bool = True,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Log-probability of each label, shape of ``labels``, 0 where ignored (and at t=0 when shifting).

    Computed in ``dtype`` (float64 by default) from the upcast logits.
    """
    aligned = shift_labels(labels, ignore_index) if shift else labels
    valid = aligned != ignore_index
    logp_all = logits.to(dtype).log_softmax(dim=-1)
    gathered = logp_all.gather(-1, torch.where(valid, aligned, 0).long().unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, gathered, torch.zeros((), dtype=dtype, device=logits.device))
    if shift:
        # Report at the label's position: the logits at t-1 score labels[t].
        out = torch.zeros_like(logp)
        out[..., 1:] = logp[..., :-1]
        return out
    return logp


def response_mask(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, shift: bool = True) -> torch.Tensor:
    """Positions (label-aligned) whose token is scored: not ignored, and not t=0 when shifting."""
    mask = labels != ignore_index
    if shift:
        mask = mask.clone()
        mask[..., 0] = False  # the first label has no logits scoring it
    return mask


def row_stats_from_token_logprobs(token_logp: torch.Tensor, mask: torch.Tensor) -> RowStats:
    """Per-row statistics from per-token log-probs ``(rows, T)`` and a response mask ``(rows, T)``."""
    token_logp = token_logp.reshape(token_logp.shape[0], -1)
    mask = mask.reshape(mask.shape[0], -1)
    zero = torch.zeros((), dtype=token_logp.dtype, device=token_logp.device)
    sum_logp = torch.where(mask, token_logp, zero).sum(-1)
    sum_p = torch.where(mask, token_logp.exp(), zero).sum(-1)
    count = mask.sum(-1).to(token_logp.dtype)
    return RowStats(sum_logp, sum_p, count)


def row_stats_ref(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    shift: bool = True,
    dtype: torch.dtype = torch.float64,
) -> RowStats:
    """Per-row (sum logp, sum p, count) of ``(rows, T, V)`` logits against ``(rows, T)`` labels."""
    token_logp = token_logprobs_ref(logits, labels, ignore_index=ignore_index, shift=shift, dtype=dtype)
    return row_stats_from_token_logprobs(token_logp, response_mask(labels, ignore_index, shift))


def sequence_logprobs_ref(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    shift: bool = True,
    average: bool = True,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Per-row mean (``average=True``) or sum of response-token log-probs, shape ``labels.shape[:-1]``.

    A row with no response tokens has an undefined mean: NaN here (the fused ops raise instead).
    """
    lead = labels.shape[:-1]
    stats = row_stats_ref(
        logits.reshape(-1, *logits.shape[-2:]),
        labels.reshape(-1, labels.shape[-1]),
        ignore_index=ignore_index,
        shift=shift,
        dtype=dtype,
    )
    out = stats.mean_logp if average else stats.sum_logp
    return out.reshape(lead)


# ---------------------------------------------------------------------------------------------
# The preference-loss family: each loss is defined once, in synpo_kernels.loss_registry (formula,
# options, defaults). Here: the per-pair reference functions of per-row statistics derived from it.
# ---------------------------------------------------------------------------------------------


class _PreferenceLosses(Mapping):
    """Live view ``name -> per-pair loss function of a whole batch's RowStats`` over the registry;
    a weighted sum ``"a+b"`` of registered losses is found too (not listed)."""

    def __getitem__(self, name: str):
        if not isinstance(name, str) or (name not in LOSSES and COMBINE not in name):
            raise KeyError(name)
        return get_loss(name).from_stats

    def __iter__(self):
        return iter(LOSSES)

    def __len__(self) -> int:
        return len(LOSSES)

    def __repr__(self) -> str:
        return f"PREFERENCE_LOSSES({sorted(self)})"


PREFERENCE_LOSSES: Mapping = _PreferenceLosses()
"""Name -> per-pair loss of per-row statistics, ``f(stats, **options)`` (``ref_logps=`` summed reference
log-probs for losses that need them); derived from :data:`synpo_kernels.loss_registry.LOSSES`."""


def _named(name: str):
    def loss_from_stats(stats: RowStats, **options) -> torch.Tensor:
        return PREFERENCE_LOSSES[name](stats, **options)

    loss_from_stats.__name__ = loss_from_stats.__qualname__ = f"{name}_loss_from_stats"
    loss_from_stats.__doc__ = f"Per-pair {name} losses; options and formula: ``LOSSES[{name!r}]``."
    return loss_from_stats


synpo_loss_from_stats = _named("synpo")
dpo_loss_from_stats = _named("dpo")
ipo_loss_from_stats = _named("ipo")
simpo_loss_from_stats = _named("simpo")
cpo_loss_from_stats = _named("cpo")
orpo_loss_from_stats = _named("orpo")
hinge_loss_from_stats = _named("hinge")
exo_pair_loss_from_stats = _named("exo_pair")
nca_pair_loss_from_stats = _named("nca_pair")
robust_loss_from_stats = _named("robust")
bco_pair_loss_from_stats = _named("bco_pair")
sppo_hard_loss_from_stats = _named("sppo_hard")
apo_zero_loss_from_stats = _named("apo_zero")
apo_down_loss_from_stats = _named("apo_down")
discopop_loss_from_stats = _named("discopop")
sft_loss_from_stats = _named("sft")
aot_loss_from_stats = _named("aot")
aot_unpaired_loss_from_stats = _named("aot_unpaired")


def preference_loss_ref(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss: str = "synpo",
    ignore_index: int = IGNORE_INDEX,
    shift: bool = True,
    dtype: torch.dtype = torch.float64,
    **loss_kwargs,
) -> torch.Tensor:
    """Mean over pairs of a preference loss on ``(2B, T, V)`` logits, computed in ``dtype``."""
    definition = get_loss(loss)
    stats = row_stats_ref(logits, labels, ignore_index=ignore_index, shift=shift, dtype=dtype)
    return definition.from_stats(stats, **loss_kwargs).mean()


def synpo_loss_ref(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 30.0,
    beta: float = 0.2,
    ignore_index: int = IGNORE_INDEX,
    shift: bool = True,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The SynPO loss of ../shared/SPEC.md section 1 on ``(2B, T, V)`` logits ([chosen; rejected])."""
    return preference_loss_ref(
        logits,
        labels,
        loss="synpo",
        ignore_index=ignore_index,
        shift=shift,
        dtype=dtype,
        alpha=alpha,
        beta=beta,
    )


def linear_logits_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``hidden @ weight.T (+ bias)`` in ``dtype``: the logits the fused linear ops never materialize."""
    logits = hidden.to(dtype) @ weight.to(dtype).t()
    if bias is not None:
        logits = logits + bias.to(dtype)
    return logits


def synpo_token_grad_ref(
    stats: RowStats,
    token_p: torch.Tensor,
    mask: torch.Tensor,
    *,
    alpha: float = 30.0,
    beta: float = 0.2,
) -> torch.Tensor:
    """Closed-form ``dL/dlogp_t`` of SynPO (SPEC section 1), for checking the autograd-derived one.

    ``token_p`` is ``(2B, T)`` per-token probabilities and ``mask`` the response mask. Returns
    ``(2B, T)``, 0 outside the mask.
    """
    chosen, rejected = stats.split_pairs()
    half = chosen.count.shape[0]
    g_w, g_l = chosen.mean_logp.exp(), rejected.mean_logp.exp()
    s = torch.sigmoid(alpha * (g_w - g_l))
    ds = alpha * s * (1 - s)
    grad_w = (-ds * g_w / chosen.count)[:, None] - beta * token_p[:half] / chosen.count[:, None]
    grad_l = (ds * g_l / rejected.count)[:, None].expand_as(token_p[half:])
    grad = torch.cat([grad_w, grad_l]) / half
    return torch.where(mask, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
