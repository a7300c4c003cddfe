"""``synpo plot``: draw a training run's curves (its metrics.jsonl) to one PNG.

    synpo plot runs/synpo-tiny                        # -> runs/synpo-tiny/training_curves.png
    synpo plot runs/synpo-tiny --out curves.png
    synpo plot runs/synpo-tiny --metrics runs/synpo-tiny/other.jsonl

Panels, each left out when none of its keys is in the file: loss; chosen vs rejected log-probs;
reward margin (and reward accuracy, right axis); learning rate (and gradient norm, right axis).
x axis: optimizer step. Noisy series are drawn faint with an exponential moving average over them;
``eval_*`` values (evaluation rows) are markers on the panel of their training series, and
``eval_*`` keys without one get a panel of their own. Invalid lines are skipped with a warning.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import NamedTuple

from synpo.cli import add_group_parser
from synpo.config import json_error_text

__all__ = ["add_parser", "ema", "load_metrics", "plot_metrics", "run"]

DEFAULT_NAME = "training_curves.png"
PANEL_INCHES = (6.4, 3.6)  # per panel; two panels a row
DPI = 100
MIN_POINTS_TO_SMOOTH = 10  # fewer points are drawn as they are


class Series(NamedTuple):
    key: str
    label: str
    color: str
    smooth: bool = True


class Panel(NamedTuple):
    title: str
    ylabel: str
    left: tuple[Series, ...]
    right: tuple[Series, ...] = ()
    right_ylabel: str = ""  # also added to the title (" and ...") when the right axis is drawn
    # The right axis's full range when its values are bounded (a fraction: 0 to 1), so that a constant
    # accuracy of 1 is drawn at the top of [0, 1], not in the middle of an axis from 0.96 to 1.04.
    right_range: tuple[float, float] | None = None


PANELS = (
    Panel("loss", "loss", (Series("loss", "loss", "#1f77b4"),)),
    Panel(
        "log-probs (mean per token)",
        "log-prob",
        (Series("chosen_logps", "chosen", "#2ca02c"), Series("rejected_logps", "rejected", "#d62728")),
    ),
    Panel(
        "reward margin",
        "reward margin",
        (Series("reward_margin", "margin", "#9467bd"),),
        (Series("reward_accuracy", "accuracy", "#ff7f0e"),),
        "accuracy",
        (0.0, 1.0),
    ),
    Panel(
        "learning rate",
        "learning rate",
        (Series("lr", "lr", "#17becf", smooth=False),),
        (Series("grad_norm", "grad norm (before clipping)", "#7f7f7f"),),
        "gradient norm",
    ),
)


class MetricsError(Exception):
    """A metrics file that cannot be plotted (missing, unreadable, empty or without a valid row)."""


def load_metrics(path: Path) -> tuple[list[dict], list[tuple[int, str]]]:
    """The JSON-object rows with a numeric ``step``, and ``(line number, why)`` for each invalid
    non-blank line. Raises :class:`MetricsError` when the file is missing, unreadable, empty or has
    no valid row."""
    if not path.is_file():
        raise MetricsError(f"no metrics file {path}" + (" (a directory)" if path.is_dir() else ""))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MetricsError(f"cannot read {path}: {exc}") from exc
    rows, bad = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.append((number, f"not JSON: {json_error_text(exc)}"))
            continue
        if not isinstance(row, dict):
            bad.append((number, "not a JSON object"))
        elif _number(row.get("step")) is None:
            bad.append((number, "no numeric 'step'"))
        else:
            rows.append(row)
    if not rows:
        if not bad:
            raise MetricsError(f"{path} is empty: no rows to plot")
        raise MetricsError(f"{path} has no valid row: {_describe(bad)}")
    return rows, bad


def _describe(bad: list[tuple[int, str]], most: int = 5) -> str:
    text = ", ".join(f"line {n} ({why})" for n, why in bad[:most])
    return text + (f" and {len(bad) - most} more" if len(bad) > most else "")


def _number(value) -> float | None:
    """``value`` as a finite float; None for anything else (bools, strings, NaN, null)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key``, sorted by step; a step logged twice keeps its last value."""
    by_step = {}
    for row in rows:
        value = _number(row.get(key))
        if value is not None:
            by_step[float(row["step"])] = value
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def ema(values: list[float], weight: float) -> list[float]:
    """Exponential moving average, debiased (as TensorBoard's smoothing) so it starts at the data."""
    out, acc, norm = [], 0.0, 0.0
    for v in values:
        acc = weight * acc + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(acc / norm)
    return out


def _auto_weight(n: int) -> float:
    """An EMA weight whose window (1 / (1 - weight)) is about n / 25 points, between 2 and 50."""
    window = min(50.0, max(2.0, n / 25))
    return 1 - 1 / window


def _present(rows: list[dict], series: tuple[Series, ...]) -> bool:
    """Whether any row has a number for one of ``series`` or its ``eval_`` counterpart."""
    keys = {k for s in series for k in (s.key, f"eval_{s.key}")}
    return any(_number(row.get(k)) is not None for row in rows for k in keys)


def plot_metrics(rows: list[dict], out: Path, title: str, smoothing: float | None = None) -> Path:
    """Draw the panels of ``rows`` to ``out`` (PNG, PANEL_INCHES * DPI pixels a panel, two panels a
    row). ``smoothing``: the EMA weight in [0, 1); 0 draws no smoothed line; None picks one per series."""
    known = {s.key for p in PANELS for s in p.left + p.right}
    panels = [p for p in PANELS if _present(rows, p.left + p.right)]
    extra_eval = sorted(
        {
            k
            for row in rows
            for k in row
            if k.startswith("eval_") and k[5:] not in known and _number(row[k]) is not None
        }
    )
    if extra_eval:
        panels.append(
            Panel(
                "evaluation",
                "value",
                tuple(Series(k, k, f"C{i % 10}", False) for i, k in enumerate(extra_eval)),
            )
        )
    if not panels:
        raise MetricsError(f"no series to plot (keys known: {', '.join(sorted(known))}, eval_*)")

    from synpo.benchmarking.plots import _pyplot

    plt = _pyplot()
    ncols = 1 if len(panels) == 1 else 2
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(PANEL_INCHES[0] * ncols, PANEL_INCHES[1] * nrows), dpi=DPI, squeeze=False
    )
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(panels) :]:
        ax.remove()
    epoch_starts = _epoch_starts(rows)
    for ax, panel in zip(flat, panels):
        handles = _draw(ax, panel.left, rows, smoothing)
        ax.set_ylabel(panel.ylabel)
        heading, top = panel.title, ax
        if _present(rows, panel.right):
            top = ax.twinx()
            handles += _draw(top, panel.right, rows, smoothing, linestyle="--")
            top.set_ylabel(panel.right_ylabel)
            if panel.right_range is not None:
                low, high = panel.right_range
                pad = 0.05 * (high - low)
                top.set_ylim(low - pad, high + pad)
            heading += f" and {panel.right_ylabel}"
        for step in epoch_starts:
            ax.axvline(step, color="black", linewidth=0.6, linestyle=":", alpha=0.5)
        ax.set_title(heading, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(True, alpha=0.3)
        if handles:  # on the top axes, so that the right axis's lines do not cover it
            top.legend(handles=handles, fontsize=8, loc=_emptiest_corner(ax, top))
    steps = _series(rows, "step")[0]
    fig.suptitle(f"{title}: steps {steps[0]:g} to {steps[-1]:g}" + _epochs_note(epoch_starts), fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out, dpi=DPI)
    finally:
        plt.close(fig)
    return out


def _draw(ax, series, rows, smoothing, linestyle="-") -> list:
    """Plot each series (and its ``eval_`` counterpart as markers) on ``ax``; the legend handles."""
    handles = []
    for s in series:
        xs, ys = _series(rows, s.key)
        if xs:
            weight = _auto_weight(len(xs)) if smoothing is None else smoothing
            smoothed = s.smooth and weight > 0 and len(xs) >= MIN_POINTS_TO_SMOOTH
            if smoothed:
                ax.plot(xs, ys, color=s.color, linewidth=0.8, alpha=0.3, linestyle=linestyle)
                handles += ax.plot(
                    xs, ema(ys, weight), color=s.color, linewidth=1.8, linestyle=linestyle,
                    label=f"{s.label} (EMA {weight:.2g})",
                )  # fmt: skip
            else:
                handles += ax.plot(
                    xs, ys, color=s.color, linewidth=1.5, linestyle=linestyle, label=s.label,
                    marker="." if len(xs) <= 50 else None,
                )  # fmt: skip
        ex, ey = _series(rows, f"eval_{s.key}")
        if ex:
            handles += ax.plot(
                ex, ey, linestyle="none", marker="D", markersize=5, markerfacecolor=s.color,
                markeredgecolor="black", label=f"eval {s.label}",
            )  # fmt: skip
    return handles


def _emptiest_corner(ax, top) -> str:
    """The legend corner of ``ax`` with the fewest data points of ``ax`` and its twin ``top`` (matplotlib's
    ``loc="best"`` sees only the lines of the axes the legend is on)."""
    if top is ax:
        return "best"
    for axes in (ax, top):
        axes.get_xlim(), axes.get_ylim()  # settles the autoscaled limits
    to_fraction = ax.transAxes.inverted()
    points = [
        xy
        for axes in (ax, top)
        for line in axes.get_lines()
        # a few points along each segment too, so that a sparse line counts where it passes
        for xy in to_fraction.transform(
            line.get_transform().transform_path(line.get_path().interpolated(8)).vertices
        )
    ]
    corners = {  # loc: (x range, y range) in axes fractions; ties go to the first
        "upper right": ((0.5, 1.0), (0.6, 1.0)),
        "upper left": ((0.0, 0.5), (0.6, 1.0)),
        "lower left": ((0.0, 0.5), (0.0, 0.4)),
        "lower right": ((0.5, 1.0), (0.0, 0.4)),
    }
    return min(
        corners,
        key=lambda loc: sum(
            corners[loc][0][0] <= x <= corners[loc][0][1] and corners[loc][1][0] <= y <= corners[loc][1][1]
            for x, y in points
        ),
    )


def _epoch_starts(rows: list[dict]) -> list[float]:
    """Steps where a new epoch begins (none for a single epoch, or more than 40 of them)."""
    starts, last = [], None
    for row in sorted((r for r in rows if _number(r.get("epoch")) is not None), key=lambda r: r["step"]):
        if last is not None and row["epoch"] != last:
            starts.append(float(row["step"]))
        last = row["epoch"]
    return starts if len(starts) <= 40 else []


def _epochs_note(starts: list[float]) -> str:
    return f" ({len(starts) + 1} epochs, dotted lines)" if starts else ""


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / DEFAULT_NAME
    try:
        if not (args.metrics and args.out) and not run_dir.is_dir():
            raise MetricsError(f"no run directory {run_dir}")
        metrics = Path(args.metrics) if args.metrics else run_dir / "metrics.jsonl"
        if args.smoothing is not None and not 0 <= args.smoothing < 1:
            raise MetricsError(f"--smoothing must be in [0, 1), got {args.smoothing}")
        rows, bad = load_metrics(metrics)
        if bad:
            print(
                f"synpo plot: warning: skipped {len(bad)} invalid line(s) of {metrics}: {_describe(bad)}",
                file=sys.stderr,
            )
        plot_metrics(rows, out, title=run_dir.name or str(run_dir), smoothing=args.smoothing)
    except MetricsError as exc:
        print(f"synpo plot: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name != "matplotlib":
            raise
        print(
            "synpo plot: error: needs matplotlib: pip install matplotlib (the clone's bench extra)",
            file=sys.stderr,
        )
        return 2
    except OSError as exc:
        print(f"synpo plot: error: cannot write {out}: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    # matplotlib is imported only when a chart is drawn: the CLI's start-up stays fast.
    parser = add_group_parser(subparsers, __name__)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run's output_dir (holds metrics.jsonl)")
    parser.add_argument("--out", metavar="PATH", help=f"the PNG to write (default: RUN_DIR/{DEFAULT_NAME})")
    parser.add_argument("--metrics", metavar="FILE", help="the metrics file (default: RUN_DIR/metrics.jsonl)")
    parser.add_argument(
        "--smoothing",
        metavar="W",
        type=float,
        help="EMA weight in [0, 1) for noisy series; 0 draws none (default: from the number of steps)",
    )
    parser.set_defaults(func=run)
    return parser
