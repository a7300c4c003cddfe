"""The fused token log-prob op against the float64 reference, on every kernel (C++ CPU, CUDA, and
the PyTorch fallback), every dtype, odd shapes, random ignored labels, and every gradient.

Tolerances are judged against what plain PyTorch achieves in the same dtype: the op must be at
least as close to the float64 truth as ``logits.log_softmax(-1).gather(...)`` in that dtype (plus a
small floor for fp32, where both are near rounding level).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import DEVICES

import synpo_kernels as sk
from synpo_kernels.ops import token_logprobs as tl_mod
from synpo_kernels.reference import IGNORE_INDEX, shift_labels, token_logprobs_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# fp32 floor: the op sums ~V exps in fp32; plain PyTorch fp32 is at the same rounding level.
FLOOR = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5, torch.float64: 1e-12}
GRAD_FLOOR = {torch.float32: 2e-6, torch.bfloat16: 1e-5, torch.float16: 1e-5, torch.float64: 1e-12}


def random_case(shape, vocab, dtype, device, ignore_frac=0.3, scale=3.0):
    logits = (torch.randn(*shape, vocab, device=device) * scale).to(dtype)
    labels = torch.randint(0, vocab, shape, device=device)
    labels[torch.rand(shape, device=device) < ignore_frac] = IGNORE_INDEX
    return logits, labels


def plain_torch_in_dtype(logits, labels, shift):
    """The naive path in the logits' own dtype: what a user's plain PyTorch code achieves."""
    aligned = shift_labels(labels) if shift else labels
    valid = aligned != IGNORE_INDEX
    logp = logits.log_softmax(-1).gather(-1, torch.where(valid, aligned, 0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    if shift:
        logp = torch.cat([torch.zeros_like(logp[..., :1]), logp[..., :-1]], dim=-1)
    return logp


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def check_against_reference(logits, labels, shift=True, op=sk.token_logprobs):
    """Forward and gradient of `op` vs the float64 reference, with a dtype-judged tolerance."""
    dtype = logits.dtype
    x = logits.detach().clone().requires_grad_(True)
    out = op(x, labels, shift=shift)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == labels.shape

    x64 = logits.detach().double().requires_grad_(True)
    ref = token_logprobs_ref(x64, labels, shift=shift)
    xb = logits.detach().clone().requires_grad_(True)
    base = plain_torch_in_dtype(xb, labels, shift)

    err, base_err = max_err(out, ref), max_err(base, ref)
    assert err <= 2 * base_err + FLOOR[dtype], f"forward error {err} vs plain {dtype} {base_err}"

    # Ignored positions (and t=0 when shifting) are exact zeros.
    aligned = shift_labels(labels) if shift else labels
    ignored_rows = aligned == IGNORE_INDEX
    expected_zero = torch.zeros_like(ignored_rows)
    if shift:
        expected_zero[..., 1:] = ignored_rows[..., :-1]
        expected_zero[..., 0] = True
    else:
        expected_zero = ignored_rows
    assert torch.all(out[expected_zero] == 0)

    upstream = torch.randn(labels.shape, dtype=torch.float64, device=labels.device)
    (grad,) = torch.autograd.grad(out, x, upstream.to(out.dtype))
    (grad_ref,) = torch.autograd.grad(ref, x64, upstream)
    (grad_base,) = torch.autograd.grad(base, xb, upstream.to(base.dtype))
    assert grad.dtype == dtype and grad.shape == logits.shape
    gerr, gbase = max_err(grad, grad_ref), max_err(grad_base, grad_ref)
    assert gerr <= 2 * gbase + GRAD_FLOOR[dtype], f"grad error {gerr} vs plain {dtype} {gbase}"
    # Rows that score nothing get exactly zero gradient (the kernel writes them, not skips them).
    assert torch.all(grad[ignored_rows] == 0)
    return out, grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,vocab", [((3, 47), 123), ((3, 47), 70001), ((2, 3, 11), 517)])
@pytest.mark.parametrize("shift", [True, False])
def test_matches_reference(device, dtype, shape, vocab, shift):
    logits, labels = random_case(shape, vocab, dtype, device)
    check_against_reference(logits, labels, shift=shift)


@pytest.mark.parametrize("device", DEVICES)
def test_vocab_262144(device):
    logits, labels = random_case((2, 3), 262144, torch.float32, device, ignore_frac=0.2)
    labels[0, 1] = 262143  # the last vocabulary entry
    check_against_reference(logits, labels)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_layouts(device, dtype):
    base, labels = random_case((5, 2), 301, dtype, device)
    transposed = base.transpose(0, 1)  # (2, 5, V) with non-unit row strides, read in place
    check_against_reference(transposed, labels.t().contiguous())
    strided_vocab = torch.randn(2, 5, 602, device=device).to(dtype)[..., ::2]  # V stride 2: copied
    check_against_reference(strided_vocab, labels.t().contiguous())
    sliced = torch.randn(2, 6, 301, device=device).to(dtype)[:, :-1]  # the usual logits[:, :-1]
    check_against_reference(sliced, labels.t().contiguous())


@pytest.mark.parametrize("device", DEVICES)
def test_all_ignored_and_empty(device):
    logits, labels = random_case((2, 9), 50, torch.float32, device)
    labels.fill_(IGNORE_INDEX)
    out, grad = check_against_reference(logits, labels)
    assert torch.all(out == 0) and torch.all(grad == 0)
    empty = sk.token_logprobs(
        torch.randn(0, 4, 10, device=device), torch.zeros(0, 4, dtype=torch.long, device=device)
    )
    assert empty.shape == (0, 4)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_vocab_and_nan_follow_log_softmax(device):
    logits = torch.randn(4, 5000, device=device)
    logits[0, :3000] = float("-inf")  # masked vocabulary entries: fine
    logits[1, 7] = float("nan")  # a NaN anywhere in the row: NaN, never a silent number
    logits[2, 9] = float("inf")
    labels = torch.tensor([4000, 3, 3, 3], device=device)
    ours = sk.token_logprobs(logits, labels, shift=False)
    torch_result = logits.log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)
    assert torch.isfinite(ours[[0, 3]]).all()
    torch.testing.assert_close(ours[[0, 3]], torch_result[[0, 3]], rtol=1e-5, atol=1e-5)
    assert torch.isnan(ours[1]) and torch.isnan(ours[2])


def test_gradcheck_float64():
    logits, labels = random_case((2, 6), 13, torch.float64, "cpu")
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: sk.token_logprobs(z, labels), (logits,))


def test_inplace_backward_overwrites_every_entry():
    """token_logprobs_bwd_ writes over the logits buffer: every entry, ignored rows included."""
    logits, labels = random_case((40,), 1003, torch.float32, "cpu")
    labels = labels.reshape(-1)
    _, lse = torch.ops.synpo_kernels.token_logprobs_fwd(logits, labels, IGNORE_INDEX)
    grad_logp = torch.randn(40)
    expected = torch.ops.synpo_kernels.token_logprobs_bwd(grad_logp, logits, labels, lse, IGNORE_INDEX)
    buffer = logits.clone()
    torch.ops.synpo_kernels.token_logprobs_bwd_(buffer, grad_logp, labels, lse, IGNORE_INDEX)
    torch.testing.assert_close(buffer, expected, rtol=0, atol=0)
    assert torch.all(buffer[labels == IGNORE_INDEX] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_pytorch_fallback_kernels(dtype):
    """The fallback registered when the extension is missing computes the same thing."""
    logits, labels = random_case((64,), 777, dtype, "cpu")
    labels = labels.reshape(-1)
    logp, lse = tl_mod._fwd_fallback(logits, labels, IGNORE_INDEX)
    ref = token_logprobs_ref(logits, labels, shift=False)
    assert max_err(logp, ref) <= FLOOR[dtype] * 5
    g = torch.randn(64, dtype=logp.dtype)
    grad = tl_mod._bwd_fallback(g, logits, labels, lse, IGNORE_INDEX)
    x64 = logits.double().requires_grad_(True)
    (grad_ref,) = torch.autograd.grad(token_logprobs_ref(x64, labels, shift=False), x64, g.double())
    bf16_slack = 1e-2 if dtype == torch.bfloat16 else 0.0
    assert max_err(grad, grad_ref) <= GRAD_FLOOR[dtype] * 5 + bf16_slack
    buffer = logits.clone()
    tl_mod._bwd_inplace_fallback(buffer, g, labels, lse, IGNORE_INDEX)
    torch.testing.assert_close(buffer, grad)


def test_package_imports_and_works_without_extension():
    code = (
        "import torch, synpo_kernels as sk\n"
        "assert not sk.HAS_CPP_EXT and 'SYNPO_DISABLE_CPP_EXT' in sk.EXT_IMPORT_ERROR\n"
        "z = torch.randn(2, 5, 33, requires_grad=True); y = torch.randint(0, 33, (2, 5))\n"
        "from synpo_kernels.reference import token_logprobs_ref\n"
        "out = sk.token_logprobs(z, y); out.sum().backward()\n"
        "assert (out.double() - token_logprobs_ref(z.detach(), y)).abs().max() < 1e-5\n"
        "print('fallback-ok')\n"
    )
    env = {**os.environ, "SYNPO_DISABLE_CPP_EXT": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "fallback-ok" in result.stdout


def test_extension_is_built_here():
    """CI builds the extension; this fails loudly if the build silently fell back."""
    assert sk.HAS_CPP_EXT, sk.EXT_IMPORT_ERROR


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    logits, labels = random_case((37,), 211, dtype, "cpu")
    labels = labels.reshape(-1)
    logits.requires_grad_(True)
    torch.library.opcheck(torch.ops.synpo_kernels.token_logprobs_fwd.default, (logits, labels, IGNORE_INDEX))
    _, lse = torch.ops.synpo_kernels.token_logprobs_fwd(logits.detach(), labels, IGNORE_INDEX)
    grad = torch.randn(37)
    torch.library.opcheck(
        torch.ops.synpo_kernels.token_logprobs_bwd.default, (grad, logits.detach(), labels, lse, IGNORE_INDEX)
    )
    torch.library.opcheck(
        torch.ops.synpo_kernels.token_logprobs_bwd_.default,
        (logits.detach().clone(), grad, labels, lse, IGNORE_INDEX),
    )


def test_torch_compile_fullgraph():
    logits, labels = random_case((3, 19), 97, torch.float32, "cpu")

    def f(z, y):
        return sk.token_logprobs(z, y).sum(-1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    eager, traced = f(x1, labels), compiled(x2, labels)
    torch.testing.assert_close(traced, eager)
    eager.sum().backward()
    traced.sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad)


class TestBadInput:
    def test_label_out_of_range(self):
        logits = torch.randn(2, 4, 10)
        for bad in (10, 11, -1, -7):
            labels = torch.zeros(2, 4, dtype=torch.long)
            labels[1, 2] = bad
            with pytest.raises(ValueError, match=r"labels: value .* outside \[0, 10\)"):
                sk.token_logprobs(logits, labels)

    def test_kernel_rejects_out_of_range_without_reading(self):
        logits = torch.randn(3, 10)
        with pytest.raises(ValueError, match="labels: value 10"):
            torch.ops.synpo_kernels.token_logprobs_fwd(logits, torch.tensor([1, 10, 2]), IGNORE_INDEX)

    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match="labels: shape"):
            sk.token_logprobs(torch.randn(2, 4, 10), torch.zeros(2, 5, dtype=torch.long))

    def test_integer_logits(self):
        with pytest.raises(TypeError, match="logits"):
            sk.token_logprobs(torch.zeros(2, 4, 10, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))

    def test_float_labels(self):
        with pytest.raises(TypeError, match="labels"):
            sk.token_logprobs(torch.randn(2, 4, 10), torch.zeros(2, 4))

    def test_device_mismatch(self):
        with pytest.raises(ValueError, match="labels: on device"):
            sk.token_logprobs(torch.randn(2, 4, 10, device="meta"), torch.zeros(2, 4, dtype=torch.long))

    def test_empty_vocab(self):
        with pytest.raises(ValueError, match="logits"):
            sk.token_logprobs(torch.randn(2, 4, 0), torch.zeros(2, 4, dtype=torch.long))

    def test_module_form(self):
        module = sk.TokenLogprobs(shift=False)
        logits, labels = random_case((2, 7), 29, torch.float32, "cpu")
        torch.testing.assert_close(module(logits, labels), sk.token_logprobs(logits, labels, shift=False))
        assert "shift=False" in repr(module)


# ---------------------------------------------------------------------------------------------
# Schemas: defined once, in Python; the compiled extension only registers kernels.
# ---------------------------------------------------------------------------------------------


def test_schemas_are_defined_in_python_and_cpp_only_registers_kernels():
    from pathlib import Path

    from synpo_kernels.ops import schemas

    for name, schema in schemas.SCHEMAS.items():
        dump = torch._C._dispatch_dump(f"synpo_kernels::{name}").splitlines()
        assert f"schema: synpo_kernels::{name}{schema}" in dump
        # "debug:" is where the schema was defined: torch.library.define (Python), not a C++ source.
        site = next(line for line in dump if line.startswith("debug:"))
        assert site.rstrip().rsplit(":", 1)[0].endswith("library.py"), site
    csrc = Path(__file__).resolve().parents[2] / "csrc"
    for source in csrc.glob("*.c*"):
        text = source.read_text()
        assert "TORCH_LIBRARY(" not in text and "TORCH_LIBRARY_FRAGMENT(" not in text, source.name
        assert 'm.def("token_logprobs' not in text, source.name


def test_schemas_module_loads_without_the_package():
    """What scripts/smoke_cmake_build.py does: the schemas by file path, then a bare _C."""
    from pathlib import Path

    schemas_py = Path(__file__).resolve().parents[2] / "synpo_kernels" / "ops" / "schemas.py"
    code = (
        "import importlib.util, sys, torch\n"
        f"spec = importlib.util.spec_from_file_location('s', {str(schemas_py)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "assert 'synpo_kernels' not in sys.modules\n"
        "print(torch.ops.synpo_kernels.token_logprobs_fwd.default._schema)\n"
        "m.define_schemas()  # idempotent\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "token_logprobs_fwd(Tensor logits, Tensor labels, int ignore_index)" in result.stdout


@pytest.mark.skipif(not sk.HAS_CPP_EXT, reason="needs the compiled extension")
def test_smoke_cmake_build_script_runs_on_the_built_module():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    module = Path(sk._ext._C.__file__)
    result = subprocess.run(
        [sys.executable, str(root / "scripts/smoke_cmake_build.py"), str(module)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


# ---------------------------------------------------------------------------------------------
# The PyTorch fallback behaves like the compiled kernels.
# ---------------------------------------------------------------------------------------------


def test_fallback_inf_and_nan_rows_follow_log_softmax():
    logits = torch.randn(5, 40, dtype=torch.float64)
    logits[0, :20] = float("-inf")  # masked entries: finite
    logits[1, 7] = float("inf")  # +inf in the row: NaN, as log_softmax
    logits[2, 3] = float("nan")
    logits[3, :] = float("-inf")  # all masked: NaN
    labels = torch.tensor([30, 2, 2, 2, 5])
    expected = logits.log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        logp, _ = tl_mod._fwd_fallback(logits.to(dtype), labels, IGNORE_INDEX)
        assert torch.isnan(logp[1:4]).all(), (dtype, logp)
        torch.testing.assert_close(logp[[0, 4]].double(), expected[[0, 4]], rtol=1e-2, atol=1e-2)
        if sk.HAS_CPP_EXT:
            compiled, _ = torch.ops.synpo_kernels.token_logprobs_fwd(logits.to(dtype), labels, IGNORE_INDEX)
            torch.testing.assert_close(logp, compiled, equal_nan=True, rtol=1e-5, atol=1e-5)


def test_fallback_rejects_out_of_range_labels_like_the_kernel():
    logits = torch.randn(3, 10)
    lse = torch.zeros(3, 2)
    for bad in (10, -1):
        labels = torch.tensor([1, bad, IGNORE_INDEX])
        with pytest.raises(ValueError, match=rf"labels: value {bad} at row 1 is outside \[0, 10\)"):
            tl_mod._fwd_fallback(logits, labels, IGNORE_INDEX)
        with pytest.raises(ValueError, match=rf"labels: value {bad} at row 1 is outside \[0, 10\)"):
            tl_mod._bwd_fallback(torch.ones(3), logits, labels, lse, IGNORE_INDEX)
        with pytest.raises(ValueError, match=rf"labels: value {bad} at row 1 is outside \[0, 10\)"):
            tl_mod._bwd_inplace_fallback(logits.clone(), torch.ones(3), labels, lse, IGNORE_INDEX)
