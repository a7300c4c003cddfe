"""Fused per-token log-prob (forward + backward) against the naive PyTorch path, side by side.

Naive = what upstream code does: ``logits.float().log_softmax(-1).gather(...)`` + autograd.

CPU (default): N=4096 tokens, V=32000, fp32. Each allocator setting runs in its own process, with
both implementations measured in that one process: the default allocator, and transparent huge
pages for every allocation (THP_MEM_ALLOC_ENABLE=1), which speeds up the naive path's large
temporaries the most. Target: >= 3x.

CUDA: N=16384, V=152064, bf16. Reports achieved bandwidth of forward+backward (bytes: read logits
twice, write the gradient once) as a fraction of the measured device-to-device copy bandwidth.
Target: >= 85%.

    python benchmarks/bench_token_logprobs.py [--device cuda] [--tokens N --vocab V --dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def run_once(args) -> dict:
    import torch
    from _common import measure

    import synpo_kernels as sk

    dtype = getattr(torch, DTYPES[args.dtype])
    device = args.device
    torch.manual_seed(0)
    logits = (torch.randn(args.tokens, args.vocab, device=device) * 2).to(dtype)
    labels = torch.randint(0, args.vocab, (args.tokens,), device=device)
    upstream = torch.randn(args.tokens, device=device)

    def fused():
        x = logits.detach().requires_grad_(True)
        out = sk.token_logprobs(x, labels, shift=False)
        out.backward(upstream)
        return x.grad

    def naive():
        x = logits.detach().requires_grad_(True)
        out = x.float().log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)
        out.backward(upstream)
        return x.grad

    diff = (fused().float() - naive().float()).abs().max().item()
    results = {"max_grad_diff": diff}
    order = [("fused", fused), ("naive", naive)]
    for name, fn in order:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        results[name] = measure(fn, device, warmup=2, repeats=args.repeats)
        if device.startswith("cuda"):
            results[name]["peak_bytes"] = torch.cuda.max_memory_allocated()
    if device.startswith("cuda"):
        src = torch.empty(
            args.tokens * args.vocab * logits.element_size() // 4, dtype=torch.float32, device=device
        )
        dst = torch.empty_like(src)
        copy = measure(lambda: dst.copy_(src), device, warmup=3, repeats=20)
        copy_bw = 2 * src.numel() * 4 / copy["median_s"]
        moved = 3 * logits.numel() * logits.element_size()  # read twice, write the gradient once
        results["copy_bandwidth_Bps"] = copy_bw
        results["fused_bandwidth_Bps"] = moved / results["fused"]["median_s"]
        results["fraction_of_copy_bandwidth"] = results["fused_bandwidth_Bps"] / copy_bw
    results["speedup"] = results["naive"]["median_s"] / results["fused"]["median_s"]
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-save", action="store_true", help="print only; do not write benchmarks/results")
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    args.tokens = args.tokens or (16384 if gpu else 4096)
    args.vocab = args.vocab or (152064 if gpu else 32000)
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")

    if args.child:
        print(json.dumps(run_once(args)))
        return 0

    settings = [("default allocator", {})]
    if not gpu:
        settings.append(("THP for all allocations", {"THP_MEM_ALLOC_ENABLE": "1"}))
    from _common import provenance, write_results

    meta = {**provenance(args.device), "device_kind": "cuda" if gpu else "cpu"}
    print(f"token_logprobs fwd+bwd, N={args.tokens} V={args.vocab} {args.dtype} on {meta['device']}")
    print(
        f"torch {meta['torch']}, commit {meta['commit']}, compiled kernels={meta['synpo_compiled_kernels']}"
    )
    records = []
    for label, env in settings:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "--device",
            args.device,
            "--tokens",
            str(args.tokens),
            "--vocab",
            str(args.vocab),
            "--dtype",
            args.dtype,
            "--repeats",
            str(args.repeats),
        ]
        proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        line = (
            f"  [{label}] fused {res['fused']['median_s'] * 1e3:8.1f} ms   naive "
            f"{res['naive']['median_s'] * 1e3:8.1f} ms   speedup {res['speedup']:.2f}x"
            f"   (max |grad diff| {res['max_grad_diff']:.1e})"
        )
        if gpu:
            line += (
                f"\n  fused bandwidth {res['fused_bandwidth_Bps'] / 1e12:.2f} TB/s = "
                f"{100 * res['fraction_of_copy_bandwidth']:.1f}% of measured copy bandwidth "
                f"({res['copy_bandwidth_Bps'] / 1e12:.2f} TB/s)"
            )
        print(line)
        for impl in ("fused", "naive"):
            records.append(
                {
                    "op": "token_logprobs",
                    "pass": "fwd+bwd",
                    "impl": impl,
                    "setting": label,
                    "tokens": args.tokens,
                    "vocab": args.vocab,
                    "dtype": args.dtype,
                    "median_s": res[impl]["median_s"],
                    "min_s": res[impl]["min_s"],
                    "peak_bytes": res[impl].get("peak_bytes"),
                }
            )
        records.append(
            {
                "op": "token_logprobs",
                "pass": "fwd+bwd",
                "impl": "ratio naive/fused",
                "setting": label,
                "tokens": args.tokens,
                "vocab": args.vocab,
                "dtype": args.dtype,
                "speedup": res["speedup"],
                "fraction_of_copy_bandwidth": res.get("fraction_of_copy_bandwidth"),
            }
        )
    if not args.no_save:
        path = write_results("token_logprobs", records, meta)
        print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
