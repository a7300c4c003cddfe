"""The Triton kernels of the fused linear GPU path, directly: row log-sum-exp, in-place logits
gradient with fused bias-gradient sums, and the fp32 weight-gradient accumulation GEMM.

Compiled on CUDA; on CPU they run in the Triton interpreter (``TRITON_INTERPRET=1`` from conftest).
Output buffers are NaN-poisoned, and ignored rows hold NaN logits, so a missed write or a read of a
row that must be skipped shows up.
"""

from __future__ import annotations

import pytest
import torch

from synpo_kernels.ops import fused_linear_kernels as K

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not K.triton_usable_on(torch.device(DEVICE)), reason="Triton not runnable here (no CUDA, no interpreter)"
)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def chunk(rows, vocab, dtype, *, pad=7, seed=0, ignore_frac=0.3):
    """A (rows, vocab) chunk viewed out of a wider buffer (row stride > V), labels with ignored rows
    whose logits are NaN."""
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(rows, vocab + pad, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    ignored = torch.rand(rows, generator=gen) < ignore_frac
    labels[ignored] = -100
    wide[ignored] = float("nan")
    logits = wide.to(dtype).to(DEVICE)[:, :vocab]
    assert logits.stride(0) == vocab + pad
    return logits, labels.to(DEVICE), ignored.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [333, 9001])
@pytest.mark.parametrize("rows", [70, 300])  # 300: each program of the persistent grid takes several blocks
def test_row_lse(dtype, vocab, rows):
    logits, labels, ignored = chunk(rows, vocab, dtype, seed=vocab)
    logp, lse = K.row_lse(logits, labels, -100)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert logp.dtype == acc and lse.dtype == acc and lse.shape == (rows, 2)
    z = logits.double()
    ref_max = z.amax(-1)
    ref_log_sum = torch.logsumexp(z - ref_max[:, None], -1)
    ref_logp = z.gather(1, labels.clamp_min(0)[:, None]).squeeze(1) - ref_max - ref_log_sum
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    keep = ~ignored
    assert torch.equal(lse[keep, 0].double(), ref_max[keep])  # the row max, exactly
    torch.testing.assert_close(lse[keep, 1].double(), ref_log_sum[keep], rtol=0, atol=tol * vocab**0.5)
    torch.testing.assert_close(logp[keep].double(), ref_logp[keep], rtol=0, atol=tol * vocab**0.5)
    assert (logp[ignored] == 0).all() and (lse[ignored] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [67, 300])  # 300: rows split over programs, bias sums from each
def test_row_grad_inplace_with_bias_sums(dtype, rows):
    vocab = 1500
    logits, labels, ignored = chunk(rows, vocab, dtype, seed=3)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    row_max = logits.double().amax(-1, keepdim=True)
    lse = torch.cat([row_max, torch.logsumexp(logits.double() - row_max, -1, keepdim=True)], -1)
    lse = torch.where(ignored[:, None], 0.0, lse).to(acc)
    g = torch.randn(rows, dtype=torch.float64, device=DEVICE).to(acc)
    z = logits.double().clone()
    expected = g.double()[:, None] * (
        torch.nn.functional.one_hot(labels.clamp_min(0), vocab).double() - torch.softmax(z, -1)
    )
    expected[ignored] = 0
    bias_grad = torch.randn(vocab, dtype=acc, device=DEVICE)
    bias_before = bias_grad.double().clone()
    K.row_grad_(logits, g, labels, lse, -100, bias_grad)
    # One unit in the last place of the output dtype (the interpreter's bf16 cast may truncate).
    tol = 1e-12 if dtype == torch.float64 else {torch.float32: 1e-6, torch.bfloat16: 8e-3}.get(dtype, 4e-3)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits.double(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(bias_grad.double(), bias_before + expected.sum(0), rtol=1e-5, atol=1e-5)
    # Without a bias gradient.
    logits2, *_ = chunk(rows, vocab, dtype, seed=3)
    K.row_grad_(logits2, g, labels, lse, -100)
    torch.testing.assert_close(logits2, logits, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wgrad_accumulate(dtype):
    gen = torch.Generator().manual_seed(4)
    m, vocab, dim = 75, 150, 72  # none a multiple of the block sizes
    dlogits = torch.randn(m, vocab + 3, generator=gen).to(dtype).to(DEVICE)[:, :vocab]
    hidden = torch.randn(m, dim, generator=gen).to(dtype).to(DEVICE)
    acc = torch.randn(vocab, dim, generator=gen).to(DEVICE)
    expected = acc.double() + dlogits.double().t() @ hidden.double()
    K.wgrad_accumulate_(acc, dlogits, hidden)
    torch.testing.assert_close(acc.double(), expected, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="acc"):
        K.wgrad_accumulate_(acc.double(), dlogits, hidden)


def test_ops_are_registered_as_triton_ops():
    """Registered through torch.library.triton_op (traceable by torch.compile on GPU). The fake-tensor
    check runs on CUDA only: under the interpreter, wrap_triton executes the kernel eagerly, which
    cannot work on fake tensors."""
    logits, labels, _ = chunk(8, 40, torch.float32, seed=1)
    logits = logits.contiguous()
    K.row_lse(logits, labels, -100)  # registers the ops
    utils = ("test_schema", "test_faketensor") if DEVICE == "cuda" else ("test_schema",)
    torch.library.opcheck(
        torch.ops.synpo_kernels.fused_linear_row_lse.default, (logits, labels, -100), test_utils=utils
    )
    assert hasattr(torch.ops.synpo_kernels, "fused_linear_row_grad_")
    assert hasattr(torch.ops.synpo_kernels, "fused_linear_wgrad_")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_padded_chunk_buffer_padding_is_read_masked_and_never_written(dtype):
    # The fused ops' chunk buffer pads rows to ROW_ALIGN elements; the row kernels may load up to
    # the next multiple of 16 (16-byte vectors at odd V), which must not change a result, and must
    # never write there. Poison the padding with NaN and +inf.
    from synpo_kernels.ops import fused_linear_common as C

    vocab, rows = 1001, 37
    weight = torch.empty(vocab, 4, dtype=dtype, device=DEVICE)
    buf = C.chunk_buffer(rows, weight)
    assert buf.shape == (rows, vocab) and buf.stride(0) % C.ROW_ALIGN == 0 and buf.stride(0) > vocab
    assert K.load_width(buf) == 1008
    full = buf.as_strided((rows, buf.stride(0)), (buf.stride(0), 1))
    full.fill_(float("nan"))
    full[:, vocab::2] = float("inf")
    gen = torch.Generator().manual_seed(7)
    buf.copy_((torch.randn(rows, vocab, generator=gen) * 3).to(dtype))
    labels = torch.randint(0, vocab, (rows,), generator=gen).to(DEVICE)
    logp, lse = K.row_lse(buf, labels, -100)
    ref_lse = torch.logsumexp(buf.double(), -1)
    ref_logp = buf.double().gather(1, labels[:, None]).squeeze(1) - ref_lse
    torch.testing.assert_close(lse.double().sum(-1), ref_lse, rtol=0, atol=2e-5 * vocab**0.5)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=0, atol=2e-5 * vocab**0.5)
    g = torch.randn(rows, generator=gen, dtype=torch.float32).to(DEVICE)
    padding_before = full[:, vocab:].clone()
    bias_grad = torch.zeros(vocab, dtype=torch.float32, device=DEVICE)
    expected = g.double()[:, None] * (
        torch.nn.functional.one_hot(labels, vocab).double()
        - torch.exp(buf.double() - lse.double().sum(-1, True))
    )
    K.row_grad_(buf, g, labels, lse, -100, bias_grad=bias_grad)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(buf.double(), expected, rtol=0, atol=tol)
    torch.testing.assert_close(bias_grad.double(), expected.sum(0), rtol=0, atol=tol * rows)
    assert torch.equal(full[:, vocab:].isnan(), padding_before.isnan())
    assert torch.equal(full[:, vocab:].isinf(), padding_before.isinf())
