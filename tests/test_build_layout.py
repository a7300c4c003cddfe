"""The csrc/ naming rule (csrc/README.md) that keeps object files from colliding in the CUDA build, what
goes into the wheel, and the one-way import direction of ../shared/LAYOUT.md (data does not import pairs;
synpo_kernels does not import synpo)."""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

CSRC = Path(__file__).resolve().parents[1] / "csrc"
SOURCES = [p for p in CSRC.iterdir() if p.suffix in (".cpp", ".cu")]


def test_source_stems_are_unique():
    stems = Counter(p.stem for p in SOURCES)
    assert SOURCES and not [s for s, n in stems.items() if n > 1], stems


def test_sources_follow_the_naming_rule():
    for path in SOURCES:
        if path.suffix == ".cu":
            assert path.stem.endswith("_kernels"), f"{path.name}: CUDA device code is <op>_kernels.cu"
            assert not re.search(r"#include\s*[<\"](torch|ATen|c10)/", path.read_text()), (
                f"{path.name}: device code includes CUDA headers only (no torch)"
            )
        elif path.stem.endswith("_cuda"):
            assert (CSRC / f"{path.stem[: -len('_cuda')]}_kernels.cu").exists(), path.name


def test_setup_refuses_clashing_stems(tmp_path):
    import shutil
    import subprocess
    import sys

    root = CSRC.parent
    shutil.copy(root / "setup.py", tmp_path / "setup.py")
    shutil.copytree(CSRC, tmp_path / "csrc")
    (tmp_path / "csrc" / "token_logprobs_cpu.cu").write_text("// clashes with token_logprobs_cpu.cpp\n")
    result = subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "same object file (token_logprobs_cpu.o)" in result.stdout + result.stderr


def _find_cuda_home_with(env_overrides: dict, tmp_path) -> str:
    """setup.py's CUDA_HOME detection, run in a subprocess with a controlled PATH and environment."""
    import os
    import subprocess
    import sys

    code = (
        "import runpy, setuptools\n"
        "setuptools.setup = lambda **kwargs: None\n"  # load setup.py's functions without building
        f"ns = runpy.run_path({str(CSRC.parent / 'setup.py')!r})\n"
        "print(ns['_find_cuda_home']())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env.update(SYNPO_BUILD_EXT="0", **env_overrides)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def _fake_toolkit(root):
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "bin" / "nvcc").write_text("#!/bin/sh\necho fake nvcc\n")
    (root / "bin" / "nvcc").chmod(0o755)
    (root / "include" / "cuda_runtime.h").write_text("// fake\n")
    return root


def test_cuda_home_looks_through_a_wrapper_nvcc_on_path(tmp_path):
    toolkit = _fake_toolkit(tmp_path / "opt" / "cuda-99.0")
    wrappers = tmp_path / "wrappers"
    wrappers.mkdir()
    (wrappers / "nvcc").write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    (wrappers / "nvcc").chmod(0o755)
    # torch would guess dirname(dirname(wrapper)) = tmp_path, which holds no toolkit.
    found = _find_cuda_home_with({"PATH": f"{wrappers}:/usr/bin:/bin"}, tmp_path)
    assert found == str(toolkit)


def test_explicit_cuda_home_wins_and_is_checked(tmp_path):
    toolkit = _fake_toolkit(tmp_path / "cuda")
    assert _find_cuda_home_with({"CUDA_HOME": str(toolkit), "PATH": "/usr/bin:/bin"}, tmp_path) == str(
        toolkit
    )
    not_a_toolkit = tmp_path / "empty"
    not_a_toolkit.mkdir()
    assert (
        _find_cuda_home_with({"CUDA_HOME": str(not_a_toolkit), "PATH": "/usr/bin:/bin"}, tmp_path) == "None"
    )


def test_every_file_of_the_python_packages_goes_into_the_wheel():
    """Each folder of Python modules is a package (packages.find needs ``__init__.py``), and each other
    file in a package (assets, configs) is matched by pyproject's package-data, so wheels carry it."""
    from setuptools.config.pyprojecttoml import read_configuration

    root = CSRC.parent
    package_data = read_configuration(root / "pyproject.toml")["tool"]["setuptools"]["package-data"]
    for package, patterns in package_data.items():
        base = root / package
        shipped = {p for pattern in patterns for p in base.glob(pattern) if p.is_file()}
        for path in base.rglob("*"):
            if "__pycache__" in path.parts or not path.is_file() or path.suffix in (".so", ".pyd"):
                continue  # compiled extensions are built into the wheel, not copied
            if path.suffix == ".py":
                assert (path.parent / "__init__.py").is_file(), f"{path}: its folder is not a package"
            else:
                assert path in shipped, f"{path.relative_to(root)}: not in [tool.setuptools.package-data]"


def _imported_modules(path: Path, root: Path) -> set[str]:
    """Every module ``path`` imports, absolute, including imports inside functions (lazy imports count:
    they are still arrows) and each name of ``from pkg import name`` as ``pkg.name`` (it may be a module)."""
    # Relative imports resolve against the file's folder (its package, for __init__.py and modules alike).
    package = list(path.relative_to(root).parent.parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _imports_of(package: Path, root: Path) -> dict[str, set[str]]:
    files = sorted(package.rglob("*.py"))
    assert files, f"no Python files under {package}"
    return {str(p.relative_to(root)): _imported_modules(p, root) for p in files}


def _is_under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_import_parser_sees_lazy_relative_and_from_imports(tmp_path):
    # The layout checks below pass trivially if the parser misses an import form; show it does not.
    pkg = tmp_path / "synpo" / "data"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import records\n")
    (pkg / "m.py").write_text(
        "import os\nfrom ..pairs import video\n\n\ndef f():\n    from synpo.pairs.io import x\n"
        "    import synpo.pairs.score\n    from synpo import pairs\n"
    )
    assert _imported_modules(pkg / "__init__.py", tmp_path) == {"synpo.data", "synpo.data.records"}
    found = _imported_modules(pkg / "m.py", tmp_path)
    assert {"os", "synpo.pairs.video", "synpo.pairs.io", "synpo.pairs.score", "synpo.pairs"} <= found


def test_data_layer_does_not_import_pairs():
    """synpo.data sits below synpo.pairs: both take the frame sampler from synpo.video."""
    root = CSRC.parent
    bad = {
        f: sorted(m for m in mods if _is_under(m, "synpo.pairs"))
        for f, mods in _imports_of(root / "synpo" / "data", root).items()
    }
    assert not {f: m for f, m in bad.items() if m}, bad
    # The sampler itself is at the bottom of synpo: it imports nothing from the package.
    assert not [m for m in _imported_modules(root / "synpo" / "video.py", root) if _is_under(m, "synpo")]


def test_kernels_do_not_import_synpo():
    root = CSRC.parent
    bad = {
        f: sorted(m for m in mods if _is_under(m, "synpo"))
        for f, mods in _imports_of(root / "synpo_kernels", root).items()
    }
    assert not {f: m for f, m in bad.items() if m}, bad
