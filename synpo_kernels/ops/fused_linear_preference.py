"""Fused lm_head -> log-probs -> per-row statistics -> preference loss, gradients in the forward.

Order: kernels (Triton row passes in :mod:`.fused_linear_kernels`, C++ token ops on the torch
backend) -> launcher (pair-chunk planning and loop) -> the op (one opaque ``torch.library.custom_op``,
``torch.ops.synpo_kernels.fused_linear_preference_loss``: fake kernel, autograd) -> public functions ->
``nn.Module``s.

Method. Every loss of the family (SynPO, DPO, IPO, SimPO, CPO, ORPO; :mod:`synpo_kernels.loss_registry`)
is a mean over pairs of a small function of per-row (sum logp, sum p, count) and of batch constants
known from the labels alone (e.g. the pooled NLL's chosen-token count; :mod:`synpo_kernels.losses`),
so the gradient with respect to token ``t`` of row ``r`` is ``g_t = a_r + b_r * p_t`` and depends only
on the rows of its own pair. The batch ``[chosen; rejected]`` is therefore cut into chunks of *whole pairs*
(chosen rows ``p0..p1`` and their rejected partners), sized so the chunk's scored tokens times ``V``
fit the chunk buffer. Per chunk, in the forward pass:

1. ``logits = h_c @ W^T (+ b)`` into the chunk buffer (input dtype)            ``2 m D V`` FLOPs
2. row pass: fp32 log-sum-exp and target log-prob per token                   read ``m V``
3. per-row stats (segment sums over ``m`` tokens), ``(a, b)`` by autograd through the reference
   per-pair formulas on ``2P`` scalars (float64), ``g_t = a_r + b_r p_t``
4. row pass: ``dlogits = g_t (onehot - softmax)`` over the buffer, bias-grad sums  read+write ``m V``
5. ``grad_h_c = dlogits @ W``, ``grad_W += dlogits^T @ h_c``                  ``4 m D V`` FLOPs

Total ``6 n D V`` FLOPs (the floor), ``n`` = scored tokens only; ~``8 n V`` bytes of chunk traffic
in bf16 (GEMM write, two row-pass reads, one write); memory = one chunk buffer + gradients. The
gradients are outputs of the op (the hidden one full-size, ``hidden``'s shape, so the op's output
shapes are static and ``torch.compile`` can hold it; the weight and bias ones in their accumulation
dtype), saved for the backward, which returns them scaled by the incoming scalar gradient (new
tensors: a retained graph can be differentiated again). Only the gradients that are needed are
computed: with a frozen lm_head (LoRA training, as upstream SynPO) step 5's weight GEMM is skipped
(``4 n D V``); under ``torch.no_grad()`` only steps 1-3 run (``2 n D V``).

The buffer holds ``chunk_bytes`` of logits, grown up to ``PAIR_GROWTH`` (4) times that to fit the
largest pair whole. A pair beyond even that is processed in sub-chunks, in two passes (statistics,
then gradients with the logits recomputed): ``8 m D V`` for that pair only.
"""

from __future__ import annotations

import torch
from torch import nn

from synpo_kernels._validation import (
    check_label_range,
    check_labels_match,
    check_linear_inputs,
    check_nonempty_rows,
    check_pairs,
)
from synpo_kernels.loss_registry import REFERENCE_OPTION, get_loss
from synpo_kernels.losses import (
    TENSOR_OPTIONS,
    LossContext,
    LossSpec,
    PreferenceStats,
    check_tensor_options,
    empty_row_reason,
    loss_coefficients,
    loss_spec,
    make_loss_spec,
    preference_stats,
    select_pairs,
)
from synpo_kernels.ops.fused_linear_common import (
    FusedLinearConfig,
    FusedLinearParams,
    GradBuffers,
    acc_weight_dtype,
    chunk_buffer,
    compact_tokens,
    double_backward_error,
    hidden_rows,
    register_autocast,
    resolve_backend,
    scaled_gradient,
)
from synpo_kernels.ops.token_logprobs import accumulation_dtype
from synpo_kernels.reference import IGNORE_INDEX, RowStats

__all__ = [
    "FusedLinearPreferenceLoss",
    "FusedLinearSynPOLoss",
    "PreferenceStats",
    "fused_linear_preference_loss",
    "fused_linear_synpo_loss",
]


# ---------------------------------------------------------------------------------------------
# Launcher: chunk planning over whole pairs, and the per-chunk work.
# ---------------------------------------------------------------------------------------------

PAIR_GROWTH = 4
"""The chunk buffer may grow to this many times ``chunk_bytes`` to hold the largest pair whole."""


class _Plan:
    """Token order and chunks of a ``[chosen; rejected]`` batch (built on the host, one sync).

    ``tok_idx`` (n,): rows of ``hidden`` viewed as ``(N, D)``, grouped chunk by chunk (chosen rows of
    the chunk's pairs, then their rejected rows). ``groups``: ``(p0, p1, t0, t1)`` per chunk.
    """

    def __init__(
        self, labels, ignore_index, shift, max_rows, growth=None, empty_reason=None, whole_batch=False
    ):
        rows, seq = labels.shape
        self.num_pairs = pairs = rows // 2
        aligned, idx = compact_tokens(labels, ignore_index, shift)
        row_of = torch.div(idx, seq, rounding_mode="floor")
        counts = torch.bincount(row_of, minlength=rows).cpu()
        check_nonempty_rows("labels", counts, empty_reason)
        self.counts = counts
        c = counts.tolist()
        offsets = [0]
        for x in c:
            offsets.append(offsets[-1] + x)
        # The buffer grows (up to `growth` times its budget) to hold the largest pair: a pair split
        # over several chunks costs a second pass (8 m D V instead of 6).
        growth = PAIR_GROWTH if growth is None else growth
        largest_pair = max(c[i] + c[pairs + i] for i in range(pairs))
        self.max_rows = max_rows = max(max_rows, min(largest_pair, growth * max_rows))
        # Greedy grouping of consecutive pairs under max_rows tokens; an oversized pair stands alone.
        # A loss that couples the pairs (``LossDef.whole_batch``: AOT's sort) needs them in one group.
        groups = []
        p0, tokens = 0, 0
        for i in range(pairs):
            size = c[i] + c[pairs + i]
            if i > p0 and tokens + size > max_rows and not whole_batch:
                groups.append((p0, i))
                p0, tokens = i, 0
            tokens += size
        groups.append((p0, pairs))
        pieces, self.groups, t = [], [], 0
        for g0, g1 in groups:
            chosen = idx[offsets[g0] : offsets[g1]]
            rejected = idx[offsets[pairs + g0] : offsets[pairs + g1]]
            pieces += [chosen, rejected]
            m = chosen.shape[0] + rejected.shape[0]
            self.groups.append((g0, g1, t, t + m))
            t += m
        self.tok_idx = torch.cat(pieces)
        self.tok_labels = aligned.index_select(0, self.tok_idx)
        self.tok_row = torch.div(self.tok_idx, seq, rounding_mode="floor")

    def group_counts(self, g0, g1, device):
        """Scored tokens of each row of the chunk's ``[chosen; rejected]`` block (int64, on ``device``):
        the lengths of its rows' consecutive token runs."""
        c = torch.cat([self.counts[g0:g1], self.counts[self.num_pairs + g0 : self.num_pairs + g1]])
        return c.to(device=device, non_blocking=True)


def _run(backend, plan, hidden2d, weight, bias, grads, spec, tensors, ignore_index):
    """All chunks; returns per-row ``sum_logp``, ``sum_p`` (2B,) and per-pair losses (B,)."""
    max_rows = plan.max_rows
    acc = accumulation_dtype(weight.dtype)
    dev = weight.device
    pairs = plan.num_pairs
    # Batch constants (e.g. the pooled NLL's chosen-token count), known from the labels: every chunk's
    # per-pair losses are then terms of the batch loss with their final scale.
    context = LossContext(pairs, float(plan.counts[:pairs].sum()))
    sum_logp = torch.empty(2 * pairs, dtype=acc, device=dev)
    sum_p = torch.empty(2 * pairs, dtype=acc, device=dev)
    losses = torch.empty(pairs, dtype=acc, device=dev)
    largest = max(t1 - t0 for _, _, t0, t1 in plan.groups)
    buf = chunk_buffer(min(largest, max_rows), weight)
    for g0, g1, t0, t1 in plan.groups:
        subs = [(s, min(t1, s + max_rows)) for s in range(t0, t1, max_rows)]
        logp = torch.empty(t1 - t0, dtype=acc, device=dev)
        lse = torch.empty((t1 - t0, 2), dtype=acc, device=dev)  # per row: max, log sum exp(z - max)
        h_c = logits = None
        for s0, s1 in subs:  # pass 1: statistics (one sub-chunk unless a pair exceeds the buffer)
            h_c = hidden2d.index_select(0, plan.tok_idx[s0:s1])
            logits = backend.logits(h_c, weight, bias, buf[: s1 - s0])
            lp, ls = backend.row_fwd(logits, plan.tok_labels[s0:s1], ignore_index)
            logp[s0 - t0 : s1 - t0] = lp
            lse[s0 - t0 : s1 - t0] = ls
        p = logp.exp()
        # Per-row sums as segment sums (the chunk's tokens come row by row): no atomics, so a CUDA
        # run repeats bit for bit; index_add_ on CUDA adds in a varying order.
        lengths = plan.group_counts(g0, g1, dev)
        s_logp = torch.segment_reduce(logp, "sum", lengths=lengths)
        s_p = torch.segment_reduce(p, "sum", lengths=lengths)
        count = lengths.to(acc)
        chunk_losses, a, b = loss_coefficients(
            s_logp, s_p, count, spec, select_pairs(tensors, pairs, g0, g1), 1.0 / pairs, context
        )
        sum_logp[g0:g1], sum_logp[pairs + g0 : pairs + g1] = s_logp[: g1 - g0], s_logp[g1 - g0 :]
        sum_p[g0:g1], sum_p[pairs + g0 : pairs + g1] = s_p[: g1 - g0], s_p[g1 - g0 :]
        losses[g0:g1] = chunk_losses
        if not grads.any:
            continue
        # Each row's coefficients over its run of tokens (output_size given: no host sync).
        g = (
            a.repeat_interleave(lengths, output_size=t1 - t0)
            + b.repeat_interleave(lengths, output_size=t1 - t0) * p
        )
        for s0, s1 in subs:  # pass 2: gradients (logits still in the buffer for a single sub-chunk)
            if len(subs) > 1:
                h_c = hidden2d.index_select(0, plan.tok_idx[s0:s1])
                logits = backend.logits(h_c, weight, bias, buf[: s1 - s0])
            r0, r1 = s0 - t0, s1 - t0
            backend.row_grad_(logits, g[r0:r1], plan.tok_labels[s0:s1], lse[r0:r1], ignore_index, grads.b)
            grads.add_chunk(backend, logits, h_c, s0, s1, plan.tok_idx[s0:s1])
    return sum_logp, sum_p, losses


# ---------------------------------------------------------------------------------------------
# The op: one opaque custom op (torch.compile never traces the host-side chunk plan), its fake kernel
# and its autograd formula. Outputs: the loss, the per-row statistics (for return_stats), the
# per-pair losses and the three gradients computed in the forward (empty when not requested), which
# are saved for the backward through ctx.save_for_backward.
# ---------------------------------------------------------------------------------------------

_OP = "synpo_kernels::fused_linear_preference_loss"
_SCHEMA = (
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor? ref_logps, str params) -> "
    "(Tensor loss, Tensor sum_logp, Tensor sum_p, Tensor count, Tensor pair_losses, "
    "Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)"
)
assert TENSOR_OPTIONS == (REFERENCE_OPTION,), "the op's schema has one per-row tensor option"


@torch.library.custom_op(_OP, mutates_args=(), schema=_SCHEMA)
def _fused_linear_preference_op(hidden, weight, bias, labels, ref_logps, params):
    p = FusedLinearParams.decode(params)
    spec = p.spec
    check_label_range("labels", labels, weight.shape[0], p.ignore_index)
    backend, w_acc, max_rows = p.execution(weight)
    empty_reason = empty_row_reason(spec, hidden.shape[0] // 2)
    whole_batch = get_loss(spec.name).whole_batch
    plan = _Plan(
        labels, p.ignore_index, p.shift, max_rows, empty_reason=empty_reason, whole_batch=whole_batch
    )
    need_b = p.grad_bias and bias is not None
    grads = GradBuffers(
        plan.tok_idx.shape[0], hidden, weight, bias, p.grad_hidden, p.grad_weight, need_b, w_acc, full=True
    )
    tensors = {} if ref_logps is None else {REFERENCE_OPTION: ref_logps}
    sum_logp, sum_p, losses = _run(
        backend, plan, hidden_rows(hidden), weight, bias, grads, spec, tensors, p.ignore_index
    )
    gh, gw, gb = grads.finish(plan.tok_idx, tuple(hidden.shape))
    count = plan.counts.to(device=weight.device, dtype=sum_logp.dtype)
    grads = tuple(hidden.new_empty((0,)) if g is None else g for g in (gh, gw, gb))  # outputs never alias
    return (losses.sum() / plan.num_pairs, sum_logp, sum_p, count, losses, *grads)


@_fused_linear_preference_op.register_fake
def _fused_linear_preference_fake(hidden, weight, bias, labels, ref_logps, params):
    p = FusedLinearParams.decode(params)
    acc = accumulation_dtype(weight.dtype)
    rows, vocab = hidden.shape[0], weight.shape[0]
    vec = lambda n: hidden.new_empty((n,), dtype=acc)
    w_acc = acc_weight_dtype(weight, p.config.weight_grad_accumulation)
    return (
        hidden.new_empty((), dtype=acc), vec(rows), vec(rows), vec(rows), vec(rows // 2),
        hidden.new_empty(hidden.shape if p.grad_hidden else (0,)),
        weight.new_empty(weight.shape if p.grad_weight else (0,), dtype=w_acc if p.grad_weight else None),
        vec(vocab) if p.grad_bias and bias is not None else hidden.new_empty((0,)),
    )  # fmt: skip


def _setup_context(ctx, inputs, output):
    hidden, weight, _bias, _labels, _ref_logps, params = inputs
    ctx.params = FusedLinearParams.decode(params)
    ctx.dtypes = (hidden.dtype, weight.dtype)
    ctx.save_for_backward(*output[5:])
    ctx.mark_non_differentiable(*output[1:])
    # No zero gradients for the non-differentiable outputs: one of them is (V, D) fp32.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, *_unused):
    if torch.is_grad_enabled():  # backward(create_graph=True): a graph of these gradients is wanted
        raise double_backward_error("fused_linear_preference_loss", "synpo_kernels.preference_loss")
    if grad_loss is None:  # set_materialize_grads(False): nothing flowed into the loss
        return (None,) * 6
    gh, gw, gb = ctx.saved_tensors
    p, (hidden_dtype, weight_dtype) = ctx.params, ctx.dtypes
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    donated = p.donate_outputs
    return (
        scaled_gradient(gh, grad_loss, hidden_dtype, donated) if need_h and p.grad_hidden else None,
        scaled_gradient(gw, grad_loss, weight_dtype, donated) if need_w and p.grad_weight else None,
        scaled_gradient(gb, grad_loss, weight_dtype, donated) if need_b and p.grad_bias else None,
        None, None, None,
    )  # fmt: skip


_fused_linear_preference_op.register_autograd(_backward, setup_context=_setup_context)
register_autocast(_OP, cast_args=(0, 1, 2))


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


def _preference(hidden, weight, labels, bias, spec: LossSpec, tensors, ignore_index, shift, config):
    check_linear_inputs(hidden, weight, bias)
    if hidden.dim() != 3:
        raise ValueError(
            f"hidden: expected shape (2B, T, D) for a preference batch, got {tuple(hidden.shape)}"
        )
    check_labels_match("labels", labels, hidden)
    check_pairs("hidden", hidden.shape[0])
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    check_tensor_options(tensors, hidden.shape[0], hidden.device)
    grad_on = torch.is_grad_enabled()
    params = FusedLinearParams(
        ignore_index, bool(shift), config, resolve_backend(config.backend, hidden.device), spec,
        grad_hidden=grad_on and hidden.requires_grad,
        grad_weight=grad_on and weight.requires_grad,
        grad_bias=grad_on and bias is not None and bias.requires_grad,
        donate_outputs=True,  # the gradient outputs are dropped below
    )  # fmt: skip
    tensors = {k: v.detach() for k, v in tensors.items()}
    loss, sum_logp, sum_p, count, losses, *_grads = _fused_linear_preference_op(
        hidden, weight, bias, labels, tensors.get(REFERENCE_OPTION), params.encode()
    )
    return loss, RowStats(sum_logp, sum_p, count), losses, tensors


def fused_linear_preference_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss: str = "synpo",
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    shift: bool = True,
    return_stats: bool = False,
    backend: str | None = None,
    chunk_bytes: int | None = None,
    weight_grad_accumulation: str = "auto",
    **loss_options,
) -> torch.Tensor | tuple[torch.Tensor, PreferenceStats]:
    """Mean over pairs of a preference loss on ``hidden @ weight.T (+ bias)``, fused, 6 n D V FLOPs.

    Args:
        hidden: ``(2B, T, D)`` lm_head input of a ``[chosen_0..chosen_{B-1}, rejected_0..]`` batch.
        weight: ``(V, D)`` lm_head weight (same dtype/device); ``bias`` optional ``(V,)``.
        labels: ``(2B, T)`` Hugging Face labels (``ignore_index`` on prompt/video/padding).
        loss: a loss of :data:`synpo_kernels.loss_registry.LOSSES`: ``synpo`` | ``dpo`` | ``ipo`` |
            ``simpo`` | ``cpo`` | ``orpo`` (formulas, options and defaults: docs/losses.md).
        loss_options: that loss's options (``alpha``/``beta`` for synpo ...; ``ref_logps=`` a ``(2B,)``
            tensor of per-row *summed* reference log-probs for dpo/ipo, whatever ``average`` says;
            not differentiated).
        return_stats: also return :class:`~synpo_kernels.losses.PreferenceStats` (chosen/rejected
            mean log-prob, chosen mean probability, reward margin, counts, per-pair losses),
            computed in the same pass.
        backend, chunk_bytes, weight_grad_accumulation: execution options,
            see :class:`~synpo_kernels.ops.fused_linear_common.FusedLinearConfig`.

    Returns:
        A 0-dim float32 loss (float64 for float64 inputs), differentiable w.r.t. ``hidden``,
        ``weight`` and ``bias``; with ``return_stats``, ``(loss, stats)``.

    Raises ``ValueError`` for an odd/empty batch, a row with no response token, labels outside
    ``[0, V)``, or mismatched shapes; ``TypeError`` for wrong dtypes or unknown loss options.
    """
    spec, tensors = make_loss_spec(loss, **loss_options)
    config = FusedLinearConfig(backend, chunk_bytes, weight_grad_accumulation)
    value, stats, losses, tensors = _preference(
        hidden, weight, labels, bias, spec, tensors, ignore_index, shift, config
    )
    if return_stats:
        return value, preference_stats(stats, spec, tensors, losses)
    return value


def fused_linear_synpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 30.0,
    beta: float = 0.2,
    **options,
) -> torch.Tensor | tuple[torch.Tensor, PreferenceStats]:
    """SynPO ``mean_b[-sigmoid(alpha (G_w - G_l)) - beta P(y_w)]`` on ``hidden @ weight.T (+ bias)``.

    :func:`fused_linear_preference_loss` with ``loss="synpo"``; ``options`` are its keyword arguments
    (``bias``, ``ignore_index``, ``shift``, ``return_stats``, ``backend``, ``chunk_bytes``,
    ``weight_grad_accumulation``). ``reward_margin`` in the stats is ``G_w - G_l``.
    """
    return fused_linear_preference_loss(
        hidden, weight, labels, loss="synpo", alpha=alpha, beta=beta, **options
    )


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class FusedLinearPreferenceLoss(nn.Module):
    """Module form of :func:`fused_linear_preference_loss`.

    ``forward(hidden, weight, labels, bias=None, **per_call_options)``: per-call options (e.g.
    ``ref_logps=``) are merged over the constructor's. Set ``return_stats=True`` to get
    ``(loss, PreferenceStats)``; the latest stats are also kept in ``self.last_stats`` (detached)
    for logging.
    """

    def __init__(
        self,
        loss: str = "synpo",
        ignore_index: int = IGNORE_INDEX,
        shift: bool = True,
        *,
        return_stats: bool = False,
        **options,
    ):
        """``options``: the execution options (``backend``, ``chunk_bytes``,
        ``weight_grad_accumulation``, :class:`FusedLinearConfig`) and the loss's own options."""
        super().__init__()
        self.config = FusedLinearConfig.pop_from(options)
        # Validate the scalar options now (tensor options such as ref_logps usually come per call).
        loss_spec(loss, **{k: v for k, v in options.items() if k not in TENSOR_OPTIONS})
        self.loss = loss
        self.ignore_index = ignore_index
        self.shift = shift
        self.return_stats = return_stats
        self.options = options
        self.last_stats: PreferenceStats | None = None

    def forward(self, hidden, weight, labels, bias=None, **per_call):
        value, stats = fused_linear_preference_loss(
            hidden, weight, labels, loss=self.loss, bias=bias, ignore_index=self.ignore_index,
            shift=self.shift, return_stats=True, **self.config.kwargs(), **{**self.options, **per_call},
        )  # fmt: skip
        self.last_stats = stats
        return (value, stats) if self.return_stats else value

    def extra_repr(self) -> str:
        opts = {k: v for k, v in self.options.items() if not isinstance(v, torch.Tensor)}
        return (
            f"loss={self.loss!r}, ignore_index={self.ignore_index}, shift={self.shift}, {opts}, {self.config}"
        )


class FusedLinearSynPOLoss(FusedLinearPreferenceLoss):
    """Module form of :func:`fused_linear_synpo_loss`: ``forward(hidden, weight, labels, bias=None)``;
    ``options`` as :class:`FusedLinearPreferenceLoss`'s (``ignore_index``, ``shift``, ``return_stats``,
    ``backend``, ``chunk_bytes``, ``weight_grad_accumulation``)."""

    def __init__(self, alpha: float = 30.0, beta: float = 0.2, **options):
        super().__init__("synpo", alpha=alpha, beta=beta, **options)
