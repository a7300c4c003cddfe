"""Per-row statistics -> per-pair preference loss -> per-row gradient coefficients.

Every loss of :data:`synpo_kernels.loss_registry.LOSSES` is a small function of three statistics per
row of a ``[chosen; rejected]`` batch: ``sum_logp = sum_t logp_t``, ``sum_p = sum_t p_t`` and the token
count ``n`` (plus, for DPO/IPO, the reference model's summed log-prob per row, passed in as a tensor,
and batch constants such as the number of chosen tokens: :class:`~synpo_kernels.loss_registry.LossContext`).
Since ``d sum_logp / d logp_t = 1`` and ``d sum_p / d logp_t = p_t``, the gradient of the batch loss
with respect to every token's log-prob is

    g_t = a_row + b_row * p_t,    a_row = dL/d sum_logp,   b_row = dL/d sum_p,

and the logits gradient is ``g_t * (onehot(y_t) - softmax(z_t))``. This module computes ``(a, b)``
for a set of whole pairs by autograd through the per-pair formulas (written once, in the registry),
in float64 on tensors of a few elements per row: exact, and negligible next to the ``n x V`` work of
the fused ops.

Because the batch loss is a *sum of per-pair terms* with batch-level constants, a chunk that holds
whole pairs has everything it needs: the fused linear ops compute the gradients of such a chunk in
the same pass as its forward (6 n D V FLOPs in total instead of 8 for recompute-in-backward designs).

Non-tensor options (``alpha``, ``beta``, ``average`` ...) live in a small frozen, hashable
:class:`LossSpec` (as Cut Cross-Entropy keeps its non-tensor options in one params object); per-row
tensor options (``ref_logps``) travel next to it and are sliced along with the pairs of a chunk.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch.fx.experimental.symbolic_shapes import guard_scalar

from synpo_kernels.loss_registry import REFERENCE_OPTION, LossContext, get_loss
from synpo_kernels.reference import RowStats

__all__ = [
    "TENSOR_OPTIONS",
    "LossContext",
    "LossSpec",
    "PreferenceStats",
    "batch_context",
    "check_tensor_options",
    "empty_row_reason",
    "loss_coefficients",
    "loss_spec",
    "make_loss_spec",
    "pair_losses",
    "preference_stats",
    "reward_margin",
    "select_pairs",
]

TENSOR_OPTIONS = (REFERENCE_OPTION,)
"""Loss options that are per-row tensors of shape ``(2B,)`` (``[chosen; rejected]`` like the batch)."""


@dataclass(frozen=True)
class LossSpec:
    """A preference loss and its non-tensor options, fully resolved (defaults filled in).

    ``options`` is a sorted tuple of ``(name, value)`` so the spec is hashable and comparable.
    """

    name: str
    options: tuple[tuple[str, float | bool | str], ...]
    tensor_options: tuple[str, ...] = ()

    def kwargs(self) -> dict[str, float | bool | str]:
        return dict(self.options)

    def option(self, name: str):
        return self.kwargs()[name]


def _graph_constant(value):
    """A numeric option as a Python constant while torch.compile traces.

    Under ``dynamic=True`` (and after a value changed, automatic dynamic) Dynamo traces Python numbers,
    arguments and registry defaults alike, as symbolic ones, which ``math.isfinite`` and the fused op's
    params string cannot take. ``guard_scalar`` specializes one with a guard on its value: the option is
    a constant of the graph and another value recompiles, as a hyper-parameter should; shapes stay
    symbolic.
    """
    if torch.compiler.is_compiling() and isinstance(value, int | float):
        return guard_scalar(value)
    return value


def loss_spec(loss: str, **options) -> LossSpec:
    """Validate ``loss`` and its scalar options (no tensor options); the spec, defaults filled in.

    ``ValueError`` for an unknown loss or a bad value, ``TypeError`` for an unknown option or a value of
    the wrong type; messages name the option.
    """
    definition = get_loss(loss)
    tensor_options = (REFERENCE_OPTION,) if definition.needs_reference else ()
    resolved = definition.resolve({k: _graph_constant(v) for k, v in options.items()})
    # Sorted by name alone: Dynamo cannot sort (name, value) pairs that hold a traced number.
    items = tuple((k, _graph_constant(resolved[k])) for k in sorted(resolved))
    return LossSpec(loss, items, tensor_options)


def make_loss_spec(loss: str, **options) -> tuple[LossSpec, dict[str, torch.Tensor]]:
    """Validate ``loss`` and its options; return the spec and the tensor options.

    Raises ``ValueError`` for an unknown loss or a missing required tensor option (``ref_logps`` for
    losses that need a reference), ``TypeError`` for an unknown option, a value of the wrong type or
    ``ref_logps`` given to a loss without a reference.
    """
    definition = get_loss(loss)
    tensors: dict[str, torch.Tensor] = {}
    if definition.needs_reference:
        value = options.pop(REFERENCE_OPTION, None)
        if value is None:
            raise ValueError(
                f"{REFERENCE_OPTION}: loss {loss!r} needs {REFERENCE_OPTION}= "
                "(a (2B,) tensor of summed reference log-probs)"
            )
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{REFERENCE_OPTION}: expected a torch.Tensor, got {type(value).__name__}")
        tensors[REFERENCE_OPTION] = value
    elif options.get(REFERENCE_OPTION) is not None:
        raise TypeError(f"{REFERENCE_OPTION}: loss {loss!r} takes no reference log-probs")
    return loss_spec(loss, **options), tensors


def check_tensor_options(tensors: dict[str, torch.Tensor], rows: int, device: torch.device) -> None:
    """Per-row tensor options must be ``(2B,)`` floating tensors on the batch's device."""
    for name, value in tensors.items():
        if value.dim() != 1 or value.shape[0] != rows:
            raise ValueError(
                f"{name}: expected shape ({rows},) (one value per row of the [chosen; rejected] batch), "
                f"got {tuple(value.shape)}"
            )
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating tensor, got {value.dtype}")
        if value.device != device:
            raise ValueError(f"{name}: on device {value.device}, but the batch is on {device}")


def select_pairs(
    tensors: dict[str, torch.Tensor], num_pairs: int, start: int, end: int
) -> dict[str, torch.Tensor]:
    """The per-row tensor options of pairs ``[start, end)``, in ``[chosen; rejected]`` layout."""
    if start == 0 and end == num_pairs:
        return tensors
    return {k: torch.cat([v[start:end], v[num_pairs + start : num_pairs + end]]) for k, v in tensors.items()}


def batch_context(count: torch.Tensor) -> LossContext:
    """Batch constants of a whole ``[chosen; rejected]`` batch from its per-row token counts ``(2B,)``."""
    half = count.shape[0] // 2
    return LossContext(half, count[:half].sum())


def pair_losses(
    stats: RowStats, spec: LossSpec, tensors: dict[str, torch.Tensor], context: LossContext | None = None
) -> torch.Tensor:
    """Per-pair losses ``(P,)`` of a ``[chosen; rejected]`` block of ``2P`` rows.

    ``context``: the whole batch's constants when the block is a chunk of it (default: the block is
    the batch).
    """
    return get_loss(spec.name).pair_losses(stats, spec.kwargs(), tensors.get(REFERENCE_OPTION), context)


def loss_coefficients(
    sum_logp: torch.Tensor,
    sum_p: torch.Tensor,
    count: torch.Tensor,
    spec: LossSpec,
    tensors: dict[str, torch.Tensor],
    scale: float,
    context: LossContext | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the per-row coefficients ``a = dL/dsum_logp``, ``b = dL/dsum_p``.

    ``L = scale * sum(pair losses)`` (``scale = 1 / total pairs`` for the batch mean). Computed in
    float64 by autograd through :func:`pair_losses`; returned in ``sum_logp``'s dtype. The
    per-token log-prob gradient of row ``r`` is then ``a[r] + b[r] * p_t``.
    """
    out_dtype = sum_logp.dtype
    with _autograd_enabled():
        sl = sum_logp.detach().to(torch.float64).clone().requires_grad_(True)
        sp = sum_p.detach().to(torch.float64).clone().requires_grad_(True)
        detached = {k: v.detach().to(torch.float64) for k, v in tensors.items()}
        stats = RowStats(sl, sp, count.detach().to(torch.float64))
        losses = pair_losses(stats, spec, detached, context)
        grad_a, grad_b = torch.autograd.grad(losses.sum() * scale, (sl, sp), allow_unused=True)
    a = torch.zeros_like(sl) if grad_a is None else grad_a
    b = torch.zeros_like(sp) if grad_b is None else grad_b
    return losses.detach().to(out_dtype), a.to(out_dtype), b.to(out_dtype)


_AUTOGRAD_KEYS = functools.reduce(
    operator.or_,
    (
        torch._C.DispatchKeySet(key)
        for key in (
            torch._C.DispatchKey.AutogradFunctionality,
            torch._C.DispatchKey.AutogradOther,
            torch._C.DispatchKey.AutogradNestedTensor,
            torch._C.DispatchKey.ADInplaceOrView,
        )
    ),
)


@contextlib.contextmanager
def _autograd_enabled():
    """Autograd on, for :func:`loss_coefficients`' few float64 scalars, wherever it is called from.

    The fused ops call it inside their ``torch.library.custom_op`` implementations, which run below
    the autograd dispatch keys (and, in a compiled graph, with more keys excluded): there, autograd
    records nothing, ``torch.func.grad`` fails (and refuses saved-tensor hooks such as the caller's
    ``save_on_cpu``), and forward-mode AD fails too. So the autograd keys are taken off the
    thread-local exclude set for this block (the other dispatch state is kept), grad mode is on and
    inference mode off. Nothing computed here leaves the block with a graph.
    """
    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C._dispatch_tls_local_exclude_set()
    with (
        torch._C._ForceDispatchKeyGuard(include, exclude - _AUTOGRAD_KEYS),
        torch.inference_mode(False),
        torch.enable_grad(),
    ):
        yield


def empty_row_reason(spec: LossSpec, num_pairs: int) -> Callable[[list[int]], str]:
    """Why rows with no response token make a batch invalid for this loss (the error message's end).

    Whether the loss divides a row's log-prob by its token count is read off the formula itself: it
    is evaluated (float64, a few scalars) on a batch whose first pair has the statistics of empty
    rows (sum logp = sum p = count = 0); a length-normalized loss gives 0/0 = NaN there.
    """

    def reason(rows: list[int]) -> str:
        where = ", ".join(
            f"row {r} = {'chosen' if r < num_pairs else 'rejected'} row of pair {r % num_pairs}" for r in rows
        )
        f64 = torch.float64
        probe = RowStats(
            torch.tensor([0.0, -1.0, 0.0, -2.0], dtype=f64),
            torch.tensor([0.0, 0.5, 0.0, 0.25], dtype=f64),
            torch.tensor([0.0, 2.0, 0.0, 2.0], dtype=f64),
        )
        refs = {REFERENCE_OPTION: torch.full((4,), -1.5, dtype=f64)} if spec.tensor_options else {}
        if not bool(torch.isfinite(pair_losses(probe, spec, refs)).all()):
            return (
                f"their length-normalized log-prob, which loss {spec.name!r} uses, is a mean over no "
                f"tokens (0/0) and undefined ({where})"
            )
        return (
            f"they are not valid preference pairs ({where}): loss {spec.name!r} compares summed "
            "log-probs, and an empty response has a sum of 0 and no gradient, so there is no response "
            "to prefer or reject"
        )

    return reason


def reward_margin(
    stats: RowStats, spec: LossSpec, tensors: dict[str, torch.Tensor], context: LossContext | None = None
) -> torch.Tensor:
    """Per-pair reward margin ``(P,)``: the chosen-minus-rejected quantity each loss pushes up.

    Defined per loss in the registry (``margin``; the table of docs/losses.md), e.g. TRL's
    ``rewards/margins`` ``beta * h`` for dpo, ``G_w - G_l`` for synpo, the log odds ratio for orpo.
    """
    return get_loss(spec.name).reward_margin(stats, spec.kwargs(), tensors.get(REFERENCE_OPTION), context)


@dataclass(frozen=True)
class PreferenceStats:
    """Detached per-pair statistics of a fused preference-loss call, for logging (no second pass).

    All tensors have shape ``(B,)`` (one entry per pair) and the accumulation dtype (float32;
    float64 for float64 inputs), except the counts (int64).

    - ``chosen_logps`` / ``rejected_logps``: per-row *mean* response-token log-prob ``m(y)``;
    - ``chosen_mean_prob``: arithmetic-mean token probability of the chosen row ``P(y_w)``;
    - ``reward_margin``: see :func:`reward_margin` (defined per loss in the registry);
    - ``chosen_count`` / ``rejected_count``: response tokens per row;
    - ``pair_losses``: the per-pair loss (the returned loss is their mean).
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_mean_prob: torch.Tensor
    reward_margin: torch.Tensor
    chosen_count: torch.Tensor
    rejected_count: torch.Tensor
    pair_losses: torch.Tensor

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Batch means as Python floats (one host sync), e.g. for a logger."""
        return {f"{prefix}{f.name}": float(getattr(self, f.name).double().mean()) for f in fields(self)}


def preference_stats(
    stats: RowStats, spec: LossSpec, tensors: dict[str, torch.Tensor], losses: torch.Tensor
) -> PreferenceStats:
    """Assemble :class:`PreferenceStats` from the row statistics of the whole batch."""
    stats = RowStats(stats.sum_logp.detach(), stats.sum_p.detach(), stats.count.detach())
    tensors = {k: v.detach() for k, v in tensors.items()}
    chosen, rejected = stats.split_pairs()
    return PreferenceStats(
        chosen_logps=chosen.mean_logp,
        rejected_logps=rejected.mean_logp,
        chosen_mean_prob=chosen.mean_p,
        reward_margin=reward_margin(stats, spec, tensors).detach(),
        chosen_count=chosen.count.round().long(),
        rejected_count=rejected.count.round().long(),
        pair_losses=losses.detach(),
    )
