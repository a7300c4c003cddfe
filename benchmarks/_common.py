"""Shared benchmark plumbing: timing (CUDA events / wall clock), provenance, result files."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def provenance(device: str) -> dict:
    info = {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.startswith("cuda"):
        info["driver"] = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    import synpo_kernels

    info["synpo_compiled_kernels"] = synpo_kernels.HAS_CPP_EXT
    info["synpo_cuda_kernels"] = synpo_kernels.HAS_CUDA_KERNELS
    return info


def measure(fn: Callable[[], object], device: str, *, warmup: int = 2, repeats: int = 7) -> dict:
    """Median/min time of `fn` in seconds: CUDA events after warm-up on GPU, wall clock on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def write_results(name: str, records: list[dict], meta: dict) -> Path:
    """Long-format JSON: one record per (implementation, size, metric), plus provenance."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    tag = meta.get("device_kind", "cpu")
    path = RESULTS_DIR / f"{name}_{tag}.json"
    payload = {"benchmark": name, "meta": meta, "records": records}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path
