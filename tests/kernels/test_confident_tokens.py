"""Confident tokens: the gradient ``g * (1 - p)`` of a target near certainty, on every implementation
of the row passes (C++ CPU, CUDA, the PyTorch fallback, the Triton row kernels, and the fused linear
op on each backend).

``1 - p`` is tiny there, so ``p`` must come from the logits relative to the row max,
``exp((z - m) - log s)``: formed from a rounded ``lse = m + log s`` (``|lse|`` ~ 20-40 in real LMs),
it carries the rounding of ``lse``'s magnitude, several times plain fp32 PyTorch's error (issue 22).
Every error is judged per row against float64 from the same input logits, and bounded by a small
multiple of plain PyTorch's own error in the same dtype (``log_softmax`` + ``gather`` + autograd),
with a floor of one rounding of the row's largest term (``p`` near 1, and the output's rounding).
"""

from __future__ import annotations

import pytest
import torch
from kernel_targets import BACKENDS, DEVICE

import synpo_kernels as sk
from synpo_kernels.ops import fused_linear_kernels as K
from synpo_kernels.ops import token_logprobs as tl_mod
from synpo_kernels.reference import IGNORE_INDEX

FACTOR = 4.0
EPS32 = torch.finfo(torch.float32).eps


# ---------------------------------------------------------------------------------------------
# The implementations of the two row passes: forward (logp, lse) and backward grad_logits.
# ---------------------------------------------------------------------------------------------


def _op_fwd(z, y):
    return torch.ops.synpo_kernels.token_logprobs_fwd(z, y, IGNORE_INDEX)


def _op_bwd(g, z, y, lse):
    return torch.ops.synpo_kernels.token_logprobs_bwd(g, z, y, lse, IGNORE_INDEX)


def _fallback_bwd(g, z, y, lse):
    return tl_mod._bwd_fallback(g, z, y, lse, IGNORE_INDEX)


def _triton_fwd(z, y):
    return K.row_lse(z, y, IGNORE_INDEX)


def _triton_bwd(g, z, y, lse):
    out = z.clone()
    K.row_grad_(out, g, y, lse, IGNORE_INDEX)
    return out


IMPLS = {
    # name: (forward, backward, device)
    "cpp": (_op_fwd, _op_bwd, "cpu"),
    "fallback": (lambda z, y: tl_mod._fwd_fallback(z, y, IGNORE_INDEX), _fallback_bwd, "cpu"),
    "cuda": (_op_fwd, _op_bwd, "cuda"),
    "triton": (_triton_fwd, _triton_bwd, DEVICE),
}
IMPL_PARAMS = [
    pytest.param("cpp", marks=pytest.mark.skipif(not sk.HAS_CPP_EXT, reason="needs the compiled extension")),
    "fallback",
    pytest.param("cuda", marks=pytest.mark.cuda),
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(not K.triton_usable_on(torch.device(DEVICE)), reason="no Triton here"),
    ),
]


# ---------------------------------------------------------------------------------------------
# Inputs and the per-row error bound.
# ---------------------------------------------------------------------------------------------


def confident_rows(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 logits ``(rows, vocab)`` and labels: targets 10-40 above the rest at several offsets,
    the issue's row (26.6 among 9.6s), a target in the last column, two tied maxima, and rows spread
    over -16..32 (target at the max, and not)."""
    gen = torch.Generator().manual_seed(seed)
    rows, labels = [], []

    def add(row, label):
        rows.append(row)
        labels.append(label)

    issue = torch.full((vocab,), 9.6, dtype=torch.float64)
    issue[5] = 26.6
    add(issue, 5)
    for offset in (0.0, 10.0, -5.0):
        for delta in (10.0, 17.0, 20.0, 30.0, 40.0):
            row = offset + torch.randn(vocab, generator=gen, dtype=torch.float64)
            label = int(torch.randint(0, vocab, (1,), generator=gen))
            row[label] = row.max() + delta
            add(row, label)
    # The target last (for V = 3001 the CPU kernel's second block raises the max it carried from the
    # first), and two tied maxima far apart (each p ~ 1/2).
    late = torch.randn(vocab, generator=gen, dtype=torch.float64) + 10.0
    late[0], late[-1] = 14.0, 31.0
    add(late, vocab - 1)
    tied = torch.randn(vocab, generator=gen, dtype=torch.float64)
    tied[1] = tied[-2] = 25.0
    add(tied, vocab - 2)
    spread = -16.0 + 48.0 * torch.rand(vocab, generator=gen, dtype=torch.float64)
    spread[int(torch.randint(0, vocab, (1,), generator=gen))] = 32.0
    add(spread, int(spread.argmax()))
    add(spread.clone(), int(torch.randint(0, vocab, (1,), generator=gen)))
    return torch.stack(rows), torch.tensor(labels)


def per_row_error(actual: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    diff = (actual.double() - ref.double()).abs()
    return diff.reshape(diff.shape[0], -1).amax(-1)


def assert_rows_no_worse_than_plain(name, actual, ref, plain, floor):
    """Per row: max |actual - ref| <= FACTOR * max(plain's max error on that row, ``floor`` (row,))."""
    err, plain_err = per_row_error(actual, ref), per_row_error(plain, ref)
    bound = FACTOR * torch.maximum(plain_err, floor.double())
    bad = torch.nonzero(err > bound).flatten().tolist()
    detail = ", ".join(f"row {r}: {err[r]:.3e} (plain {plain_err[r]:.3e}, bound {bound[r]:.3e})" for r in bad)
    assert not bad, f"{name}: error above {FACTOR:g}x plain PyTorch's: {detail}"


def plain_and_reference(z: torch.Tensor, labels: torch.Tensor, g: torch.Tensor):
    """``(logp, grad_logits)`` of plain PyTorch in ``z``'s dtype, and in float64 from the same logits."""
    results = []
    for x in (z.detach().clone(), z.detach().double()):
        x.requires_grad_(True)
        logp = x.log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)
        (grad,) = torch.autograd.grad(logp, x, g.to(logp.dtype))
        results.append((logp.detach(), grad))
    return results


def row_floor(g: torch.Tensor, ref_grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One fp32 rounding of ``g * p`` for ``p`` near 1, plus the output dtype's rounding of the row's
    largest entry."""
    return EPS32 * g.abs().double() + torch.finfo(dtype).eps * ref_grad.abs().amax(-1)


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [64, 3001])  # 3001: several blocks of the CPU kernel, odd length
def test_confident_rows_logits_gradient(impl, dtype, vocab):
    fwd, bwd, device = IMPLS[impl]
    logits64, labels = confident_rows(vocab, seed=vocab)
    z = logits64.to(dtype).to(device)
    labels = labels.to(device)
    g = (torch.randn(z.shape[0], generator=torch.Generator().manual_seed(1)) + 2.0).to(device)
    (plain_logp, plain_grad), (ref_logp, ref_grad) = plain_and_reference(z, labels, g)

    logp, lse = fwd(z, labels)
    grad = bwd(g, z, labels, lse)
    assert grad.dtype == dtype and torch.isfinite(grad).all()
    floor = row_floor(g, ref_grad, dtype)
    assert_rows_no_worse_than_plain(f"{impl} grad_logits", grad, ref_grad, plain_grad, floor)
    # log p of the target: (z_t - m) - log s, at fp32's resolution of log s.
    assert_rows_no_worse_than_plain(
        f"{impl} logp", logp, ref_logp, plain_logp, torch.full_like(ref_logp, EPS32)
    )


def tied_embedding_case(n_tokens: int, vocab: int, dim: int, seed: int = 0):
    """A tied-embedding-like lm_head: each hidden state close to its target's embedding, so the target
    logit is about 24-50 while the others spread over about -20..20 (fp32 inputs)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, dim, generator=gen, dtype=torch.float64) * (32.0 / dim) ** 0.5
    labels = torch.randint(0, vocab, (n_tokens,), generator=gen)
    scale = 0.75 + 0.5 * torch.rand(n_tokens, 1, generator=gen, dtype=torch.float64)
    hidden = scale * weight[labels] + 0.05 * torch.randn(n_tokens, dim, generator=gen, dtype=torch.float64)
    return hidden.float(), weight.float(), labels


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_tied_embedding_weight_gradient(impl):
    """Weight and hidden gradients of ``logp = log_softmax(h @ W^T)[y]`` with the logits gradient of
    each implementation, the GEMMs in fp32 as plain PyTorch's, against float64 from the same
    fp32 logits."""
    fwd, bwd, device = IMPLS[impl]
    hidden, weight, labels = (x.to(device) for x in tied_embedding_case(96, 1000, 64, seed=1))
    z = hidden @ weight.t()
    assert z.min() < -10 and z.max() > 25
    g = torch.randn(z.shape[0], generator=torch.Generator().manual_seed(2)).to(device)
    (_, plain_grad), (_, ref_grad) = plain_and_reference(z, labels, g)
    _, lse = fwd(z, labels)
    grad = bwd(g, z, labels, lse)
    for name, ours, plain, ref in (
        ("grad_weight", grad.t() @ hidden, plain_grad.t() @ hidden, ref_grad.t() @ hidden.double()),
        ("grad_hidden", grad @ weight, plain_grad @ weight, ref_grad @ weight.double()),
    ):
        err = (ours.double() - ref).abs().max().item()
        plain_err = (plain.double() - ref).abs().max().item()
        floor = EPS32 * ref.abs().max().item()
        assert err <= FACTOR * max(plain_err, floor), (
            f"{impl} {name}: {err:.3e} vs plain fp32 {plain_err:.3e}"
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_embedding_fused_linear(backend):
    """The fused lm_head op end to end (its GEMMs and row passes, both backends): weight and hidden
    gradients against float64 from the same fp32 inputs, bounded by plain fp32 PyTorch's error."""
    hidden, weight, labels = (x.to(DEVICE) for x in tied_embedding_case(80, 1000, 64, seed=1))
    g = torch.randn(labels.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEVICE)
    grads = {}
    for name, dtype in (("fused", torch.float32), ("plain", torch.float32), ("ref", torch.float64)):
        h = hidden.detach().to(dtype).requires_grad_(True)
        w = weight.detach().to(dtype).requires_grad_(True)
        if name == "fused":
            logp = sk.fused_linear_token_logprobs(h, w, labels, shift=False, backend=backend)
        else:
            logp = (h @ w.t()).log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)
        grads[name] = torch.autograd.grad((logp * g.to(dtype)).sum(), (h, w))
    for i, name in enumerate(("grad_hidden", "grad_weight")):
        ref = grads["ref"][i]
        err = (grads["fused"][i].double() - ref).abs().max().item()
        plain_err = (grads["plain"][i].double() - ref).abs().max().item()
        floor = EPS32 * ref.abs().max().item()
        assert err <= FACTOR * max(plain_err, floor), (
            f"{backend} {name}: {err:.3e} vs plain fp32 {plain_err:.3e}"
        )


@pytest.mark.parametrize("impl", ["cpp", "fallback"])
def test_backward_rejects_a_one_float_lse(impl):
    """``lse`` is ``(N, 2)`` (max, log sum exp(z - max)); the old one-float ``(N,)`` form is refused
    with a ValueError naming it, by the compiled kernel and the fallback alike."""
    if impl == "cpp" and not sk.HAS_CPP_EXT:
        pytest.skip("needs the compiled extension")
    fwd, bwd, _ = IMPLS[impl]
    z, labels = torch.randn(4, 9), torch.tensor([1, 2, IGNORE_INDEX, 8])
    _, lse = fwd(z, labels)
    assert lse.shape == (4, 2)
    with pytest.raises(ValueError, match=r"lse: expected shape \(4, 2\)"):
        bwd(torch.ones(4), z, labels, lse.sum(-1))
