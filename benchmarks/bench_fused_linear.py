"""Benchmark: fused lm_head -> SynPO loss (fwd + bwd) against the naive path and the peers.

Every method runs in its own subprocess (so process RSS and CUDA peak memory are its own), side by
side in one invocation; results are printed as a table and written as JSON.

Suites (``--suite``):
- ``gpu``: issue 3's target shape, n=16384 response tokens (16 rows x 1025 positions, position 0
  unscored), D=4096, V=152064, bf16, on CUDA. Methods: ``fused`` (Triton path, default options),
  ``fused_fp32acc`` (fp32 weight-gradient accumulator, +2.5 GB), ``fused_torch`` (the torch backend
  with the CUDA token op), ``naive`` (full logits + fp32 log_softmax + autograd), ``liger_flce``
  (Liger fused linear cross-entropy, ``reduction='none'`` per-token losses -> SynPO), ``liger_simpo``
  (Liger's chunked preference base with SimPO: the same cost structure; SynPO's mean-probability
  term cannot be expressed in its ``(chosen_logps, rejected_logps)`` interface), ``cce`` (Cut
  Cross-Entropy ``reduction='none'`` -> SynPO). Timing with CUDA events (median of ``--reps`` after
  warm-up); memory = ``torch.cuda.max_memory_allocated`` minus the inputs and the gradients; the
  6nDV floor uses a bf16 8192^3 matmul measured in the same run. Peers that are not installed are
  reported as missing (the GPU image has no network: ``pip download --no-deps liger-kernel
  cut-cross-entropy`` on the CPU machine and carry the wheels).
- ``cpu``: n=4096 (16 rows x 257: 8 pairs of 256-token responses), D=1024, V=32768, fp32 on CPU:
  ``fused`` vs ``naive``. The fused path's memory is one chunk buffer, max(``chunk_bytes`` = 64 MiB,
  largest pair x V x 4 bytes): with 512-token responses (``--set rows=8 seq=513``) it is 128 MiB. Time: median
  wall clock after one warm-up; memory: peak RSS (``ru_maxrss``) of a fresh process running one
  fwd+bwd, minus its RSS just before the call (inputs allocated), and the same minus the gradients.
- ``video``: a video-captioning-shaped batch, each row 2048 prompt/video positions + 256 response
  tokens (``--video-rows`` rows, default 4 on CPU: D=512, V=16384; on CUDA: D=4096, V=152064, bf16):
  ``fused`` (only the 256 response rows per row enter the GEMMs) vs ``naive`` (every position), with
  the FLOPs each path issues.

Usage::

    python benchmarks/bench_fused_linear.py --suite cpu video       # CPU machine
    python benchmarks/bench_fused_linear.py --suite gpu video       # GPU machine (cuda)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


def case_config(suite: str, device: str, args) -> dict:
    if suite == "gpu":
        return dict(rows=16, seq=1025, prompt=1, dim=4096, vocab=152064, dtype="bfloat16", device="cuda")
    if suite == "cpu":
        # 8 pairs of 256-token responses (caption-sized); `--set rows=8 seq=513` gives 512-token ones.
        return dict(rows=16, seq=257, prompt=1, dim=1024, vocab=32768, dtype="float32", device="cpu")
    if suite == "video":
        if device == "cuda":
            return dict(rows=args.video_rows or 4, seq=2304, prompt=2048, dim=4096, vocab=152064,
                        dtype="bfloat16", device="cuda")  # fmt: skip
        return dict(rows=args.video_rows or 4, seq=2304, prompt=2048, dim=512, vocab=16384,
                    dtype="float32", device="cpu")  # fmt: skip
    raise ValueError(f"--suite: unknown suite {suite!r}")


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    cfg = dict(cfg)
    for item in overrides or []:
        key, _, value = item.partition("=")
        if key not in cfg:
            raise ValueError(f"--set: unknown key {key!r}; one of {sorted(cfg)}")
        cfg[key] = type(cfg[key])(value)
    return cfg


METHODS = {
    "gpu": ["fused", "fused_fp32acc", "fused_torch", "naive", "liger_flce", "liger_simpo", "cce"],
    "cpu": ["fused", "naive"],
    "video": ["fused", "naive"],
}


def make_inputs(cfg, torch):
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, cfg["dtype"])
    dev = cfg["device"]
    rows, seq, dim, vocab = cfg["rows"], cfg["seq"], cfg["dim"], cfg["vocab"]
    # In place, without temporaries, so that the inputs set the process's RSS baseline.
    hidden = torch.randn(rows, seq, dim, generator=gen).to(dtype).to(dev).requires_grad_(True)
    weight = (
        torch.randn(vocab, dim, generator=gen).mul_(2.0 / dim**0.5).to(dtype).to(dev).requires_grad_(True)
    )
    labels = torch.randint(0, vocab, (rows, seq), generator=gen)
    labels[:, : cfg["prompt"]] = -100
    return hidden, weight, labels.to(dev)


# ---------------------------------------------------------------------------------------------
# Methods: each returns the SynPO loss (a 0-dim tensor) for the [chosen; rejected] batch.
# ---------------------------------------------------------------------------------------------


def _synpo_from_token_logp(token_logp, labels, alpha=30.0, beta=0.2):
    from synpo_kernels import reference as R

    mask = R.response_mask(labels)
    stats = R.row_stats_from_token_logprobs(token_logp.float(), mask)
    return R.synpo_loss_from_stats(stats, alpha=alpha, beta=beta).mean()


def method_fn(name, chunk_bytes=None):
    import torch

    import synpo_kernels as sk

    opts = {"chunk_bytes": chunk_bytes}
    if name == "fused":
        return lambda h, w, y: sk.fused_linear_synpo_loss(h, w, y, **opts)
    if name == "fused_fp32acc":
        return lambda h, w, y: sk.fused_linear_synpo_loss(h, w, y, weight_grad_accumulation="fp32", **opts)
    if name == "fused_torch":
        return lambda h, w, y: sk.fused_linear_synpo_loss(h, w, y, impl="torch", **opts)
    if name == "naive":

        def naive(h, w, y):
            logits = h @ w.t()
            logp = torch.log_softmax(logits.float(), dim=-1)
            aligned = torch.full_like(y, -100)
            aligned[:, :-1] = y[:, 1:]
            valid = aligned != -100
            tok = logp.gather(-1, torch.where(valid, aligned, 0).unsqueeze(-1)).squeeze(-1)
            tok = torch.where(valid, tok, 0.0)
            shifted = torch.zeros_like(tok)
            shifted[:, 1:] = tok[:, :-1]
            return _synpo_from_token_logp(shifted, y)

        return naive
    if name == "liger_flce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        flce = LigerFusedLinearCrossEntropyLoss(reduction="none")

        def liger_flce(h, w, y):
            aligned = torch.full_like(y, -100)
            aligned[:, :-1] = y[:, 1:]
            nll = flce(w, h.reshape(-1, h.shape[-1]), aligned.reshape(-1))
            tok = -nll.view(y.shape).float()
            shifted = torch.zeros_like(tok)
            shifted[:, 1:] = tok[:, :-1]
            return _synpo_from_token_logp(shifted, y)

        return liger_flce
    if name == "liger_simpo":
        from liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss

        simpo = LigerFusedLinearSimPOLoss()

        def liger_simpo(h, w, y):
            out = simpo(w, h[:, :-1], y[:, 1:])
            return out[0] if isinstance(out, tuple) else out

        return liger_simpo
    if name == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def cce(h, w, y):
            nll = linear_cross_entropy(h, w, y, shift=1, reduction="none")
            tok = -nll.float()
            shifted = torch.zeros(y.shape, dtype=tok.dtype, device=tok.device)
            shifted[:, 1:] = tok.view(y.shape[0], -1)[:, : y.shape[1] - 1]
            return _synpo_from_token_logp(shifted, y)

        return cce
    raise ValueError(f"unknown method {name!r}")


def matmul_flops(cfg, method):
    n_pos = cfg["rows"] * (cfg["seq"] - 1)
    n_resp = cfg["rows"] * (cfg["seq"] - cfg["prompt"])
    rows = n_resp if method.startswith("fused") else n_pos
    per = 8 if method in ("cce",) else 6  # CCE recomputes the logits in backward
    return per * rows * cfg["dim"] * cfg["vocab"], n_resp


# ---------------------------------------------------------------------------------------------
# Workers: memory (one method per fresh process) and time (all methods, interleaved, one process)
# ---------------------------------------------------------------------------------------------


def _failed(exc) -> dict:
    return {"status": f"failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"}


def _step(fn, hidden, weight, labels):
    hidden.grad = None
    weight.grad = None
    loss = fn(hidden, weight, labels)
    loss.backward()
    return loss


def mem_worker(spec: dict) -> dict:
    """Peak memory of one fwd+bwd of one method, in a fresh process."""
    import torch

    cfg, method = spec["cfg"], spec["method"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    try:
        fn = method_fn(method, spec.get("chunk_bytes"))
    except ImportError as exc:
        return {"status": f"missing ({exc.name or exc})"}
    cuda = cfg["device"] == "cuda"
    try:
        # Load libraries and JIT code (MKL/oneDNN kernels, CUDA context, Triton) on a tiny problem
        # first, so that the measured growth is the method's memory, not code pages.
        tiny = dict(cfg, rows=2, seq=9, prompt=1, dim=16, vocab=64)
        _step(fn, *make_inputs(tiny, torch))
        hidden, weight, labels = make_inputs(cfg, torch)
        grad_bytes = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            loss = _step(fn, hidden, weight, labels)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            base = _rss_bytes()
            loss = _step(fn, hidden, weight, labels)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    except Exception as exc:  # a peer failing (e.g. out of memory) must not hide the others
        return _failed(exc)
    return {"status": "ok", "peak_bytes": peak, "beyond_grads_bytes": peak - grad_bytes, "loss": float(loss)}


def time_worker(spec: dict) -> dict:
    """Wall time of fwd+bwd for every method, interleaved round by round after one warm-up each, so a
    fluctuating machine load affects all methods alike. CUDA: CUDA events."""
    import torch

    cfg = spec["cfg"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cuda = cfg["device"] == "cuda"
    hidden, weight, labels = make_inputs(cfg, torch)
    fns, out = {}, {}
    for method in spec["methods"]:
        try:
            fns[method] = method_fn(method, spec.get("chunk_bytes"))
        except ImportError as exc:
            out[method] = {"status": f"missing ({exc.name or exc})"}

    def timed(fn):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            loss = _step(fn, hidden, weight, labels)
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3, loss
        t0 = time.perf_counter()
        loss = _step(fn, hidden, weight, labels)
        return time.perf_counter() - t0, loss

    times = {m: [] for m in fns}
    for rnd in range(spec["reps"] + 1):  # round 0 is the warm-up
        for method, fn in list(fns.items()):
            try:
                dt, loss = timed(fn)
            except Exception as exc:
                out[method] = _failed(exc)
                del fns[method]
                if cuda:
                    torch.cuda.empty_cache()
                continue
            if rnd > 0:
                times[method].append(dt)
            out[method] = {"status": "ok", "loss": float(loss)}
    for method in fns:
        t = times[method]
        out[method].update(seconds=statistics.median(t), min_seconds=min(t), all_seconds=t)
    return out


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_peak_matmul() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def run_worker(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"failed (timeout {timeout:.0f}s)"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"status": f"failed (exit {proc.returncode}: {tail[0][:200]})"}


def fmt_bytes(x):
    return "-" if x is None else f"{x / 2**20:9.1f} MiB"


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", nargs="+", default=None, help="gpu, cpu, video (default: by device)")
    parser.add_argument("--methods", nargs="+", default=None, help="subset of methods")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions after one warm-up")
    parser.add_argument("--video-rows", type=int, default=None)
    parser.add_argument(
        "--chunk-mib", type=float, default=None, help="chunk_bytes of the fused methods (MiB)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads in workers")
    parser.add_argument("--set", nargs="+", default=None, metavar="KEY=VALUE", help="override case keys")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        spec = json.loads(args.worker)
        result = time_worker(spec) if spec["mode"] == "time" else mem_worker(spec)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    import torch

    cuda = torch.cuda.is_available()
    suites = args.suite or (["gpu", "video"] if cuda else ["cpu", "video"])
    report = {
        "host": platform.node(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "cpu_threads": args.threads or torch.get_num_threads(),
        "suites": {},
    }
    peak_flops = measure_peak_matmul() if cuda and "gpu" in suites else None
    if peak_flops:
        report["bf16_matmul_flops_per_s"] = peak_flops
    for suite in suites:
        cfg = apply_overrides(case_config(suite, "cuda" if cuda else "cpu", args), args.set)
        if cfg["device"] == "cuda" and not cuda:
            report["suites"][suite] = {"status": "skipped (no CUDA device)"}
            print(f"[{suite}] skipped: no CUDA device")
            continue
        reps = args.reps or (5 if cfg["device"] == "cuda" else 2)
        methods = [m for m in METHODS[suite] if not args.methods or m in args.methods]
        base_spec = {"cfg": cfg, "reps": reps, "threads": args.threads}
        if args.chunk_mib:
            base_spec["chunk_bytes"] = int(args.chunk_mib * 2**20)
        timing = run_worker(dict(base_spec, mode="time", methods=methods), args.timeout)
        rows = {}
        for method in methods:
            res = dict(timing.get(method, timing))  # a crashed time worker reports for all
            if res.get("status") == "ok":
                mem = run_worker(dict(base_spec, mode="mem", method=method), args.timeout)
                if mem.get("status") == "ok":
                    res.update(peak_bytes=mem["peak_bytes"], beyond_grads_bytes=mem["beyond_grads_bytes"])
                else:
                    res["status"] = f"memory run {mem.get('status')}"
            res["matmul_flops"] = matmul_flops(cfg, method)[0]
            rows[method] = res
            print(f"[{suite}] {method}: {res}", flush=True)
        floor = 6 * (cfg["rows"] * (cfg["seq"] - cfg["prompt"])) * cfg["dim"] * cfg["vocab"]
        summary = {"config": cfg, "floor_6nDV_flops": floor, "methods": rows}
        naive = rows.get("naive", {})
        if peak_flops:
            summary["floor_seconds"] = floor / peak_flops
        for r in rows.values():
            if r.get("status") != "ok":
                continue
            if peak_flops:
                r["x_floor"] = r["seconds"] / summary["floor_seconds"]
            r["achieved_flops_per_s_6nDV"] = floor / r["seconds"]
            if naive.get("status") == "ok":
                r["speedup_vs_naive"] = naive["seconds"] / r["seconds"]
                r["memory_vs_naive"] = r["peak_bytes"] / max(naive["peak_bytes"], 1)
        peers = [r["seconds"] for k, r in rows.items() if k.startswith("liger") and r.get("status") == "ok"]
        fused = rows.get("fused", {})
        if fused.get("status") == "ok":
            if peers:
                summary["fused_speedup_vs_best_liger"] = min(peers) / fused["seconds"]
            if rows.get("cce", {}).get("status") == "ok":
                summary["fused_speedup_vs_cce"] = rows["cce"]["seconds"] / fused["seconds"]
        report["suites"][suite] = summary
        print(f"\n== {suite}: {cfg}")
        print(
            f"{'method':<15}{'time':>11}{'vs naive':>10}{'x floor':>9}{'peak mem':>15}"
            f"{'beyond grads':>15}  status"
        )
        for name, r in rows.items():
            ok = r.get("status") == "ok"
            t = f"{r['seconds'] * 1e3:9.1f}ms" if ok else "-"
            sp = f"{r.get('speedup_vs_naive', float('nan')):9.2f}x" if ok else "-"
            xf = f"{r['x_floor']:8.2f}x" if ok and "x_floor" in r else "-"
            print(
                f"{name:<15}{t:>11}{sp:>10}{xf:>9}{fmt_bytes(r.get('peak_bytes')):>15}"
                f"{fmt_bytes(r.get('beyond_grads_bytes')):>15}  {r.get('status')}"
            )
        for key in ("fused_speedup_vs_best_liger", "fused_speedup_vs_cce"):
            if key in summary:
                print(f"{key}: {summary[key]:.2f}")
    out = args.out or RESULTS / f"fused_linear_{'cuda' if cuda else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
