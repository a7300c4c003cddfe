"""Load a CMake-built synpo_kernels _C module on its own and check its ops against PyTorch.

Usage: python scripts/smoke_cmake_build.py build/cmake/_C.cpython-*.so [--expect-cuda]
Run in a process that has not imported synpo_kernels (both would register kernels for the same ops).
The module only registers kernels: the op schemas are defined in Python, so this script first loads
``synpo_kernels/ops/schemas.py`` by its path (it imports nothing but torch), then the module.
With --expect-cuda (a CUDA build checked on a machine without a GPU), it also requires the CUDA
kernels to be compiled in and registered for the CUDA dispatch key of every op.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

SCHEMAS = Path(__file__).resolve().parents[1] / "synpo_kernels" / "ops" / "schemas.py"

OPS = ("token_logprobs_fwd", "token_logprobs_bwd", "token_logprobs_bwd_")


def cuda_registered(op: str) -> bool:
    dump = torch._C._dispatch_dump(f"synpo_kernels::{op}")
    return any(line.startswith("CUDA:") for line in dump.splitlines())


def load_file(name: str, path) -> object:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(path: str, expect_cuda: bool = False) -> int:
    load_file("synpo_kernels_schemas", SCHEMAS)  # the schemas first: the module registers kernels only
    module = load_file("_C", path)
    logits = torch.randn(64, 70001) * 3
    labels = torch.randint(0, 70001, (64,))
    labels[::5] = -100
    logp, lse = torch.ops.synpo_kernels.token_logprobs_fwd(logits, labels, -100)
    valid = labels != -100
    expected = logits.double().log_softmax(-1).gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)
    error = (logp.double() - expected)[valid].abs().max().item()
    grad = torch.ops.synpo_kernels.token_logprobs_bwd(torch.ones(64), logits, labels, lse, -100)
    softmax = logits.double().softmax(-1)
    expected_grad = torch.nn.functional.one_hot(labels.clamp(min=0), 70001).double() - softmax
    grad_error = (grad.double() - expected_grad)[valid].abs().max().item()
    ok = error < 1e-4 and grad_error < 1e-6 and bool((logp[~valid] == 0).all())
    print(
        f"cmake module {path}: built_with_cuda={module.built_with_cuda()} "
        f"logp max err {error:.2e}, grad max err {grad_error:.2e}: {'OK' if ok else 'FAIL'}"
    )
    if expect_cuda:
        missing = [op for op in OPS if not cuda_registered(op)]
        compiled = module.built_with_cuda()
        print(f"CUDA kernels compiled in: {compiled}; no CUDA kernel for: {missing or 'none'}")
        ok = ok and module.built_with_cuda() and not missing
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], expect_cuda="--expect-cuda" in sys.argv[2:]))
