"""The launch-configuration table of the Triton kernels, keyed by (arch, dtype, V range).

``kernel_configs.json`` (next to this file) holds one entry per kernel (``row_lse``, ``row_grad``,
``row_grad_bias`` -- the gradient pass with the bias column sums, another compile -- and ``wgrad``)
and key: the block sizes,
warps and stages, and ``ctas_per_sm``, the resident programs per SM that the compiled kernel's real
register and shared-memory use allow (:func:`occupancy`). The launchers read it
(:mod:`.fused_linear_kernels` ``lse_config`` / ``grad_config`` / ``wgrad_config``): ``row_lse`` runs a
persistent grid of ``ctas_per_sm x SMs`` programs, ``row_grad`` splits its rows so that as many
programs run. The interpreter has its own entries (arch ``"interpreter"``), so CI's interpreter tests
run the table's code paths (the persistent loop included).

Who writes it: ``benchmarks/tune_kernels.py`` times candidate configurations on a GPU and rewrites
the entries of that GPU's arch with the fastest (``measured`` records the device, the time and the
date). Entries with ``"measured": null`` are the defaults derived from the compiler's output
(``scripts/aot_report.py``), not timed yet. CI's AOT report checks every compiled entry's
``ctas_per_sm`` against the occupancy of the kernel ptxas actually produced, so a kernel change that
costs registers cannot leave a launch sized for more programs than fit.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ARCH_LIMITS",
    "TABLE_PATH",
    "KernelEntry",
    "arch_of",
    "dtype_name",
    "entries",
    "lookup",
    "occupancy",
]

TABLE_PATH = Path(__file__).with_name("kernel_configs.json")
KERNELS = ("row_lse", "row_grad", "row_grad_bias", "wgrad")
INTERPRETER = "interpreter"
DEFAULT_ARCH = "default"
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


@dataclass(frozen=True)
class ArchLimits:
    """Per-SM resources that bound how many programs are resident (CUDA occupancy rules)."""

    regs: int = 65536
    max_threads: int = 2048
    max_ctas: int = 32
    smem: int = 233472  # bytes per SM usable by blocks
    smem_per_cta_reserved: int = 1024
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of 256


ARCH_LIMITS = {
    "sm_90": ArchLimits(smem=233472),
    "sm_80": ArchLimits(smem=167936),
}


def occupancy(arch: str, *, regs: int, num_warps: int, smem: int) -> int:
    """Programs of ``num_warps`` warps using ``regs`` registers per thread and ``smem`` bytes of shared
    memory that one SM of ``arch`` holds at once (0 if one does not fit)."""
    lim = ARCH_LIMITS.get(arch, ArchLimits())
    threads = num_warps * 32
    per_warp = -(-max(regs, 1) * 32 // lim.reg_alloc_unit) * lim.reg_alloc_unit
    by_regs = (lim.regs // per_warp) // num_warps
    by_threads = lim.max_threads // threads
    by_smem = lim.smem // (smem + lim.smem_per_cta_reserved)
    return max(0, min(by_regs, by_threads, by_smem, lim.max_ctas))


@dataclass(frozen=True)
class KernelEntry:
    """One row of the table: where it applies, the launch configuration, and its provenance."""

    kernel: str
    arch: str
    dtype: str  # "bf16" | "fp16" | "fp32" | "fp64" | "*"
    vocab_min: int
    vocab_max: int | None  # exclusive; None: no upper bound
    config: dict[str, int]
    ctas_per_sm: int
    measured: dict[str, Any] | None = None

    def matches(self, kernel: str, arch: str, dtype: str, vocab: int) -> bool:
        return (
            self.kernel == kernel
            and self.arch == arch
            and self.dtype in ("*", dtype)
            and self.vocab_min <= vocab
            and (self.vocab_max is None or vocab < self.vocab_max)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "kernel": self.kernel,
            "arch": self.arch,
            "dtype": self.dtype,
            "vocab": [self.vocab_min, self.vocab_max],
            "config": self.config,
            "ctas_per_sm": self.ctas_per_sm,
            "measured": self.measured,
        }


def _entry(raw: dict[str, Any], where: str) -> KernelEntry:
    try:
        vocab_min, vocab_max = raw["vocab"]
        entry = KernelEntry(
            raw["kernel"], raw["arch"], raw["dtype"], int(vocab_min),
            None if vocab_max is None else int(vocab_max), dict(raw["config"]), int(raw["ctas_per_sm"]),
            raw.get("measured"),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: malformed kernel-config entry {raw!r}: {exc}") from None
    if entry.kernel not in KERNELS:
        raise ValueError(f"{where}: unknown kernel {entry.kernel!r} (known: {KERNELS})")
    if entry.ctas_per_sm < 1:
        raise ValueError(f"{where}: ctas_per_sm must be >= 1, got {entry.ctas_per_sm}")
    return entry


def load_table(path: str | Path) -> list[KernelEntry]:
    """Entries of a table file, validated."""
    data = json.loads(Path(path).read_text())
    return [_entry(raw, f"{path} entry {i}") for i, raw in enumerate(data["entries"])]


@functools.cache
def entries() -> tuple[KernelEntry, ...]:
    """The packaged table (read once)."""
    return tuple(load_table(TABLE_PATH))


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


def arch_of(device: torch.device) -> str:
    """``"sm_90"`` for an H100/H200, ``"sm_80"`` for an A100, ...: the table's arch key of ``device``."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


@functools.lru_cache(maxsize=256)  # called per chunk launch: scan the table once per key
def lookup(kernel: str, arch: str, dtype: torch.dtype, vocab: int) -> KernelEntry:
    """The first entry for ``kernel`` on ``arch`` (else the ``"default"`` arch) with ``dtype`` and
    ``vocab`` in range. The table covers every (kernel, dtype, V) for the default arch and the
    interpreter, so a miss there is a broken table."""
    name = dtype_name(dtype)
    for key in (arch, DEFAULT_ARCH) if arch != INTERPRETER else (INTERPRETER,):
        for entry in entries():
            if entry.matches(kernel, key, name, vocab):
                return entry
    raise LookupError(f"{TABLE_PATH.name}: no entry for kernel={kernel} arch={arch} dtype={name} V={vocab}")
