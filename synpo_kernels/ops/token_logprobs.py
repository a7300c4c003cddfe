"""Fused per-token log-softmax gather: ``logp_t = log softmax(z_t)[y_t]`` without an N x V output.

Order: kernels (C++/CUDA in ``csrc/``, registered for the ``torch.ops.synpo_kernels.*`` schemas of
:mod:`.schemas`; a chunked PyTorch fallback when the extension is not built) -> fake kernels ->
autograd (first and second order) -> public function -> ``nn.Module``.

The three ops work on a 2-D ``(N, V)`` view of the logits (unit stride along V, any row stride) and
on labels *already aligned* with the rows (``labels[i]`` is the token row ``i`` scores). The public
function does the Hugging Face shift by shifting the small label tensor, never the logits, so the
logits are read in place.

- ``token_logprobs_fwd(logits, labels, ignore_index) -> (logp, lse)``: ``logp`` ``(N,)`` and
  ``lse`` ``(N, 2)``, per row the max ``m`` and ``log s = log sum exp(z - m)`` (the log-sum-exp
  ``m + log s`` kept as two floats), in the accumulation dtype (float32; float64 for float64
  logits); 0 on ignored rows, whose logits are never read. ``logp = (z_y - m) - log s``.
- ``token_logprobs_bwd(grad_logp, logits, labels, lse, ignore_index) -> grad_logits``:
  ``grad * (onehot - softmax)`` in the logits' dtype, contiguous ``(N, V)``; zero on ignored rows.
  ``softmax = exp((z - m) - log s)``, never ``exp(z - lse)`` with ``lse`` rounded to one float:
  ``z - m`` is exact near the max, so ``1 - p`` of a confident token (``p`` near 1, ``|lse|`` ~
  20-40 in real LMs) keeps plain PyTorch's fp32 accuracy instead of the rounding of ``lse``.
- ``token_logprobs_bwd_(logits, grad_logp, labels, lse, ignore_index)``: the same, written over the
  logits buffer (the fused linear CPU path uses it to keep one chunk buffer).
"""

from __future__ import annotations

import torch
from torch import nn

from synpo_kernels import _ext
from synpo_kernels._validation import (
    check_floating,
    check_label_range,
    check_labels,
    check_same_device,
)
from synpo_kernels.ops import schemas
from synpo_kernels.reference import IGNORE_INDEX

__all__ = ["TokenLogprobs", "accumulation_dtype", "shift_and_flatten_labels", "token_logprobs"]

_LIB = schemas.LIB  # the schemas are defined in synpo_kernels/ops/schemas.py

# Rows per chunk of the fallback: bounds its fp32 temporaries to about 64 MiB.
_FALLBACK_CHUNK_ELEMENTS = 1 << 24


# ---------------------------------------------------------------------------------------------
# Kernels: the compiled ones live in csrc/. This PyTorch fallback is registered where no compiled
# kernel exists (extension not built, or built without CUDA and running on a GPU). It computes the
# same thing chunk by chunk, in fp32, so its memory stays bounded too.
# ---------------------------------------------------------------------------------------------


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float32/bfloat16/float16 logits; float64 only for float64 logits."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fallback_chunks(n_rows: int, vocab: int):
    step = max(1, _FALLBACK_CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def _check_fallback_labels(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """The compiled kernels' label check, with their message: ``ValueError`` naming ``labels``."""
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"labels: value {int(labels[row])} at row {row} is outside [0, {vocab}) and is not "
            f"ignore_index ({ignore_index})"
        )


def _row_lse(z: torch.Tensor) -> torch.Tensor:
    """``(rows, 2)``: per row the max ``m`` and ``log s = log sum exp(z - m)``, as the compiled
    kernels (and ``log_softmax``) compute them: ``log s`` NaN for a row holding NaN or +inf
    (``torch.logsumexp`` would give +inf, hence -inf log-probs), -inf for an all -inf row.

    ``s = 1 + rest`` with the max's own term kept out of the float sum and ``log s = log1p(rest)``,
    as the C++ kernel: ``rest`` is ``1 - p`` of a confident target (~1e-6), which a sum holding the
    1 would round to fp32's resolution at 1."""
    row_max = z.amax(dim=-1, keepdim=True)
    shift = torch.where(row_max == float("-inf"), 0.0, row_max)
    terms = torch.exp(z - shift)
    finite = torch.isfinite(row_max)
    at_max = (z == row_max) & finite
    rest = torch.where(at_max, 0.0, terms).sum(-1, keepdim=True) + (at_max.sum(-1, keepdim=True) - 1)
    log_sum = torch.where(finite, torch.log1p(rest), torch.log(terms.sum(-1, keepdim=True)))
    return torch.cat([row_max, log_sum], dim=-1)


def _fwd_fallback(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    n_rows, vocab = logits.shape
    _check_fallback_labels(labels, vocab, ignore_index)
    acc = accumulation_dtype(logits.dtype)
    logp = torch.zeros(n_rows, dtype=acc, device=logits.device)
    lse = torch.zeros((n_rows, 2), dtype=acc, device=logits.device)
    for start, end in _fallback_chunks(n_rows, vocab):
        lab = labels[start:end]
        valid = lab != ignore_index
        z = logits[start:end].to(acc)
        row_lse = _row_lse(z)
        target = z.gather(-1, torch.where(valid, lab, 0).long().unsqueeze(-1)).squeeze(-1)
        logp[start:end] = torch.where(valid, (target - row_lse[:, 0]) - row_lse[:, 1], 0.0)
        lse[start:end] = torch.where(valid[:, None], row_lse, 0.0)
    return logp, lse


def _grad_chunk(grad_logp, logits, labels, lse, ignore_index, start, end):
    lab = labels[start:end]
    valid = lab != ignore_index
    acc = accumulation_dtype(logits.dtype)
    g = torch.where(valid, grad_logp[start:end].to(acc), 0.0)
    row_max, log_sum = lse[start:end, :1], lse[start:end, 1:]
    z = logits[start:end].to(acc)
    grad = -g[:, None] * torch.exp((z - row_max) - log_sum)
    # The target entry g * (1 - p) = -g * expm1(log p): relative precision even for p near 1.
    target = torch.where(valid, lab, 0).long().unsqueeze(-1)
    log_p = (z.gather(-1, target) - row_max) - log_sum
    grad.scatter_(-1, target, torch.where(valid[:, None], -g[:, None] * torch.expm1(log_p), 0.0))
    return grad


def _check_fallback_lse(lse: torch.Tensor, n_rows: int) -> None:
    """The compiled kernels' shape check of ``lse``, with their message."""
    if tuple(lse.shape) != (n_rows, 2):
        raise ValueError(f"lse: expected shape ({n_rows}, 2), got {tuple(lse.shape)}")


def _bwd_fallback(grad_logp, logits, labels, lse, ignore_index):
    _check_fallback_labels(labels, logits.shape[1], ignore_index)
    _check_fallback_lse(lse, logits.shape[0])
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    for start, end in _fallback_chunks(*logits.shape):
        out[start:end] = _grad_chunk(grad_logp, logits, labels, lse, ignore_index, start, end)
    return out


def _bwd_inplace_fallback(logits, grad_logp, labels, lse, ignore_index):
    _check_fallback_labels(labels, logits.shape[1], ignore_index)
    _check_fallback_lse(lse, logits.shape[0])
    for start, end in _fallback_chunks(*logits.shape):
        grad = _grad_chunk(grad_logp, logits, labels, lse, ignore_index, start, end)
        logits[start:end] = grad


def _register_ops() -> None:
    if not _ext.HAS_CPP_EXT:
        fallback_keys = ("CPU", "CUDA")
    elif not _ext.HAS_CUDA_KERNELS:
        fallback_keys = ("CUDA",)
    else:
        fallback_keys = ()
    for key in fallback_keys:
        torch.library.impl(f"{_LIB}::token_logprobs_fwd", key)(_fwd_fallback)
        torch.library.impl(f"{_LIB}::token_logprobs_bwd", key)(_bwd_fallback)
        torch.library.impl(f"{_LIB}::token_logprobs_bwd_", key)(_bwd_inplace_fallback)


_register_ops()


# ---------------------------------------------------------------------------------------------
# Fake (meta) kernels, so torch.compile and torch.export trace the ops without running them.
# ---------------------------------------------------------------------------------------------


@torch.library.register_fake(f"{_LIB}::token_logprobs_fwd")
def _fwd_fake(logits, labels, ignore_index):
    n_rows = logits.shape[0]
    acc = accumulation_dtype(logits.dtype)
    return logits.new_empty((n_rows,), dtype=acc), logits.new_empty((n_rows, 2), dtype=acc)


@torch.library.register_fake(f"{_LIB}::token_logprobs_bwd")
def _bwd_fake(grad_logp, logits, labels, lse, ignore_index):
    return logits.new_empty(logits.shape)


@torch.library.register_fake(f"{_LIB}::token_logprobs_bwd_")
def _bwd_inplace_fake(logits, grad_logp, labels, lse, ignore_index):
    return None


# ---------------------------------------------------------------------------------------------
# Autograd: d logp_t / d z_t = onehot(y_t) - softmax(z_t); lse (max, log sum exp(z - max)) is an
# internal, non-differentiable output (saved so backward reads the logits once and never recomputes
# the row reduction).
# ---------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    logits, labels, ignore_index = inputs
    _, lse = output
    ctx.save_for_backward(logits, labels, lse)
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_logp, _grad_lse):
    logits, labels, lse = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0]:
        grad_logits = torch.ops.synpo_kernels.token_logprobs_bwd(
            grad_logp.contiguous(), logits, labels, lse, ctx.ignore_index
        )
    return grad_logits, None, None


torch.library.register_autograd(f"{_LIB}::token_logprobs_fwd", _backward, setup_context=_setup_context)


# Double backward: the backward op computes G = g * (onehot(y) - softmax(z)) (0 on ignored rows), a
# differentiable function of g and z (lse is softmax's normalizer, a function of z, not a separate
# input). With U the gradient of G and s = softmax(z), per row:
#   dL/dg = U[y] - sum_j U_j s_j,      dL/dz = -g * s * (U - sum_j U_j s_j).
# Written with plain differentiable PyTorch ops that recompute s from z (materializing rows x V in the
# accumulation dtype: second-order gradients are not a hot path), so higher orders stay exact too.


def _bwd_setup_context(ctx, inputs, output):
    grad_logp, logits, labels, _lse, ignore_index = inputs
    ctx.save_for_backward(grad_logp, logits, labels)
    ctx.ignore_index = ignore_index


def _bwd_backward(ctx, grad_grad_logits):
    grad_logp, logits, labels = ctx.saved_tensors
    need_g, need_z = ctx.needs_input_grad[:2]
    acc = accumulation_dtype(logits.dtype)
    valid = labels != ctx.ignore_index
    softmax = torch.softmax(torch.where(valid[:, None], logits.to(acc), 0.0), dim=-1)
    u = grad_grad_logits.to(acc)
    u_dot_s = (u * softmax).sum(-1)
    grad_g = grad_z = None
    if need_g:
        u_label = u.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
        grad_g = torch.where(valid, u_label - u_dot_s, 0.0).to(grad_logp.dtype)
    if need_z:
        g = torch.where(valid, grad_logp.to(acc), 0.0)
        grad_z = (-g[:, None] * softmax * (u - u_dot_s[:, None])).to(logits.dtype)
    return grad_g, grad_z, None, None, None


torch.library.register_autograd(
    f"{_LIB}::token_logprobs_bwd", _bwd_backward, setup_context=_bwd_setup_context
)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


def shift_and_flatten_labels(labels: torch.Tensor, ignore_index: int, shift: bool) -> torch.Tensor:
    """Labels aligned with the logits rows that score them, flattened to int64 ``(N,)``."""
    aligned = labels.long()
    if shift:
        pad = aligned.new_full((*aligned.shape[:-1], 1), ignore_index)
        aligned = torch.cat([aligned[..., 1:], pad], dim=-1)
    return aligned.reshape(-1).contiguous()


def _as_rows(logits: torch.Tensor) -> torch.Tensor:
    rows = logits.reshape(-1, logits.shape[-1])  # a view whenever the layout allows it
    if rows.stride(-1) != 1 or rows.stride(0) < rows.shape[-1]:
        rows = rows.contiguous()
    return rows


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    shift: bool = True,
) -> torch.Tensor:
    """Per-token log-probabilities of ``labels`` under ``logits``, without an N x V output.

    Args:
        logits: ``(..., T, V)`` float32, bfloat16 or float16 (float64 is accepted too). Any layout;
            the rows are read in place when ``reshape`` can view them.
        labels: ``(..., T)`` integer, Hugging Face style (aligned with ``input_ids``).
        ignore_index: label value that marks positions with no target.
        shift: when True, the logits at ``t - 1`` score ``labels[..., t]`` (causal LM); when False,
            the logits at ``t`` score ``labels[..., t]``.

    Returns:
        float32 tensor (float64 for float64 logits) of ``labels.shape``:
        ``log softmax(logits[..., t-1, :])[labels[..., t]]`` (``t`` instead of ``t - 1`` without
        shift), 0 where the label is ``ignore_index`` and at ``t = 0`` when shifting.
        Differentiable w.r.t. ``logits``; the gradient is written in one pass in the logits' dtype.
    """
    check_floating("logits", logits)
    check_labels("labels", labels)
    check_same_device(logits=logits, labels=labels)
    if logits.dim() < 1 or tuple(logits.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"labels: shape {tuple(labels.shape)} must equal logits.shape[:-1] "
            f"(logits has shape {tuple(logits.shape)})"
        )
    if labels.dim() < 1:
        raise ValueError("labels: needs at least one (sequence) dimension")
    vocab = logits.shape[-1]
    if vocab == 0:
        raise ValueError("logits: the vocabulary dimension is empty")
    check_label_range("labels", labels, vocab, ignore_index)
    if labels.numel() == 0:
        return torch.zeros(labels.shape, dtype=accumulation_dtype(logits.dtype), device=labels.device)

    flat_labels = shift_and_flatten_labels(labels, ignore_index, shift)
    logp, _ = torch.ops.synpo_kernels.token_logprobs_fwd(_as_rows(logits), flat_labels, ignore_index)
    logp = logp.view(labels.shape)
    if shift:
        # Row t-1's result belongs to label position t.
        logp = torch.cat([logp.new_zeros((*labels.shape[:-1], 1)), logp[..., :-1]], dim=-1)
    return logp


class TokenLogprobs(nn.Module):
    """Module form of :func:`token_logprobs`."""

    def __init__(self, ignore_index: int = IGNORE_INDEX, shift: bool = True):
        super().__init__()
        self.ignore_index = ignore_index
        self.shift = shift

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return token_logprobs(logits, labels, ignore_index=self.ignore_index, shift=self.shift)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, shift={self.shift}"
