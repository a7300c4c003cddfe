"""``synpo plot``: a run's metrics.jsonl drawn to a PNG, and its errors."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys

import pytest

from synpo.cli import main
from synpo.plot_cli import DPI, PANEL_INCHES, ema


def _train_row(step: int) -> dict:
    """A row with the keys synpo train's ``_metrics_row`` writes (values shaped like a real run)."""
    t = step / 40
    return {
        "step": step,
        "epoch": (step - 1) // 20,
        "loss": -0.5 - 0.1 * t + 0.01 * math.sin(step),
        "chosen_logps": -6.3 + 0.5 * t,
        "rejected_logps": -6.3 - 0.2 * t,
        "reward_margin": 0.001 * t,
        "chosen_mean_prob": 0.0018 + 0.001 * t,
        "grad_norm": 0.02 + 0.005 * math.cos(step),
        "lr": 0.002 * (1 - t),
        "pairs": 4,
        "tokens": 1600,
        "tokens_per_s": 12000.0,
        "step_time_s": 0.13,
        "peak_memory_mb": 495.4,
        "skipped_batches": 0,
        "skipped_in_step": 0,
    }


def _write(path, rows, extra_lines=()):
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def _expected(cols: int, rows: int) -> tuple[int, int]:
    return round(PANEL_INCHES[0] * cols * DPI), round(PANEL_INCHES[1] * rows * DPI)


def test_plots_a_run_dir_to_training_curves_png(tmp_path, capsys):
    _write(tmp_path / "metrics.jsonl", [_train_row(s) for s in range(1, 41)])
    assert main(["plot", str(tmp_path)]) == 0
    out = tmp_path / "training_curves.png"
    assert capsys.readouterr().out.strip() == str(out)
    assert out.stat().st_size > 20_000
    assert _png_size(out) == _expected(2, 2)  # loss, log-probs, margin, lr + grad norm


def test_eval_rows_and_a_bad_line(tmp_path, capsys):
    rows = [_train_row(s) for s in range(1, 41)]
    rows += [
        {"step": s, "eval_loss": -0.55, "eval_reward_accuracy": 0.7, "eval_seconds": 2.0} for s in (20, 40)
    ]
    metrics = tmp_path / "logs" / "m.jsonl"
    metrics.parent.mkdir()
    _write(metrics, rows[:5], ['{"step": 6, "loss": ', *(json.dumps(r) for r in rows[5:])])
    out = tmp_path / "png" / "curves.png"
    assert main(["plot", str(tmp_path), "--metrics", str(metrics), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert "warning: skipped 1 invalid line(s)" in captured.err and "line 6 (not JSON" in captured.err
    assert out.stat().st_size > 20_000
    # eval_seconds has no training series: a fifth panel, on a third row
    assert _png_size(out) == _expected(2, 3)


def test_panels_without_keys_are_left_out(tmp_path):
    _write(tmp_path / "metrics.jsonl", [{"step": s, "loss": 1.0 / s} for s in range(1, 6)])
    assert main(["plot", str(tmp_path)]) == 0
    out = tmp_path / "training_curves.png"
    assert out.stat().st_size > 5_000
    assert _png_size(out) == _expected(1, 1)


@pytest.mark.parametrize(
    "setup, message",
    [
        ("no_dir", "no run directory"),
        ("no_file", "no metrics file"),
        ("empty", "is empty"),
        ("all_bad", "has no valid row: line 1 (not JSON"),
    ],
)
def test_errors_exit_2_with_a_message(tmp_path, capsys, setup, message):
    run_dir = tmp_path / "run"
    if setup != "no_dir":
        run_dir.mkdir()
    if setup == "empty":
        (run_dir / "metrics.jsonl").write_text("\n")
    if setup == "all_bad":
        (run_dir / "metrics.jsonl").write_text('{"step": 1, \n[1, 2]\n')
    assert main(["plot", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("synpo plot: error: ") and message in err
    assert not (run_dir / "training_curves.png").exists()


def test_ema_is_debiased():
    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert ema([0.0, 1.0], 0.5) == pytest.approx([0.0, 2 / 3])


def test_the_command_imports_neither_torch_nor_matplotlib_until_it_draws(tmp_path):
    code = (
        "import sys\n"
        "from synpo.cli import build_parser\n"
        "build_parser().parse_args(['plot', 'x'])\n"
        "assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules, 'imported at start-up'\n"
        "from synpo.cli import main\n"
        f"assert main(['plot', {str(tmp_path)!r}]) == 0\n"
        "assert 'torch' not in sys.modules, 'synpo plot imported torch'\n"
    )
    _write(tmp_path / "metrics.jsonl", [_train_row(s) for s in range(1, 4)])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_without_matplotlib_says_what_to_install(tmp_path, capsys, monkeypatch):
    _write(tmp_path / "metrics.jsonl", [_train_row(1)])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert main(["plot", str(tmp_path)]) == 2
    assert "needs matplotlib: pip install matplotlib (the clone's bench extra)" in capsys.readouterr().err


def test_accuracy_axis_spans_zero_to_one_for_a_constant_accuracy(tmp_path, monkeypatch):
    """A constant reward accuracy of 1 (a tiny run learns its pairs at once) is drawn at the top of
    [0, 1], not as a flat line in the middle of an axis from 0.96 to 1.04 (issue 23)."""
    import matplotlib.pyplot as plt

    from synpo.plot_cli import plot_metrics

    figures = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    rows = [{**_train_row(s), "reward_accuracy": 1.0} for s in range(1, 21)]
    plot_metrics(rows, tmp_path / "curves.png", "run")
    (fig,) = figures
    (accuracy,) = [ax for ax in fig.axes if ax.get_ylabel() == "accuracy"]
    low, high = accuracy.get_ylim()
    assert low < 0.0 < 1.0 < high < 1.1
    (margin,) = [ax for ax in fig.axes if ax.get_ylabel() == "reward margin"]
    assert margin.get_ylim()[1] < 0.01  # the left axis keeps its autoscaled range
    real_close(fig)
