"""Fused lm_head -> preference loss (SynPO and the comparison family): values, every gradient, stats,
chunking, dispatch and input errors, against the float64 reference of ``synpo_kernels.reference``.

Tolerances are judged against plain PyTorch in the same dtype (``F.linear`` in that dtype, fp32
log-softmax, autograd): the fused op may be at most a small multiple of plain PyTorch's own error
against float64, plus a floor at that dtype's resolution. The Triton path runs compiled on CUDA and
in the interpreter on CPU (``TRITON_INTERPRET=1`` from conftest); shapes are small and odd.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from kernel_targets import BACKENDS, DEVICE, FLOOR, HAS_CUDA

import synpo_kernels as sk
from synpo_kernels import reference as R
from synpo_kernels.ops import fused_linear_kernels as K
from synpo_kernels.ops.fused_linear_preference import _Plan

LOSS_OPTIONS = {
    "synpo": {},
    "dpo": {"ref": True},
    "ipo": {"ref": True, "tau": 0.5},
    "simpo": {"beta": 2.5, "gamma": 0.3},
    "cpo": {"beta": 0.2},
    "orpo": {"lam": 0.3},
    "hinge": {"ref": True, "beta": 0.05, "f_divergence_type": "forward_kl"},
    "exo_pair": {"ref": True, "label_smoothing": 0.1, "f_divergence_type": "js_divergence"},
    "nca_pair": {"ref": True, "beta": 0.3},
    "robust": {"ref": True, "label_smoothing": 0.2, "f_divergence_type": "alpha_divergence"},
    "bco_pair": {"ref": True, "beta": 0.3},
    "sppo_hard": {"ref": True, "beta": 0.7},
    "apo_zero": {"ref": True, "beta": 0.3},
    "apo_down": {"ref": True, "beta": 0.3},
    "discopop": {
        "ref": True,
        "discopop_tau": 0.3,
        "f_divergence_type": "alpha_divergence",
        "f_alpha_divergence_coef": 1.5,
    },
    "sft": {},
    "aot": {"ref": True, "beta": 0.3, "label_smoothing": 0.1},
    "aot_unpaired": {"ref": True, "beta": 0.2},
    # A weighted sum (TRL's loss_weights; the MPO recipe), one pass like any loss.
    "dpo+bco_pair+sft": {"ref": True, "beta": 0.3, "dpo_weight": 0.8, "bco_pair_weight": 0.2},
}


def make_batch(pairs, seq, dim, vocab, dtype, *, bias=True, seed=0, device=DEVICE):
    """Random lm_head inputs and HF labels: random prompt length, response length, holes, padding."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    hidden = torch.randn(rows, seq, dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=gen, dtype=torch.float64) * (2.5 / math.sqrt(dim))
    b = torch.randn(vocab, generator=gen, dtype=torch.float64) * 0.5 if bias else None
    labels = torch.full((rows, seq), -100, dtype=torch.long)
    for r in range(rows):
        prompt = int(torch.randint(1, seq - 2, (1,), generator=gen))
        length = int(torch.randint(1, seq - prompt + 1, (1,), generator=gen))
        labels[r, prompt : prompt + length] = torch.randint(0, vocab, (length,), generator=gen)
        holes = torch.rand(length, generator=gen) < 0.2
        holes[0] = False  # keep at least one scored token per row
        labels[r, prompt : prompt + length][holes] = -100
    cast = lambda x: None if x is None else x.to(dtype).to(device).requires_grad_(True)
    return cast(hidden), cast(weight), cast(b), labels.to(device)


def ref_options(loss, rows, seed=1):
    opts = dict(LOSS_OPTIONS[loss])
    if opts.pop("ref", False):
        gen = torch.Generator().manual_seed(seed)
        opts["ref_logps"] = (torch.randn(rows, generator=gen, dtype=torch.float64) * 2 - 3).to(DEVICE)
    return opts


def reference_and_plain(hidden, weight, bias, labels, loss, opts, **kw):
    """(float64 reference loss and grads, plain PyTorch loss and grads in the input dtype)."""
    inputs = [x for x in (hidden, weight, bias) if x is not None]
    ref_in = [x.detach().double().requires_grad_(True) for x in inputs]
    h64, w64 = ref_in[0], ref_in[1]
    b64 = ref_in[2] if bias is not None else None
    ref = R.preference_loss_ref(R.linear_logits_ref(h64, w64, b64), labels, loss=loss, **opts, **kw)
    ref_grads = torch.autograd.grad(ref, ref_in)
    plain_in = [x.detach().clone().requires_grad_(True) for x in inputs]
    pb = plain_in[2] if bias is not None else None
    logits = F.linear(plain_in[0], plain_in[1], pb)
    plain = R.preference_loss_ref(logits, labels, loss=loss, dtype=torch.float32, **opts, **kw)
    plain_grads = torch.autograd.grad(plain, plain_in)
    return (ref, ref_grads), (plain, plain_grads)


def assert_close(actual, ref, plain, dtype, name, factor=4.0, reduction=512):
    """``|actual - ref| <= factor * |plain - ref| + floor``; the floor (at the dtype's resolution,
    relative to the largest reference value) grows like sqrt(reduction length) beyond 512, since BLAS
    accumulation order differs between a GEMM of a few compact rows and plain PyTorch's larger one."""
    actual, ref, plain = actual.detach().double(), ref.detach().double(), plain.detach().double()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = (actual - ref).abs().max().item()
    plain_err = (plain - ref).abs().max().item()
    scale = max(ref.abs().max().item(), 1e-30)
    tol = factor * plain_err + FLOOR[dtype] * scale * max(1.0, math.sqrt(reduction / 512))
    assert err <= tol, f"{name}: max error {err:.3e} > {tol:.3e} (plain {dtype} error {plain_err:.3e})"


def run_fused(hidden, weight, bias, labels, loss, opts, backend, **kw):
    out, stats = sk.fused_linear_preference_loss(
        hidden, weight, labels, loss=loss, bias=bias, backend=backend, return_stats=True, **opts, **kw
    )
    inputs = [x for x in (hidden, weight, bias) if x is not None]
    return out, torch.autograd.grad(out, inputs), stats


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_repeats_bit_for_bit(backend, dtype):
    """Two calls on the same inputs agree bit for bit: the per-row sums are segment sums, not
    atomics (CUDA's index_add_ made runs differ in the last bits on an H100). Only the Triton
    backend's bias-gradient column sums are atomic (one add per column per program) on CUDA."""
    hidden, weight, bias, labels = make_batch(3, 41, 64, 5003, torch.float64, seed=11)
    inputs = [x.to(dtype).requires_grad_(True) for x in (hidden, weight, bias)]
    first, second = (
        run_fused(*inputs, labels, "synpo", {}, backend, chunk_bytes=40 * 5003 * 2) for _ in range(2)
    )
    atomic_bias = backend == "triton" and DEVICE == "cuda"
    torch.testing.assert_close(first[0], second[0], rtol=0, atol=0)
    for name, a, b in zip(("hidden", "weight", "bias"), first[1], second[1]):
        if name == "bias" and atomic_bias:
            eps = torch.finfo(dtype).eps
            torch.testing.assert_close(a, b, rtol=4 * eps, atol=4 * eps * b.abs().max().item())
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", sorted(LOSS_OPTIONS))
def test_every_loss_float64_exact(loss, backend):
    """The general path (stats -> autograd coefficients -> a + b p_t) is exact for every loss."""
    hidden, weight, bias, labels = make_batch(
        3, 13, 40, 97, torch.float64, seed=sorted(LOSS_OPTIONS).index(loss)
    )
    opts = ref_options(loss, 6)
    # Small chunks: several chunks of whole pairs.
    out, grads, _ = run_fused(hidden, weight, bias, labels, loss, opts, backend, chunk_bytes=14 * 97 * 8)
    (ref, ref_grads), _ = reference_and_plain(hidden, weight, bias, labels, loss, opts)
    assert out.dtype == torch.float64 and out.shape == ()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12, msg=f"grad {name} ({loss})")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", ["synpo", "dpo"])
def test_dtypes_against_plain_pytorch(dtype, loss, backend):
    hidden, weight, bias, labels = make_batch(3, 14, 40, 131, dtype, seed=7)
    opts = ref_options(loss, 6, seed=3)
    out, grads, _ = run_fused(hidden, weight, bias, labels, loss, opts, backend, chunk_bytes=16 * 131 * 6)
    (ref, ref_grads), (plain, plain_grads) = reference_and_plain(hidden, weight, bias, labels, loss, opts)
    assert out.dtype == torch.float32
    assert_close(out, ref, plain, dtype, "loss")
    for name, g, r, p in zip(("hidden", "weight", "bias"), grads, ref_grads, plain_grads):
        assert g.dtype == dtype and g.shape == p.shape
        assert_close(g, r, p, dtype, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("accumulation", ["fp32", "native"])
def test_weight_grad_accumulation_modes(accumulation, backend):
    hidden, weight, bias, labels = make_batch(4, 12, 72, 101, torch.bfloat16, seed=11)
    _, grads, _ = run_fused(
        hidden, weight, bias, labels, "synpo", {}, backend, chunk_bytes=10 * 101 * 6,
        weight_grad_accumulation=accumulation,
    )  # fmt: skip
    (_, ref_grads), (_, plain_grads) = reference_and_plain(hidden, weight, bias, labels, "synpo", {})
    assert_close(grads[1], ref_grads[1], plain_grads[1], torch.bfloat16, "grad weight")
    assert_close(grads[0], ref_grads[0], plain_grads[0], torch.bfloat16, "grad hidden")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["synpo", "orpo"])
def test_chunking_invariance_and_oversized_pairs(loss, backend, monkeypatch):
    """One chunk, chunks of several pairs, a buffer grown to fit a pair, and pairs split over
    sub-chunks (two passes, buffer growth disabled) all agree (orpo: its pooled NLL is a batch
    constant passed to every chunk)."""
    from synpo_kernels.ops import fused_linear_preference as P

    hidden, weight, bias, labels = make_batch(4, 15, 24, 61, torch.float64, seed=5)
    counts = (labels[:, 1:] != -100).sum(1)
    largest = int((counts[:4] + counts[4:]).max())
    results = []
    for rows, growth in ((10_000, 4), (largest + 1, 4), (largest // 2, 4), (3, 1)):
        monkeypatch.setattr(P, "PAIR_GROWTH", growth)
        plan = _Plan(labels, -100, True, rows)
        if growth == 1:
            assert any(t1 - t0 > 3 for *_, t0, t1 in plan.groups)  # some pairs are split: two passes
        else:
            assert plan.max_rows >= largest  # every pair fits the (grown) buffer
        results.append(run_fused(hidden, weight, bias, labels, loss, {}, backend, chunk_bytes=rows * 61 * 8))
    for out, grads, _ in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=1e-12, atol=1e-13)
        for g, g0 in zip(grads, results[0][1]):
            torch.testing.assert_close(g, g0, rtol=1e-10, atol=1e-13)


def test_plan_of_a_whole_batch_loss_is_one_group():
    """AOT sorts across the batch: one group of all pairs, in sub-chunks past the buffer."""
    _, _, _, labels = make_batch(5, 13, 8, 31, torch.float64, seed=4)
    assert len(_Plan(labels, -100, True, 12).groups) > 1
    plan = _Plan(labels, -100, True, 12, whole_batch=True)
    assert plan.groups == [(0, 5, 0, plan.tok_idx.shape[0])] and plan.max_rows < plan.tok_idx.shape[0]
    assert sk.loss_registry.get_loss("aot").whole_batch and sk.loss_registry.get_loss("dpo+aot").whole_batch
    assert not sk.loss_registry.get_loss("dpo").whole_batch


def test_plan_groups_whole_pairs():
    _, _, _, labels = make_batch(5, 12, 8, 17, torch.float32, seed=2)
    counts = (R.shift_labels(labels) != -100).sum(1).tolist()
    plan = _Plan(labels, -100, True, max_rows=9, growth=1)
    covered = []
    for g0, g1, t0, t1 in plan.groups:
        covered += list(range(g0, g1))
        expected = sum(counts[i] + counts[5 + i] for i in range(g0, g1))
        assert t1 - t0 == expected
        assert g1 - g0 == 1 or expected <= 9
        rows = plan.tok_row[t0:t1].tolist()
        assert set(rows) == set(range(g0, g1)) | {5 + i for i in range(g0, g1)}
    assert covered == list(range(5))
    assert (
        sorted(plan.tok_idx.tolist())
        == torch.nonzero(R.shift_labels(labels).flatten() != -100).flatten().tolist()
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_output_scaling_and_partial_grads(backend):
    hidden, weight, bias, labels = make_batch(2, 11, 24, 53, torch.float64, seed=9)
    out, grads, _ = run_fused(hidden, weight, bias, labels, "synpo", {}, backend)
    scaled = sk.fused_linear_synpo_loss(hidden, weight, labels, bias=bias, backend=backend) * -2.5
    scaled_grads = torch.autograd.grad(scaled, (hidden, weight, bias))
    for g, s in zip(grads, scaled_grads):
        torch.testing.assert_close(s, -2.5 * g, rtol=1e-12, atol=1e-14)
    # Frozen lm_head (LoRA): only the hidden gradient is computed, and it is the same.
    frozen = weight.detach()
    loss = sk.fused_linear_synpo_loss(hidden, frozen, labels, backend=backend)
    (gh,) = torch.autograd.grad(loss, (hidden,))
    ref = R.synpo_loss_ref(R.linear_logits_ref(hidden, frozen), labels)
    torch.testing.assert_close(gh, torch.autograd.grad(ref, (hidden,))[0], rtol=1e-10, atol=1e-13)
    # No grad: same value, nothing kept.
    with torch.no_grad():
        value = sk.fused_linear_synpo_loss(hidden, weight, labels, bias=bias, backend=backend)
    assert not value.requires_grad
    torch.testing.assert_close(value, out.detach(), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_shift_and_custom_ignore_index(backend):
    hidden, weight, _, labels = make_batch(2, 10, 16, 29, torch.float64, bias=False, seed=4)
    labels = torch.where(labels == -100, torch.full_like(labels, -1), labels)
    out = sk.fused_linear_synpo_loss(
        hidden, weight, labels, shift=False, ignore_index=-1, backend=backend, beta=0.7
    )
    gh, gw = torch.autograd.grad(out, (hidden, weight))
    ref = R.synpo_loss_ref(
        R.linear_logits_ref(hidden, weight), labels, shift=False, ignore_index=-1, beta=0.7
    )
    rh, rw = torch.autograd.grad(ref, (hidden, weight))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(gh, rh, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(gw, rw, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_odd_vocabulary(backend):
    """V > 65536 and not a multiple of any block size (fp32: cuBLAS/CPU GEMMs + row kernels)."""
    hidden, weight, bias, labels = make_batch(1, 6, 12, 70_001, torch.float32, seed=13)
    out, grads, _ = run_fused(hidden, weight, bias, labels, "synpo", {}, backend, chunk_bytes=3 * 70_001 * 4)
    (ref, ref_grads), (plain, plain_grads) = reference_and_plain(hidden, weight, bias, labels, "synpo", {})
    assert_close(out, ref, plain, torch.float32, "loss", reduction=70_001)
    for name, g, r, p in zip(("hidden", "weight", "bias"), grads, ref_grads, plain_grads):
        assert_close(g, r, p, torch.float32, f"grad {name}", reduction=70_001)


@pytest.mark.parametrize("loss", sorted(LOSS_OPTIONS))
def test_stats_match_reference(loss):
    hidden, weight, bias, labels = make_batch(3, 12, 16, 41, torch.float64, seed=21)
    opts = ref_options(loss, 6)
    _, stats = sk.fused_linear_preference_loss(
        hidden, weight, labels, loss=loss, bias=bias, return_stats=True, **opts
    )
    logits = R.linear_logits_ref(hidden.detach(), weight.detach(), bias.detach())
    rs = R.row_stats_ref(logits, labels)
    chosen, rejected = rs.split_pairs()
    torch.testing.assert_close(stats.chosen_logps, chosen.mean_logp)
    torch.testing.assert_close(stats.rejected_logps, rejected.mean_logp)
    torch.testing.assert_close(stats.chosen_mean_prob, chosen.mean_p)
    assert stats.chosen_count.tolist() == chosen.count.long().tolist()
    assert stats.rejected_count.tolist() == rejected.count.long().tolist()
    torch.testing.assert_close(stats.pair_losses, R.PREFERENCE_LOSSES[loss](rs, **opts))
    m_w, m_l, s_w, s_l = chosen.mean_logp, rejected.mean_logp, chosen.sum_logp, rejected.sum_logp
    if sk.loss_registry.get_loss(loss).needs_reference:
        ref = opts["ref_logps"]  # summed reference log-probs, whatever the loss's `average`
        n_w, n_l = (chosen.count, rejected.count) if loss == "ipo" else (1.0, 1.0)  # each loss's default
        h = (s_w - ref[:3]) / n_w - (s_l - ref[3:]) / n_l
        if loss not in (
            "dpo",
            "ipo",
        ):  # TRL's other DPO loss types: TRL's margin β h, whatever the f-divergence
            torch.testing.assert_close(stats.reward_margin, opts.get("beta", 0.1) * h)
            return
    expected = {
        "sft": s_w - s_l,
        "synpo": m_w.exp() - m_l.exp(),
        "dpo": 0.1 * h if loss == "dpo" else None,
        "ipo": h if loss == "ipo" else None,
        "simpo": 2.5 * (m_w - m_l),
        "cpo": 0.2 * (s_w - s_l),
        "orpo": (m_w - torch.log(-torch.expm1(m_w))) - (m_l - torch.log(-torch.expm1(m_l))),
    }[loss]
    torch.testing.assert_close(stats.reward_margin, expected)
    assert all(not getattr(stats, f).requires_grad for f in stats.__dataclass_fields__)
    logged = stats.as_dict(prefix="train/")
    assert set(logged) == {f"train/{f}" for f in stats.__dataclass_fields__}


def test_modules():
    hidden, weight, bias, labels = make_batch(2, 10, 16, 31, torch.float64, seed=8)
    module = sk.FusedLinearSynPOLoss(alpha=12.0, beta=0.4)
    out = module(hidden, weight, labels, bias)
    ref = R.synpo_loss_ref(R.linear_logits_ref(hidden, weight, bias), labels, alpha=12.0, beta=0.4)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-13)
    assert module.last_stats is not None and module.last_stats.chosen_logps.shape == (2,)
    assert "alpha" in repr(module)
    ref_logps = (torch.randn(4, dtype=torch.float64) - 5).to(hidden.device)
    dpo = sk.FusedLinearPreferenceLoss("dpo", beta=0.3, return_stats=True)
    value, stats = dpo(hidden, weight, labels, ref_logps=ref_logps)
    ref = R.preference_loss_ref(
        R.linear_logits_ref(hidden, weight), labels, loss="dpo", ref_logps=ref_logps, beta=0.3
    )
    torch.testing.assert_close(value, ref, rtol=1e-12, atol=1e-13)
    assert stats.reward_margin.shape == (2,)
    with pytest.raises(TypeError, match="unknown option"):
        sk.FusedLinearPreferenceLoss("simpo", alpha=1.0)
    with pytest.raises(ValueError, match="loss"):
        sk.FusedLinearPreferenceLoss("kto")


def test_input_errors():
    hidden, weight, bias, labels = make_batch(2, 8, 16, 23, torch.float32, seed=1)
    f = sk.fused_linear_synpo_loss
    with pytest.raises(ValueError, match="weight: shape"):
        f(hidden, weight[:, :15], labels)
    with pytest.raises(ValueError, match="bias: expected shape"):
        f(hidden, weight, labels, bias=bias[:-1])
    with pytest.raises(TypeError, match="weight: dtype"):
        f(hidden, weight.double(), labels)
    bad = labels.clone()
    bad[1, 3] = 23
    with pytest.raises(ValueError, match=r"labels: value 23 is outside \[0, 23\)"):
        f(hidden, weight, bad)
    with pytest.raises(ValueError, match="even, non-zero number of rows"):
        f(hidden[:3], weight, labels[:3])
    empty = labels.clone()
    empty[2, 1:] = -100
    with pytest.raises(ValueError, match=r"row\(s\) \[2\] have no response tokens"):
        f(hidden, weight, empty)
    with pytest.raises(ValueError, match="labels: shape"):
        f(hidden, weight, labels[:, :-1])
    with pytest.raises(TypeError, match="labels: expected an integer"):
        f(hidden, weight, labels.float())
    with pytest.raises(ValueError, match="hidden: expected shape \\(2B, T, D\\)"):
        f(hidden[0], weight, labels[0])
    with pytest.raises(ValueError, match="ZeRO-3"):
        f(hidden, torch.empty(0), labels)
    with pytest.raises(ValueError, match="ref_logps"):
        sk.fused_linear_preference_loss(hidden, weight, labels, loss="dpo")
    with pytest.raises(ValueError, match=r"ref_logps: expected shape \(4,\)"):
        sk.fused_linear_preference_loss(hidden, weight, labels, loss="dpo", ref_logps=torch.zeros(3))
    with pytest.raises(TypeError, match="unknown option"):
        sk.fused_linear_preference_loss(hidden, weight, labels, loss="synpo", gamma=1.0)
    with pytest.raises(ValueError, match="loss: unknown preference loss"):
        sk.fused_linear_preference_loss(hidden, weight, labels, loss="kto")
    with pytest.raises(TypeError, match="alpha: expected a number, got str"):
        f(hidden, weight, labels, alpha="30")
    with pytest.raises(ValueError, match="backend"):
        f(hidden, weight, labels, backend="cuda")
    with pytest.raises(ValueError, match="chunk_bytes"):
        f(hidden, weight, labels, chunk_bytes=0)
    with pytest.raises(ValueError, match="weight_grad_accumulation"):
        f(hidden, weight, labels, weight_grad_accumulation="bf16")


@pytest.mark.skipif(K.INTERPRET, reason="checks the error raised when the interpreter is off")
def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    hidden, weight, _, labels = make_batch(1, 6, 8, 11, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="backend: 'triton' cannot run here"):
        sk.fused_linear_synpo_loss(hidden, weight, labels, backend="triton")


@pytest.mark.skipif(not HAS_CUDA, reason="device-memory accounting needs a CUDA device (CPU: benchmarks)")
def test_cuda_memory_stays_bounded():
    """No N x V tensor: peak device memory beyond inputs and grads stays near the chunk buffer."""
    rows, seq, dim, vocab = 8, 513, 256, 32768
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(rows, seq, dim, device="cuda", generator=gen).bfloat16().requires_grad_(True)
    weight = (torch.randn(vocab, dim, device="cuda", generator=gen) / 16).bfloat16().requires_grad_(True)
    labels = torch.randint(0, vocab, (rows, seq), device="cuda", generator=gen)
    labels[:, :1] = -100
    chunk = 64 << 20  # one pair: 1024 tokens x 32768 x 2 bytes = 64 MiB
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    sk.fused_linear_synpo_loss(hidden, weight, labels, chunk_bytes=chunk).backward()
    torch.cuda.synchronize()
    grads = 2 * (hidden.numel() + weight.numel()) + 4 * weight.numel()  # + fp32 accumulator
    extra = torch.cuda.max_memory_allocated() - base - grads
    logits_bytes = rows * seq * vocab * 2
    assert extra < chunk + (16 << 20), f"{extra / 2**20:.1f} MiB beyond inputs and grads"
    assert extra < logits_bytes / 2


def test_torch_compile_with_the_fused_loss_inside():
    """Inside a torch.compile'd function the fused loss is one opaque op (no graph break; the full
    matrix of losses and modes is in test_fused_linear_compile.py)."""
    hidden, weight, _, labels = make_batch(2, 9, 16, 33, torch.float32, bias=False, seed=3)

    def step(h, w, y):
        return sk.fused_linear_synpo_loss(torch.tanh(h) * 2, w, y)

    compiled = torch.compile(step, backend="eager")
    out = compiled(hidden, weight, labels)
    got = torch.autograd.grad(out, (hidden, weight))
    ref = step(hidden, weight, labels)
    expected = torch.autograd.grad(ref, (hidden, weight))
    torch.testing.assert_close(out, ref)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "logits"])
def test_empty_row_message_is_true_for_the_loss(fused):
    """Summed-log-prob losses (dpo by default) do not length-normalize: the message says why an empty
    row is still invalid there; length-normalized ones (synpo, ipo) say the mean is undefined."""
    hidden, weight, _, labels = make_batch(2, 8, 6, 11, torch.float64, bias=False, seed=5, device="cpu")
    labels = labels.clone()
    labels[3, 1:] = -100  # the rejected row of pair 1
    ref = torch.zeros(4, dtype=torch.float64)

    def call(loss, **opts):
        if fused:
            return sk.fused_linear_preference_loss(hidden, weight, labels, loss=loss, **opts)
        return sk.preference_loss(F.linear(hidden, weight), labels, loss=loss, **opts)

    with pytest.raises(ValueError) as summed:
        call("dpo", ref_logps=ref)
    message = str(summed.value)
    assert "row(s) [3]" in message and "rejected row of pair 1" in message
    assert "length-normalized" not in message
    assert "not valid preference pairs" in message and "summed log-probs" in message and "'dpo'" in message
    for loss, opts in (
        ("synpo", {}),
        ("ipo", {"ref_logps": ref}),
        ("dpo", {"ref_logps": ref, "average": True}),
    ):
        with pytest.raises(ValueError, match=r"row\(s\) \[3\] .*length-normalized log-prob.*undefined"):
            call(loss, **opts)
