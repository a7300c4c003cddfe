"""The fused linear ops as opaque custom ops: ``torch.library.opcheck`` and
``torch.compile(fullgraph=True)`` against eager, for every loss of the registry, with and without
bias, with gradients, under ``torch.no_grad()`` and with a frozen weight, on both CPU backends; and
``dynamic=True`` (one graph for several sequence lengths, fused and unfused losses).

Backend ``aot_eager``: Dynamo + AOTAutograd with the ops' fake kernels and autograd formulas (what
fullgraph capture needs); one test also runs Inductor end to end.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_targets import backends
from torch._dynamo.utils import counters

import synpo_kernels as sk
from synpo_kernels.losses import loss_spec
from synpo_kernels.ops.fused_linear_common import FusedLinearConfig, FusedLinearParams

BACKENDS = backends("cpu")
MODES = ("grad", "no_grad", "frozen_weight")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles its own closures of the same code objects: start from an empty cache."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def batch(pairs=2, seq=6, dim=8, vocab=17, dtype=torch.float32, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    hidden = torch.randn(rows, seq, dim, generator=gen, dtype=dtype)
    weight = torch.randn(vocab, dim, generator=gen, dtype=dtype) / math.sqrt(dim)
    b = torch.randn(vocab, generator=gen, dtype=dtype) * 0.3 if bias else None
    labels = torch.randint(0, vocab, (rows, seq), generator=gen)
    labels[:, :2] = -100
    labels[2, 3] = -100
    ref = torch.randn(rows, generator=gen) - 5
    return hidden, weight, b, labels, ref


def leaves(hidden, weight, bias, mode):
    h = hidden.clone().requires_grad_(mode != "no_grad")
    w = weight.clone().requires_grad_(mode == "grad")
    b = None if bias is None else bias.clone().requires_grad_(mode == "grad")
    return h, w, b


def assert_same(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def run_mode(fn, compiled, hidden, weight, bias, labels, mode):
    """Outputs and gradients of eager ``fn`` and ``compiled``; both must agree."""
    results = []
    for f in (fn, compiled):
        h, w, b = leaves(hidden, weight, bias, mode)
        if mode == "no_grad":
            with torch.no_grad():
                outs = f(h, w, b, labels)
            results.append((outs, ()))
            continue
        outs = f(h, w, b, labels)
        inputs = [x for x in (h, w, b) if x is not None and x.requires_grad]
        results.append((outs, torch.autograd.grad(outs[0].sum(), inputs)))
    (eager, eager_grads), (traced, traced_grads) = results
    for e, t in zip(eager, traced):
        assert_same(t, e)
    assert len(traced_grads) == len(eager_grads)
    for e, t in zip(eager_grads, traced_grads):
        assert_same(t, e)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("loss", list(sk.LOSSES))
def test_preference_loss_fullgraph_matches_eager(loss, bias, backend):
    hidden, weight, b, labels, ref = batch(bias=bias, seed=len(loss))
    opts = {"ref_logps": ref} if sk.LOSSES[loss].needs_reference else {}

    def fn(h, w, b, y):
        out, stats = sk.fused_linear_preference_loss(
            h, w, y, loss=loss, bias=b, backend=backend, return_stats=True, chunk_bytes=9 * 17 * 4, **opts
        )
        return out, stats.chosen_logps, stats.rejected_logps, stats.reward_margin, stats.pair_losses

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for mode in MODES:
        run_mode(fn, compiled, hidden, weight, b, labels, mode)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_token_logprobs_fullgraph_matches_eager(bias, backend):
    hidden, weight, b, labels, _ = batch(bias=bias, seed=7)
    scale = torch.linspace(-1.0, 2.0, labels.numel()).view(labels.shape)

    def fn(h, w, b, y):
        logp = sk.fused_linear_token_logprobs(h, w, y, bias=b, backend=backend, chunk_bytes=5 * 17 * 4)
        return ((logp * scale).sum(), logp)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for mode in MODES:
        run_mode(fn, compiled, hidden, weight, b, labels, mode)


def test_inductor_end_to_end():
    """The default backend too (Inductor generates code around the opaque ops)."""
    hidden, weight, b, labels, _ = batch(seed=11)

    def fn(h, w, b, y):
        loss = sk.fused_linear_synpo_loss(torch.tanh(h) * 2, w, y, bias=b, backend="torch")
        tokens = sk.fused_linear_token_logprobs(h, w, y, bias=b, backend="torch")
        return (loss + tokens.sum() * 1e-2,)

    run_mode(fn, torch.compile(fn, fullgraph=True), hidden, weight, b, labels, "grad")


# ---------------------------------------------------------------------------------------------
# opcheck. Utils run: test_schema, test_autograd_registration, test_faketensor and
# test_aot_dispatch_dynamic, on float64 inputs requiring grad. None is skipped.
# ---------------------------------------------------------------------------------------------

OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _params(backend, spec=None, grads=(True, True, True)):
    return FusedLinearParams(
        -100, True, FusedLinearConfig(chunk_bytes=9 * 17 * 8), backend, spec, *grads
    ).encode()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["synpo", "dpo"])
def test_opcheck_preference_op(loss, backend):
    hidden, weight, b, labels, ref = batch(dtype=torch.float64, seed=3)
    h, w, b = leaves(hidden, weight, b, "grad")
    spec = loss_spec(loss)
    params = _params(backend, spec)
    torch.library.opcheck(
        torch.ops.synpo_kernels.fused_linear_preference_loss.default,
        (h, w, b, labels, ref.double() if spec.tensor_options else None, params),
        test_utils=OPCHECK_UTILS,
    )
    # Without gradients (torch.no_grad(), frozen lm_head): the gradient outputs are empty.
    no_grads = _params(backend, spec, (False, False, False))
    torch.library.opcheck(
        torch.ops.synpo_kernels.fused_linear_preference_loss.default,
        (
            hidden.double(),
            weight.double(),
            None,
            labels,
            ref.double() if spec.tensor_options else None,
            no_grads,
        ),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_token_logprobs_ops(backend):
    hidden, weight, b, labels, _ = batch(dtype=torch.float64, seed=4)
    h, w, b = leaves(hidden, weight, b, "grad")
    torch.library.opcheck(
        torch.ops.synpo_kernels.fused_linear_token_logprobs.default,
        (h, w, b, labels, _params(backend, grads=(False, False, False))),
        test_utils=OPCHECK_UTILS,
    )
    # Gradients due and every position in one chunk buffer: the forward keeps its logits.
    kept = FusedLinearParams(
        -100, True, FusedLinearConfig(chunk_bytes=1 << 20), backend, None, True, True, True
    )
    torch.library.opcheck(
        torch.ops.synpo_kernels.fused_linear_token_logprobs.default,
        (h, w, b, labels, kept.encode()),
        test_utils=OPCHECK_UTILS,
    )
    for fwd_params, bwd_params in (
        (_params(backend, grads=(False, False, False)), _params(backend)),
        (kept.encode(),) * 2,
    ):
        logp, lse, logits = torch.ops.synpo_kernels.fused_linear_token_logprobs(
            hidden.double(), weight.double(), None, labels, fwd_params
        )
        assert (logits.numel() > 0) == (fwd_params == kept.encode())
        torch.library.opcheck(
            torch.ops.synpo_kernels.fused_linear_token_logprobs_bwd.default,
            (torch.randn_like(logp), hidden.double(), weight.double(), None, labels, lse, logits, bwd_params),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
        )


# ---------------------------------------------------------------------------------------------
# The options object
# ---------------------------------------------------------------------------------------------


def test_params_is_one_frozen_object_round_tripping_through_the_op_argument():
    spec = loss_spec("simpo", beta=2.5, gamma=0.3)
    params = FusedLinearParams(
        -7, False, FusedLinearConfig("triton", 1 << 20, "fp32"), "triton", spec, True, False, True
    )
    assert FusedLinearParams.decode(params.encode()) == params
    assert hash(params) == hash(FusedLinearParams.decode(params.encode()))
    with pytest.raises(AttributeError):
        params.shift = True  # frozen


# ---------------------------------------------------------------------------------------------
# dynamic=True: every dimension and every Python number symbolic from the first compile. The loss
# options must still become constants of the graph (the fused op's params string holds them).
# ---------------------------------------------------------------------------------------------

SEQ_LENGTHS = (6, 9, 13)


def _float_option(loss):
    """The loss's first float option with a non-default value, passed as an argument of the compiled
    function (where dynamic=True makes it a symbolic float), or nothing for a loss without one."""
    for p in sk.LOSSES[loss].params:
        if p.type is float:
            return {p.name: p.default * 0.75 + 0.125 if p.high is None else (p.default + p.high) / 2}
    return {}


@pytest.mark.parametrize("fused", [True, False], ids=["fused_linear", "logits"])
@pytest.mark.parametrize("loss", list(sk.LOSSES))
def test_dynamic_true_one_graph_for_every_length(loss, fused):
    opts = _float_option(loss)

    def fn(h, w, b, y, ref, **options):
        if sk.LOSSES[loss].needs_reference:
            options["ref_logps"] = ref
        if fused:
            return (sk.fused_linear_preference_loss(h, w, y, loss=loss, bias=b, backend="torch", **options),)
        return (sk.preference_loss(h @ w.T + b, y, loss=loss, **options),)

    counters.clear()
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for seq in SEQ_LENGTHS:
        hidden, weight, b, labels, ref = batch(seq=seq, seed=seq + len(loss))

        def eager(h, w, b, y, ref=ref):
            return fn(h, w, b, y, ref, **opts)

        def traced(h, w, b, y, ref=ref):
            return compiled(h, w, b, y, ref, **opts)

        run_mode(eager, traced, hidden, weight, b, labels, "grad")
    # Graphs compiled, not backend calls: specializing an option restarts the first trace once.
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 1, f"{graphs} graphs for lengths {SEQ_LENGTHS}"


@pytest.mark.parametrize("fused", [True, False], ids=["fused_linear", "logits"])
def test_changed_option_is_a_new_constant(fused):
    """Automatic dynamic makes a float argument symbolic once its value changes; the loss options must
    then still trace (as constants: one graph per value, each equal to eager)."""
    hidden, weight, b, labels, _ = batch(seed=5)

    def fn(h, w, b, y, alpha):
        if fused:
            return sk.fused_linear_synpo_loss(h, w, y, bias=b, alpha=alpha, backend="torch")
        return sk.synpo_loss(h @ w.T + b, y, alpha=alpha)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    values = [compiled(hidden, weight, b, labels, alpha) for alpha in (30.0, 12.5, 3.0, 12.5)]
    for alpha, value in zip((30.0, 12.5, 3.0, 12.5), values):
        assert_same(value, fn(hidden, weight, b, labels, alpha))
    assert len({round(v.item(), 6) for v in values}) == 3
