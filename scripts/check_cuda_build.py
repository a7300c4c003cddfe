"""Check an installed synpo-kernels build that should hold the CUDA kernels (no GPU needed).

Usage: python scripts/check_cuda_build.py [--archs sm_80,sm_90a] [--ptx sm_90]

Run it outside the source tree, so that ``import synpo_kernels`` finds the installed wheel. Fails
(exit 1) unless: the compiled extension loads, it was built with the CUDA kernels, every op has a
kernel for the CUDA dispatch key, and the module embeds a cubin per requested arch and PTX for
forward compatibility (listed with the ``cuobjdump`` Triton bundles).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

OPS = ("token_logprobs_fwd", "token_logprobs_bwd", "token_logprobs_bwd_")


def cuobjdump() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else None


def embedded(so: str, what: str) -> list[str]:
    tool = cuobjdump()
    if tool is None:
        return []
    out = subprocess.run([tool, f"--list-{what}", so], capture_output=True, text=True).stdout
    return sorted({line.rsplit(".", 2)[-2] for line in out.splitlines() if ":" in line})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="sm_80,sm_90", help="cubins that must be embedded")
    parser.add_argument("--ptx", default="sm_90", help="PTX that must be embedded")
    args = parser.parse_args()
    os.environ["SYNPO_REQUIRE_CPP_EXT"] = "1"  # an import failure must show, not fall back
    import torch

    import synpo_kernels as sk
    from synpo_kernels import _ext

    so = sk._ext._C.__file__
    print(f"synpo_kernels {sk.__version__} from {Path(sk.__file__).parent}")
    size_mib = os.path.getsize(so) / 2**20
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); module {so} ({size_mib:.1f} MiB)")
    problems = []
    if not sk.HAS_CUDA_KERNELS:
        problems.append("built without the CUDA kernels")
    for op in OPS:
        sites = _ext.kernel_registrations(op)
        print(f"  synpo_kernels::{op}: {', '.join(sorted(sites))}; CUDA from {sites.get('CUDA', 'nowhere')}")
        if not _ext.is_compiled_site(sites.get("CUDA", "")):
            problems.append(f"{op} has no compiled CUDA kernel registered")
    cubins, ptx = embedded(so, "elf"), embedded(so, "ptx")
    if cuobjdump() is None:
        print("  cuobjdump not found (Triton's NVIDIA backend): embedded archs not checked")
    else:
        print(f"  cubins: {', '.join(cubins) or 'none'}; PTX: {', '.join(ptx) or 'none'}")
        problems += [f"no {a} cubin" for a in args.archs.split(",") if a and a not in cubins]
        problems += [f"no {a} PTX" for a in args.ptx.split(",") if a and a not in ptx]
    for p in problems:
        print(f"FAIL: {p}")
    print("CUDA build check: " + ("OK" if not problems else "FAILED"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
