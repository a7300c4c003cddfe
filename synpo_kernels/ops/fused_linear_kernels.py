"""Triton kernels and launchers of the fused linear ops' GPU path (row passes over a chunk buffer).

The fused linear ops (:mod:`.fused_linear_token_logprobs`, :mod:`.fused_linear_preference`) never
hold ``n x V`` logits: they work on a bounded chunk buffer of ``m x V`` logits, produced by a cuBLAS
GEMM (``h_c @ W^T``) in the input dtype, on which two memory-bound row passes run:

1. :func:`row_lse` (``_row_lse_kernel``): per row, an online fp32 log-sum-exp over V and the target
   logit; writes ``logp = (z_y - max) - log s`` (``m`` floats) and ``lse`` (``(m, 2)``: the row max
   and ``log s = log sum exp(z - max)``). Reads the chunk once: ``m * V * itemsize`` bytes.
2. :func:`row_grad_` (``_row_grad_kernel``): ``d = g_t * (onehot(y_t) - exp((z - max) - log s))``
   written *over* the logits buffer in the input dtype (reads and writes it once), with the bias
   gradient's column sums reduced in registers and added with one fp32 atomic per column per program.
   ``z - max`` first: ``exp(z - lse)`` with ``lse = max + log s`` rounded to one float would give
   ``1 - p`` of a confident token (``p`` near 1, ``|lse|`` ~ 20-40) the rounding of ``lse``'s
   magnitude, several times plain fp32 PyTorch's error.

The GEMMs around them (``dlogits @ W`` for the hidden gradient, ``dlogits^T @ h_c`` for the weight
gradient) are cuBLAS, because on Hopper/Ampere cuBLAS is at ~95% of the bf16 peak, which a Triton
GEMM does not reach: the GEMMs are 6 n D V FLOPs, everything else is ~8 bytes per logit
(GEMM write 2, row_lse read 2, row_grad read 2 + write 2 in bf16), i.e. at the issue's shape
(n=16384, V=152064) ~20 GB, ~7 ms at 3 TB/s against ~77 ms of GEMMs.

3. :func:`wgrad_accumulate_` (``_wgrad_kernel``): ``acc[V, D] += dlogits^T @ h_c`` into an fp32
   accumulator for bf16/fp16 inputs, used when cuBLAS' ``addmm(..., out_dtype=float32)`` is not
   available in place (checked once per device; always the case on CPU, so the interpreter tests
   exercise this kernel).

Interpreter (``TRITON_INTERPRET=1``, how CI checks these kernels on CPU): bf16 arithmetic is wrong
there, so loads are upcast right after the load (``UPCAST`` constexpr; the row kernels upcast in
compiled mode too since all their arithmetic is fp32), and the table's ``interpreter`` entries use
large blocks (~2 ms per interpreted block iteration) and two programs, so that the persistent loop
runs there too. Launch configurations come from :mod:`.kernel_tuning`'s table (``kernel_configs.json``,
keyed by arch, dtype and V range). The launchers are registered with
``torch.library.triton_op`` / ``wrap_triton`` so ``torch.compile`` can trace them.
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

import torch

from synpo_kernels.ops import kernel_tuning as tuning

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a Linux dependency of the package
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "INTERPRET",
    "LaunchConfig",
    "grad_config",
    "launch_target",
    "lse_config",
    "row_grad_",
    "row_lse",
    "triton_usable_on",
    "wgrad_accumulate_",
    "wgrad_config",
]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Whether the kernels were defined under the Triton interpreter (read at import, as Triton does)."""


def triton_usable_on(device: torch.device) -> bool:
    """Triton kernels can run on CUDA devices, and on CPU tensors only under the interpreter."""
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return not INTERPRET
    return device.type == "cpu" and INTERPRET


def _tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.float64: tl.float64}[dtype]


if HAS_TRITON:
    LOG2E = tl.constexpr(1.4426950408889634)  # log2(e)

    @triton.jit
    def _row_lse_kernel(
        logits_ptr,
        stride_row,
        labels_ptr,
        logp_ptr,
        lse_ptr,
        n_rows,
        V,
        V_LOAD,
        ignore_index,
        ACC: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        # V_LOAD >= V: columns loaded (a multiple of 16 when the row's padding may be read, so the
        # masked loads are 16-byte vectors even for V = 32001); columns >= V count as -inf.
        # Persistent grid: program p takes row blocks p, p + P, p + 2P, ... (P programs, as many as
        # are resident at once: kernel_tuning's ctas_per_sm x SMs). A row block is BLOCK_M rows,
        # streamed over V in BLOCK_V columns. Every lane keeps its own running (max, sum of exp) in ACC
        # (fp32, fp64 for fp64 logits) and the lanes are reduced once per row after the V loop: no
        # block-wide reduction (barrier) inside it. One exp per logit: exp(-|z - m|) either rescales
        # the running sum (new max) or is added to it. Ignored rows are never read.
        n_blocks = tl.cdiv(n_rows, BLOCK_M)
        for block in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
            rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < n_rows
            labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
            active = row_ok & (labels != ignore_index)
            row_base = logits_ptr + rows.to(tl.int64) * stride_row
            m_lane = tl.full([BLOCK_M, BLOCK_V], float("-inf"), ACC)
            s_lane = tl.zeros([BLOCK_M, BLOCK_V], ACC)
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                mask = active[:, None] & (cols[None, :] < V_LOAD)
                z = tl.load(row_base[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(ACC)
                z = tl.where(cols[None, :] < V, z, float("-inf"))
                new_max = z > m_lane
                # -inf logits (and masked lanes) add exp(-inf) = 0; NaN propagates into the sum.
                diff = tl.where(z == float("-inf"), float("-inf"), tl.where(new_max, m_lane - z, z - m_lane))
                e = tl.exp(diff)
                s_lane = tl.where(new_max, s_lane * e + 1.0, s_lane + e)
                m_lane = tl.maximum(m_lane, z)
            m = tl.max(m_lane, axis=1)
            m_safe = tl.where((m == float("inf")) | (m == float("-inf")), 0.0, m)
            # s = 1 + rest, the max's own 1 kept out of the reduction (s_lane - 1 is exact on the
            # lanes that hold the max) so that rest, 1 - p of a confident target (~1e-6), keeps its
            # relative precision; log s = log1p(rest), by its series below 2^-10 (no log1p in
            # the interpreter). An all -inf row: rest = -1, log s = -inf.
            at_max = m_lane == m[:, None]
            rest = tl.sum(tl.where(at_max, s_lane - 1.0, s_lane * tl.exp(m_lane - m_safe[:, None])), axis=1)
            rest = tl.where(active, rest + (tl.sum(at_max.to(ACC), axis=1) - 1.0), 0.0)
            small = (rest >= 0.0) & (rest < 0.0009765625)
            log_s = tl.where(small, rest * (1.0 - rest * (0.5 - rest * (1.0 / 3.0))), tl.log(1.0 + rest))
            # A +inf logit: NaN, as log_softmax (inf - inf), not a finite sum.
            log_s = tl.where(m == float("inf"), float("nan"), log_s)
            safe_labels = tl.where(active, labels, 0)
            target = tl.load(row_base + safe_labels, mask=active, other=0.0).to(ACC)
            tl.store(logp_ptr + rows, tl.where(active, (target - m) - log_s, 0.0), mask=row_ok)
            tl.store(lse_ptr + 2 * rows, tl.where(active, m, 0.0), mask=row_ok)
            tl.store(lse_ptr + 2 * rows + 1, tl.where(active, log_s, 0.0), mask=row_ok)

    # rows_per_split is not specialized (divisibility by 16): the split is sized from the kernel's
    # occupancy, which must not in turn depend on the split.
    @triton.jit(do_not_specialize=["rows_per_split"])
    def _row_grad_kernel(
        logits_ptr,
        stride_row,
        labels_ptr,
        lse_ptr,
        g_ptr,
        bias_grad_ptr,
        n_rows,
        V,
        V_LOAD,
        rows_per_split,
        ignore_index,
        ACC: tl.constexpr,
        HAS_BIAS_GRAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        # Grid (V blocks, row splits): a program owns BLOCK_V columns of rows_per_split rows, so the
        # bias-gradient column sums stay in registers and cost one atomic per column per program.
        pid_v = tl.program_id(0)
        pid_s = tl.program_id(1)
        cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        col_load = cols < V_LOAD  # see _row_lse_kernel: vector loads; stores stop at V
        row_start = pid_s * rows_per_split
        row_end = tl.minimum(row_start + rows_per_split, n_rows)
        # Column sums kept per (row lane, column) and reduced over the rows once after the loop: a
        # cross-warp reduction per iteration would put barriers in the loop.
        bias_acc = tl.zeros([BLOCK_M, BLOCK_V], ACC)
        for r0 in range(row_start, row_end, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
            active = row_ok & (labels != ignore_index)
            row_max = tl.load(lse_ptr + 2 * rows, mask=active, other=0.0).to(ACC)
            log2_s = tl.load(lse_ptr + 2 * rows + 1, mask=active, other=0.0).to(ACC) * LOG2E
            g = tl.load(g_ptr + rows, mask=active, other=0.0).to(ACC)
            ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_row + cols[None, :]
            z = tl.load(ptrs, mask=active[:, None] & col_load[None, :], other=0.0).to(ACC)
            # (z - max) first (exact near the max); in base 2 with log s pre-scaled per row: one
            # FMA per logit, as exp(z - lse) was (the form exp((z - m) - log s) took 106 registers
            # instead of 80 at sm_90 bf16 V=152064, 2 CTAs/SM instead of 3).
            p = tl.exp2((z - row_max[:, None]) * LOG2E - log2_s[:, None])
            onehot = (cols[None, :] == labels[:, None]).to(ACC)
            d = tl.where(active[:, None] & col_ok[None, :], g[:, None] * (onehot - p), 0.0)
            tl.store(ptrs, d.to(logits_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
            if HAS_BIAS_GRAD:
                bias_acc += d
        if HAS_BIAS_GRAD:
            bias_sum = tl.sum(bias_acc, axis=0)
            tl.atomic_add(bias_grad_ptr + cols, bias_sum.to(bias_grad_ptr.dtype.element_ty), mask=col_ok)

    @triton.jit
    def _wgrad_kernel(
        a_ptr,
        stride_am,
        b_ptr,
        stride_bm,
        acc_ptr,
        stride_acc,
        M,
        V,
        D,
        UPCAST: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_V: tl.constexpr,
    ):
        # acc[V, D] += A[M, V]^T @ B[M, D], fp32 accumulation; grouped tile order for L2 reuse.
        pid = tl.program_id(0)
        n_v = tl.cdiv(V, BLOCK_V)
        n_d = tl.cdiv(D, BLOCK_D)
        group = GROUP_V * n_d
        first_v = (pid // group) * GROUP_V
        size_v = tl.minimum(n_v - first_v, GROUP_V)
        pid_v = first_v + (pid % group) % size_v
        pid_d = (pid % group) // size_v
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        v_ok = offs_v < V
        d_ok = offs_d < D
        acc = tl.zeros([BLOCK_V, BLOCK_D], tl.float32)
        for k0 in range(0, M, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < M
            a = tl.load(
                a_ptr + ks.to(tl.int64)[None, :] * stride_am + offs_v[:, None],
                mask=v_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            b = tl.load(
                b_ptr + ks.to(tl.int64)[:, None] * stride_bm + offs_d[None, :],
                mask=k_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            if UPCAST:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        c_ptrs = acc_ptr + offs_v.to(tl.int64)[:, None] * stride_acc + offs_d[None, :]
        c_mask = v_ok[:, None] & d_ok[None, :]
        cur = tl.load(c_ptrs, mask=c_mask, other=0.0)
        tl.store(c_ptrs, cur + acc, mask=c_mask)


# ---------------------------------------------------------------------------------------------
# Launch configurations, from the table of :mod:`.kernel_tuning` (keyed by arch, dtype and V range;
# the interpreter has its own entries). Functions of plain inputs, so that scripts/aot_report.py
# compiles exactly what the launchers launch.
# ---------------------------------------------------------------------------------------------


class LaunchConfig(NamedTuple):
    """A launch's grid, constexprs (block sizes, accumulation dtype) and compile options."""

    grid: tuple[int, ...]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    rows_per_split: int = 0
    """``_row_grad_kernel`` only: rows per program along the split grid axis (a runtime argument)."""
    entry: tuning.KernelEntry | None = None
    """The table entry the configuration came from (its ``ctas_per_sm`` sized the grid)."""


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


GRAD_WAVES = 4
"""Waves of resident programs ``_row_grad_kernel``'s grid aims at (its programs are independent)."""


def _slots(entry: tuning.KernelEntry, sm_count: int) -> int:
    # The interpreter has no SMs: its entries' ctas_per_sm is the program count itself.
    return entry.ctas_per_sm * max(sm_count, 1)


def lse_config(
    n_rows: int,
    vocab: int,
    dtype: torch.dtype,
    *,
    arch: str,
    sm_count: int,
    entry: tuning.KernelEntry | None = None,
) -> LaunchConfig:
    """``_row_lse_kernel`` over an ``(n_rows, vocab)`` chunk of ``dtype`` logits (``n_rows >= 1``) on
    ``arch`` (``"sm_90"``, ..., or ``"interpreter"``) with ``sm_count`` SMs: a persistent grid of at
    most the programs that are resident at once. ``entry`` overrides the table's (the tuner's
    candidates)."""
    entry = entry or tuning.lookup("row_lse", arch, dtype, vocab)
    c = entry.config
    block_m, block_v = c["BLOCK_M"], min(c["BLOCK_V"], _next_pow2(vocab))
    programs = min(triton.cdiv(n_rows, block_m), _slots(entry, sm_count))
    meta = {"ACC": _tl_dtype(_acc_dtype(dtype)), "BLOCK_M": block_m, "BLOCK_V": block_v}
    return LaunchConfig((programs,), meta, c["num_warps"], c["num_stages"], entry=entry)


def grad_config(
    n_rows: int,
    vocab: int,
    dtype: torch.dtype,
    *,
    has_bias_grad: bool,
    arch: str,
    sm_count: int,
    entry: tuning.KernelEntry | None = None,
) -> LaunchConfig:
    """``_row_grad_kernel`` over an ``(n_rows, vocab)`` chunk (``n_rows >= 1``): rows split so that the
    grid holds about :data:`GRAD_WAVES` times the programs that are resident at once (the entry's
    ``ctas_per_sm``, from the compiled kernel's register use), never less than one row block per
    program. Several short waves rather than one long one: a partial last wave of long programs
    would leave most SMs idle (e.g. 297 column blocks on 264 slots)."""
    entry = entry or tuning.lookup("row_grad_bias" if has_bias_grad else "row_grad", arch, dtype, vocab)
    c = entry.config
    block_m, block_v = c["BLOCK_M"], min(c["BLOCK_V"], _next_pow2(vocab))
    n_vblocks = triton.cdiv(vocab, block_v)
    slots = _slots(entry, sm_count) * (GRAD_WAVES if sm_count else 1)
    row_blocks = triton.cdiv(n_rows, block_m)
    want = max(1, min(row_blocks, triton.cdiv(slots, n_vblocks)))
    # The most row blocks per split that still give `want` splits: rounding a split up to whole row
    # blocks must not drop the grid below its target (4000 rows in blocks of 8 over 33 splits would
    # round to 128 rows, 32 splits).
    blocks_per_split = row_blocks if want == 1 else triton.cdiv(row_blocks, want - 1) - 1
    rows_per_split = blocks_per_split * block_m
    splits = triton.cdiv(row_blocks, blocks_per_split)
    meta = {
        "ACC": _tl_dtype(_acc_dtype(dtype)),
        "HAS_BIAS_GRAD": has_bias_grad,
        "BLOCK_M": block_m,
        "BLOCK_V": block_v,
    }
    grid = (n_vblocks, splits)
    return LaunchConfig(grid, meta, c["num_warps"], c["num_stages"], rows_per_split, entry)


def wgrad_config(
    vocab: int, dim: int, dtype: torch.dtype, *, arch: str, entry: tuning.KernelEntry | None = None
) -> LaunchConfig:
    """``_wgrad_kernel`` for ``acc[vocab, dim] += dlogits^T @ hidden`` with ``dtype`` operands."""
    entry = entry or tuning.lookup("wgrad", arch, dtype, vocab)
    c = entry.config
    bv, bd = c["BLOCK_V"], c["BLOCK_D"]
    # The interpreter's bf16 arithmetic is wrong, and fp32 operands need an exact (ieee) dot.
    upcast = arch == tuning.INTERPRETER or dtype == torch.float32
    meta = {"UPCAST": upcast, "BLOCK_V": bv, "BLOCK_D": bd, "BLOCK_K": c["BLOCK_K"], "GROUP_V": c["GROUP_V"]}
    grid = (triton.cdiv(vocab, bv) * triton.cdiv(dim, bd),)
    return LaunchConfig(grid, meta, c["num_warps"], c["num_stages"], entry=entry)


def launch_target(device: torch.device) -> tuple[str, int]:
    """``(arch, sm_count)`` the launch configurations are looked up for: the interpreter's entries
    under ``TRITON_INTERPRET=1``, else the CUDA device's arch and SM count."""
    if INTERPRET or device.type != "cuda":
        return tuning.INTERPRETER, 0
    return tuning.arch_of(device), torch.cuda.get_device_properties(device).multi_processor_count


# ---------------------------------------------------------------------------------------------
# Launchers, registered as torch.library triton ops.
# ---------------------------------------------------------------------------------------------


def _launch(kernel, cfg: LaunchConfig, *args) -> None:
    """Launch ``kernel`` with ``cfg``; the one place that decides how a triton op launches.

    Compiled, through ``wrap_triton`` (traceable by torch.compile). Under the interpreter
    ``@triton.jit`` returns an ``InterpretedFunction``, which torch >= 2.12's wrap_triton passes
    through unchanged and torch 2.11's rejects: it is launched directly, the same on both.
    """
    fn = kernel if INTERPRET else torch.library.wrap_triton(kernel)
    fn[cfg.grid](*args, **cfg.constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def load_width(logits: torch.Tensor) -> int:
    """Columns the row kernels may load: ``V`` rounded up to 16 when every row's padding up to there
    lies inside the tensor's storage (the fused ops' chunk buffer has a padded row stride), else ``V``.

    Reading a few padding columns is harmless (they are masked to -inf / 0); it lets Triton emit
    16-byte vector loads, which it cannot for a mask at an odd ``V``. Nothing is ever written there.
    """
    rows, vocab = logits.shape
    padded = -(-vocab // 16) * 16
    if padded == vocab or rows == 0 or logits.stride(0) < padded:
        return vocab
    end = logits.storage_offset() + (rows - 1) * logits.stride(0) + padded
    return padded if end * logits.element_size() <= logits.untyped_storage().nbytes() else vocab


def _row_lse_impl(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, vocab = logits.shape
    acc = _acc_dtype(logits.dtype)
    logp = torch.full((n_rows,), float("nan"), dtype=acc, device=logits.device)
    lse = torch.full((n_rows, 2), float("nan"), dtype=acc, device=logits.device)
    if n_rows == 0:
        return logp, lse
    arch, sms = launch_target(logits.device)
    cfg = lse_config(n_rows, vocab, logits.dtype, arch=arch, sm_count=sms)
    _launch(
        _row_lse_kernel, cfg,
        logits, logits.stride(0), labels, logp, lse, n_rows, vocab, load_width(logits), ignore_index,
    )  # fmt: skip
    return logp, lse


def _row_grad_impl(
    logits: torch.Tensor,
    grad_logp: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    bias_grad: torch.Tensor | None,
    ignore_index: int,
) -> None:
    n_rows, vocab = logits.shape
    if n_rows == 0:
        return
    has_bias = bias_grad is not None
    arch, sms = launch_target(logits.device)
    cfg = grad_config(n_rows, vocab, logits.dtype, has_bias_grad=has_bias, arch=arch, sm_count=sms)
    _launch(
        _row_grad_kernel, cfg,
        logits, logits.stride(0), labels, lse, grad_logp, bias_grad if has_bias else lse,
        n_rows, vocab, load_width(logits), cfg.rows_per_split, ignore_index,
    )  # fmt: skip


def _wgrad_impl(acc: torch.Tensor, dlogits: torch.Tensor, hidden: torch.Tensor) -> None:
    m, vocab = dlogits.shape
    dim = hidden.shape[1]
    if m == 0:
        return
    cfg = wgrad_config(vocab, dim, dlogits.dtype, arch=launch_target(dlogits.device)[0])
    _launch(
        _wgrad_kernel, cfg,
        dlogits, dlogits.stride(0), hidden, hidden.stride(0), acc, acc.stride(0), m, vocab, dim,
    )  # fmt: skip


@functools.cache
def _ops():
    """Register the triton ops once (lazily, so importing the package never touches Triton)."""
    lse_op = torch.library.triton_op("synpo_kernels::fused_linear_row_lse", mutates_args=())(_row_lse_impl)
    grad_op = torch.library.triton_op(
        "synpo_kernels::fused_linear_row_grad_", mutates_args={"logits", "bias_grad"}
    )(_row_grad_impl)
    wgrad_op = torch.library.triton_op("synpo_kernels::fused_linear_wgrad_", mutates_args={"acc"})(
        _wgrad_impl
    )
    return lse_op, grad_op, wgrad_op


def _check_rows(logits: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError("logits: expected a 2-D chunk with unit stride along the vocabulary")


def row_lse(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    """``(logp, lse)`` per row of a ``(m, V)`` chunk against aligned int64 ``labels`` ``(m,)``.

    ``logp`` ``(m,)``; ``lse`` ``(m, 2)``: the row max and ``log sum exp(z - max)`` (what
    :func:`row_grad_` takes). fp32 (fp64 for fp64 logits); 0 on rows whose label is ``ignore_index``.
    """
    _check_rows(logits)
    return _ops()[0](logits, labels, ignore_index)


def row_grad_(
    logits: torch.Tensor,
    grad_logp: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    bias_grad: torch.Tensor | None = None,
) -> None:
    """Overwrite ``logits`` with ``grad_logp * (onehot - softmax)``; add column sums to ``bias_grad``.

    ``lse``: ``(m, 2)`` as :func:`row_lse` returns it. ``bias_grad`` (``(V,)``, fp32/fp64) accumulates
    ``sum_rows dlogits`` in full precision (before the rounding to the logits' dtype). Rows with an
    ignored label are set to 0.
    """
    _check_rows(logits)
    _ops()[1](logits, grad_logp, labels, lse, bias_grad, ignore_index)


def wgrad_accumulate_(acc: torch.Tensor, dlogits: torch.Tensor, hidden: torch.Tensor) -> None:
    """``acc += dlogits^T @ hidden`` with ``acc`` fp32 ``(V, D)``, operands in their own dtype."""
    if acc.dtype != torch.float32 or acc.stride(1) != 1:
        raise ValueError("acc: expected a float32 accumulator with unit stride along D")
    _check_rows(dlogits)
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    _ops()[2](acc, dlogits, hidden)
