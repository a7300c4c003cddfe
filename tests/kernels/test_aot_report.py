"""scripts/aot_report.py --quick: every Triton kernel compiles ahead of time for sm_90 and sm_80 with
the launchers' configurations, without spills (no GPU needed; Triton's bundled ptxas does the work)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNELS = {"_row_lse_kernel", "_row_grad_kernel", "_wgrad_kernel"}


def _ptxas() -> str | None:
    try:
        from triton import knobs

        path = knobs.nvidia.ptxas.path
    except Exception:  # no triton, or no nvidia backend in it
        return None
    return path if path and os.access(path, os.X_OK) else None


@pytest.mark.skipif(_ptxas() is None, reason="needs triton's nvidia backend with its bundled ptxas")
def test_quick_report_compiles_every_kernel_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "aot_report.py"), "--quick", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    rows = [r for r in json.loads(out.read_text()) if r["source"] == "triton"]
    assert {(r["kernel"], r["arch"]) for r in rows} == {(k, a) for k in KERNELS for a in ("sm_90", "sm_80")}
    for r in rows:
        assert "error" not in r, r
        assert r["spill_st"] == 0 and r["spill_ld"] == 0, r
        assert f"| {r['kernel']} | {r['arch']} | bf16 | 152064 |" in res.stdout
