"""Every public op on the meta device: shapes and dtypes propagate without data, as when a model is
initialised (or its memory planned) on meta, and the result matches the same call on CPU tensors.

The data-dependent argument checks (label range, rows without response tokens) cannot run without
data and must be skipped there, not raise ``Tensor.item() cannot be called on meta tensors``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import synpo_kernels as sk
from synpo_kernels.loss_registry import LOSSES, REFERENCE_OPTION

PAIRS, SEQ, DIM, VOCAB = 2, 7, 5, 13  # odd sizes: no shape is accidentally another's


def inputs(device, dtype, seed):
    """Leaves of a [chosen; rejected] batch on ``device``; meta tensors get CPU's shapes and dtypes."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * PAIRS
    labels = torch.randint(0, VOCAB, (rows, SEQ), generator=gen)
    labels[:, :2] = -100
    data = {
        "logits": torch.randn(rows, SEQ, VOCAB, generator=gen, dtype=dtype),
        "hidden": torch.randn(rows, SEQ, DIM, generator=gen, dtype=dtype),
        "weight": torch.randn(VOCAB, DIM, generator=gen, dtype=dtype) / DIM**0.5,
        "bias": torch.randn(VOCAB, generator=gen, dtype=dtype),
        "labels": labels,
        "ref": torch.randn(rows, generator=gen, dtype=torch.float32) - 5,
    }
    out = {k: v.to(device) for k, v in data.items()}
    for k in ("logits", "hidden", "weight", "bias"):
        out[k].requires_grad_(True)
    return out


def ref_option(loss):
    return {REFERENCE_OPTION: "ref"} if LOSSES[loss].needs_reference else {}


def _call(name, t, loss="synpo"):
    """``name``'s op on the tensors ``t``: the output tensor(s) and the leaves it differentiates."""
    logits, labels, hidden, weight, bias = (t[k] for k in ("logits", "labels", "hidden", "weight", "bias"))
    opts = {k: t[v] for k, v in ref_option(loss).items()}
    full = (logits,)
    fused = (hidden, weight, bias)
    calls = {
        "token_logprobs": lambda: (sk.token_logprobs(logits, labels), full),
        "token_logprobs_module": lambda: (sk.TokenLogprobs()(logits, labels), full),
        "sequence_logprobs": lambda: (sk.sequence_logprobs(logits, labels), full),
        "sequence_logprobs_sum": lambda: (sk.sequence_logprobs(logits, labels, average=False), full),
        "row_stats": lambda: (_fields(sk.row_stats(logits, labels)), full),
        "synpo_loss": lambda: (sk.synpo_loss(logits, labels), full),
        "synpo_module": lambda: (sk.SynPOLoss()(logits, labels), full),
        "preference_loss": lambda: (sk.preference_loss(logits, labels, loss=loss, **opts), full),
        "preference_module": lambda: (sk.PreferenceLoss(loss)(logits, labels, **opts), full),
        "fused_token_logprobs": lambda: (
            sk.fused_linear_token_logprobs(hidden, weight, labels, bias=bias),
            fused,
        ),
        "fused_token_module": lambda: (sk.FusedLinearTokenLogprobs()(hidden, weight, labels, bias), fused),
        "fused_sequence_logprobs": lambda: (
            sk.fused_linear_sequence_logprobs(hidden, weight, labels),
            fused[:2],
        ),
        "fused_synpo": lambda: (sk.fused_linear_synpo_loss(hidden, weight, labels, bias=bias), fused),
        "fused_synpo_module": lambda: (sk.FusedLinearSynPOLoss()(hidden, weight, labels, bias), fused),
        "fused_preference": lambda: (
            sk.fused_linear_preference_loss(hidden, weight, labels, loss=loss, bias=bias, **opts),
            fused,
        ),
        "fused_preference_stats": lambda: (
            _value_and_stats(
                sk.fused_linear_preference_loss(
                    hidden, weight, labels, loss=loss, bias=bias, return_stats=True, **opts
                )
            ),
            fused,
        ),
        "fused_preference_module": lambda: (
            sk.FusedLinearPreferenceLoss(loss)(hidden, weight, labels, bias, **opts),
            fused,
        ),
    }
    out, wrt = calls[name]()
    return (out if isinstance(out, tuple) else (out,)), wrt


def _fields(record):
    """The tensors of a dataclass result (RowStats, PreferenceStats), in field order."""
    return tuple(getattr(record, f.name) for f in dataclasses.fields(record))


def _value_and_stats(result):
    value, stats = result
    return (value, *_fields(stats))


PER_LOSS = ("preference_loss", "preference_module", "fused_preference", "fused_preference_stats")
SINGLE = (
    "token_logprobs",
    "token_logprobs_module",
    "sequence_logprobs",
    "sequence_logprobs_sum",
    "row_stats",
    "synpo_loss",
    "synpo_module",
    "fused_token_logprobs",
    "fused_token_module",
    "fused_sequence_logprobs",
    "fused_synpo",
    "fused_synpo_module",
    "fused_preference_module",
)
CASES = [(name, "synpo") for name in SINGLE] + [(name, loss) for name in PER_LOSS for loss in LOSSES]


def _signature(outputs, leaves):
    """Shapes and dtypes of the outputs, and of the gradients of their sum w.r.t. ``leaves``."""
    total = sum(o.float().sum() for o in outputs if o.requires_grad)
    grads = torch.autograd.grad(total, leaves)
    return [(tuple(t.shape), t.dtype) for t in (*outputs, *grads)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("name", "loss"), CASES, ids=[f"{n}-{lo}" for n, lo in CASES])
def test_meta_shapes_match_cpu(name, loss, dtype):
    outputs, leaves = _call(name, inputs("meta", dtype, seed=len(name)), loss)
    assert all(o.device.type == "meta" for o in outputs)
    expected_outputs, expected_leaves = _call(name, inputs("cpu", dtype, seed=len(name)), loss)
    meta = _signature(outputs, leaves)
    assert meta == _signature(expected_outputs, expected_leaves)
    assert len(meta) > len(outputs)  # at least one gradient was propagated


def test_meta_module_built_under_meta_device():
    """Modules constructed inside ``torch.device("meta")`` (a model initialised on meta) run there."""
    with torch.device("meta"):
        module = sk.FusedLinearPreferenceLoss("dpo", beta=0.1)
        token_module = sk.TokenLogprobs()
        t = inputs("meta", torch.bfloat16, seed=3)
        value = module(t["hidden"], t["weight"], t["labels"], ref_logps=t["ref"])
        token_logp = token_module(t["logits"], t["labels"])
    assert value.shape == () and value.device.type == "meta" and value.dtype == torch.float32
    assert token_logp.shape == t["labels"].shape and token_logp.device.type == "meta"
