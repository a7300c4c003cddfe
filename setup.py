"""Build of ``synpo_kernels._C``: the C++ CPU kernels always, the CUDA kernels when possible.

Never fails for lack of CUDA: with a CPU-only torch, or without nvcc, it warns and builds the CPU
part. Without torch importable at build time (an isolated build), it warns and installs the
pure-Python package, which runs on the PyTorch fallback (``synpo_kernels.HAS_CPP_EXT`` is False).

Environment:
  SYNPO_BUILD_EXT=0          skip the compiled extension entirely
  SYNPO_BUILD_CUDA=0         build the CPU kernels only, even with a CUDA torch
  SYNPO_CUDA_ARCH_LIST       CUDA architectures (default "8.0;9.0a;9.0+PTX": Ampere, Hopper, and PTX
                             that newer GPUs JIT-compile), same syntax as TORCH_CUDA_ARCH_LIST
  CUDA_HOME                  the CUDA toolkit; when unset, found from nvcc (a wrapper script on PATH
                             is looked through) or /usr/local/cuda
  MAX_JOBS                   parallel compile jobs (ninja)

Source naming rule (csrc/README.md): torch's build names each object file by its source's stem, so
``x.cu`` and ``x.cpp`` in one extension collide. CUDA device code is ``<op>_kernels.cu``, its torch
glue ``<op>_cuda.cpp``, CPU kernels ``<op>_cpu.cpp``; the build refuses sources whose stems clash.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import warnings

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")
DEFAULT_CUDA_ARCHS = "8.0;9.0a;9.0+PTX"


def _note(message: str) -> None:
    print(f"[synpo-kernels build] {message}", file=sys.stderr)
    warnings.warn(message, stacklevel=2)


def _cpu_sources() -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(CSRC, "*.cpp")) if not p.endswith("_cuda.cpp"))


def _cuda_sources() -> list[str]:
    return sorted(glob.glob(os.path.join(CSRC, "*.cu")) + glob.glob(os.path.join(CSRC, "*_cuda.cpp")))


def _check_unique_stems(sources: list[str]) -> None:
    stems: dict[str, str] = {}
    for path in sources:
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in stems:
            raise SystemExit(
                f"[synpo-kernels build] {stems[stem]} and {path} would compile to the same object "
                f"file ({stem}.o): rename one (rule: <op>_kernels.cu for device code, <op>_cuda.cpp "
                "for its torch glue, <op>_cpu.cpp for CPU kernels)"
            )
        stems[stem] = path


def _is_cuda_home(path: str | None) -> bool:
    return bool(path) and all(
        os.path.exists(os.path.join(path, p)) for p in ("bin/nvcc", "include/cuda_runtime.h")
    )


def _find_cuda_home() -> str | None:
    """The CUDA toolkit root, checked to hold nvcc and the runtime headers.

    torch guesses ``dirname(dirname(which nvcc))``, which is wrong for a wrapper script such as
    ``/usr/local/bin/nvcc`` (it gives ``/usr/local``); an explicit ``CUDA_HOME``/``CUDA_PATH`` wins,
    then the real nvcc behind the one on PATH, then ``/usr/local/cuda``.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var] if _is_cuda_home(os.environ[var]) else None
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper script: find the nvcc it execs
            with open(nvcc, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                for token in head.decode(errors="replace").split():
                    if token.endswith("/bin/nvcc") and os.path.isabs(token):
                        candidates.append(os.path.dirname(os.path.dirname(token)))
        except OSError:
            pass
    candidates.append("/usr/local/cuda")
    return next((c for c in candidates if _is_cuda_home(c)), None)


def _extensions():
    if os.environ.get("SYNPO_BUILD_EXT", "1") == "0":
        _note("SYNPO_BUILD_EXT=0: skipping synpo_kernels._C (the PyTorch fallback will be used)")
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        # torch.utils.cpp_extension reads CUDA_HOME when it is first imported: set it before.
        os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _note(
            "torch is not importable in the build environment, so synpo_kernels._C is not built "
            "(the PyTorch fallback will be used). Install torch first and build with "
            "`pip install --no-build-isolation .`"
        )
        return [], {}

    sources = _cpu_sources()
    if not sources:
        return [], {}
    _check_unique_stems(sources + _cuda_sources())
    include_dirs = [os.path.join(HERE, CSRC)]
    # -fno-trapping-math lets GCC if-convert float compares, so the kernels' inner loops vectorize.
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    define_macros = [("TORCH_EXTENSION_NAME", "_C")]
    extra_link_args = ["-fopenmp"]

    want_cuda = os.environ.get("SYNPO_BUILD_CUDA", "1") != "0"
    # Gate on the torch build and nvcc, not on a visible GPU: build boxes often have none.
    has_cuda_toolchain = torch.version.cuda is not None and cuda_home is not None
    if want_cuda and has_cuda_toolchain:
        if os.environ.get("SYNPO_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ["SYNPO_CUDA_ARCH_LIST"]
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        nvidia_include = os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu13", "include")
        if os.path.isdir(nvidia_include):
            include_dirs.append(os.path.abspath(nvidia_include))  # cuBLAS headers of pip CUDA wheels
        ext = cpp_extension.CUDAExtension(
            name="synpo_kernels._C",
            sources=sources + _cuda_sources(),
            include_dirs=include_dirs,
            define_macros=[*define_macros, ("SYNPO_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"],
            },
            extra_link_args=extra_link_args,
        )
        print(
            f"[synpo-kernels build] CUDA kernels enabled (CUDA {torch.version.cuda}, "
            f"archs {os.environ['TORCH_CUDA_ARCH_LIST']})",
            file=sys.stderr,
        )
    else:
        reason = (
            "SYNPO_BUILD_CUDA=0"
            if not want_cuda
            else f"torch {torch.__version__} has no CUDA"
            if torch.version.cuda is None
            else f"CUDA_HOME={os.environ['CUDA_HOME']} lacks bin/nvcc or include/cuda_runtime.h"
            if os.environ.get("CUDA_HOME")
            else "no CUDA toolkit found (set CUDA_HOME)"
        )
        _note(f"building the CPU kernels only: {reason}. CUDA tensors use the PyTorch fallback.")
        ext = cpp_extension.CppExtension(
            name="synpo_kernels._C",
            sources=sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=extra_link_args,
        )
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
