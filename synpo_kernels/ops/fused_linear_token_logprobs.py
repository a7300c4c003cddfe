"""Fused lm_head -> per-token log-probs: ``log softmax(hidden @ W^T + b)[y]`` without the N x V logits.

Order: kernels (Triton row passes in :mod:`.fused_linear_kernels`, C++ token ops on the torch
backend) -> launcher (the chunk loops) -> the ops (``torch.ops.synpo_kernels.fused_linear_token_logprobs``
and its backward ``fused_linear_token_logprobs_bwd``, opaque custom ops with fake kernels and autograd)
-> public functions -> ``nn.Module``.

Cost. Forward: ``2 n D V`` FLOPs (``n`` = scored tokens, compacted; see
:mod:`.fused_linear_common`) plus one read of each chunk for the fp32 log-sum-exp. The per-token
upstream gradient is unknown in the forward. When gradients are due and the batch's positions fit
one chunk buffer (``chunk_bytes``), the forward keeps the logits it computed and the backward
overwrites them with their gradient (a copy of them for a retained graph or a traced one): ``4 n D V``
FLOPs, ``6 n D V`` in total (:func:`keeps_logits`). Otherwise the backward recomputes each chunk's
logits from ``hidden`` and ``W`` (saved: only the inputs and the log-sum-exp per position):
``6 n D V`` FLOPs, ``8 n D V`` in total. Memory: one ``(m, V)`` chunk buffer in the input dtype (on
the ``6 n D V`` path held from the forward to the backward), the gradients, ``O(n)`` vectors.
Any per-token upstream gradient is exact, including one that differs per token (the case where
Liger's ``reduction='none'`` once gave wrong weight gradients): every token's ``g_t`` scales its own
logits-gradient row before both gradient GEMMs.

For the preference losses (whose gradient is known in the forward), use
:mod:`.fused_linear_preference` (6 n D V).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from synpo_kernels._validation import (
    check_label_range,
    check_labels_match,
    check_linear_inputs,
    check_nonempty_rows,
)
from synpo_kernels.ops.fused_linear_common import (
    FusedLinearConfig,
    FusedLinearParams,
    GradBuffers,
    chunk_buffer,
    compact_tokens,
    double_backward_error,
    hidden_rows,
    may_reuse_saved,
    padded_chunk,
    register_autocast,
    resolve_backend,
)
from synpo_kernels.ops.token_logprobs import accumulation_dtype
from synpo_kernels.reference import IGNORE_INDEX

__all__ = [
    "FusedLinearTokenLogprobs",
    "fused_linear_sequence_logprobs",
    "fused_linear_token_logprobs",
]


# ---------------------------------------------------------------------------------------------
# Launcher: the chunk loops of the forward and of the backward.
# ---------------------------------------------------------------------------------------------


def _scored_tokens(labels, p: FusedLinearParams):
    """Row indices of the scored tokens in the flattened hidden states, and their aligned labels."""
    aligned, idx = compact_tokens(labels, p.ignore_index, p.shift)
    return idx, aligned.index_select(0, idx)


def _chunks(n: int, rows: int):
    for t0 in range(0, n, rows):
        yield t0, min(n, t0 + rows)


def keeps_logits(p: FusedLinearParams, weight: torch.Tensor, positions: int) -> bool:
    """Whether the forward keeps the scored rows' logits for the backward: when gradients are due and
    every position of the batch fits one chunk buffer (decided from shapes, so the fake kernel agrees).
    The backward then starts from them (``6 n D V`` in all) instead of recomputing them (``8 n D V``);
    the price is the buffer (at most ``chunk_bytes``) held from the forward to the backward."""
    if not (p.grad_hidden or p.grad_weight or p.grad_bias):
        return False
    return positions <= p.execution(weight)[2]


def _forward_chunks(backend, hidden2d, weight, bias, idx, labels_c, ignore_index, rows, keep=None):
    """Log-probs and log-sum-exp of the scored rows; ``keep``: the ``(N, V')`` padded buffer the
    logits are computed into (one chunk: the caller checked :func:`keeps_logits`) and left in."""
    n = idx.shape[0]
    acc = accumulation_dtype(weight.dtype)
    logp = torch.empty(n, dtype=acc, device=weight.device)
    lse = torch.empty((n, 2), dtype=acc, device=weight.device)  # per row: max, log sum exp(z - max)
    if n == 0:
        return logp, lse
    buf = chunk_buffer(min(rows, n), weight) if keep is None else keep[:, : weight.shape[0]]
    for t0, t1 in _chunks(n, rows):
        logits = backend.logits(hidden2d.index_select(0, idx[t0:t1]), weight, bias, buf[: t1 - t0])
        lp, ls = backend.row_fwd(logits, labels_c[t0:t1], ignore_index)
        logp[t0:t1] = lp
        lse[t0:t1] = ls
    return logp, lse


def _backward_chunks(
    backend,
    grads,
    hidden2d,
    weight,
    bias,
    idx,
    labels_c,
    lse,
    g,
    ignore_index,
    rows,
    kept=None,
    reuse_kept=False,
):
    """Gradients chunk by chunk, each chunk's logits recomputed; or, with ``kept`` (the forward's
    logits), one chunk that starts from them: overwritten in place when ``reuse_kept``, else a copy."""
    n = idx.shape[0]
    if n == 0:
        return
    if kept is not None and reuse_kept:
        buf, rows = kept[:n, : weight.shape[0]], n
    else:
        buf = chunk_buffer(min(rows, n), weight)
    if kept is not None and not reuse_kept:
        rows = n
        buf.copy_(kept[:n, : weight.shape[0]])
    for t0, t1 in _chunks(n, rows):
        h_c = hidden2d.index_select(0, idx[t0:t1])
        logits = buf if kept is not None else backend.logits(h_c, weight, bias, buf[: t1 - t0])
        backend.row_grad_(logits, g[t0:t1], labels_c[t0:t1], lse[t0:t1], ignore_index, grads.b)
        grads.add_chunk(backend, logits, h_c, t0, t1, idx[t0:t1])


# ---------------------------------------------------------------------------------------------
# The ops: forward and backward, each one opaque custom op (torch.compile never traces the chunk
# loops), with fake kernels and autograd. The forward saves the inputs and a full-length ``(N, 2)``
# log-sum-exp (max, log sum exp(z - max); 0 on unscored rows: static shapes); the backward recomputes
# the compaction from the labels.
# ---------------------------------------------------------------------------------------------

_FWD = "synpo_kernels::fused_linear_token_logprobs"
_BWD = "synpo_kernels::fused_linear_token_logprobs_bwd"


@torch.library.custom_op(
    _FWD,
    mutates_args=(),
    schema=(
        "(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, str params) -> "
        "(Tensor logp, Tensor lse, Tensor logits)"
    ),
)
def _fwd_op(hidden, weight, bias, labels, params):
    p = FusedLinearParams.decode(params)
    check_label_range("labels", labels, weight.shape[0], p.ignore_index)
    backend, _, rows = p.execution(weight)
    idx, labels_c = _scored_tokens(labels, p)
    keep = padded_chunk(labels.numel(), weight) if keeps_logits(p, weight, labels.numel()) else None
    logp_c, lse_c = _forward_chunks(
        backend, hidden_rows(hidden), weight, bias, idx, labels_c, p.ignore_index, rows, keep
    )
    pos = idx + 1 if p.shift else idx  # row t scores (and reports at) label position t + 1
    out = torch.zeros(labels.numel(), dtype=logp_c.dtype, device=weight.device)
    out.index_copy_(0, pos, logp_c)
    lse = torch.zeros((labels.numel(), 2), dtype=lse_c.dtype, device=weight.device)
    lse.index_copy_(0, idx, lse_c)
    if keep is None:
        keep = weight.new_empty((0,))
    else:
        keep[idx.shape[0] :].zero_()  # rows past the scored ones: an output holds no uninitialised memory
    return out.view(labels.shape), lse, keep


@_fwd_op.register_fake
def _fwd_fake(hidden, weight, bias, labels, params):
    acc = accumulation_dtype(weight.dtype)
    p, positions = FusedLinearParams.decode(params), labels.numel()
    kept = padded_chunk(positions, weight) if keeps_logits(p, weight, positions) else weight.new_empty((0,))
    return hidden.new_empty(labels.shape, dtype=acc), hidden.new_empty((labels.numel(), 2), dtype=acc), kept


@torch.library.custom_op(
    _BWD,
    mutates_args=(),
    schema=(
        "(Tensor grad_logp, Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor lse, "
        "Tensor logits, str params) -> (Tensor, Tensor, Tensor)"
    ),
)
def _bwd_op(grad_logp, hidden, weight, bias, labels, lse, logits, params):
    return _bwd_impl(grad_logp, hidden, weight, bias, labels, lse, logits, params, reuse_kept=False)


def _bwd_impl(grad_logp, hidden, weight, bias, labels, lse, logits, params, *, reuse_kept):
    """The backward op's work; ``reuse_kept``: overwrite the kept ``logits`` instead of copying them
    (only where nothing else will read them, :func:`_backward`)."""
    p = FusedLinearParams.decode(params)
    backend, w_acc, rows = p.execution(weight)
    idx, labels_c = _scored_tokens(labels, p)
    need_b = p.grad_bias and bias is not None
    grads = GradBuffers(idx.shape[0], hidden, weight, bias, p.grad_hidden, p.grad_weight, need_b, w_acc)
    lse_c = lse.index_select(0, idx)
    pos = idx + 1 if p.shift else idx
    g = grad_logp.reshape(-1).index_select(0, pos).to(lse_c.dtype).contiguous()
    if grads.any:
        kept = logits if logits.numel() else None
        _backward_chunks(
            backend,
            grads,
            hidden_rows(hidden),
            weight,
            bias,
            idx,
            labels_c,
            lse_c,
            g,
            p.ignore_index,
            rows,
            kept,
            reuse_kept,
        )
    gh, gw, gb = grads.finish(idx, tuple(hidden.shape), weight.dtype)
    return tuple(hidden.new_empty((0,)) if x is None else x for x in (gh, gw, gb))  # outputs never alias


@_bwd_op.register_fake
def _bwd_fake(grad_logp, hidden, weight, bias, labels, lse, logits, params):
    p = FusedLinearParams.decode(params)
    return (
        hidden.new_empty(hidden.shape if p.grad_hidden else (0,)),
        weight.new_empty(weight.shape if p.grad_weight else (0,)),
        weight.new_empty((weight.shape[0],) if p.grad_bias and bias is not None else (0,)),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, params = inputs
    _, lse, logits = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, logits)
    ctx.params = params
    ctx.mark_non_differentiable(lse, logits)


def _backward(ctx, grad_out, _grad_lse, _grad_logits):
    hidden, weight, bias, labels, lse, logits = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    if not (need_h or need_w or need_b):
        return None, None, None, None, None
    params = replace(
        FusedLinearParams.decode(ctx.params), grad_hidden=need_h, grad_weight=need_w, grad_bias=need_b
    )
    args = (grad_out, hidden, weight, bias, labels, lse, logits, params.encode())
    if logits.numel() and not torch.is_grad_enabled() and may_reuse_saved(logits, params.donate_outputs):
        # The kept logits are read by nothing after this backward (eager, graph not retained, the
        # caller dropped them): overwrite them instead of copying. The op itself never mutates its
        # inputs (its schema says so; torch.compile and opcheck go through it).
        gh, gw, gb = _bwd_impl(*args, reuse_kept=True)
    else:
        gh, gw, gb = _bwd_op(*args)
    return gh if need_h else None, gw if need_w else None, gb if need_b else None, None, None


def _double_backward(ctx, *_grads):
    raise double_backward_error("fused_linear_token_logprobs", "synpo_kernels.token_logprobs")


_fwd_op.register_autograd(_backward, setup_context=_setup_context)
register_autocast(_FWD, cast_args=(0, 1, 2))
_bwd_op.register_autograd(_double_backward)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


def _prepare(hidden, weight, labels, bias, ignore_index, config):
    check_linear_inputs(hidden, weight, bias)
    check_labels_match("labels", labels, hidden)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    return resolve_backend(config.backend, hidden.device)


def fused_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    shift: bool = True,
    backend: str | None = None,
    chunk_bytes: int | None = None,
    weight_grad_accumulation: str = "auto",
) -> torch.Tensor:
    """Per-token log-probs of ``labels`` under ``hidden @ weight.T (+ bias)``, never materializing
    the ``N x V`` logits.

    Args:
        hidden: ``(..., T, D)`` float32/bfloat16/float16 (float64 too): the lm_head input.
        weight: ``(V, D)`` lm_head weight, same dtype and device as ``hidden``.
        labels: ``(..., T)`` integer, Hugging Face style (aligned with ``input_ids``).
        bias: optional ``(V,)``.
        ignore_index: label value with no target (prompt, video/image tokens, padding).
        shift: the logits at ``t - 1`` score ``labels[..., t]`` (causal LM); ``False``: at ``t``.
        backend, chunk_bytes, weight_grad_accumulation: execution options,
            see :class:`~synpo_kernels.ops.fused_linear_common.FusedLinearConfig`.

    Returns:
        float32 (float64 for float64 inputs) tensor of ``labels.shape``, 0 where the label is
        ignored (and at ``t = 0`` when shifting): the contract of :func:`synpo_kernels.token_logprobs`.
        Differentiable w.r.t. ``hidden``, ``weight`` and ``bias`` under any per-token upstream
        gradient (the backward starts from the forward's logits when every position fits one chunk
        buffer, else recomputes them chunk by chunk).
    """
    config = FusedLinearConfig(backend, chunk_bytes, weight_grad_accumulation)
    backend_name = _prepare(hidden, weight, labels, bias, ignore_index, config)
    grad_on = torch.is_grad_enabled()
    params = FusedLinearParams(
        ignore_index, bool(shift), config, backend_name,
        grad_hidden=grad_on and hidden.requires_grad,
        grad_weight=grad_on and weight.requires_grad,
        grad_bias=grad_on and bias is not None and bias.requires_grad,
        donate_outputs=True,  # the kept logits are dropped below: the backward may overwrite them
    )  # fmt: skip
    logp, _lse, _logits = _fwd_op(hidden, weight, bias, labels, params.encode())
    return logp


def fused_linear_sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    average: bool = True,
    **options,
) -> torch.Tensor:
    """Per-row mean (``average=True``) or sum of response-token log-probs, shape ``labels.shape[:-1]``.

    The fused counterpart of :func:`synpo_kernels.sequence_logprobs`; ``options`` are the keyword
    arguments of :func:`fused_linear_token_logprobs` (``bias``, ``ignore_index``, ``shift``,
    ``backend``, ``chunk_bytes``, ``weight_grad_accumulation``). Typically called under
    ``torch.no_grad()`` for DPO/IPO reference log-probs (then only the ``2 n D V`` forward runs).
    Differentiable otherwise. A row with no response token raises ``ValueError`` when averaging.
    """
    token_logp = fused_linear_token_logprobs(hidden, weight, labels, **options)
    total = token_logp.sum(-1)  # ignored positions hold exact zeros
    if not average:
        return total
    mask = labels != options.get("ignore_index", IGNORE_INDEX)
    if options.get("shift", True):
        mask[..., 0] = False
    count = mask.sum(-1)
    check_nonempty_rows("labels", count.reshape(-1))
    return total / count.to(total.dtype)


# ---------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------


class FusedLinearTokenLogprobs(nn.Module):
    """Module form of :func:`fused_linear_token_logprobs`: ``forward(hidden, weight, labels, bias=None)``."""

    def __init__(self, ignore_index: int = IGNORE_INDEX, shift: bool = True, **execution):
        """``execution``: ``backend``, ``chunk_bytes``, ``weight_grad_accumulation``
        (:class:`~synpo_kernels.ops.fused_linear_common.FusedLinearConfig`)."""
        super().__init__()
        self.ignore_index = ignore_index
        self.shift = shift
        self.config = FusedLinearConfig(**execution)

    def forward(self, hidden, weight, labels, bias=None) -> torch.Tensor:
        return fused_linear_token_logprobs(
            hidden,
            weight,
            labels,
            bias=bias,
            ignore_index=self.ignore_index,
            shift=self.shift,
            **self.config.kwargs(),
        )

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, shift={self.shift}, {self.config}"
