"""Small-size CPU micro benchmarks through pytest-benchmark, for comparisons between commits:

    pytest benchmarks/ --benchmark-only                              # run
    pytest benchmarks/ --benchmark-only --benchmark-autosave          # keep in .benchmarks/
    pytest benchmarks/ --benchmark-only --benchmark-compare           # against the last saved run

Each op runs forward+backward at the ``smoke`` preset's size for ours and the naive path (the same
inputs and implementations as ``synpo bench kernels``), and one optimizer step of the tiny model
for SynPO-fused and DPO-with-reference. Groups put ours next to its baseline.
"""

from __future__ import annotations

import math

import pytest

from synpo.benchmarking import kernels, trainer

CASES = {case.op: case for case in kernels.PRESETS["smoke"].cases}


@pytest.mark.parametrize("impl", [kernels.OURS, "naive"])
@pytest.mark.parametrize("op", kernels.OPS)
def test_op_forward_backward(benchmark, op, impl):
    case = CASES[op]
    benchmark.group = f"{op} fwd+bwd {case.label}"
    inputs = kernels.make_inputs(case, "cpu", requires_grad=True)
    fn, _note = kernels.build_impl(impl, op, {})
    out = benchmark(kernels._call, fn, inputs, "fwd+bwd")
    assert out.detach().isfinite().all()


@pytest.mark.parametrize("op", kernels.OPS)
def test_op_forward(benchmark, op):
    case = CASES[op]
    benchmark.group = f"{op} fwd {case.label}"
    inputs = kernels.make_inputs(case, "cpu", requires_grad=False)
    fn, _note = kernels.build_impl(kernels.OURS, op, {})
    benchmark(kernels._call, fn, inputs, "fwd")


@pytest.fixture(scope="module")
def tiny_model():
    spec, batch_spec = trainer.PRESETS["smoke"].models[0]
    model, pad, vocab = trainer.build_model(spec, "cpu")
    return model, trainer.build_batch(batch_spec, vocab, pad, "cpu")


@pytest.mark.parametrize("method", ["synpo_fused", "dpo_reference_naive"])
def test_trainer_step(benchmark, tiny_model, method):
    model, batch = tiny_model
    step, _optimizer = trainer.make_step(model, batch, method)
    benchmark.group = "trainer step, tiny model"
    assert math.isfinite(benchmark(step))
