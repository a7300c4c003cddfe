"""Fused lm_head -> per-token log-probs (and per-row sequence log-probs): outputs and the gradients
of hidden, weight and bias under arbitrary per-token upstream gradients (the case where Liger's
``reduction='none'`` once gave wrong weight gradients), against the float64 reference, with
tolerances judged against plain PyTorch in the same dtype.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from kernel_targets import BACKENDS, DEVICE, FLOOR

import synpo_kernels as sk
from synpo_kernels import reference as R


def make_inputs(lead, seq, dim, vocab, dtype, *, bias=True, ignore_frac=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, seq, dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=gen, dtype=torch.float64) * (2.5 / math.sqrt(dim))
    b = torch.randn(vocab, generator=gen, dtype=torch.float64) * 0.5 if bias else None
    labels = torch.randint(0, vocab, (*lead, seq), generator=gen)
    labels[torch.rand(labels.shape, generator=gen) < ignore_frac] = -100
    cast = lambda x: None if x is None else x.to(dtype).to(DEVICE).requires_grad_(True)
    return cast(hidden), cast(weight), cast(b), labels.to(DEVICE)


def assert_close(actual, ref, plain, dtype, name, factor=4.0):
    actual, ref, plain = actual.detach().double(), ref.detach().double(), plain.detach().double()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = (actual - ref).abs().max().item()
    plain_err = (plain - ref).abs().max().item()
    tol = factor * plain_err + FLOOR[dtype] * max(ref.abs().max().item(), 1e-30)
    assert err <= tol, f"{name}: max error {err:.3e} > {tol:.3e} (plain {dtype} error {plain_err:.3e})"


def reference_grads(hidden, weight, bias, labels, upstream, *, shift=True, dtype=torch.float64):
    """Token log-probs and grads: float64 (``dtype=float64``) or plain PyTorch in the input dtype."""
    inputs = [x.detach().clone().requires_grad_(True) for x in (hidden, weight, bias) if x is not None]
    if dtype == torch.float64:
        ins = [x.double().detach().requires_grad_(True) for x in inputs]
        logits = R.linear_logits_ref(ins[0], ins[1], ins[2] if bias is not None else None)
    else:
        ins = inputs
        logits = F.linear(ins[0], ins[1], ins[2] if bias is not None else None)
    out = R.token_logprobs_ref(
        logits, labels, shift=shift, dtype=torch.float64 if dtype == torch.float64 else torch.float32
    )
    grads = torch.autograd.grad((out * upstream.to(out.dtype)).sum(), ins)
    return out, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("chunk_bytes", [7 * 113 * 8, None], ids=["recompute", "kept"])
def test_outputs_and_grads_per_token_upstream(dtype, with_bias, backend, chunk_bytes):
    """Both backward paths: logits recomputed chunk by chunk (8 n D V), and the forward's logits kept
    when every position fits one chunk buffer (6 n D V)."""
    hidden, weight, bias, labels = make_inputs((2, 3), 9, 40, 113, dtype, bias=with_bias, seed=3)
    out = sk.fused_linear_token_logprobs(
        hidden, weight, labels, bias=bias, backend=backend, chunk_bytes=chunk_bytes
    )
    assert out.shape == labels.shape
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    upstream = upstream.to(DEVICE) * torch.linspace(0.1, 3.0, labels.numel(), device=DEVICE).view(
        labels.shape
    )
    inputs = [x for x in (hidden, weight, bias) if x is not None]
    grads = torch.autograd.grad((out * upstream.to(out.dtype)).sum(), inputs)
    ref, ref_grads = reference_grads(hidden, weight, bias, labels, upstream)
    plain, plain_grads = reference_grads(hidden, weight, bias, labels, upstream, dtype=dtype)
    mask = R.response_mask(labels)
    assert (out[~mask] == 0).all()
    if dtype == torch.float64:
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
        return
    assert_close(out, ref, plain, dtype, "logp")
    for name, g, r, p in zip(("hidden", "weight", "bias"), grads, ref_grads, plain_grads):
        assert g.dtype == dtype
        assert_close(g, r, p, dtype, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_shift_noncontiguous_hidden_and_module(backend):
    hidden, weight, bias, labels = make_inputs((3,), 8, 24, 57, torch.float64, seed=5)
    base = hidden.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)
    assert not base.is_contiguous()
    module = sk.FusedLinearTokenLogprobs(shift=False, backend=backend)
    out = module(base, weight, labels, bias)
    upstream = torch.randn(labels.shape, dtype=torch.float64, device=DEVICE)
    grads = torch.autograd.grad((out * upstream).sum(), (base, weight, bias))
    ref, ref_grads = reference_grads(base, weight, bias, labels, upstream, shift=False)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    assert "shift=False" in repr(module)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_logprobs(backend):
    hidden, weight, bias, labels = make_inputs((4,), 10, 16, 37, torch.float64, ignore_frac=0.3, seed=6)
    labels[:, 1] = 3  # every row scores at least one token
    logits = R.linear_logits_ref(hidden, weight, bias)
    for average in (True, False):
        with torch.no_grad():
            out = sk.fused_linear_sequence_logprobs(
                hidden, weight, labels, bias=bias, average=average, backend=backend
            )
        ref = R.sequence_logprobs_ref(logits.detach(), labels, average=average)
        assert out.shape == (4,) and not out.requires_grad
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out = sk.fused_linear_sequence_logprobs(hidden, weight, labels, bias=bias, backend=backend)
    (gw,) = torch.autograd.grad(out.sum(), (weight,))
    (rw,) = torch.autograd.grad(R.sequence_logprobs_ref(logits, labels).sum(), (weight,))
    torch.testing.assert_close(gw, rw, rtol=1e-10, atol=1e-12)
    labels[2, :] = -100
    with pytest.raises(ValueError, match=r"row\(s\) \[2\]"):
        sk.fused_linear_sequence_logprobs(hidden, weight, labels, backend=backend)
    summed = sk.fused_linear_sequence_logprobs(hidden, weight, labels, average=False, backend=backend)
    assert summed[2].item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_gives_zeros(backend):
    hidden, weight, bias, labels = make_inputs((2,), 5, 8, 19, torch.float32, seed=2)
    labels.fill_(-100)
    out = sk.fused_linear_token_logprobs(hidden, weight, labels, bias=bias, backend=backend)
    assert (out == 0).all()
    grads = torch.autograd.grad(out.sum(), (hidden, weight, bias))
    assert all((g == 0).all() for g in grads)


@pytest.fixture
def logits_gemm_rows(monkeypatch):
    """The rows of every logits GEMM of the torch backend, in call order."""
    from synpo_kernels.ops import fused_linear_common as C

    seen = []
    original = C._TorchBackend.logits

    def counting(h_c, weight, bias, out):
        seen.append(h_c.shape[0])
        return original(h_c, weight, bias, out)

    monkeypatch.setattr(C._TorchBackend, "logits", staticmethod(counting))
    return seen


def test_flops_skip_ignored_rows(logits_gemm_rows):
    """Only rows with a scored label enter the matmul (counted through the torch backend)."""
    seen = logits_gemm_rows
    hidden, weight, _, labels = make_inputs((2,), 40, 8, 23, torch.float32, bias=False, seed=1)
    labels[:, :30] = -100  # prompt/video tokens
    sk.fused_linear_token_logprobs(hidden, weight, labels, backend="torch")
    assert sum(seen) == int((R.shift_labels(labels) != -100).sum())


@pytest.mark.parametrize("grad", [True, False])
def test_backward_recomputes_logits_only_when_they_were_not_kept(logits_gemm_rows, grad):
    """The logits GEMM runs once per scored row when the forward keeps them (all positions fit
    ``chunk_bytes``; gradients due), twice when they do not fit; without gradients nothing is kept."""
    from synpo_kernels.ops import fused_linear_common as C
    from synpo_kernels.ops import fused_linear_token_logprobs as T

    seen = logits_gemm_rows
    hidden, weight, bias, labels = make_inputs((2,), 30, 8, 23, torch.float64, seed=4)
    scored = int((R.shift_labels(labels) != -100).sum())
    expected = []
    for chunk_bytes, kept in ((None, True), (7 * 23 * 8, False)):
        seen.clear()
        with torch.set_grad_enabled(grad):
            out = sk.fused_linear_token_logprobs(hidden, weight, labels, bias=bias, chunk_bytes=chunk_bytes)
            params = C.FusedLinearParams(
                -100, True, C.FusedLinearConfig("torch", chunk_bytes), "torch", grad_hidden=grad
            )
            assert T.keeps_logits(params, weight, labels.numel()) == (kept and grad)
        if grad:
            expected.append(torch.autograd.grad(out.sum(), (hidden, weight, bias)))
        passes = 1 if (kept or not grad) else 2
        assert sum(seen) == passes * scored, (chunk_bytes, seen)
    if grad:
        for g_kept, g_recomputed in zip(*expected):
            torch.testing.assert_close(g_kept, g_recomputed, rtol=1e-12, atol=1e-13)


def test_input_errors():
    hidden, weight, bias, labels = make_inputs((2,), 6, 8, 19, torch.float32, seed=2)
    f = sk.fused_linear_token_logprobs
    with pytest.raises(ValueError, match="weight: shape"):
        f(hidden, weight.t(), labels)
    with pytest.raises(ValueError, match="bias: expected shape"):
        f(hidden, weight, labels, bias=bias[None])
    with pytest.raises(ValueError, match="labels: value 19"):
        f(hidden, weight, torch.full_like(labels, 19))
    with pytest.raises(ValueError, match="labels: value -3"):
        f(hidden, weight, torch.full_like(labels, -3))
    with pytest.raises(ValueError, match="labels: shape"):
        f(hidden, weight, labels[None])
    with pytest.raises(TypeError, match="hidden: expected a floating"):
        f(hidden.long(), weight, labels)
    with pytest.raises(TypeError, match="bias: dtype"):
        f(hidden, weight, labels, bias=bias.double())
    with pytest.raises(ValueError, match="hidden: expected shape"):
        f(hidden[0, 0], weight, labels[0, 0])
    with pytest.raises(TypeError, match="ignore_index"):
        f(hidden, weight, labels, ignore_index=-100.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_frac", [0.05, 0.85])
def test_hidden_grad_full_and_compact_layouts(ignore_frac, backend):
    """Mostly-scored batches write the hidden gradient in place, sparse ones keep it compact: same result."""
    hidden, weight, bias, labels = make_inputs(
        (3,), 16, 24, 41, torch.float64, ignore_frac=ignore_frac, seed=12
    )
    out = sk.fused_linear_token_logprobs(
        hidden, weight, labels, bias=bias, backend=backend, chunk_bytes=9 * 41 * 8
    )
    upstream = torch.randn(labels.shape, dtype=torch.float64, device=DEVICE)
    grads = torch.autograd.grad((out * upstream).sum(), (hidden, weight, bias))
    ref, ref_grads = reference_grads(hidden, weight, bias, labels, upstream)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
