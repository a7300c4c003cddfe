"""The schemas of the ops that the compiled extension implements, defined once, here.

``synpo_kernels._C`` (``csrc/``) only registers kernels for these ops (``TORCH_LIBRARY_IMPL`` per
device); the PyTorch fallback, the fake kernels and the autograd formulas are registered from
:mod:`synpo_kernels.ops.token_logprobs`. This module must run before ``_C`` is loaded
(:mod:`synpo_kernels._ext` imports it first). It imports nothing but torch, so a build check can load
it by file path without importing the package (``scripts/smoke_cmake_build.py``).

- ``token_logprobs_fwd(logits, labels, ignore_index) -> (logp, lse)``
- ``token_logprobs_bwd(grad_logp, logits, labels, lse, ignore_index) -> grad_logits``
- ``token_logprobs_bwd_(logits, grad_logp, labels, lse, ignore_index)``: writes over ``logits``

The fused linear ops (``fused_linear_*``) are pure Python and define themselves with
``torch.library.custom_op`` / ``triton_op`` in their own modules.
"""

from __future__ import annotations

import torch

__all__ = ["LIB", "SCHEMAS", "define_schemas"]

LIB = "synpo_kernels"

SCHEMAS = {
    "token_logprobs_fwd": "(Tensor logits, Tensor labels, int ignore_index) -> (Tensor, Tensor)",
    "token_logprobs_bwd": (
        "(Tensor grad_logp, Tensor logits, Tensor labels, Tensor lse, int ignore_index) -> Tensor"
    ),
    "token_logprobs_bwd_": (
        "(Tensor(a!) logits, Tensor grad_logp, Tensor labels, Tensor lse, int ignore_index) -> ()"
    ),
}
"""Op name -> schema (arguments and returns) of ``torch.ops.synpo_kernels.<name>``."""


def _defined(name: str) -> bool:
    return hasattr(getattr(torch.ops, LIB), name)


def define_schemas() -> None:
    """Define every op of :data:`SCHEMAS` that is not defined yet (idempotent)."""
    for name, schema in SCHEMAS.items():
        if not _defined(name):
            torch.library.define(f"{LIB}::{name}", schema)


define_schemas()
