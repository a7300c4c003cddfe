"""Autograd contract of every op: a retained graph can be differentiated again with the same result,
saved-tensor hooks see what the ops keep for the backward, and second-order gradients are either
exact (the logits ops) or a clear error (the fused linear ops, whose gradients come from kernels).
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_targets import backends

import synpo_kernels as sk
from synpo_kernels.ops import fused_linear_kernels as K

BACKENDS = backends("cpu")
LOSSES = ["synpo", "dpo", "simpo", "orpo"]


def batch(pairs=2, seq=7, dim=8, vocab=13, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    hidden = torch.randn(rows, seq, dim, generator=gen, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(vocab, dim, generator=gen, dtype=dtype) / math.sqrt(dim)).requires_grad_(True)
    bias = (torch.randn(vocab, generator=gen, dtype=dtype) * 0.3).requires_grad_(True)
    labels = torch.randint(0, vocab, (rows, seq), generator=gen)
    labels[:, :2] = -100
    labels[1, 4] = -100
    ref = torch.randn(rows, generator=gen, dtype=torch.float64) - 4
    return hidden, weight, bias, labels, ref


def loss_options(loss, ref):
    return {"ref_logps": ref} if loss == "dpo" else {}


def fused_preference(loss, backend):
    def run(h, w, b, y, ref):
        return sk.fused_linear_preference_loss(
            h, w, y, loss=loss, bias=b, backend=backend, **loss_options(loss, ref)
        )

    return run


def fused_tokens(backend):
    def run(h, w, b, y, ref):
        logp = sk.fused_linear_token_logprobs(h, w, y, bias=b, backend=backend)
        return (logp * torch.linspace(-1, 2, logp.numel(), dtype=logp.dtype).view_as(logp)).sum()

    return run


def token_op(h, w, b, y, ref):
    return (sk.token_logprobs(torch.nn.functional.linear(h, w, b), y) * 0.7).sum()


def cases():
    out = [
        pytest.param(fused_preference(loss, backend), id=f"preference-{loss}-{backend}")
        for loss in LOSSES
        for backend in ("torch", "triton")
    ]
    out += [pytest.param(fused_tokens(backend), id=f"tokens-{backend}") for backend in ("torch", "triton")]
    out.append(pytest.param(token_op, id="token_logprobs"))
    return out


def _skip_triton(request):
    if "triton" in request.node.callspec.id and not K.triton_usable_on(torch.device("cpu")):
        pytest.skip("no Triton here")


@pytest.mark.parametrize("fn", cases())
def test_backward_twice_through_retained_graph_doubles(fn, request):
    _skip_triton(request)
    h, w, b, y, ref = batch()
    out = fn(h, w, b, y, ref)
    out.backward(retain_graph=True)
    first = [x.grad.clone() for x in (h, w, b)]
    out.backward()
    for name, x, g1 in zip(("hidden", "weight", "bias"), (h, w, b), first):
        assert g1.abs().max() > 0, name
        torch.testing.assert_close(x.grad, 2 * g1, rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize("fn", cases())
def test_autograd_grad_twice_gives_the_same_gradients(fn, request):
    _skip_triton(request)
    h, w, b, y, ref = batch(seed=1)
    out = fn(h, w, b, y, ref)
    first = torch.autograd.grad(out, (h, w, b), retain_graph=True)
    second = torch.autograd.grad(out, (h, w, b))
    for g1, g2 in zip(first, second):
        torch.testing.assert_close(g2, g1, rtol=0, atol=0)


@pytest.mark.parametrize("fn", cases())
def test_save_on_cpu_hooks_see_the_saved_gradients(fn, request):
    _skip_triton(request)
    h, w, b, y, ref = batch(seed=2)
    expected = torch.autograd.grad(fn(h, w, b, y, ref), (h, w, b))
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(h, w, b, y, ref)
    hooked = torch.autograd.grad(out, (h, w, b))
    assert packed, "nothing went through the saved-tensor hooks"
    with torch.autograd.graph.save_on_cpu():
        out = fn(h, w, b, y, ref)
    on_cpu = torch.autograd.grad(out, (h, w, b))
    for g, g_hooked, g_cpu in zip(expected, hooked, on_cpu):
        torch.testing.assert_close(g_hooked, g, rtol=0, atol=0)
        torch.testing.assert_close(g_cpu, g, rtol=0, atol=0)


@pytest.mark.parametrize("loss", LOSSES)
def test_fused_preference_saves_its_gradients_through_save_for_backward(loss):
    """The gradients computed in the forward are what the graph saves (weight (V, D) among them)."""
    h, w, b, y, ref = batch(seed=3)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        out = sk.fused_linear_preference_loss(h, w, y, loss=loss, bias=b, **loss_options(loss, ref))
    assert tuple(w.shape) in shapes and tuple(h.shape) in shapes and tuple(b.shape) in shapes
    out.backward()


# ---------------------------------------------------------------------------------------------
# Double backward
# ---------------------------------------------------------------------------------------------


def test_token_logprobs_gradgradcheck_float64():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 7, (2, 5), generator=gen)
    y[0, 2] = -100
    for shift in (True, False):
        f = lambda x, s=shift: sk.token_logprobs(x, y, shift=s)
        assert torch.autograd.gradcheck(f, (z,), check_grad_dtypes=True)
        assert torch.autograd.gradgradcheck(f, (z,), check_grad_dtypes=True)


def test_token_logprobs_bwd_op_gradgradcheck():
    """The backward op itself, differentiated w.r.t. both the upstream gradient and the logits."""
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(6, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 9, (6,), generator=gen)
    y[3] = -100
    g = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)

    def bwd(g, z):
        _, lse = torch.ops.synpo_kernels.token_logprobs_fwd(z, y, -100)
        return torch.ops.synpo_kernels.token_logprobs_bwd(g, z, y, lse, -100)

    assert torch.autograd.gradcheck(bwd, (g, z), check_grad_dtypes=True)


@pytest.mark.parametrize("loss", ["synpo", "dpo", "ipo", "simpo", "cpo", "orpo"])
def test_preference_losses_on_logits_gradgradcheck(loss):
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(4, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 6, (4, 5), generator=gen)
    y[:, 0] = -100
    opts = (
        {"ref_logps": torch.randn(4, generator=gen, dtype=torch.float64) - 3}
        if loss in ("dpo", "ipo")
        else {}
    )
    f = lambda x: sk.preference_loss(x, y, loss=loss, **opts)
    assert torch.autograd.gradgradcheck(f, (z,), check_grad_dtypes=True)


def test_synpo_loss_double_backward_matches_float64_reference():
    """The value the old code returned as 0: d/dz |dL/dz|^2 through synpo_loss."""
    from synpo_kernels.reference import preference_loss_ref

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4, 7, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 11, (4, 7), generator=gen)
    y[:, :2] = -100

    def penalty_grad(fn):
        (gz,) = torch.autograd.grad(fn(z), z, create_graph=True)
        return torch.autograd.grad(gz.pow(2).sum(), z)[0]

    ours = penalty_grad(lambda x: sk.synpo_loss(x, y))
    ref = penalty_grad(lambda x: preference_loss_ref(x, y, loss="synpo"))
    assert ref.abs().max() > 1e-3
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["synpo", "dpo"])
def test_fused_preference_double_backward_is_a_clear_error(loss, backend):
    h, w, b, y, ref = batch(seed=4)
    out = sk.fused_linear_preference_loss(
        h, w, y, loss=loss, bias=b, backend=backend, **loss_options(loss, ref)
    )
    with pytest.raises(
        RuntimeError, match="double backward through fused_linear_preference_loss is not supported"
    ):
        (gw,) = torch.autograd.grad(out, w, create_graph=True)
        torch.autograd.grad(gw.pow(2).sum(), w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_token_logprobs_double_backward_is_a_clear_error(backend):
    h, w, b, y, _ = batch(seed=5)
    out = sk.fused_linear_token_logprobs(h, w, y, bias=b, backend=backend).sum()
    (gw,) = torch.autograd.grad(out, w, create_graph=True)
    with pytest.raises(
        RuntimeError, match="double backward through fused_linear_token_logprobs is not supported"
    ):
        torch.autograd.grad(gw.pow(2).sum(), w)
