"""``synpo bench quality``: the pre-registered protocol on the smoke preset end to end (stopped after
a run and resumed), its splits, selection, summary and render, the measures against hand computations
on fresh random inputs, and docs/real_model.md against the render of the committed results."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from synpo.benchmarking import quality, quality_report

ROOT = Path(__file__).resolve().parents[1]
SMOKE = quality.PRESETS["smoke"]


def _synpo(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "synpo", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def _smoke_args(out: Path) -> list[str]:
    return [
        "bench",
        "quality",
        "--preset",
        "smoke",
        "--output-dir",
        str(out),
        "--doc",
        str(out / "real_model_smoke.md"),
        "--work-dir",
        str(out / "work"),  # a killed run's files stay under the test's folder
    ]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke protocol killed (SIGKILL) once two runs are saved, then rerun to the end."""
    out = tmp_path_factory.mktemp("quality")
    runs_dir = out / "real_model_smoke_runs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "synpo", *_smoke_args(out)],
        cwd=out,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while len(list(runs_dir.glob("*.json"))) < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    kept = {p.name: p.read_bytes() for p in runs_dir.glob("*.json")}
    proc = _synpo(*_smoke_args(out), cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc, kept


def _payload(smoke) -> dict:
    out, _, _ = smoke
    return json.loads((out / "real_model_smoke.json").read_text())


def test_smoke_resumes_from_the_runs_saved_before_it_was_killed(smoke):
    out, proc, kept = smoke
    plan = quality.plan_runs(SMOKE)
    assert 2 <= len(kept) < len(plan)  # killed part-way
    executed = int(re.search(r"executed (\d+) run\(s\)", proc.stdout).group(1))
    assert executed == len(plan) - len(kept)  # the saved runs are not run again
    runs_dir = out / "real_model_smoke_runs"
    for name, data in kept.items():
        assert (runs_dir / name).read_bytes() == data, name  # nor rewritten
    assert len(list(runs_dir.glob("*.json"))) == len(plan)
    assert f"{len(plan) - executed} done" in proc.stdout  # the plan printed up front knew them
    assert "quality: 100%" in proc.stderr  # the progress bar reached its end


def test_smoke_results_carry_the_summary_schema(smoke):
    payload = _payload(smoke)
    assert payload["schema"] == 2 and payload["status"] == "complete"
    summary, runs = payload["summary"], payload["runs"]
    assert list(summary) == list(quality.METHODS)
    for method, s in summary.items():
        assert s["lr"] in SMOKE.lr_grid
        assert s["seeds"] == list(SMOKE.test_seeds)
        for key in ("test_judge_score", "test_accuracy", "test_accuracy_hard"):
            entry = s[key]
            assert set(entry) == {"before", "after_mean", "after_std"}, key
            assert all(math.isfinite(v) for v in entry.values()), (method, key)
        for key in ("perplexity_ratio", "chosen_logp_delta", "rejected_logp_delta"):
            assert set(s[key]) == {"mean", "std"} and s[key]["std"] >= 0, key
        assert set(s["test_criteria"]) == {*quality.CRITERIA, "words"}
        # The summary is the mean over the test runs at the selected rate.
        tests = [r for r in runs if r["split"] == "test" and r["method"] == method and r["kind"] == "train"]
        assert {r["lr"] for r in tests} == {s["lr"]} and len(tests) == len(SMOKE.test_seeds)
        scores = [r["metrics"]["judge"]["score"] for r in tests]
        assert s["test_judge_score"]["after_mean"] == pytest.approx(sum(scores) / len(scores))
        base = next(r for r in runs if r["run_id"] == "base-test")["metrics"]
        assert s["test_accuracy"]["before"] == base["pairs"]["standard"]["accuracy"]
    for r in runs:
        assert {"method", "lr", "seed", "split", "metrics"} <= set(r)
        if r["kind"] == "train":
            assert r["split"] in ("validation", "test") and r["method"] in quality.METHODS
    assert [r["run_id"] for r in runs] == [
        s.run_id for s in quality.plan_runs(SMOKE, quality.select_lrs(runs, SMOKE.lr_grid))
    ]
    meta = payload["meta"]
    assert meta["cpu_time_s"] == pytest.approx(sum(r["wall_s"] for r in runs))
    for key in ("device", "torch", "transformers", "peft", "commit", "date", "hyperparameters"):
        assert meta.get(key), key
    assert meta["hyperparameters"]["simpo"]["beta"] == 2.5
    assert meta["hyperparameters"]["simpo"]["gamma"] == pytest.approx(1.375)
    speed = {r["method"]: r for r in payload["speed"]}
    assert set(speed) == set(quality.SPEED_METHODS)
    assert all(r["status"] == "ok" and r["steps_per_s"] > 0 and r["peak_bytes"] > 0 for r in speed.values())


def test_smoke_runs_measure_what_the_protocol_says(smoke):
    out, _, _ = smoke
    runs = {p.stem: json.loads(p.read_text()) for p in (out / "real_model_smoke_runs").glob("*.json")}
    data = quality.load_protocol_data(quality.DEFAULT_PAIRS_DIR, SMOKE.validation_scenes, SMOKE.test_scenes)
    for run in runs.values():
        if run["kind"] == "speed":
            continue
        descriptions = run["details"]["descriptions"]
        assert [d["id"] for d in descriptions] == data.judged_ids[run["split"]]  # its own split only
        judge = run["metrics"]["judge"]
        assert judge["score"] == pytest.approx(sum(d["score"] for d in descriptions) / len(descriptions))
        for d in descriptions:
            hand = 1.1 * d["hallucination"] + d["harmony"] + d["consistency"]
            assert d["score"] == pytest.approx(0.0 if d["empty"] else hand)
        if run["split"] == "test":
            for condition, key in (("standard", "test"), ("hard", "test_hard")):
                values = run["details"]["pairs"][condition]
                assert len(values["chosen"]) == len(data.pairs[key])
                assert run["metrics"]["pairs"][condition]["accuracy"] == quality.preference_accuracy(
                    values["chosen"], values["rejected"]
                )
        else:
            assert "pairs" not in run["metrics"]  # validation scores only (a)
    # The base model is scored once per split; every description is sampled with the same seeds, so
    # the base model's texts are reproducible from the seed alone (the same on a rerun).
    assert runs["base-test"]["train"] is None and runs["base-validation"]["train"] is None
    # Same seed, same data order for every method: the tokens of each step agree; the losses differ.
    seed = SMOKE.test_seeds[0]
    curves = {
        m: next(r for r in runs.values() if r["method"] == m and r["split"] == "test" and r["seed"] == seed)[
            "train"
        ]["curve"]
        for m in quality.METHODS
    }
    assert [r["tokens"] for r in curves["synpo"]] == [r["tokens"] for r in curves["dpo"]]
    assert [r["tokens"] for r in curves["synpo"]] == [r["tokens"] for r in curves["simpo"]]
    assert len(curves["synpo"]) == SMOKE.steps
    assert curves["synpo"][0]["loss"] != curves["dpo"][0]["loss"]


def test_smoke_renders_its_doc_and_charts_from_the_json(smoke, tmp_path):
    out, _, _ = smoke
    results, doc = out / "real_model_smoke.json", out / "real_model_smoke.md"
    assert quality_report.check_doc(results, doc) == 0
    for name in quality_report.CHARTS:
        assert (out / "plots" / f"real_model_smoke_{name}.png").stat().st_size > 5000
    text = doc.read_text()
    assert "## Protocol (pre-registered)" in text and text.index("## Protocol") < text.index("## Results")
    # The render is a pure function of the JSON: the same file renders the same page, an edited
    # page is noticed, a missing one too.
    payload = json.loads(results.read_text())
    assert quality_report.render_doc(payload) == quality_report.render_doc(copy.deepcopy(payload)) == text
    edited = tmp_path / "edited.md"
    edited.write_text(text.replace("SynPO", "SynP0", 1))
    assert quality_report.check_doc(results, edited) == 1
    assert quality_report.check_doc(results, tmp_path / "missing.md") == 1
    proc = _synpo(
        "bench", "quality", "--preset", "smoke", "--check-docs", "--output-dir", str(out), "--doc", str(doc),
        cwd=out,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _with_judge(payload: dict, method: str, mean: float, std: float) -> dict:
    data = copy.deepcopy(payload)
    data["summary"][method]["test_judge_score"].update(after_mean=mean, after_std=std)
    return data


def _answer(payload: dict) -> str:
    text = quality_report.render_doc(payload)
    return next(
        line for line in text.splitlines() if line.startswith("- **Does SynPO train better captions?**")
    )


def test_findings_follow_the_numbers_by_the_stated_rule(smoke):
    payload = _payload(smoke)
    for method in ("dpo", "simpo"):
        payload = _with_judge(payload, method, 5.0, 0.2)
    # Better by more than the larger std than both: yes; within one std of both: no difference.
    line = _answer(_with_judge(payload, "synpo", 5.5, 0.2))
    assert "**yes**" in line and "better than DPO and SimPO" in line
    line = _answer(_with_judge(payload, "synpo", 5.15, 0.1))
    assert "**no**" in line and "no different from DPO and SimPO" in line
    line = _answer(_with_judge(payload, "synpo", 4.0, 0.1))
    assert "**no**" in line and "worse than DPO and SimPO" in line
    mixed = _with_judge(_with_judge(payload, "simpo", 6.0, 0.1), "synpo", 5.5, 0.1)
    line = _answer(mixed)
    assert "**partly**" in line and "better than DPO" in line and "worse than SimPO" in line
    # The >= 90% rule: the page says so when the base model's accuracy reaches it, not otherwise.
    data = copy.deepcopy(payload)
    for s in data["summary"].values():
        s["test_accuracy"]["before"] = 0.96
    assert "already ranks 0.96 of the test pairs right (>= 0.90)" in quality_report.render_doc(data)
    for s in data["summary"].values():
        s["test_accuracy"]["before"] = 0.80
    assert "already ranks" not in quality_report.render_doc(data)


def test_the_decision_rule():
    assert quality_report.versus(5.0, 0.1, 4.0, 0.2) == "higher"
    assert quality_report.versus(4.0, 0.1, 5.0, 0.2) == "lower"
    assert quality_report.versus(5.0, 0.1, 4.85, 0.2) == "no difference"  # within the larger std
    assert quality_report.versus(5.0, 0.2, 4.85, 0.1) == "no difference"
    assert quality_report.versus(5.0, 0.0, 5.0, 0.0) == "no difference"
    assert quality_report.change(0.9, 0.8, 0.05) == "fell"
    assert quality_report.change(0.9, 0.86, 0.05) == "no change"
    assert quality_report.change(0.9, 1.0, 0.05) == "rose"
    # Three seeds' 50/53 average to 1 ulp below 50/53 (the SmolLM2 comparison's SynPO accuracy).
    seeds = [50 / 53] * 3
    assert quality_report.change(50 / 53, sum(seeds) / 3, 0.0) == "no change"
    assert quality_report.change(50 / 53, 49 / 53, 0.0) == "fell"


# ---------------------------------------------------------------------------------------------
# The protocol's parts, without a model
# ---------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_splits_are_disjoint_by_scene_id_and_deterministic():
    data = quality.load_protocol_data(quality.DEFAULT_PAIRS_DIR)
    again = quality.load_protocol_data(quality.DEFAULT_PAIRS_DIR)
    assert data.split_ids == again.split_ids and data.pairs == again.pairs
    ids = [set(data.split_ids[s]) for s in quality.SPLITS]
    assert sum(map(len, ids)) == len(set().union(*ids)) == len(data.scenes)  # disjoint, covering
    assert all(ids)
    for split, records in (("train", data.pairs["train"]), ("test", data.pairs["test"])):
        assert {r["id"] for r in records} <= set(data.split_ids[split]), split
    assert {r["id"] for r in data.pairs["test_hard"]} <= set(data.split_ids["test"])
    for split in ("validation", "test"):
        assert set(data.judged_ids[split]) <= set(data.split_ids[split])
    # A scene's split is a function of its id alone, whatever the others.
    for scene_id in data.split_ids["validation"][:5] + data.split_ids["test"][:5]:
        assert quality.scene_split(scene_id) in ("validation", "test")
        assert quality.scene_split(scene_id) == quality.scene_split(str(scene_id))
    # The pairs are the pipeline's: its test split is its held-out file, and nothing else is lost.
    bundled_train = _read_jsonl(quality.DEFAULT_PAIRS_DIR / "train.jsonl")
    bundled_heldout = _read_jsonl(quality.DEFAULT_PAIRS_DIR / "heldout.jsonl")
    assert [(r["id"], r["chosen"], r["rejected"]) for r in data.pairs["test"]] == [
        (r["id"], r["chosen"], r["rejected"]) for r in sorted(bundled_heldout, key=lambda r: r["id"])
    ]
    assert {r["id"] for r in data.pairs["train"]} < {r["id"] for r in bundled_train}  # validation left out
    caps = quality.load_protocol_data(quality.DEFAULT_PAIRS_DIR, 3, 2)
    assert caps.judged_ids["validation"] == data.judged_ids["validation"][:3]
    assert caps.judged_ids["test"] == data.judged_ids["test"][:2]
    with pytest.raises(ValueError, match="scene_id"):
        quality.scene_split("")


def test_harder_pair_is_the_best_against_the_second_best():
    def record(scores):
        return {
            "id": "s",
            "prompt": "p",
            "candidates": [
                {"index": i, "text": f"t{i}", "status": "ok", "score": sc} for i, sc in enumerate(scores)
            ],
        }

    pair = quality.harder_pair(record([3.0, 9.1, 5.0, 9.1, 8.0, 8.0]))
    assert (pair["chosen"], pair["rejected"]) == ("t1", "t4")  # ties: the lowest index, as select's rule
    assert pair["score_gap"] == pytest.approx(1.1)
    assert quality.harder_pair(record([4.0, 4.0])) is None
    assert quality.harder_pair(record([])) is None
    failed = record([2.0, 7.0])
    failed["candidates"][1]["status"] = "failed"
    assert quality.harder_pair(failed) is None


def _fake_run(split, method, lr, seed, score, kind="train"):
    return {
        "run_id": quality.RunSpec(kind, split, method, lr, seed).run_id,
        "kind": kind,
        "split": split,
        "method": method,
        "lr": lr,
        "seed": seed,
        "metrics": {"judge": {"score": score}},
    }


def test_selection_reads_the_validation_runs_only():
    grid = [1e-4, 3e-4, 1e-3]
    validation = {"synpo": [5.0, 7.0, 6.0], "dpo": [8.0, 4.0, 4.0], "simpo": [3.0, 3.0, 9.0]}
    runs = [
        _fake_run("validation", m, lr, 0, score)
        for m, scores in validation.items()
        for lr, score in zip(grid, scores)
    ]
    # Test runs that would choose otherwise: ignored.
    runs += [_fake_run("test", m, lr, 1, 100.0 * (i + 1)) for m in validation for i, lr in enumerate(grid)]
    runs.append(_fake_run("validation", None, None, None, 50.0, kind="base") | {"run_id": "base-validation"})
    assert quality.select_lrs(runs, grid) == {"synpo": 3e-4, "dpo": 1e-4, "simpo": 1e-3}
    # A tie goes to the smaller rate.
    tie = [r for r in runs if not (r["method"] == "synpo" and r["lr"] == 1e-3 and r["split"] == "validation")]
    tie.append(_fake_run("validation", "synpo", 1e-3, 0, 7.0))
    assert quality.select_lrs(tie, grid)["synpo"] == 3e-4
    # A missing validation run: no selection (the test runs cannot stand in for it).
    partial = [
        r for r in runs if not (r["method"] == "dpo" and r["lr"] == 3e-4 and r["split"] == "validation")
    ]
    with pytest.raises(ValueError, match="validation run of dpo"):
        quality.select_lrs(partial, grid)
    # The plan names the test runs' rate only once the validation runs have chosen it.
    preset = quality.PRESETS["cpu"]
    assert {s.lr for s in quality.plan_runs(preset) if s.split == "test" and s.kind == "train"} == {None}
    chosen = quality.plan_runs(preset, {"synpo": 5e-5, "dpo": 1.5e-4, "simpo": 5e-4})
    assert {(s.method, s.lr) for s in chosen if s.split == "test" and s.kind == "train"} == {
        ("synpo", 5e-5),
        ("dpo", 1.5e-4),
        ("simpo", 5e-4),
    }


def test_runs_of_another_protocol_are_refused(tmp_path):
    quality.save_run(tmp_path, {"run_id": "base-test", "protocol_id": "aaa", "metrics": {}})
    assert set(quality.load_runs(tmp_path, "aaa")) == {"base-test"}
    with pytest.raises(ValueError, match="another protocol"):
        quality.load_runs(tmp_path, "bbb")
    assert quality.load_runs(tmp_path / "none", "aaa") == {}
    (tmp_path / "base-validation.json.tmp").write_text("{half a run")  # a killed write: never read
    assert set(quality.load_runs(tmp_path, "aaa")) == {"base-test"}
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match=r"broken\.json"):
        quality.load_runs(tmp_path, "aaa")


def test_the_cpu_preset_is_the_registered_protocol():
    preset = quality.PRESETS["cpu"]
    assert len(preset.lr_grid) >= 3 and len(preset.test_seeds) >= 3
    assert preset.validation_seed not in preset.test_seeds
    assert quality.METHOD_LOSS["synpo"] == {"alpha": 30.0, "beta": 0.2}
    assert quality.METHOD_LOSS["dpo"] == {"beta": 0.1}
    simpo = quality.METHOD_LOSS["simpo"]
    assert 2.0 <= simpo["beta"] <= 2.5 and 0.3 <= simpo["gamma"] / simpo["beta"] <= 0.6
    plan = quality.plan_runs(preset)
    n = len(quality.METHODS)
    assert len(plan) == 2 + n * len(preset.lr_grid) + n * len(preset.test_seeds) + 1
    assert len({s.run_id for s in plan}) == len(plan)
    with pytest.raises(ValueError, match="lr_grid"):
        quality.QualityPreset(**{**preset.__dict__, "lr_grid": []})
    with pytest.raises(ValueError, match="test_seeds"):
        quality.QualityPreset(**{**preset.__dict__, "test_seeds": [1, 1]})


def test_methods_differ_only_in_the_loss(tmp_path):
    preset = quality.PRESETS["cpu"]
    runs = {m: quality.method_overrides(preset, m, 1e-4, 1, "t.jsonl", tmp_path) for m in quality.METHODS}
    keys = set().union(*runs.values())
    differing = {k for k in keys if len({json.dumps(r.get(k)) for r in runs.values()}) > 1}
    assert differing and all(k.startswith("loss.") for k in differing)
    assert runs["dpo"]["loss.reference.mode"] == "adapter_disabled"
    assert runs["simpo"]["loss.beta"] == 2.5 and runs["synpo"]["loss.alpha"] == 30.0
    other = quality.method_overrides(preset, "synpo", 3e-4, 2, "t.jsonl", tmp_path)
    assert {k for k in keys if other.get(k) != runs["synpo"].get(k)} == {"optim.lr", "train.seed"}
    with pytest.raises(ValueError, match="method"):
        quality.method_overrides(preset, "kto", 1e-4, 1, "t.jsonl", tmp_path)
    with pytest.raises(ValueError, match="lr"):
        quality.method_overrides(preset, "synpo", 0, 1, "t.jsonl", tmp_path)


def test_the_plan_is_printed_with_its_cpu_time_and_nothing_runs(tmp_path):
    proc = _synpo(
        "bench", "quality", "--max-runs", "0", "--runs-dir", str(tmp_path / "runs"), "--output-dir",
        str(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = quality.plan_runs(quality.PRESETS["cpu"])
    assert f"plan: {len(plan)} runs, ~" in proc.stdout and "of CPU time in all; 0 done" in proc.stdout
    for spec in plan:
        assert spec.run_id in proc.stdout
    assert not (tmp_path / "runs").exists() and not (tmp_path / "real_model.json").exists()
    proc = _synpo(
        "bench",
        "quality",
        "--preset",
        "smoke",
        "--budget-s",
        "0",
        "--output-dir",
        str(tmp_path),
        cwd=tmp_path,
    )
    assert proc.returncode == 0 and "executed 0 run(s)" in proc.stdout and "--budget-s 0" in proc.stdout


def test_committed_doc_is_the_render_of_the_committed_results():
    results = ROOT / "benchmarks" / "results" / "real_model.json"
    doc = ROOT / "docs" / "real_model.md"
    assert results.is_file() and doc.is_file()
    proc = _synpo("bench", "quality", "--check-docs", cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    payload = json.loads(results.read_text())
    assert payload["schema"] == 2 and payload["meta"]["preset"] == "cpu"
    # The committed protocol is the code's: a change to the preset, the data or the methods must be
    # registered anew (synpo bench quality --register) before it runs.
    preset = quality.PRESETS["cpu"]
    data = quality.load_protocol_data(quality.DEFAULT_PAIRS_DIR, preset.validation_scenes, preset.test_scenes)
    texts = quality.read_paragraphs(quality.FLUENT_TEXT_PATH)[: preset.fluent_paragraphs]
    assert payload["protocol"]["id"] == quality.protocol(preset, data, texts)["id"]
    if payload["status"] == "complete":
        for name in quality_report.CHARTS:
            assert (ROOT / "benchmarks" / "results" / "plots" / f"real_model_{name}.png").is_file()
    else:
        assert "**Results pending.**" in doc.read_text()


def test_cli_reports_bad_options_in_one_line(tmp_path):
    proc = _synpo("bench", "quality", "--render-only", "--results", str(tmp_path / "none.json"), cwd=tmp_path)
    assert proc.returncode != 0 and "--results" in proc.stderr and "Traceback" not in proc.stderr
    proc = _synpo("bench", "quality", "--preset", "smoke", "--steps", "0", "--no-save", cwd=tmp_path)
    assert proc.returncode != 0 and "--steps" in proc.stderr and "Traceback" not in proc.stderr
    proc = _synpo("bench", "quality", "--preset", "smoke", "--pairs-dir", str(tmp_path), cwd=tmp_path)
    assert proc.returncode != 0 and "--pairs-dir" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# The measures against hand computations
# ---------------------------------------------------------------------------------------------


def _hand_mean_logprob(logits_row, ids_row, ignore=-100):
    total, n = 0.0, 0
    for t in range(1, len(ids_row)):
        if ids_row[t] == ignore:
            continue
        z = logits_row[t - 1].double()
        total += float(z[ids_row[t]] - torch.log(torch.exp(z - z.max()).sum()) - z.max())
        n += 1
    return total / n


def test_mean_token_logprobs_matches_a_hand_computation():
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    rows, T, V = 3, 9, 17
    logits = torch.randn(rows, T, V, generator=gen) * 3
    labels = torch.randint(0, V, (rows, T), generator=gen)
    labels[:, :3] = -100  # prompt
    labels[1, 6:] = -100  # padding
    got = quality.mean_token_logprobs(logits, labels)
    assert got.dtype == torch.float64
    for i in range(rows):
        assert got[i].item() == pytest.approx(_hand_mean_logprob(logits[i], labels[i].tolist()), abs=1e-5)
    labels[2, 1:] = -100
    with pytest.raises(ValueError, match="labels"):
        quality.mean_token_logprobs(logits, labels)
    with pytest.raises(ValueError, match="logits, labels"):
        quality.mean_token_logprobs(logits[0], labels[0])


def test_preference_accuracy_matches_a_hand_count():
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    chosen = torch.randn(50, generator=gen).tolist()
    rejected = torch.randn(50, generator=gen).tolist()
    rejected[0] = chosen[0]  # a tie counts as wrong
    hand = sum(1 for c, r in zip(chosen, rejected) if c - r > 0) / 50
    assert quality.preference_accuracy(chosen, rejected) == hand
    assert quality.preference_accuracy([1.0, 2.0], [0.0, 3.0]) == 0.5
    with pytest.raises(ValueError, match="chosen, rejected"):
        quality.preference_accuracy([1.0], [])
    with pytest.raises(ValueError, match="chosen, rejected"):
        quality.preference_accuracy([], [])


@pytest.fixture(scope="module")
def tiny():
    from synpo import tiny as tiny_models

    seed = int.from_bytes(os.urandom(2), "little")
    model, tokenizer = tiny_models.build_tiny_causal_lm(seed=seed)
    return model, tokenizer


def test_perplexity_matches_a_hand_computation(tiny):
    model, tokenizer = tiny
    texts = quality.read_paragraphs(quality.FLUENT_TEXT_PATH)[:3]
    model.train()
    got = quality.perplexity(model, tokenizer, texts)
    assert model.training  # the mode it came in with is restored
    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text)["input_ids"]
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            nll -= _hand_mean_logprob(logits, ids) * (len(ids) - 1)
            count += len(ids) - 1
    assert got["tokens"] == count
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    with pytest.raises(ValueError, match="texts"):
        quality.perplexity(model, tokenizer, [])


def test_heldout_preferences_match_unpadded_hand_scoring(tiny):
    from synpo.data import PairEncoder, PreferenceCollator, PreferenceDataset, read_preference_jsonl

    model, tokenizer = tiny
    examples, _ = read_preference_jsonl(ROOT / "synpo" / "assets" / "sample_pairs.jsonl")
    dataset = PreferenceDataset(examples[:4], PairEncoder(tokenizer, max_length=512))
    got = quality.heldout_preferences(model, dataset, PreferenceCollator(tokenizer.pad_token_id))
    hand_c, hand_r = [], []
    with torch.no_grad():
        for i in range(len(dataset)):
            pair = dataset[i]
            for response, out in ((pair.chosen_ids, hand_c), (pair.rejected_ids, hand_r)):
                ids = pair.prompt_ids + response
                model.eval()
                logits = model(input_ids=torch.tensor([ids])).logits[0]
                model.train()
                labels = [-100] * len(pair.prompt_ids) + response
                out.append(_hand_mean_logprob(logits, labels))
    assert got["chosen"] == pytest.approx(hand_c, abs=1e-4)
    assert got["rejected"] == pytest.approx(hand_r, abs=1e-4)
    assert got["accuracy"] == sum(c > r for c, r in zip(hand_c, hand_r)) / len(hand_c)


def test_fluent_text_is_a_held_out_corpus():
    paragraphs = quality.read_paragraphs(quality.FLUENT_TEXT_PATH)
    assert 30 <= len(paragraphs) <= 60
    assert not any(p.startswith("#") for p in paragraphs)
    pairs = (ROOT / "synpo" / "assets" / "sample_pairs.jsonl").read_text()
    assert not any(p[:60] in pairs for p in paragraphs)
