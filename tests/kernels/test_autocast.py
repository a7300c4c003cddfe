"""The fused linear ops under ``torch.autocast``: they behave as ``F.linear`` + the loss would.

Inside autocast the lm_head GEMMs run in the autocast dtype (the ops' autocast kernels cast hidden,
weight and bias as ``F.linear``'s operands are cast), the log-sum-exp, statistics and loss stay fp32,
and each gradient comes back in its parameter's dtype. Values and gradients are compared with float64,
with an error bound judged against the unfused path under the same autocast.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from kernel_targets import BACKENDS, DEVICE
from test_fused_linear_preference import assert_close

import synpo_kernels as sk
from synpo_kernels import reference as R

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def inputs(hidden_dtype, *, bias=True, frozen_weight=False, seed=0):
    """fp32 lm_head parameters (as a model under autocast keeps them) and hidden states in
    ``hidden_dtype`` (fp32, or the autocast dtype an autocast backbone may hand over)."""
    gen = torch.Generator().manual_seed(seed)
    rows, seq, dim, vocab = 6, 11, 48, 293
    hidden = torch.randn(rows, seq, dim, generator=gen).to(DEVICE, hidden_dtype).requires_grad_(True)
    weight = (torch.randn(vocab, dim, generator=gen) * (2.0 / math.sqrt(dim))).to(DEVICE)
    weight.requires_grad_(not frozen_weight)
    b = (torch.randn(vocab, generator=gen) * 0.3).to(DEVICE).requires_grad_(True) if bias else None
    labels = torch.randint(0, vocab, (rows, seq), generator=gen)
    labels[:, :4] = -100
    labels[torch.rand(rows, seq, generator=gen) < 0.15] = -100
    labels[:, 5] = 7
    return hidden, weight, b, labels.to(DEVICE)


def differentiable(*tensors):
    return [t for t in tensors if t is not None and t.requires_grad]


def float64(*tensors):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def fused_preference(backend):
    def run(h, w, b, y):
        return sk.fused_linear_synpo_loss(h, w, y, bias=b, backend=backend)

    return run


def plain_preference(h, w, b, y):
    return R.preference_loss_ref(F.linear(h, w, b), y, loss="synpo", dtype=torch.float32)


def fused_tokens(backend):
    def run(h, w, b, y):
        logp = sk.fused_linear_token_logprobs(h, w, y, bias=b, backend=backend)
        return (logp * torch.linspace(-1, 1, logp.numel(), device=logp.device).view_as(logp)).sum()

    return run


def plain_tokens(h, w, b, y):
    logp = sk.token_logprobs(F.linear(h, w, b), y)
    return (logp * torch.linspace(-1, 1, logp.numel(), device=logp.device).view_as(logp)).sum()


def reference64(plain, h, w, b, y):
    """The float64 reference: the unfused formula in float64 (no autocast)."""
    h64, w64, b64 = float64(h, w, b)
    out = plain(h64, w64, b64, y)
    return out, torch.autograd.grad(out, differentiable(h64, w64, b64))


CASES = [
    pytest.param(fused_preference, plain_preference, id="preference"),
    pytest.param(fused_tokens, plain_tokens, id="tokens"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused, plain", CASES)
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize(
    "hidden_cast, frozen_weight",
    [(False, False), (True, False), (False, True)],
    ids=["fp32", "mixed", "frozen"],
)
def test_values_and_gradients_as_the_unfused_path_under_autocast(
    fused, plain, dtype, backend, hidden_cast, frozen_weight
):
    h, w, b, y = inputs(dtype if hidden_cast else torch.float32, frozen_weight=frozen_weight)
    params = differentiable(h, w, b)
    with torch.autocast(DEVICE, dtype=dtype):
        out = fused(backend)(h, w, b, y)
    grads = torch.autograd.grad(out, params)
    with torch.autocast(DEVICE, dtype=dtype):
        plain_out = plain(h, w, b, y)
    plain_grads = torch.autograd.grad(plain_out, params)
    ref, ref_grads = reference64(plain, h, w, b, y)

    assert out.dtype == torch.float32
    for g, p in zip(grads, params):
        assert g.dtype == p.dtype and g.shape == p.shape
    # GEMMs in the autocast dtype: the error is the autocast dtype's, like the unfused path's.
    assert_close(out, ref, plain_out, dtype, "loss")
    for name, g, r, pg in zip(("hidden", "weight", "bias"), grads, ref_grads, plain_grads):
        assert_close(g, r, pg, dtype, f"grad {name}")
    # ... and really in that dtype: not the fp32 result.
    assert out.item() != fused(backend)(h.float(), w, b, y).item()


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_autocast_off_inside_a_region_keeps_the_inputs_dtype(dtype):
    h, w, b, y = inputs(torch.float32)
    plain = sk.fused_linear_synpo_loss(h, w, y, bias=b)
    with torch.autocast(DEVICE, dtype=dtype), torch.autocast(DEVICE, enabled=False):
        inner = sk.fused_linear_synpo_loss(h, w, y, bias=b)
    torch.testing.assert_close(inner, plain, rtol=0, atol=0)


def test_float64_is_not_cast_and_a_mismatch_names_the_argument():
    """As for ``F.linear`` under autocast, float64 stays float64: float64 hidden states with an fp32
    weight are then a dtype mismatch, reported before any work."""
    h, w, b, y = inputs(torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="weight: dtype"):
            sk.fused_linear_synpo_loss(h.double(), w, y)
        # All float64: nothing is cast, the op runs in float64.
        out = sk.fused_linear_synpo_loss(h.double(), w.double(), y, bias=b.double())
    assert out.dtype == torch.float64
