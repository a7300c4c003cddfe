"""Shared machinery of the fused linear ops: options, backends, token compaction, gradient buffers.

Design (both fused linear ops, every device):

- **Compaction.** With the Hugging Face shift, row ``t`` of ``hidden`` scores ``labels[t + 1]``.
  Only rows whose aligned label is not ``ignore_index`` are gathered (``index_select`` per chunk)
  and enter a GEMM; the hidden gradient is scattered back at the end. FLOPs scale with response
  tokens ``n``, not sequence length (a video-captioning row of 2048 prompt/video tokens + 256
  response tokens costs 256 rows of lm_head work, not 2304). Planning the chunks needs the token
  counts on the host: host syncs per call are the label range check, ``nonzero`` and (preference
  losses) the per-row counts; none inside the chunk loop.
- **Chunk buffer.** Logits exist only as one ``(m, V)`` buffer in the input dtype, ``m`` chosen so
  the buffer fits ``chunk_bytes`` (default 64 MiB on CPU, 640 MiB on CUDA; the preference op grows it
  up to 4x to hold its largest ``[chosen, rejected]`` pair whole). Per chunk:
  ``logits = h_c @ W^T (+ b)`` (one GEMM, ``2 m D V``), a row pass for the fp32 log-sum-exp and
  target log-prob, and, when gradients are due, a row pass overwriting the buffer with
  ``g_t * (onehot - softmax)`` followed by ``grad_h_c = dlogits @ W`` and
  ``grad_W += dlogits^T @ h_c`` (``4 m D V``).
- **Backends.** ``torch``: the GEMMs are ``torch.mm``/``addmm`` and the row passes are the C++
  token ops ``torch.ops.synpo_kernels.token_logprobs_fwd`` / ``token_logprobs_bwd_`` (a chunked
  PyTorch fallback when the extension is not built); this is the CPU path, and works on any device.
  ``triton``: the same GEMMs (cuBLAS on GPU) with the row passes as Triton kernels
  (:mod:`.fused_linear_kernels`), the bias gradient fused into the gradient row pass. ``auto``
  picks Triton for CUDA tensors and torch otherwise; ``backend=`` or ``SYNPO_FUSED_LINEAR_BACKEND``
  overrides it (the tests force ``triton`` on CPU under ``TRITON_INTERPRET=1``).
- **Weight-gradient accumulation.** ``grad_W`` sums over chunks. ``"fp32"`` accumulates in a float32
  ``(V, D)`` buffer (cuBLAS ``addmm(out_dtype=float32)`` in place where available, else a Triton
  GEMM; upcast operands on the torch backend) and rounds once at the end; ``"native"`` accumulates
  in the weight's dtype with ``addmm_`` (one rounding per chunk; no extra ``V x D`` buffer).
  ``"auto"`` = fp32 when the weight is fp32/fp64 (then it *is* native) or when the fp32 buffer is at
  most 1 GiB, native otherwise (at V=152064, D=4096 the fp32 buffer would be 2.5 GB).
- **One opaque custom op per fused op.** Each fused op is a ``torch.library.custom_op``
  (``synpo_kernels::fused_linear_preference_loss``; ``fused_linear_token_logprobs`` and its backward
  ``fused_linear_token_logprobs_bwd``) with a fake kernel giving its output shapes and an autograd
  formula (``register_autograd``). ``torch.compile(fullgraph=True)`` therefore never traces the chunk
  plan (host-side, from data-dependent token counts): the op is one node of the graph, and its
  implementation runs the chunk loop eagerly, calling the C++ token ops or the Triton ``triton_op``s.
  Every non-tensor option of a call is one frozen :class:`FusedLinearParams` (as Cut Cross-Entropy's
  ``CCEParams``), passed to the op as one string argument (:meth:`FusedLinearParams.encode`, a
  ``repr`` that Dynamo folds to a constant; decoded once per distinct value).
- **Autograd.** Gradients are stored through ``ctx.save_for_backward`` (saved-tensor hooks such as
  ``torch.autograd.graph.save_on_cpu`` see them). Without a retained graph the backward hands the
  saved gradient itself (scaled in place) to autograd, so no second ``V x D`` tensor ever exists
  (:func:`scaled_gradient`); with ``retain_graph=True`` it returns a scaled copy and the graph can be
  differentiated again with the same result.
- **Autocast.** Under ``torch.autocast`` each fused op's autocast kernel casts hidden, weight and
  bias to the autocast dtype as ``F.linear``'s operands would be (:func:`register_autocast`); the
  statistics and the loss stay fp32 and gradients return in each parameter's dtype. Second-order gradients
  through the fused ops raise ``RuntimeError`` (their gradients are computed by the kernels, not by
  differentiable operations); the logits ops (``token_logprobs`` and what builds on it) support them.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import math
import os
from dataclasses import dataclass

import torch

from synpo_kernels._validation import AUTOCAST_DEVICES, autocast_dtypes
from synpo_kernels.losses import LossSpec
from synpo_kernels.ops import fused_linear_kernels as K
from synpo_kernels.ops.token_logprobs import accumulation_dtype, shift_and_flatten_labels

__all__ = [
    "BACKENDS",
    "FusedLinearConfig",
    "FusedLinearParams",
    "GradBuffers",
    "acc_weight_dtype",
    "autocast_dtypes",
    "chunk_rows",
    "compact_tokens",
    "double_backward_error",
    "get_backend",
    "register_autocast",
    "resolve_backend",
    "scaled_gradient",
]

BACKENDS = ("auto", "torch", "triton")
ACCUMULATIONS = ("auto", "fp32", "native")
_ENV_BACKEND = "SYNPO_FUSED_LINEAR_BACKEND"
_DEFAULT_CHUNK_BYTES_CPU = 64 << 20
_DEFAULT_CHUNK_BYTES_CUDA = 640 << 20
_AUTO_FP32_ACCUM_LIMIT = 1 << 30


@dataclass(frozen=True)
class FusedLinearConfig:
    """Non-tensor execution options of the fused linear ops.

    - ``backend``: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"torch"`` or ``"triton"``; ``None``
      reads ``SYNPO_FUSED_LINEAR_BACKEND`` (default auto).
    - ``chunk_bytes``: bound of the logits chunk buffer; ``None`` = 64 MiB on CPU, 640 MiB on CUDA.
    - ``weight_grad_accumulation``: ``"auto"``, ``"fp32"`` or ``"native"`` (module docstring).
    """

    backend: str | None = None
    chunk_bytes: int | None = None
    weight_grad_accumulation: str = "auto"

    @classmethod
    def pop_from(cls, options: dict) -> FusedLinearConfig:
        """The execution options taken out of a keyword dict (the other keys stay in it)."""
        return cls(**{f.name: options.pop(f.name) for f in dataclasses.fields(cls) if f.name in options})

    def kwargs(self) -> dict:
        """The options as keyword arguments of the fused functions."""
        return dataclasses.asdict(self)

    def __post_init__(self):
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS} or None, got {self.backend!r}")
        if self.chunk_bytes is not None and (
            isinstance(self.chunk_bytes, bool)
            or not isinstance(self.chunk_bytes, int)
            or self.chunk_bytes <= 0
        ):
            raise ValueError(f"chunk_bytes: expected a positive int or None, got {self.chunk_bytes!r}")
        if self.weight_grad_accumulation not in ACCUMULATIONS:
            raise ValueError(
                f"weight_grad_accumulation: expected one of {ACCUMULATIONS}, "
                f"got {self.weight_grad_accumulation!r}"
            )


@dataclass(frozen=True)
class FusedLinearParams:
    """Every non-tensor option of one fused linear op call (Cut Cross-Entropy's ``CCEParams``).

    - ``ignore_index``, ``shift``: label conventions (Hugging Face ``-100``, shift by one).
    - ``config``: the user's execution options; ``backend``: the backend resolved for the call's
      device (``"torch"`` or ``"triton"``, :func:`resolve_backend`).
    - ``spec``: the preference loss and its options (``None`` for the token op).
    - ``grad_hidden`` / ``grad_weight`` / ``grad_bias``: which gradients to compute (the preference
      op in its forward, the token op's backward op in its backward); ``False`` under
      ``torch.no_grad()`` or for a frozen tensor.
    - ``donate_outputs``: the caller drops the op's working outputs at once (the public functions
      do): the preference op's gradients, which its backward may then hand to autograd scaled in place
      (:func:`scaled_gradient`), and the token op's kept logits, which its backward may then overwrite
      (:func:`may_reuse_saved`). Off for a direct call of an op, whose outputs stay intact.

    A custom op takes no dataclass, so it is passed as the string :meth:`encode` makes (a ``repr`` of
    primitives, which Dynamo constant-folds) and read back by :meth:`decode` (cached).
    """

    ignore_index: int
    shift: bool
    config: FusedLinearConfig
    backend: str
    spec: LossSpec | None = None
    grad_hidden: bool = False
    grad_weight: bool = False
    grad_bias: bool = False
    donate_outputs: bool = False

    def encode(self) -> str:
        c, spec = self.config, self.spec
        spec_args = None if spec is None else (spec.name, spec.options, spec.tensor_options)
        return repr(
            (
                self.ignore_index, self.shift, c.backend, c.chunk_bytes, c.weight_grad_accumulation,
                self.backend, spec_args, self.grad_hidden, self.grad_weight, self.grad_bias,
                self.donate_outputs,
            )
        )  # fmt: skip

    @staticmethod
    def decode(text: str) -> FusedLinearParams:
        return _decode_params(text)

    def execution(self, weight: torch.Tensor):
        """``(backend, w_acc, rows)`` of a call with this ``weight``: the backend object, the dtype
        ``grad_W`` accumulates in, and the rows of the logits chunk buffer."""
        backend = get_backend(self.backend)
        w_acc = acc_weight_dtype(weight, self.config.weight_grad_accumulation)
        return backend, w_acc, chunk_rows(self.config, weight, backend.name, w_acc)


@functools.lru_cache(maxsize=512)
def _decode_params(text: str) -> FusedLinearParams:
    ignore_index, shift, backend_opt, chunk_bytes, accumulation, backend, spec, gh, gw, gb, donate = (
        ast.literal_eval(text)
    )
    return FusedLinearParams(
        ignore_index, shift, FusedLinearConfig(backend_opt, chunk_bytes, accumulation), backend,
        None if spec is None else LossSpec(*spec), gh, gw, gb, donate,
    )  # fmt: skip


def _graph_retained() -> bool:
    """Whether the running backward keeps the graph (``retain_graph=True``); ``True`` when unknown.

    The autograd engine exposes this only privately (AOTAutograd reads it to donate saved buffers the
    same way); without it every gradient is copied, as a retained graph needs.
    """
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep_graph is None else bool(keep_graph())


def scaled_gradient(
    saved: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, donated: bool
) -> torch.Tensor:
    """``saved * scale`` in ``dtype``: the gradient a fused op's backward returns from a gradient it
    computed in its forward and saved, computed in ``saved``'s precision and rounded once.

    Without a retained graph (``loss.backward()``) the engine frees the node's saved tensors right
    after its backward, before the outputs reach ``AccumulateGrad``: ``saved`` is scaled in place and
    returned, and becomes ``.grad`` with no copy (at an lm_head a ``V x D`` tensor, 2.3 GiB at
    D=4096, V=152064 in fp32). With a retained graph, or in a graph being traced, ``saved`` is left
    untouched and a new tensor is returned, so a second backward gives the same gradients again;
    likewise unless ``donated`` (``saved`` is an op output its caller dropped).
    """
    # (A mul with an out= of another dtype would allocate a full-size temporary in saved's dtype.)
    scale = scale.to(saved.dtype)
    scaled = saved.mul_(scale) if may_reuse_saved(saved, donated) else saved * scale
    return scaled if scaled.dtype == dtype else scaled.to(dtype)


def may_reuse_saved(saved: torch.Tensor, donated: bool) -> bool:
    """Whether a backward may overwrite ``saved``, a tensor its op saved for it: the caller dropped the
    op output it is (``donated``), the graph is not retained (the engine frees it right after this
    backward), and it is a plain tensor with data: a graph being traced (torch.compile's AOTAutograd,
    opcheck) holds functional or fake tensors, and a traced backward may not mutate a forward output;
    meta tensors go through the ops' fake kernels.
    """
    plain = type(saved) is torch.Tensor and saved.device.type != "meta"
    return donated and plain and not _graph_retained()


_autocast_libs: list = []  # the registrations live as long as these libraries


def register_autocast(qualname: str, cast_args: tuple[int, ...]) -> None:
    """Autocast kernels (CPU and CUDA) for a fused linear custom op: under ``torch.autocast`` the
    op's floating inputs at positions ``cast_args`` (hidden, weight, bias) are cast to the autocast
    dtype, as ``F.linear``'s would be, and the op runs with autocast off. So the GEMMs run in the
    autocast dtype while the log-sum-exp, the statistics and the loss stay fp32 (as the op always
    computes them), and the casts, recorded by autograd, bring each gradient back to its parameter's
    dtype. ``torch.library.register_autocast`` would fix one cast dtype at registration; this one
    follows the running autocast's dtype (bf16 or fp16)."""
    namespace, name = qualname.split("::")
    lib = torch.library.Library(namespace, "IMPL")
    _autocast_libs.append(lib)
    op = getattr(getattr(torch.ops, namespace), name)

    for device_type in AUTOCAST_DEVICES:

        def kernel(_keyset, *args, device_type=device_type):
            args = list(args)
            dtypes = autocast_dtypes(device_type, *(args[i] for i in cast_args))
            for i, dtype in zip(cast_args, dtypes):
                if args[i] is not None and args[i].device.type == device_type:
                    args[i] = args[i].to(dtype)
            with torch.autocast(device_type, enabled=False):
                return op(*args)

        key = "AutocastCPU" if device_type == "cpu" else "AutocastCUDA"
        lib.impl(name, kernel, key, with_keyset=True)


def double_backward_error(op: str, alternative: str) -> RuntimeError:
    """The error of a second-order gradient through a fused linear op."""
    return RuntimeError(
        f"double backward through {op} is not supported: its gradients are computed by the fused "
        f"kernels, not by differentiable operations, so a second-order gradient through it would be "
        f"silently wrong. Use {alternative} on full logits (F.linear) for higher-order gradients."
    )


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """``"torch"`` or ``"triton"`` for tensors on ``device``."""
    if backend is None:
        backend = os.environ.get(_ENV_BACKEND, "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"{_ENV_BACKEND}: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and K.triton_usable_on(device) else "torch"
    if backend == "triton" and not K.triton_usable_on(device):
        if not K.HAS_TRITON:
            why = "Triton is not installed"
        elif device.type == "cpu":
            why = "CPU tensors need TRITON_INTERPRET=1 set before synpo_kernels is imported"
        elif device.type == "cuda":
            why = "TRITON_INTERPRET=1 is set, so kernels run in the interpreter (CPU tensors only)"
        else:
            why = f"no Triton support for device {device.type}"
        raise ValueError(f"backend: 'triton' cannot run here: {why}")
    return backend


def acc_weight_dtype(weight: torch.Tensor, accumulation: str) -> torch.dtype:
    """The dtype ``grad_W`` is accumulated in over chunks."""
    if weight.dtype in (torch.float32, torch.float64) or accumulation == "native":
        return weight.dtype
    if accumulation == "fp32":
        return torch.float32
    return torch.float32 if weight.numel() * 4 <= _AUTO_FP32_ACCUM_LIMIT else weight.dtype


def chunk_rows(
    config: FusedLinearConfig, weight: torch.Tensor, backend_name: str, w_acc: torch.dtype | None
) -> int:
    """Rows of the logits chunk buffer under the ``chunk_bytes`` budget (at least 1)."""
    budget = config.chunk_bytes
    if budget is None:
        budget = _DEFAULT_CHUNK_BYTES_CUDA if weight.device.type == "cuda" else _DEFAULT_CHUNK_BYTES_CPU
    vocab = weight.shape[0]
    per_row = vocab * weight.element_size()
    if backend_name == "torch" and w_acc is not None and w_acc != weight.dtype:
        per_row += vocab * 4  # the fp32 upcast of the chunk for the weight-gradient GEMM
    rows = max(1, budget // per_row)
    if weight.device.type == "cuda" and rows >= 256:
        rows -= rows % 128  # whole GEMM tiles
    return int(rows)


ROW_ALIGN = 64
"""Chunk buffer rows start every ``ROW_ALIGN`` elements (128 B in bf16), whatever ``V`` is."""


def padded_chunk(rows: int, weight: torch.Tensor) -> torch.Tensor:
    """A ``(rows, V')`` allocation, ``V'`` = ``V`` rounded up to :data:`ROW_ALIGN`, its padding columns
    zeroed (see :func:`chunk_buffer`, its ``[:, :V]`` view)."""
    vocab = weight.shape[0]
    padded = -(-vocab // ROW_ALIGN) * ROW_ALIGN
    buf = torch.empty((rows, padded), dtype=weight.dtype, device=weight.device)
    # The padding is never written, but CPU bf16 GEMMs (oneDNN, torch 2.13) read past the last column
    # of a strided operand and multiply it by zero: uninitialised NaN/Inf there made NaN gradients.
    buf[:, vocab:].zero_()
    return buf


def chunk_buffer(rows: int, weight: torch.Tensor) -> torch.Tensor:
    """The ``(rows, V)`` logits chunk buffer, a view of a ``(rows, V')`` allocation, ``V'`` = ``V``
    rounded up to :data:`ROW_ALIGN`.

    With an odd vocabulary (32001, 50257) an unpadded row starts at an odd element, so the row passes
    could not use 16-byte loads anywhere; with the padded stride every row starts 128-byte aligned
    (the GEMMs write through their leading dimension, cuBLAS ``ldc``). Costs at most 63 elements a row.
    """
    return padded_chunk(rows, weight)[:, : weight.shape[0]]


def compact_tokens(labels: torch.Tensor, ignore_index: int, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(aligned_labels (N,), idx (n,))``: int64 labels aligned with the rows of ``hidden`` viewed
    as ``(N, D)``, and the sorted flat indices of the rows that score a token (one host sync)."""
    aligned = shift_and_flatten_labels(labels, ignore_index, shift)
    idx = torch.nonzero(aligned != ignore_index).flatten()
    return aligned, idx


def hidden_rows(hidden: torch.Tensor) -> torch.Tensor:
    """``hidden`` as ``(N, D)`` rows with unit stride along D (a view whenever possible)."""
    rows = hidden.reshape(-1, hidden.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows


# ---------------------------------------------------------------------------------------------
# Backends: GEMMs + row passes over one chunk.
# ---------------------------------------------------------------------------------------------


class _TorchBackend:
    name = "torch"

    @staticmethod
    def logits(h_c, weight, bias, out):
        if bias is None:
            torch.mm(h_c, weight.t(), out=out)
        else:
            torch.addmm(bias, h_c, weight.t(), out=out)
        return out

    @staticmethod
    def row_fwd(logits, labels, ignore_index):
        return torch.ops.synpo_kernels.token_logprobs_fwd(logits, labels, ignore_index)

    @staticmethod
    def row_grad_(logits, g, labels, lse, ignore_index, bias_acc):
        torch.ops.synpo_kernels.token_logprobs_bwd_(logits, g, labels, lse, ignore_index)
        if bias_acc is not None:
            bias_acc += logits.sum(0, dtype=bias_acc.dtype)

    @staticmethod
    def wgrad_(acc, dlogits, h_c):
        if acc.dtype == dlogits.dtype:
            acc.addmm_(dlogits.t(), h_c)
        else:
            acc.addmm_(dlogits.t().to(acc.dtype), h_c.to(acc.dtype))


_CUBLAS_FP32_ACC_OK: dict[torch.device, bool] = {}


def _cublas_fp32_accumulate_ok(device: torch.device) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=float32, out=acc)`` works in place here (once)."""
    if device not in _CUBLAS_FP32_ACC_OK:
        ok = False
        if device.type == "cuda":
            try:
                gen = torch.Generator(device=device).manual_seed(0)
                a = torch.randn(96, 40, device=device, generator=gen).to(torch.bfloat16)
                b = torch.randn(96, 24, device=device, generator=gen).to(torch.bfloat16)
                acc = torch.randn(40, 24, device=device, generator=gen)
                expect = acc + a.float().t() @ b.float()
                torch.addmm(acc, a.t(), b, out_dtype=torch.float32, out=acc)
                ok = bool(torch.allclose(acc, expect, rtol=1e-3, atol=1e-3))
            except (RuntimeError, TypeError, NotImplementedError):
                ok = False
        _CUBLAS_FP32_ACC_OK[device] = ok
    return _CUBLAS_FP32_ACC_OK[device]


class _TritonBackend(_TorchBackend):
    name = "triton"

    @staticmethod
    def row_fwd(logits, labels, ignore_index):
        return K.row_lse(logits, labels, ignore_index)

    @staticmethod
    def row_grad_(logits, g, labels, lse, ignore_index, bias_acc):
        K.row_grad_(logits, g, labels, lse, ignore_index, bias_acc)

    @staticmethod
    def wgrad_(acc, dlogits, h_c):
        if acc.dtype == dlogits.dtype:
            acc.addmm_(dlogits.t(), h_c)
        elif _cublas_fp32_accumulate_ok(acc.device):
            torch.addmm(acc, dlogits.t(), h_c, out_dtype=torch.float32, out=acc)
        else:
            K.wgrad_accumulate_(acc, dlogits, h_c)


def get_backend(name: str):
    return _TritonBackend if name == "triton" else _TorchBackend


# ---------------------------------------------------------------------------------------------
# Gradient buffers, filled chunk by chunk.
# ---------------------------------------------------------------------------------------------


class GradBuffers:
    """Gradients being accumulated: compact hidden ``(n, D)``, weight ``(V, D)``, bias ``(V,)``.

    The hidden gradient is stored compactly (one row per scored token, in the chunk order) and
    scattered into a zero ``(N, D)`` tensor by :meth:`finish`, or, when at least half the rows are
    scored, written straight into the ``(N, D)`` gradient; the weight gradient accumulates in
    ``w_acc`` dtype; the bias gradient in the accumulation dtype (fp32; fp64 for fp64).
    """

    def __init__(self, n_tokens, hidden, weight, bias, need_h, need_w, need_b, w_acc, full=None):
        dim, vocab = weight.shape[1], weight.shape[0]
        dev = weight.device
        self.weight = weight
        n_total = hidden.numel() // max(dim, 1)
        # Most rows scored (plain LM batches): write straight into the full-size gradient instead of
        # keeping a compact copy as large as it. ``full=True`` forces it (a gradient that outlives
        # the call as an op output).
        self.full = need_h and (2 * n_tokens >= n_total if full is None else full)
        self.h = None
        if need_h:
            shape = (n_total, dim) if self.full else (n_tokens, dim)
            alloc = torch.zeros if self.full else torch.empty
            self.h = alloc(shape, dtype=hidden.dtype, device=dev)
        self.w = torch.zeros((vocab, dim), dtype=w_acc, device=dev) if need_w else None
        acc = accumulation_dtype(weight.dtype)
        self.b = torch.zeros((vocab,), dtype=acc, device=dev) if need_b else None

    @property
    def any(self) -> bool:
        return self.h is not None or self.w is not None or self.b is not None

    def add_chunk(self, backend, dlogits, h_c, t0, t1, rows):
        """Consume one chunk of logits gradients: compact positions ``[t0, t1)``, hidden rows ``rows``
        (the bias part is added by the row pass)."""
        if self.h is not None:
            if self.full:
                self.h.index_copy_(0, rows, torch.mm(dlogits, self.weight))
            else:
                torch.mm(dlogits, self.weight, out=self.h[t0:t1])
        if self.w is not None:
            backend.wgrad_(self.w, dlogits, h_c)

    def finish(self, idx, hidden_shape, out_dtype=None):
        """``(grad_hidden, grad_weight, grad_bias)``, each ``None`` when not computed.

        ``grad_hidden`` has ``hidden_shape`` (the compact rows scattered at ``idx``, or the full
        buffer). ``out_dtype``: the dtype of the weight and bias gradients (rounded once from their
        accumulation dtype); ``None`` keeps the accumulation dtype (to be scaled later, then rounded).
        """
        gh = gw = gb = None
        if self.h is not None:
            if self.full:
                gh = self.h
            else:
                gh = self.h.new_zeros((math.prod(hidden_shape[:-1]), hidden_shape[-1]))
                gh.index_copy_(0, idx, self.h)
            gh = gh.view(hidden_shape)
        if self.w is not None:
            gw = self.w if out_dtype is None else self.w.to(out_dtype)
        if self.b is not None:
            gb = self.b if out_dtype is None else self.b.to(out_dtype)
        self.h = self.w = self.b = None
        return gh, gw, gb
