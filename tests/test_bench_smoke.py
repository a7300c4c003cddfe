"""``synpo bench kernels`` / ``synpo bench trainer`` at their smoke size, end to end (what CI runs),
plus the pieces around them: result files, charts, the README section, the scaling projection,
and the sweep's handling of failures, missing peers and sizes that do not fit."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from synpo.benchmarking import common, kernels, report, runner, scaling, trainer

ROOT = Path(__file__).resolve().parents[1]


def _smoke(benchmark: str, tmp_path_factory) -> tuple[Path, str]:
    """Run a smoke preset as a user would, without --output-dir: its results go to ./runs/bench-smoke,
    not into the checkout's tracked benchmarks/results/ (issue 23)."""
    cwd = tmp_path_factory.mktemp("bench")
    tracked = ROOT / "benchmarks" / "results" / f"{benchmark}_smoke.json"
    before = tracked.stat().st_mtime_ns if tracked.exists() else None
    env = {k: v for k, v in os.environ.items() if k != common.RESULTS_ENV}
    proc = subprocess.run(
        [sys.executable, "-m", "synpo", "bench", benchmark, "--preset", "smoke"],
        cwd=cwd,
        env={**env, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = cwd / common.SMOKE_RESULTS_DIR
    assert f"results: {out / f'{benchmark}_smoke.json'}" in proc.stdout
    assert (tracked.stat().st_mtime_ns if tracked.exists() else None) == before
    return out, proc.stdout


@pytest.fixture(scope="module")
def kernels_smoke(tmp_path_factory):
    return _smoke("kernels", tmp_path_factory)


@pytest.fixture(scope="module")
def trainer_smoke(tmp_path_factory):
    return _smoke("trainer", tmp_path_factory)


def test_kernels_smoke_writes_results_and_reports_every_implementation(kernels_smoke):
    out, stdout = kernels_smoke
    data = json.loads((out / "kernels_smoke.json").read_text())
    meta, records = data["meta"], data["records"]
    for key in ("device", "torch", "triton", "commit", "date", "gemm_rate_flops_per_s"):
        assert meta.get(key), key
    by = {(r["op"], r["impl"], r["pass"]): r for r in records}
    for op in kernels.OPS:
        for impl in (kernels.OURS, "naive"):
            for pass_name in kernels.PASSES:
                rec = by[(op, impl, pass_name)]
                assert rec["status"] == "ok", rec
                assert rec["median_s"] > 0 and rec["peak_bytes"] is not None
        # every implementation of the op is listed, run or not (settings of ours only when asked for)
        assert {r["impl"] for r in records if r["op"] == op} == {
            name for name, impl in kernels.IMPLEMENTATIONS.items() if op in impl.ops and not impl.opt_in
        }
        assert by[(op, "naive", "fwd+bwd")]["check"] == "ok"
        assert by[(op, kernels.OURS, "fwd+bwd")]["time_vs_ours"] == pytest.approx(1.0)
    linear = by[("synpo_loss", kernels.OURS, "fwd+bwd")]
    assert linear["useful_flops"] == 6 * linear["tokens"] * linear["hidden"] * linear["vocab"]
    assert linear["achieved_tflops"] > 0 and linear["pct_of_floor"] > 0
    # Triton-only peers cannot run on CPU; they stay visible with the reason.
    cce = by[("synpo_loss", "cce", "fwd+bwd")]
    assert cce["status"] in ("unsupported", "missing") and cce["reason"]
    assert by[("synpo_loss", "torch_compile", "fwd")]["status"] == "skipped"
    with open(out / "kernels_smoke.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records)
    assert {"device", "torch", "commit", "date", "impl", "pass", "median_s", "peak_bytes"} <= set(rows[0])
    assert "fused lm_head -> SynPO loss" in stdout and "| synpo_kernels |" in stdout


def test_trainer_smoke_measures_all_methods_and_the_ratio(trainer_smoke):
    out, stdout = trainer_smoke
    data = json.loads((out / "trainer_smoke.json").read_text())
    records = {r["method"]: r for r in data["records"]}
    assert set(records) == set(trainer.METHODS)
    for rec in records.values():
        assert rec["status"] == "ok", rec
        assert rec["steps_per_s"] > 0 and rec["tokens_per_s"] > 0 and rec["peak_bytes"] > 0
    summary = records["synpo_fused"]["synpo_fused_vs_dpo_reference"]
    assert summary["speedup"] > 0 and summary["memory_ratio"] > 0
    assert "SynPO fused vs DPO with reference" in stdout
    # Prefix sharing: computed on fewer tokens (the prompt once), tokens/s still counts the pairs'.
    shared = records["synpo_fused_shared"]["prefix_sharing_vs_unshared"]
    assert shared["speedup"] > 0 and shared["token_bound"] == pytest.approx(2 * (96 + 28) / (96 + 56))
    assert records["synpo_fused_shared"]["tokens_per_step"] == records["synpo_fused"]["tokens_per_step"]
    assert "Prefix sharing: SynPO fused + shared vs SynPO fused" in stdout
    assert (out / "trainer_smoke.csv").is_file()


def test_charts_and_readme_section_from_smoke_results(kernels_smoke, trainer_smoke, tmp_path):
    pytest.importorskip("matplotlib")
    from synpo.benchmarking import plots

    pngs = plots.charts_for(kernels_smoke[0] / "kernels_smoke.json", tmp_path)
    pngs += plots.charts_for(trainer_smoke[0] / "trainer_smoke.json", tmp_path)
    assert len(pngs) == len(kernels.OPS) + 1
    assert all(p.stat().st_size > 10_000 for p in pngs)


def test_plot_script_writes_next_to_its_input_not_over_committed_charts(trainer_smoke, tmp_path):
    pytest.importorskip("matplotlib")
    other = tmp_path / "other.json"
    other.write_text((trainer_smoke[0] / "trainer_smoke.json").read_text())
    committed = ROOT / "benchmarks" / "results" / "plots"
    before = {p: p.stat().st_mtime_ns for p in committed.glob("*.png")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "plot.py"), str(other)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "plots" / "other.png").stat().st_size > 10_000
    assert {p: p.stat().st_mtime_ns for p in committed.glob("*.png")} == before


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_markers_are_added_once_and_only_their_content_changes():
    update = _load_script("update_readme_results")
    text = "# x\n\nintro\n\n## Development\n\nrest\n"
    with_section = update.with_bench_section(text)
    assert with_section.count("<!-- bench:start -->") == 1
    assert with_section.index("## Benchmarks") < with_section.index("## Development")
    assert update.with_bench_section(with_section) == with_section
    replaced = update.replace_between(with_section, update.BENCH_MARKERS, "TABLE", "README")
    assert replaced.replace("TABLE\n", "") == with_section
    again = update.replace_between(replaced, update.BENCH_MARKERS, "NEW", "README")
    assert "TABLE" not in again and "NEW" in again and again.endswith("rest\n")


def test_sizes_that_do_not_fit_are_recorded_as_oom_and_the_sweep_goes_on():
    preset = kernels.PRESETS["smoke"]
    tasks, settled = kernels.plan_tasks(preset, "cpu", None, None, max_memory=1)
    assert not tasks  # nothing fits in one byte; every run is settled without running
    statuses = {(c.op, impl): res["status"] for c, impl, _p, res in settled}
    assert statuses[("synpo_loss", "naive")] == "oom"
    assert statuses[("synpo_loss", "cce")] in ("unsupported", "missing")
    records = kernels.build_records(preset, [], [], settled, {}, "rss")
    assert {r["status"] for r in records} >= {"oom", "skipped"}
    assert "OOM" in report.kernels_markdown(records, {"preset": "smoke"})


def test_a_failing_run_is_recorded_and_the_next_one_still_runs():
    case = kernels.PRESETS["smoke"].cases[0]
    good = {"kind": "case", "group": "g", "case": kernels.asdict(case), "impl": "naive", "passes": ["fwd"]}
    bad = {**good, "impl": "no_such_impl"}
    # A failure that names a sticky CUDA error ends that worker; a fresh one runs the rest.
    sticky = {**good, "impl": "CUDA error: an illegal memory access was encountered"}
    settings = {
        "device": "cpu",
        "warmup": 0,
        "repeats": 1,
        "threads": 1,
        "rates": {"dtype": "float32", "gemm_size": 64, "copy_bytes": 1 << 16},
    }
    results = runner.run_tasks(
        "kernels", [bad, sticky, good], settings=settings, isolation="none", timeout_s=120
    )
    assert results[0]["status"] == "failed" and "no_such_impl" in results[0]["reason"]
    assert results[1]["status"] == "failed" and "illegal memory access" in results[1]["reason"]
    assert results[2]["status"] == "ok" and results[2]["passes"]["fwd"]["status"] == "ok"


def test_cpu_large_preset_runs_ours_and_naive_at_the_larger_shapes_each_in_a_fresh_process():
    preset = kernels.PRESETS["cpu-large"]
    assert preset.isolation == "task"  # per-process peak RSS
    tasks, settled = kernels.plan_tasks(preset, "cpu", None, None, None)
    assert {t["impl"] for t in tasks} == {kernels.OURS, "naive"}
    sizes = {kernels.Case(**t["case"]).label for t in tasks}
    assert "n=4096 V=32000 fp32" in sizes
    assert "2B=16 T=257 prompt=1 (n=4096) D=1024 V=32768 fp32" in sizes
    assert "video 2B=4 T=2304 prompt=2048 (n=1024) D=512 V=16384 fp32" in sizes
    assert all(res["status"] in ("skipped", "unsupported", "missing") for *_c, res in settled)


def test_settings_of_ours_run_only_when_named():
    preset = kernels.PRESETS["smoke"]
    tasks, settled = kernels.plan_tasks(preset, "cpu", ["synpo_loss"], None, None)
    assert not {t["impl"] for t in tasks} & {"synpo_kernels_fp32acc", "synpo_kernels_torch"}
    assert not {impl for _c, impl, _p, _r in settled} & {"synpo_kernels_fp32acc", "synpo_kernels_torch"}
    named = [kernels.OURS, "synpo_kernels_fp32acc", "synpo_kernels_torch"]
    tasks, _settled = kernels.plan_tasks(preset, "cpu", ["synpo_loss"], named, None)
    assert {t["impl"] for t in tasks} == set(named)
    case = kernels.Case(**tasks[0]["case"])
    inputs = kernels.make_inputs(case, "cpu", requires_grad=True)
    losses = {
        name: kernels._call(kernels.build_impl(name, case.op, {})[0], inputs, "fwd+bwd").detach().item()
        for name in named
    }
    assert losses["synpo_kernels_fp32acc"] == pytest.approx(losses[kernels.OURS], rel=1e-5)
    assert losses["synpo_kernels_torch"] == pytest.approx(losses[kernels.OURS], rel=1e-5)


def test_interleaved_trainer_steps_time_every_method_in_one_process():
    spec, batch = trainer.PRESETS["smoke"].models[0]
    task = {"group": spec.name, "model": kernels.asdict(spec), "batch": kernels.asdict(batch)}
    task["methods"] = [trainer.BASELINE, trainer.OURS]
    settings = {"device": "cpu", "warmup_steps": 1, "steps": 2, "autocast_bf16": False, "threads": None}
    result = trainer.run_task(task, settings, {})
    assert set(result["methods"]) == {trainer.BASELINE, trainer.OURS}
    tasks, results = trainer.per_method([task], [result])
    records = trainer.build_records(trainer.PRESETS["smoke"], tasks, results, "rss")
    assert [r["method"] for r in records] == [trainer.BASELINE, trainer.OURS]
    assert all(r["status"] == "ok" and len(r["times_s"]) == 2 and r["peak_bytes"] > 0 for r in records)
    assert records[1]["synpo_fused_vs_dpo_reference"]["speedup"] > 0
    assert "timed in turn" in report.trainer_markdown(records, {"interleaved": True})


def test_profiled_step_names_where_the_time_goes():
    """``--profile-top``: one more step per method under torch.profiler, after the timed ones; its top
    host operators by self time go into the record and the report, the timing stays as measured."""
    spec, batch = trainer.PRESETS["smoke"].models[0]
    task = {"group": spec.name, "model": kernels.asdict(spec), "batch": kernels.asdict(batch)}
    task["methods"] = [trainer.OURS]
    settings = {"device": "cpu", "warmup_steps": 1, "steps": 2, "autocast_bf16": False, "threads": None}
    result = trainer.run_task(task, {**settings, "profile_top": 4}, {})
    tasks, results = trainer.per_method([task], [result])
    (record,) = trainer.build_records(trainer.PRESETS["smoke"], tasks, results, "rss")
    assert record["status"] == "ok" and len(record["times_s"]) == 2
    host = record["profile"]["host"]
    assert "device" not in record["profile"] and 1 <= len(host) <= 4
    assert all(e["self_ms"] > 0 and e["calls"] >= 1 and 0 < e["share"] <= 1 for e in host)
    assert [e["self_ms"] for e in host] == sorted((e["self_ms"] for e in host), reverse=True)
    assert sum(e["share"] for e in host) <= 1 + 1e-9
    assert any(e["name"] == "aten::mm" for e in host)  # the step's GEMMs are among the top four
    text = report.trainer_markdown([record], {})
    assert "| method | GPU kernels | host operators |" in text and f"`{host[0]['name']}`" in text
    # Without the option: no profile, no table.
    plain = trainer.run_task(task, settings, {})["methods"][trainer.OURS]
    assert "profile" not in plain


def test_prefix_sharing_sweep_builds_each_size_once_and_charts_the_speedups(tmp_path):
    """A sweep's cases share one model in one process; each case gets its own batches (shared and
    not), and the report and chart read the speed-up against the token-count bound."""
    pytest.importorskip("matplotlib")
    import dataclasses

    from synpo.benchmarking import plots

    preset = trainer.PRESETS["prefix-sweep"]
    spec = trainer.MODELS["tiny"]
    sizes = [trainer.BatchSpec(pairs=1, prompt=p, chosen=12, rejected=10) for p in (4, 16, 40)]
    preset = dataclasses.replace(preset, models=tuple((spec, b) for b in sizes))
    settings = {"device": "cpu", "warmup_steps": 0, "steps": 1, "autocast_bf16": False, "threads": None}
    context, tasks, results = {}, [], []
    for batch in sizes:
        task = {"group": spec.name, "model": kernels.asdict(spec), "batch": kernels.asdict(batch)}
        task["methods"] = list(preset.methods)
        results.append(trainer.run_task(task, settings, context))
        tasks.append(task)
        assert context["batches"][True]["input_ids"].shape[1] == batch.prompt + 22  # one shared row
        assert context["batches"][False]["input_ids"].shape == (2, batch.prompt + 12)
    records = trainer.build_records(preset, *trainer.per_method(tasks, results), "rss")
    shared = [r for r in records if r.get("prefix_sharing_vs_unshared")]
    assert [r["prompt_positions"] for r in shared] == [4, 16, 40]
    table = report.trainer_markdown(records, {"interleaved": True})
    assert table.count("| tiny | 1 |") == 3 and "token bound" in table
    data = {"benchmark": "trainer", "meta": {"device": "cpu", "commit": "x"}, "records": records}
    path = tmp_path / "trainer_prefix-sweep.json"
    path.write_text(json.dumps(data))
    (png,) = plots.charts_for(path, tmp_path)
    assert png.name == "trainer_prefix-sweep_prefix_sharing.png" and png.stat().st_size > 10_000


def test_worker_env_settings_are_added_to_the_cpu_defaults():
    env = common.worker_env("cpu", ["THP_MEM_ALLOC_ENABLE=1"])
    assert env["THP_MEM_ALLOC_ENABLE"] == "1" and "MALLOC_MMAP_THRESHOLD_" in env
    assert common.worker_env("cuda", None) is None
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        common.worker_env("cpu", ["THP_MEM_ALLOC_ENABLE"])


def test_out_of_memory_errors_are_recognised():
    import torch

    assert common.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert common.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"))
    assert not common.is_out_of_memory(RuntimeError("shape mismatch"))


def test_peak_memory_sees_an_allocation_inside_the_block():
    import torch

    with common.PeakMemory("cpu") as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    if mem.exact:
        assert 48 * 2**20 < mem.peak_bytes < 512 * 2**20


def test_scaling_projection_without_gpu_results_is_labelled_estimated(tmp_path):
    proj = scaling.projection(tmp_path / "missing.json")
    assert proj["sources"] == ["estimated"]
    rows = {r["gpus"]: r for r in proj["rows"]}
    assert rows[1]["synpo_fused"]["comm_bytes"] == 0
    # DPO gathers the parameters three times per step, SynPO twice (LoRA gradients are small).
    ratio = rows[8]["dpo_reference_naive"]["comm_bytes"] / rows[8]["synpo_fused"]["comm_bytes"]
    assert 1.45 < ratio < 1.5
    text = scaling.markdown(proj)
    assert "estimated" in text and "| 64 |" in text


def test_readme_benchmark_section_is_generated_from_the_committed_results():
    """The README table is never typed by hand: regenerating it from benchmarks/results changes
    nothing (after new results: python scripts/update_readme_results.py)."""
    update = _load_script("update_readme_results")
    assert update.main(["--check"]) == 0
