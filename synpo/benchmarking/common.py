"""Shared benchmark plumbing: provenance, timing, peak memory, reference rates, result files.

Timing: CUDA events after warm-up on GPU; ``time.perf_counter`` around each call on CPU. Peak memory:
``torch.cuda.max_memory_allocated`` over the call minus what was allocated before it (GPU); on CPU the
process's peak resident set size over the call minus its RSS just before (``VmHWM`` reset through
``/proc/self/clear_refs``, free heap returned to the OS first so that reused pages do not hide growth).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import datetime as _dt
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

RESULTS_ENV = "SYNPO_BENCH_RESULTS"

# Provenance keys copied into every CSV row, so that a CSV file stands on its own.
PROVENANCE_COLUMNS = ("device", "driver", "torch", "triton", "cuda", "commit", "date")


# ---------------------------------------------------------------------------------------------
# Where results go, and where they came from
# ---------------------------------------------------------------------------------------------


def repo_root() -> Path | None:
    """The source checkout this package runs from (editable install), or None when installed."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").is_file() and (parent / "benchmarks").is_dir():
            return parent
    return None


def default_results_dir() -> Path:
    """``$SYNPO_BENCH_RESULTS``, else the checkout's ``benchmarks/results``, else
    ``./synpo-bench-results``."""
    if os.environ.get(RESULTS_ENV):
        return Path(os.environ[RESULTS_ENV])
    root = repo_root()
    if root is not None:
        return root / "benchmarks" / "results"
    return Path.cwd() / "synpo-bench-results"


# Where a smoke preset's results go unless asked: they check that the harness runs, they are not
# figures to publish, so not into the checkout's tracked benchmarks/results/ (runs/ is git-ignored).
SMOKE_RESULTS_DIR = Path("runs") / "bench-smoke"


def results_dir(args: argparse.Namespace) -> Path:
    """Where this run's results go: ``--output-dir`` when given, ``$SYNPO_BENCH_RESULTS``, then
    ``./runs/bench-smoke`` for a ``smoke`` preset, else :func:`default_results_dir`."""
    if getattr(args, "output_dir", None):
        return Path(args.output_dir)
    if getattr(args, "preset", None) == "smoke" and not os.environ.get(RESULTS_ENV):
        return Path.cwd() / SMOKE_RESULTS_DIR
    return default_results_dir()


def git_commit() -> str:
    """Short commit of the checkout (``-dirty`` when tracked files differ), ``unknown`` outside git."""
    root = repo_root() or Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if out.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name() -> str:
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return name


def default_threads() -> int:
    import torch

    return torch.get_num_threads()


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_name()}, {os.cpu_count()} cores"


def nvidia_driver_version() -> str | None:
    """The NVIDIA kernel driver version (``nvidia-smi``), or None without one."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def provenance(device: str) -> dict:
    """Device, driver, library versions, git commit and date of a benchmark run."""
    import torch

    import synpo_kernels

    cuda = device.startswith("cuda")
    info = {
        "device": device_name(device),
        "device_kind": "cuda" if cuda else "cpu",
        "driver": nvidia_driver_version() if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host_cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "synpo_compiled_kernels": synpo_kernels.HAS_CPP_EXT,
        "synpo_cuda_kernels": synpo_kernels.HAS_CUDA_KERNELS,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if cuda:
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(torch.device(device))))
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(torch.device(device)).total_memory
    with contextlib.suppress(OSError):
        info["load_average"] = os.getloadavg()[0]
    return info


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def profile_top_ops(fn, device: str, top: int) -> dict:
    """Run ``fn`` once under ``torch.profiler``: ``{"host": [...], "device": [...]}`` (``device`` on
    CUDA only), each the ``top`` entries with the most self time as ``{name, calls, self_ms, share}``
    (``share``: of that side's summed self time). Host: operators' own CPU time (where a launch-bound
    step goes); device: kernels' GPU time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    events = prof.key_averages()

    def ranked(kind: DeviceType, attr: str) -> list[dict]:
        timed = [(e, float(getattr(e, attr, 0.0) or 0.0)) for e in events if e.device_type == kind]
        timed = [(e, us) for e, us in timed if us > 0]
        total = sum(us for _, us in timed) or 1.0
        timed.sort(key=lambda item: item[1], reverse=True)
        return [
            {"name": e.key[:120], "calls": e.count, "self_ms": us / 1000, "share": us / total}
            for e, us in timed[:top]
        ]

    out = {"host": ranked(DeviceType.CPU, "self_cpu_time_total")}
    if cuda:
        out["device"] = ranked(DeviceType.CUDA, "self_device_time_total")
    return out


def measure(
    fn: Callable[[], object],
    device: str,
    *,
    warmup: int = 2,
    repeats: int = 7,
    max_total_s: float | None = None,
) -> dict:
    """Median/min time of ``fn`` in seconds: CUDA events after warm-up on GPU, wall clock on CPU.

    ``max_total_s`` stops the timed calls early (after at least one) once they have taken that long,
    so that a slow implementation does not hold up a sweep; ``repeats`` in the result is the count run.
    """
    import torch

    for _ in range(warmup):
        fn()
    times: list[float] = []
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        if max_total_s is not None and sum(times) >= max_total_s:
            break
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "repeats": len(times),
        "times_s": times,
    }


# ---------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def current_rss() -> int:
    """Resident set size of this process, bytes."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # best effort off Linux


def peak_rss() -> int:
    """Peak RSS of this process since start or the last :func:`reset_peak_rss`, bytes."""
    # VmHWM, not ru_maxrss: once a thread has exited (a loader's thread pool), ru_maxrss keeps the
    # peak as of then (the signal struct's maxrss), which a reset of VmHWM does not lower.
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_memory(device: str) -> None:
    """Collect garbage and hand freed memory back (CUDA cache; glibc heap) before a measurement."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
    else:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory of the code inside ``with``, beyond what was held when it started (bytes).

    ``.peak_bytes``: the growth over the block (GPU: max allocated; CPU: peak RSS, which also counts
    memory the allocator holds); ``.total_bytes``: the absolute peak (everything the process held).
    """

    def __init__(self, device: str):
        self.device = device
        self.peak_bytes: int | None = None
        self.total_bytes: int | None = None
        self.exact = True

    def __enter__(self):
        release_free_memory(self.device)
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            # Without the reset the peak is the process's peak so far: an upper bound.
            self.exact = reset_peak_rss()
            self.base = current_rss()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self.total_bytes = torch.cuda.max_memory_allocated()
        else:
            self.total_bytes = peak_rss()
        self.peak_bytes = max(0, self.total_bytes - self.base)
        return False


def cpu_worker_env() -> dict:
    """Environment of CPU worker processes: glibc's mmap threshold fixed at its initial 128 KiB.

    glibc raises the threshold as large blocks are freed, after which big tensors come from the heap
    and stay resident when freed; peak RSS then depends on allocation history, not on what an
    implementation holds. Fixed, every block above 128 KiB is mapped and unmapped with its tensor.
    Applied to every implementation alike; an explicit setting in the environment is kept.
    """
    return {"MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072")}


def worker_env(device: str, settings: list[str] | None = None) -> dict | None:
    """Environment added to the worker processes: :func:`cpu_worker_env` on CPU, then ``--worker-env
    KEY=VALUE`` settings (e.g. ``THP_MEM_ALLOC_ENABLE=1``: transparent huge pages for every torch CPU
    allocation). None when there is nothing to add."""
    env = {} if device.startswith("cuda") else cpu_worker_env()
    for item in settings or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--worker-env: expected KEY=VALUE, got {item!r}")
        env[key] = value
    return env or None


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception means the device (or host) ran out of memory."""
    import torch

    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text.lower()
        or "can't allocate memory" in text
        or "CUDA error: out of memory" in text
    )


def available_host_memory() -> int | None:
    """``MemAvailable`` of the host, bytes."""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


# ---------------------------------------------------------------------------------------------
# Reference rates measured in the same run
# ---------------------------------------------------------------------------------------------


def measure_matmul_rate(device: str, dtype_name: str, size: int, repeats: int = 5) -> dict:
    """FLOP/s of a square ``size`` GEMM in ``dtype_name`` (the rate the FLOP floor is taken at)."""
    import torch

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=torch.float32, generator=gen).to(dtype)
    b = torch.randn(size, size, device=device, dtype=torch.float32, generator=gen).to(dtype)
    timing = measure(lambda: torch.mm(a, b), device, warmup=2, repeats=repeats)
    return {"gemm_size": size, "gemm_dtype": dtype_name, "flops_per_s": 2 * size**3 / timing["median_s"]}


def measure_copy_bandwidth(device: str, nbytes: int, repeats: int = 7) -> dict:
    """Bytes/s of a device copy (bytes read plus written): the floor of memory-bound row passes."""
    import torch

    src = torch.empty(max(1, nbytes // 4), dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device, warmup=2, repeats=repeats)
    return {"copy_bytes": src.numel() * 4, "bytes_per_s": 2 * src.numel() * 4 / timing["median_s"]}


# ---------------------------------------------------------------------------------------------
# Result files
# ---------------------------------------------------------------------------------------------


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _columns(records: Iterable[dict]) -> list[str]:
    cols: dict[str, None] = {}
    for rec in records:
        for key, value in rec.items():
            if not isinstance(value, (list, dict)):
                cols.setdefault(key, None)
    return list(cols)


def write_long_results(stem: str, records: list[dict], meta: dict, results_dir: Path) -> tuple[Path, Path]:
    """Long format: one record per (implementation, size, pass) in ``<stem>.json`` (with ``meta``)
    and ``<stem>.csv`` (each row repeating the provenance columns)."""
    results_dir = Path(results_dir)
    json_path = results_dir / f"{stem}.json"
    csv_path = results_dir / f"{stem}.csv"
    payload = {"benchmark": stem, "schema": 1, "meta": meta, "records": records}
    _atomic_write(json_path, json.dumps(payload, indent=2, default=str) + "\n")
    cols = _columns(records) + [c for c in PROVENANCE_COLUMNS if c not in _columns(records)]
    rows = [{**{c: meta.get(c) for c in PROVENANCE_COLUMNS}, **rec} for rec in records]
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, csv_path)
    return json_path, csv_path


def load_results(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} µs"


# ---------------------------------------------------------------------------------------------
# What ``synpo bench kernels`` and ``synpo bench trainer`` share: options, metadata, output
# ---------------------------------------------------------------------------------------------


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a sweep's driver (processes, limits, output), after the benchmark's own."""
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads per worker (0: all; default: the preset's)",
    )
    parser.add_argument(
        "--isolation",
        choices=("task", "group", "none"),
        default=None,
        help="worker processes: one per run, per group, or one for all (default: the preset's)",
    )
    parser.add_argument(
        "--worker-env",
        nargs="+",
        default=None,
        metavar="KEY=VALUE",
        help="environment of the worker processes (e.g. THP_MEM_ALLOC_ENABLE=1), recorded in the results",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run before it is stopped")
    parser.add_argument("--budget-s", type=float, default=None, help="stop the sweep after this many seconds")
    parser.add_argument(
        "--output-dir",
        default=None,
        help="where results go (default: benchmarks/results in a checkout; --preset smoke: "
        "./runs/bench-smoke)",
    )
    parser.add_argument("--no-save", action="store_true", help="print only")


def run_meta(device: str, preset, isolation: str, threads: int | None, env: dict | None) -> dict:
    """Provenance plus the settings every sweep records (``preset``: a kernels or trainer preset)."""
    return {
        **provenance(device),
        "preset": preset.name,
        "preset_description": preset.description,
        "isolation": isolation,
        "worker_env": env,
        "cpu_threads": threads or default_threads(),
    }


def finish(args: argparse.Namespace, stem: str, records: list[dict], meta: dict, table: str) -> int:
    """Print the table and, unless ``--no-save``, write ``<stem>.json`` and ``<stem>.csv``."""
    print()
    print(table)
    if not args.no_save:
        json_path, csv_path = write_long_results(stem, records, meta, results_dir(args))
        print(f"\nresults: {json_path} and {csv_path}")
    return 0
