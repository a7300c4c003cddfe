"""Autotune the Triton kernels' launch configurations on a GPU and write ``kernel_configs.json``.

    python benchmarks/tune_kernels.py                 # bf16/fp16/fp32, V = 32001 and 152064: ~2 min
    python benchmarks/tune_kernels.py --quick         # bf16, the row passes only: ~30 s
    python benchmarks/tune_kernels.py --write         # also rewrite the packaged table

For each kernel (``row_lse``, ``row_grad``, ``row_grad_bias``, ``wgrad``), dtype and V (one V per
range of the table: below and above 65536), every candidate configuration is compiled, its
resident programs per SM are computed from the compiled kernel's real register and shared-memory
use (:func:`synpo_kernels.ops.kernel_tuning.occupancy`), its grid is sized from that the way the
launchers size it, and it is timed on a full chunk of the default CUDA budget (CUDA events, median).
The fastest candidate replaces the GPU's arch entries (``measured`` records device, versions,
date, its time, the current entry's time and the copy-bandwidth floor of the pass). Without a CUDA
GPU it exits 2: the table's defaults stay in use, and CI checks their occupancy ahead of time
(``scripts/aot_report.py``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

__all__ = ["main"]

ROW_VOCABS = (32001, 152064)  # one per V range of the table
RANGES = ((0, 65536), (65536, None))
DIM = 4096
DTYPES = ("bf16", "fp16", "fp32")

LSE_CANDIDATES = [
    {"BLOCK_M": m, "BLOCK_V": v, "num_warps": w, "num_stages": 3}
    for m, v, w in itertools.product((1, 2), (2048, 4096, 8192), (4, 8, 16))
    if m * v <= 8192
]
GRAD_CANDIDATES = [
    {"BLOCK_M": m, "BLOCK_V": v, "num_warps": w, "num_stages": 3}
    for m, v, w in itertools.product((4, 8, 16), (512, 1024, 2048), (4, 8))
    if m * v <= 16384
]
WGRAD_CANDIDATES = [
    {"BLOCK_V": v, "BLOCK_D": d, "BLOCK_K": k, "GROUP_V": 8, "num_warps": w, "num_stages": s}
    for v, d, k, w, s in (
        (128, 128, 64, 8, 3),
        (128, 128, 32, 8, 4),
        (128, 64, 64, 4, 3),
        (64, 128, 64, 4, 3),
        (64, 64, 32, 4, 3),
    )
]


def _range_of(vocab: int) -> tuple[int, int | None]:
    return next(r for r in RANGES if r[0] <= vocab and (r[1] is None or vocab < r[1]))


def _chunk(vocab: int, dtype, device):
    """A full chunk of the default CUDA budget, in the fused ops' own padded buffer, with labels,
    per-row lse/g and (for the weight gradient) a hidden chunk and an fp32 accumulator."""
    import torch

    from synpo_kernels.ops import fused_linear_common as common

    weight = torch.empty((vocab, DIM), dtype=dtype, device=device)
    rows = common.chunk_rows(common.FusedLinearConfig(), weight, "triton", None)
    buf = common.chunk_buffer(rows, weight)
    gen = torch.Generator(device=device).manual_seed(0)
    buf.copy_(torch.randn(buf.shape, generator=gen, device=device, dtype=torch.float32) * 3)
    labels = torch.randint(0, vocab, (rows,), generator=gen, device=device)
    return {
        "rows": rows,
        "logits": buf,
        "labels": labels,
        "lse": torch.zeros(rows, device=device),
        "g": torch.randn(rows, generator=gen, device=device),
        "bias_grad": torch.zeros(vocab, device=device),
        "hidden": torch.randn(rows, DIM, generator=gen, device=device).to(dtype),
        "acc": torch.zeros(vocab, DIM, device=device),
    }


def _launch_and_time(kernel: str, entry, data, arch: str, sms: int, device: str, dtype):
    """(median seconds, compiled kernel) of one candidate; grid sized from the entry's ctas_per_sm."""
    from synpo.benchmarking.common import measure
    from synpo_kernels.ops import fused_linear_kernels as K

    logits, rows, vocab = data["logits"], data["rows"], data["logits"].shape[1]
    v_load = K.load_width(logits)
    if kernel == "row_lse":
        cfg = K.lse_config(rows, vocab, dtype, arch=arch, sm_count=sms, entry=entry)
        out = data["lse"].clone()
        args = (logits, logits.stride(0), data["labels"], out, out, rows, vocab, v_load, -100)
        fn = K._row_lse_kernel
    elif kernel in ("row_grad", "row_grad_bias"):
        bias = kernel == "row_grad_bias"
        cfg = K.grad_config(rows, vocab, dtype, has_bias_grad=bias, arch=arch, sm_count=sms, entry=entry)
        # The pass overwrites its input: time it on a scratch copy each call would add a copy; the
        # values do not change the work (every element is read, exp'd and written), so it runs in place.
        args = (
            logits, logits.stride(0), data["labels"], data["lse"], data["g"], data["bias_grad"],
            rows, vocab, v_load, cfg.rows_per_split, -100,
        )  # fmt: skip
        fn = K._row_grad_kernel
    else:
        cfg = K.wgrad_config(vocab, DIM, dtype, arch=arch, entry=entry)
        hidden, acc = data["hidden"], data["acc"]
        args = (logits, logits.stride(0), hidden, hidden.stride(0), acc, acc.stride(0), rows, vocab, DIM)
        fn = K._wgrad_kernel

    def run():
        return fn[cfg.grid](*args, **cfg.constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    compiled = run()
    return measure(run, device, warmup=3, repeats=15)["median_s"], compiled


def _tune_one(kernel, candidates, dtype_name, vocab, arch, sms, device, data, current):
    import torch

    from synpo_kernels.ops import kernel_tuning as tuning

    dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype_name])
    lo, hi = _range_of(vocab)
    results = []
    for config in candidates:
        probe = tuning.KernelEntry(kernel, arch, dtype_name, lo, hi, config, 1)
        try:
            _, compiled = _launch_and_time(kernel, probe, data, arch, sms, device, dtype)
            ctas = tuning.occupancy(
                arch, regs=compiled.n_regs, num_warps=config["num_warps"], smem=compiled.metadata.shared
            )
            if ctas < 1 or compiled.n_spills:
                continue
            entry = tuning.KernelEntry(kernel, arch, dtype_name, lo, hi, config, ctas)
            seconds, _ = _launch_and_time(kernel, entry, data, arch, sms, device, dtype)
        except Exception as exc:  # a candidate that does not compile or launch is skipped, said
            print(f"  skip {kernel} {dtype_name} V={vocab} {config}: {type(exc).__name__}: {exc}"[:300])
            continue
        results.append((seconds, entry))
    if not results:
        raise RuntimeError(f"no candidate of {kernel} {dtype_name} V={vocab} ran")
    current_s, _ = _launch_and_time(kernel, current, data, arch, sms, device, dtype)
    best_s, best = min(results, key=lambda r: r[0])
    return best, best_s, current_s, len(results)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="bf16 and the row passes only")
    ap.add_argument("--dtypes", default=None, help=f"comma-separated of {','.join(DTYPES)}")
    ap.add_argument("--vocabs", default=None, help="comma-separated V (default 32001,152064)")
    ap.add_argument("--write", action="store_true", help="rewrite synpo_kernels/ops/kernel_configs.json")
    ap.add_argument("--out", type=Path, default=None, help="also write the tuned table here")
    args = ap.parse_args(argv)

    import torch
    from tqdm import tqdm

    from synpo.benchmarking.common import measure_copy_bandwidth, provenance
    from synpo_kernels.ops import fused_linear_kernels as K
    from synpo_kernels.ops import kernel_tuning as tuning

    if not torch.cuda.is_available() or K.INTERPRET or not K.HAS_TRITON:
        print("tune_kernels: needs a CUDA GPU with Triton (and TRITON_INTERPRET unset); the table's "
              "defaults stay in use", file=sys.stderr)  # fmt: skip
        return 2
    dtypes = args.dtypes.split(",") if args.dtypes else (["bf16"] if args.quick else list(DTYPES))
    if bad := [d for d in dtypes if d not in DTYPES]:
        ap.error(f"--dtypes: unknown {bad} (known: {DTYPES})")
    vocabs = [int(v) for v in args.vocabs.split(",")] if args.vocabs else list(ROW_VOCABS)
    kernels = ["row_lse", "row_grad", "row_grad_bias"] + ([] if args.quick else ["wgrad"])
    device = "cuda"
    arch, sms = K.launch_target(torch.device(device))
    info = provenance(device)
    copy_rate = measure_copy_bandwidth(device, 1 << 30)["bytes_per_s"]
    candidates = {"row_lse": LSE_CANDIDATES, "row_grad": GRAD_CANDIDATES, "row_grad_bias": GRAD_CANDIDATES}
    candidates["wgrad"] = WGRAD_CANDIDATES
    print(f"tuning for {arch} ({sms} SMs, {info['device']}), copy {copy_rate / 1e9:.0f} GB/s")

    tuned: list[tuning.KernelEntry] = []
    jobs = [(k, d, v) for d in dtypes for v in vocabs for k in kernels]
    for kernel, dtype_name, vocab in tqdm(jobs, desc="tune", unit="case"):
        dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype_name])
        data = _chunk(vocab, dtype, device)
        current = tuning.lookup(kernel, arch, dtype, vocab)
        best, best_s, current_s, tried = _tune_one(
            kernel, candidates[kernel], dtype_name, vocab, arch, sms, device, data, current
        )
        moved = data["rows"] * vocab * dtype.itemsize * (1 if kernel == "row_lse" else 2)
        measured = {
            "device": info["device"], "torch": info["torch"], "triton": info["triton"], "date": info["date"],
            "commit": info["commit"], "V": vocab, "rows": data["rows"], "us": round(best_s * 1e6, 1),
            "previous_us": round(current_s * 1e6, 1), "candidates": tried,
        }  # fmt: skip
        if kernel != "wgrad":
            measured["pct_of_copy_floor"] = round(100 * moved / copy_rate / best_s, 1)
        tuned.append(tuning.KernelEntry(**{**best.__dict__, "measured": measured}))
        tqdm.write(
            f"{kernel:14s} {dtype_name} V={vocab:6d}: {best_s * 1e6:8.1f} us (was {current_s * 1e6:8.1f}) "
            f"{best.config} ctas/SM={best.ctas_per_sm}"
        )

    table = json.loads(tuning.TABLE_PATH.read_text())
    keys = {(e.kernel, e.dtype, e.vocab_min) for e in tuned}
    kept = [
        e
        for e in table["entries"]
        if not (e["arch"] == arch and (e["kernel"], e["dtype"], e["vocab"][0]) in keys)
    ]
    # Tuned entries first: lookup takes the first match, so they win over the arch's older ones.
    table["entries"] = [e.to_json() for e in tuned] + kept
    text = json.dumps(table, indent=1) + "\n"
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    if args.write:
        tuning.TABLE_PATH.write_text(text)
        tuning.entries.cache_clear()
        tuning.lookup.cache_clear()
        print(f"wrote {tuning.TABLE_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
