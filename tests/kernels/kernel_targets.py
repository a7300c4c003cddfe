"""The devices and backends the kernel tests run on, and their error floors, named once."""

from __future__ import annotations

import pytest
import torch

from synpo_kernels.ops import fused_linear_kernels as K

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def backends(device: str = DEVICE) -> list:
    """The fused linear ops' backends for tensors on ``device``: ``torch`` always, ``triton`` where it
    runs (compiled on CUDA, in the interpreter on CPU under ``TRITON_INTERPRET=1``)."""
    runnable = K.triton_usable_on(torch.device(device))
    reason = f"Triton not runnable on {device} (no CUDA, no interpreter)"
    return ["torch", pytest.param("triton", marks=pytest.mark.skipif(not runnable, reason=reason))]


BACKENDS = backends()
# Resolution floor of each dtype, added to the multiple of plain PyTorch's own error a fused op may have.
FLOOR = {torch.float64: 1e-11, torch.float32: 3e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
