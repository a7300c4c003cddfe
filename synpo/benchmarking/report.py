"""Markdown tables from benchmark records: what the CLI prints and what the README shows.

Everything here is computed from result records (``benchmarks/results/*.json``); nothing is typed.
"""

from __future__ import annotations

from synpo.benchmarking.common import fmt_bytes, fmt_seconds

OP_TITLES = {
    "token_logprobs": "token_logprobs (logits -> per-token log-probs)",
    "fused_linear_token_logprobs": "fused_linear_token_logprobs (hidden, lm_head -> per-token log-probs)",
    "synpo_loss": "fused lm_head -> SynPO loss",
}


def provenance_line(meta: dict) -> str:
    parts = [f"**{meta.get('device')}**"]
    if meta.get("device_kind") == "cpu" and meta.get("cpu_threads"):
        parts.append(f"{meta['cpu_threads']} torch thread(s) per worker")
    if meta.get("driver"):
        parts.append(f"driver {meta['driver']}")
    parts.append(f"torch {meta.get('torch')}")
    if meta.get("cuda"):
        parts.append(f"CUDA {meta['cuda']}")
    parts.append(f"triton {meta.get('triton')}")
    parts.append(f"commit `{meta.get('commit')}`")
    parts.append(str(meta.get("date")))
    line = ", ".join(parts)
    extras = []
    gemm = meta.get("gemm_rate_range_flops_per_s") or [meta.get("gemm_rate_flops_per_s")] * 2
    if gemm[0]:
        extras.append(f"measured GEMM rate {_span(gemm, 1e12, '.3g')} TFLOP/s ({meta.get('gemm')})")
    copy = meta.get("copy_bandwidth_range_bytes_per_s") or [meta.get("copy_bandwidth_bytes_per_s")] * 2
    if copy[0]:
        extras.append(f"copy bandwidth {_span(copy, 1e9, '.3g')} GB/s")
    if meta.get("gemm_rate_range_flops_per_s"):
        extras.append("each worker process measures the rates its runs' floors use")
    if meta.get("load_average") is not None and meta.get("device_kind") == "cpu":
        extras.append(f"load average {meta['load_average']:.1f} at start")
    if extras:
        line += "; " + ", ".join(extras)
    return line


def _span(values, scale: float, spec: str) -> str:
    lo, hi = (format(v / scale, spec) for v in values)
    return lo if lo == hi else f"{lo}-{hi}"


def _early_stop(meta: dict) -> str:
    limit = meta.get("max_pass_s")
    return f" (fewer once the timed calls of a pass exceed {limit:.0f} s)" if limit else ""


def _status_cell(rec: dict | None) -> str:
    if rec is None:
        return "-"
    status = rec.get("status")
    if status == "ok":
        return fmt_seconds(rec.get("median_s"))
    return {"oom": "OOM", "missing": "missing", "unsupported": "unsupported", "skipped": "skipped"}.get(
        status, str(status)
    )


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _intro(meta: dict, method: str) -> list[str]:
    """The first lines of a results section: where and when it ran, then how it was measured."""
    return [provenance_line(meta), "", method]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def kernels_markdown(records: list[dict], meta: dict, heading_level: int = 3) -> str:
    """One table per op: both passes' times, forward+backward memory/throughput/ratios, checks."""
    out = _intro(
        meta,
        f"Preset `{meta.get('preset')}`: median of {meta.get('repeats')} calls after {meta.get('warmup')} "
        f"warm-up{_early_stop(meta)}; memory = {meta.get('memory_method')}. Ratios are "
        "implementation / synpo_kernels (above 1: ours is faster / smaller), forward+backward.",
    )
    notes: dict[str, int] = {}
    for op, title in OP_TITLES.items():
        recs = [r for r in records if r["op"] == op]
        if not recs:
            continue
        token_op = op == "token_logprobs"
        header = [
            "size",
            "implementation",
            "fwd",
            "fwd+bwd",
            "peak mem fwd+bwd",
            "without grads",
            "GB/s" if token_op else "TFLOP/s",
            "% of floor",
            "time vs ours",
            "mem vs ours",
            "check",
        ]
        rows = []
        keys = []
        for r in recs:
            key = (r["size"], r["impl"])
            if key not in keys:
                keys.append(key)
        by_key = {(r["size"], r["impl"], r["pass"]): r for r in recs}
        for size, impl in keys:
            fwd = by_key.get((size, impl, "fwd"))
            both = by_key.get((size, impl, "fwd+bwd"))
            ok = both is not None and both.get("status") == "ok"
            rate = both.get("achieved_gbps" if token_op else "achieved_tflops") if ok else None
            pct = both.get("pct_of_floor") if ok else None
            check = both.get("check", "-") if both else "-"
            for r in (fwd, both):
                if r is not None and r.get("status") != "ok" and r.get("reason"):
                    notes.setdefault(f"{impl}: {r['reason']}", len(notes) + 1)
            rows.append(
                [
                    size,
                    impl,
                    _status_cell(fwd),
                    _status_cell(both),
                    fmt_bytes(both.get("peak_bytes")) if ok else "-",
                    fmt_bytes(both.get("workspace_bytes")) if ok else "-",
                    "-" if rate is None else (f"{rate:.1f}" if token_op else f"{rate:.3g}"),
                    "-" if pct is None else f"{pct:.0f}%",
                    _ratio(both.get("time_vs_ours")) if ok else "-",
                    _ratio(both.get("memory_vs_ours")) if ok else "-",
                    check,
                ]
            )
        out += ["", f"{'#' * heading_level} {title}", "", _md_table(header, rows)]
    if notes:
        out += ["", "Not measured:"]
        out += [f"- {text}" for text in notes]
    return "\n".join(out)


def trainer_markdown(records: list[dict], meta: dict, heading_level: int = 3) -> str:
    """One table per model: steps/s, tokens/s, peak memory, and SynPO-fused vs DPO-reference."""
    out = _intro(
        meta,
        f"Preset `{meta.get('preset')}`: median step time of {meta.get('steps')} optimizer steps after "
        f"{meta.get('warmup_steps')} warm-up (forward, backward, clip, AdamW step)"
        f"{'; the methods timed in turn, step by step, in one process' if meta.get('interleaved') else ''}"
        f"; peak memory = {meta.get('memory_method')}.",
    )
    cases = list(dict.fromkeys(r.get("case", r["model"]) for r in records))
    for case in cases:
        recs = [r for r in records if r.get("case", r["model"]) == case]
        first = recs[0]
        out += [
            "",
            f"{'#' * heading_level} {case}: {first.get('model_description')}",
            "",
            f"Batch: {first.get('batch_description')}.",
            "",
        ]
        header = [
            "method",
            "step",
            "steps/s",
            "tokens/s",
            "peak memory",
            "step memory",
            "vs DPO+ref (time)",
            "status",
        ]
        rows = []
        for r in recs:
            ok = r.get("status") == "ok"
            rows.append(
                [
                    r["method"],
                    fmt_seconds(r.get("step_s")) if ok else "-",
                    f"{r['steps_per_s']:.3g}" if ok else "-",
                    f"{r['tokens_per_s']:.4g}" if ok else "-",
                    fmt_bytes(r.get("peak_bytes")) if ok else "-",
                    fmt_bytes(r.get("step_bytes")) if ok else "-",
                    _ratio(r.get("speedup_vs_dpo_reference")) if ok else "-",
                    "ok" if ok else f"{r.get('status')}: {r.get('reason')}",
                ]
            )
        out.append(_md_table(header, rows))
        summary = next((r for r in recs if r.get("synpo_fused_vs_dpo_reference")), None)
        if summary:
            s = summary["synpo_fused_vs_dpo_reference"]
            out += [
                "",
                f"SynPO fused vs DPO with reference (naive logits, as upstream): "
                f"**{s['speedup']:.2f}x** steps/s, peak memory {s['memory_ratio']:.2f}x "
                f"({fmt_bytes(s['synpo_peak_bytes'])} vs {fmt_bytes(s['dpo_peak_bytes'])}).",
            ]
        shared = next((r for r in recs if r.get("prefix_sharing_vs_unshared")), None)
        if shared:
            s = shared["prefix_sharing_vs_unshared"]
            out += [
                "",
                f"Prefix sharing: SynPO fused + shared vs SynPO fused: **{s['speedup']:.2f}x** steps/s "
                f"(token-count bound {s['token_bound']:.2f}x: {100 * s['fraction_of_bound']:.0f}% of it), "
                f"peak memory {s['memory_ratio']:.2f}x.",
            ]
        out += profile_markdown(recs)
    out += prefix_sharing_markdown(records)
    return "\n".join(out)


def _top_ops_cell(entries: list[dict] | None, n: int = 3) -> str:
    if not entries:
        return "-"
    cells = []
    for e in entries[:n]:
        name = e["name"] if len(e["name"]) <= 60 else e["name"][:57] + "..."
        cells.append(f"`{name}` {e['self_ms']:.3g} ms ({100 * e['share']:.0f}%, x{e['calls']})")
    return "; ".join(cells).replace("|", "\\|")


def profile_markdown(records: list[dict]) -> list[str]:
    """The profiled step of each method that has one (``--profile-top``): its top kernels and host
    operators by self time (none: [])."""
    rows = [
        [r["method"], _top_ops_cell(r["profile"].get("device")), _top_ops_cell(r["profile"].get("host"))]
        for r in records
        if r.get("profile")
    ]
    if not rows:
        return []
    return [
        "",
        "One more step per method under torch.profiler (`--profile-top`; not timed above): the entries with "
        "the most self time, their share of that side's total and call count; all of them in the JSON.",
        "",
        _md_table(["method", "GPU kernels", "host operators"], rows),
    ]


def prefix_sharing_markdown(records: list[dict]) -> list[str]:
    """One table over the cases that ran SynPO fused with and without prefix sharing (none: [])."""
    rows = []
    for r in records:
        s = r.get("prefix_sharing_vs_unshared")
        if not s:
            continue
        unshared_s = r["step_s"] * s["speedup"]
        vs_dpo = s.get("vs_dpo_reference")
        rows.append(
            [
                r["model"],
                str(r["pairs"]),
                str(r["prompt_positions"]) + (f" ({r['frames']} frames)" if r.get("frames") else ""),
                f"{r['chosen_tokens']}/{r['rejected_tokens']}",
                fmt_seconds(unshared_s),
                fmt_seconds(r["step_s"]),
                f"**{s['speedup']:.2f}x**",
                f"{s['token_bound']:.2f}x",
                f"{100 * s['fraction_of_bound']:.0f}%",
                f"{s['memory_ratio']:.2f}x",
                _ratio(vs_dpo) if vs_dpo else "-",
            ]
        )
    if not rows:
        return []
    header = [
        "model",
        "pairs",
        "prompt",
        "captions",
        "unshared step",
        "shared step",
        "speed-up",
        "token bound",
        "of bound",
        "peak memory (shared/unshared)",
        "shared vs DPO+ref naive",
    ]
    return [
        "",
        "Prefix sharing (SynPO fused + shared vs SynPO fused; token bound = 2(P+R)/(P+2R)):",
        "",
        _md_table(header, rows),
    ]
