"""Loading of the compiled extension ``synpo_kernels._C``, with an explicit fallback flag.

The extension is optional: a source checkout without a build, or a wheel built on a machine without
a C++ toolchain, still imports. ``HAS_CPP_EXT`` says whether the compiled kernels are in use;
``HAS_CUDA_KERNELS`` whether the build included the CUDA kernels; ``EXT_IMPORT_ERROR`` why not.
"""

from __future__ import annotations

import os
import warnings

# The op schemas are defined in Python (torch first: the extension links against libtorch), before
# the extension, which only registers its kernels for them, is loaded.
import synpo_kernels.ops.schemas  # noqa: F401

HAS_CPP_EXT = False
HAS_CUDA_KERNELS = False
EXT_IMPORT_ERROR: str | None = None
_C = None

if os.environ.get("SYNPO_DISABLE_CPP_EXT", "0") == "1":
    EXT_IMPORT_ERROR = "disabled by SYNPO_DISABLE_CPP_EXT=1"
else:
    try:
        from synpo_kernels import _C  # type: ignore[attr-defined,no-redef]

        HAS_CPP_EXT = True
        HAS_CUDA_KERNELS = bool(_C.built_with_cuda())
    except ImportError as exc:  # not built, or built against another torch
        EXT_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
        if os.environ.get("SYNPO_REQUIRE_CPP_EXT", "0") == "1":
            raise
        warnings.warn(
            "synpo_kernels._C is not available; using the pure-PyTorch fallback for the token op "
            f"({EXT_IMPORT_ERROR}). Build it with `pip install --no-build-isolation .`.",
            RuntimeWarning,
            stacklevel=2,
        )


def kernel_registrations(op: str) -> dict[str, str]:
    """Dispatch key -> where its kernel for ``torch.ops.synpo_kernels.<op>`` was registered.

    E.g. ``{"CPU": ".../csrc/token_logprobs_cpu.cpp:366", "CUDA": ".../token_logprobs_cuda.cpp:103",
    ...}``. A compiled kernel is registered from a C++ source; the PyTorch fallback registers from
    Python (``torch/library.py``), on the CUDA key too. Tells whether a build's CUDA kernels are really
    in use, also on a machine without a GPU.
    """
    import torch

    sites = {}
    for line in torch._C._dispatch_dump(f"synpo_kernels::{op}").splitlines():
        key, sep, rest = line.partition(": registered at ")
        if sep and key != "debug":  # "debug:" is the schema's own line
            sites[key] = rest.split(" :: ")[0].strip()
    return sites


def is_compiled_site(site: str) -> bool:
    """Whether a registration site (see :func:`kernel_registrations`) is a C++/CUDA source file."""
    return site.rsplit(":", 1)[0].endswith((".cpp", ".cu", ".cc"))
