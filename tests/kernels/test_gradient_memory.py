"""What the fused linear ops hold in memory: nothing ``V x D``-sized beyond the gradients themselves.

The allocator's own record (``torch.profiler`` with ``profile_memory=True``: every allocation and
free of the CPU or CUDA allocator, those inside C++ kernels included) gives the peak of live bytes
over a forward + backward that starts with the inputs already allocated. The bound is the gradients
the call leaves behind, plus the chunk buffer (grown up to ``PAIR_GROWTH`` times ``chunk_bytes`` for
a whole pair), plus a slack far below ``V x D``: a second copy of the weight gradient (the op's
output beside an accumulation buffer, a scaled copy in the backward, zero gradients materialised for
the non-differentiable outputs) fails it.

Uninitialised memory is poisoned (``torch.empty`` and friends return NaN): no result may depend on it.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_targets import BACKENDS, DEVICE
from torch.profiler import ProfilerActivity, profile

import synpo_kernels as sk
from synpo_kernels.ops.fused_linear_preference import PAIR_GROWTH

PAIRS, SEQ, DIM, VOCAB = 2, 41, 256, 16411  # odd V: the chunk buffer's rows are padded
CHUNK_BYTES = 1 << 20
SLACK = 2 << 20  # O(n D) vectors and compact rows; V x D fp32 here is 16 MiB


def live_bytes_peak(fn, params) -> tuple[int, int]:
    """``(peak, end)`` bytes allocated and still live during ``fn()``, from the allocator's events
    (``fn`` runs once before, to warm caches: kernel configurations, the Triton launchers)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    fn()
    for p in params:
        if p is not None:
            p.grad = None
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak, live


def make_inputs(dtype, *, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * PAIRS
    hidden = torch.randn(rows, SEQ, DIM, generator=gen).to(dtype).to(DEVICE).requires_grad_(True)
    weight = (torch.randn(VOCAB, DIM, generator=gen) / math.sqrt(DIM)).to(dtype).to(DEVICE)
    weight.requires_grad_(True)
    b = (torch.randn(VOCAB, generator=gen) * 0.1).to(dtype).to(DEVICE).requires_grad_(True) if bias else None
    labels = torch.randint(0, VOCAB, (rows, SEQ), generator=gen)
    labels[:, :17] = -100  # a prompt: its rows never enter the GEMMs
    labels[torch.rand(rows, SEQ, generator=gen) < 0.1] = -100
    labels[:, 17] = 5
    return hidden, weight, b, labels.to(DEVICE)


def grad_bytes(*tensors) -> int:
    return sum(t.grad.numel() * t.grad.element_size() for t in tensors if t is not None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 0.25], ids=["plain", "scaled"])
def test_preference_op_holds_no_second_weight_gradient(backend, dtype, scale):
    hidden, weight, bias, labels = make_inputs(dtype)
    ref = torch.randn(2 * PAIRS, dtype=torch.float64, device=DEVICE) - 30

    def step():
        loss = sk.fused_linear_preference_loss(
            hidden, weight, labels, loss="dpo", ref_logps=ref, bias=bias, backend=backend,
            chunk_bytes=CHUNK_BYTES, weight_grad_accumulation="native",
        )  # fmt: skip
        (loss * scale).backward()

    peak, end = live_bytes_peak(step, (hidden, weight, bias))
    grads = grad_bytes(hidden, weight, bias)
    # The Triton interpreter keeps the last launch's arguments (one chunk buffer) alive.
    kept = PAIR_GROWTH * CHUNK_BYTES if backend == "triton" and DEVICE == "cpu" else 0
    assert end <= grads + kept + SLACK
    extra = peak - grads
    assert extra <= PAIR_GROWTH * CHUNK_BYTES + SLACK, (
        f"{extra / 2**20:.1f} MiB beyond the gradients ({grads / 2**20:.1f} MiB); "
        f"V x D is {weight.numel() * weight.element_size() / 2**20:.1f} MiB"
    )


def test_fp32_accumulation_of_a_bf16_weight_adds_only_its_buffer():
    """fp32 accumulation of a bf16 weight gradient keeps one fp32 ``V x D`` buffer (by design), and
    nothing else of that size."""
    hidden, weight, _bias, labels = make_inputs(torch.bfloat16, bias=False)

    def step():
        sk.fused_linear_synpo_loss(
            hidden, weight, labels, backend="torch", chunk_bytes=CHUNK_BYTES, weight_grad_accumulation="fp32"
        ).backward()

    peak, _ = live_bytes_peak(step, (hidden, weight))
    fp32_buffer = weight.numel() * 4
    assert peak - grad_bytes(hidden, weight) <= fp32_buffer + PAIR_GROWTH * CHUNK_BYTES + SLACK


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_op_holds_no_second_weight_gradient(backend):
    hidden, weight, bias, labels = make_inputs(torch.float32)

    def step():
        logp = sk.fused_linear_token_logprobs(
            hidden, weight, labels, bias=bias, backend=backend, chunk_bytes=CHUNK_BYTES
        )
        logp.sum().backward()

    peak, _ = live_bytes_peak(step, (hidden, weight, bias))
    # The token op may keep its scored rows' logits (at most chunk_bytes) and work on a copy of them.
    assert peak - grad_bytes(hidden, weight, bias) <= 2 * CHUNK_BYTES + SLACK


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_result_depends_on_uninitialised_memory(backend, dtype, monkeypatch):
    """``torch.empty``/``new_empty``/``empty_like`` return NaN-filled tensors: every value and gradient
    of both fused ops stays what it is with clean memory (the padded chunk buffer's columns are read
    past the end by CPU bf16 GEMMs, so they must be initialised)."""
    inputs = make_inputs(dtype, seed=3)

    def run():
        hidden, weight, bias = (x.detach().requires_grad_(True) for x in inputs[:3])
        labels = inputs[3]
        loss = sk.fused_linear_synpo_loss(
            hidden, weight, labels, bias=bias, backend=backend, chunk_bytes=CHUNK_BYTES
        )
        tok = sk.fused_linear_token_logprobs(hidden, weight, labels, bias=bias, backend=backend)
        out = loss + (tok * 0.01).sum()
        return [out, *torch.autograd.grad(out, (hidden, weight, bias))]

    clean = run()

    def poisoned(alloc):
        def make(*args, **kwargs):
            out = alloc(*args, **kwargs)
            return out.fill_(math.nan) if out.is_floating_point() else out.fill_(-(2**31))

        return make

    monkeypatch.setattr(torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned(torch.Tensor.new_empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(torch.empty_like))
    poisoned = run()
    for name, a, b in zip(("loss", "grad hidden", "grad weight", "grad bias"), poisoned, clean):
        assert torch.isfinite(a).all(), name
        if name == "grad bias" and backend == "triton" and DEVICE == "cuda":
            # Triton's bias-gradient column sums are atomic on CUDA: their order varies run to run.
            # Read garbage would be NaN (the poison) or far off, never within a few ulps.
            eps = torch.finfo(a.dtype).eps
            torch.testing.assert_close(a, b, rtol=4 * eps, atol=4 * eps * b.abs().max().item(), msg=name)
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
