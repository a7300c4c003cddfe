"""PNG charts from result files (matplotlib): time and memory vs size per implementation.

- ``kernels_<preset>_<op>.png``: per op, forward time, forward+backward time and forward+backward
  peak memory against the sizes of the sweep (log scale), one series per implementation; sizes
  where an implementation ran out of memory are marked with an ``x`` on the axis's upper edge.
- ``trainer_<preset>_prefix_sharing.png``: a prefix-sharing sweep's speed-up over prompt length;
- ``trainer_<preset>.png``: per model, step time, peak memory and the memory the step itself adds,
  for the four methods.
"""

from __future__ import annotations

from pathlib import Path

from synpo.benchmarking.common import load_results
from synpo.benchmarking.report import OP_TITLES

# One fixed colour and marker per implementation, so that charts compare across files.
STYLE = {
    "synpo_kernels": ("#d62728", "o"),
    "naive": ("#7f7f7f", "s"),
    "torch_compile": ("#1f77b4", "^"),
    "liger_ce": ("#2ca02c", "D"),
    "liger_flce": ("#2ca02c", "D"),
    "liger_simpo": ("#98df8a", "v"),
    "cce": ("#9467bd", "P"),
    "torch_lce": ("#ff7f0e", "X"),
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def kernel_charts(results_path: Path, out_dir: Path) -> list[Path]:
    data = load_results(results_path)
    records, meta = data["records"], data["meta"]
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for op, title in OP_TITLES.items():
        recs = [r for r in records if r["op"] == op]
        if not recs:
            continue
        sizes = list(dict.fromkeys(r["size"] for r in recs))
        impls = list(dict.fromkeys(r["impl"] for r in recs))
        panels = [
            ("fwd", "median_s", 1e3, "forward time (ms)"),
            ("fwd+bwd", "median_s", 1e3, "forward+backward time (ms)"),
            ("fwd+bwd", "peak_bytes", 1 / 2**20, "forward+backward peak memory (MiB)"),
        ]
        fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
        for ax, (pass_name, key, scale, ylabel) in zip(axes, panels):
            for impl in impls:
                xs, ys, oom_x = [], [], []
                for i, size in enumerate(sizes):
                    rec = next(
                        (
                            r
                            for r in recs
                            if r["size"] == size and r["impl"] == impl and r["pass"] == pass_name
                        ),
                        None,
                    )
                    if rec is None:
                        continue
                    if rec["status"] == "ok" and rec.get(key):
                        xs.append(i)
                        ys.append(rec[key] * scale)
                    elif rec["status"] == "oom":
                        oom_x.append(i)
                if not xs and not oom_x:
                    continue  # missing / unsupported / skipped: listed in the README table instead
                color, marker = STYLE.get(impl, ("black", "o"))
                ax.plot(xs, ys, marker=marker, color=color, label=impl, linewidth=1.5)
                if oom_x:
                    ax.plot(
                        oom_x, [1.0] * len(oom_x), "x", color=color, markersize=10, mew=2,
                        transform=ax.get_xaxis_transform(), clip_on=False,
                    )  # fmt: skip
            ax.set_yscale("log")
            ax.set_ylabel(ylabel)
            ax.set_xticks(range(len(sizes)))
            ax.set_xticklabels([_wrap(s) for s in sizes], rotation=30, ha="right", fontsize=7)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(
            f"{title} — {meta.get('device')} ({meta.get('preset')}, commit {meta.get('commit')})", fontsize=10
        )
        fig.tight_layout()
        path = out_dir / f"{Path(results_path).stem}_{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _wrap(label: str, width: int = 26) -> str:
    words, lines, line = label.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    lines.append(line)
    return "\n".join(lines)


def trainer_chart(results_path: Path, out_dir: Path) -> list[Path]:
    data = load_results(results_path)
    records, meta = data["records"], data["meta"]
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    models = list(dict.fromkeys(r.get("case", r["model"]) for r in records))
    fig, axes = plt.subplots(len(models), 3, figsize=(16, 3.6 * len(models)), squeeze=False)
    palette = ["#7f7f7f", "#1f77b4", "#17becf", "#ff7f0e", "#d62728", "#9467bd"]
    for row, model in enumerate(models):
        recs = [r for r in records if r.get("case", r["model"]) == model]
        names = [r["method"] for r in recs]
        colors = [palette[i % len(palette)] for i in range(len(recs))]
        for col, (key, scale, label) in enumerate(
            (
                ("step_s", 1e3, "step time (ms)"),
                ("peak_bytes", 1 / 2**30, "peak memory (GiB)"),
                ("step_bytes", 1 / 2**30, "memory added by the step (GiB)"),
            )
        ):
            ax = axes[row][col]
            values = [r[key] * scale if r["status"] == "ok" and r.get(key) else 0.0 for r in recs]
            bars = ax.bar(range(len(recs)), values, color=colors)
            for bar, rec in zip(bars, recs):
                text = f"{bar.get_height():.3g}" if rec["status"] == "ok" else rec["status"].upper()
                ax.annotate(
                    text,
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
            ax.set_xticks(range(len(recs)))
            ax.set_xticklabels([n.replace("_", "\n", 1) for n in names], fontsize=8)
            ax.set_ylabel(label)
            ax.set_title(f"{model}", fontsize=9)
            ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(
        f"trainer step — {meta.get('device')} ({meta.get('preset')}, commit {meta.get('commit')})",
        fontsize=10,
    )
    fig.tight_layout()
    path = out_dir / f"{Path(results_path).stem}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def prefix_sharing_chart(results_path: Path, out_dir: Path) -> list[Path]:
    """Speed-up of prefix sharing over prompt length, one line per (model, caption length), with the
    token-count bound dashed; ``[]`` when fewer than three cases measured it."""
    data = load_results(results_path)
    cases = [r for r in data["records"] if r.get("prefix_sharing_vs_unshared")]
    if len(cases) < 3:
        return []
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    series: dict[tuple, list[dict]] = {}
    for r in cases:
        series.setdefault((r["model"], r["pairs"], r["chosen_tokens"]), []).append(r)
    for i, ((model, pairs, chosen), recs) in enumerate(sorted(series.items())):
        recs.sort(key=lambda r: r["prompt_positions"])
        x = [r["prompt_positions"] for r in recs]
        color = f"C{i}"
        label = f"{model}, {pairs} pair(s), captions ~{chosen}"
        ax.plot(x, [r["prefix_sharing_vs_unshared"]["speedup"] for r in recs], "o-", color=color, label=label)
        ax.plot(
            x, [r["prefix_sharing_vs_unshared"]["token_bound"] for r in recs], "--", color=color, alpha=0.6
        )
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt/video positions per pair")
    ax.set_ylabel("steps/s, shared / unshared")
    ax.set_title(
        f"prefix sharing (dashed: token-count bound) — {data['meta'].get('device')}, "
        f"commit {data['meta'].get('commit')}",
        fontsize=9,
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / f"{Path(results_path).stem}_prefix_sharing.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def charts_for(results_path: Path, out_dir: Path) -> list[Path]:
    """Charts of one result file (its kind read from the file); a prefix-sharing sweep gets its line
    chart instead of the per-case bars."""
    kind = load_results(results_path).get("benchmark", "")
    if kind.startswith("kernels"):
        return kernel_charts(results_path, out_dir)
    if kind.startswith("trainer"):
        sweep = prefix_sharing_chart(results_path, out_dir)
        return sweep or trainer_chart(results_path, out_dir)
    return []
