"""``synpo bench quality``: the smoke preset end to end, the measures against hand computations on
fresh random inputs, and docs/real_model.md against the render of the committed results."""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from synpo.benchmarking import quality, quality_report

ROOT = Path(__file__).resolve().parents[1]


def _synpo(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "synpo", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    doc = out / "real_model_smoke.md"
    proc = _synpo(
        "bench", "quality", "--preset", "smoke", "--output-dir", str(out), "--doc", str(doc), cwd=out
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, doc, proc


def _by_kind(records, kind):
    return [r for r in records if r.get("kind") == kind]


def test_smoke_trains_every_method_on_the_same_data_and_writes_everything(smoke):
    out, doc, proc = smoke
    payload = json.loads((out / "real_model_smoke.json").read_text())
    meta, records = payload["meta"], payload["records"]
    for key in ("device", "torch", "transformers", "peft", "commit", "date", "wall_s", "hyperparameters"):
        assert meta.get(key), key
    assert meta["hyperparameters"]["synpo"] == {"alpha": 30.0, "beta": 0.2}
    steps = quality.PRESETS["smoke"].steps
    summaries = {r["method"]: r for r in _by_kind(records, "summary")}
    assert list(summaries) == list(quality.METHODS)
    for method, s in summaries.items():
        assert s["steps"] == steps
        for key in (
            "heldout_accuracy_after",
            "perplexity_after",
            "heldout_chosen_logps_after",
            "train_steps_per_s",
        ):
            assert math.isfinite(s[key]), (method, key)
        assert 0.0 <= s["heldout_accuracy_after"] <= 1.0 and s["perplexity_after"] > 1.0
        assert len(s["heldout_chosen_after"]) == s["heldout_pairs"] >= 1
        # The accuracy is the one computed from the stored per-pair values.
        assert s["heldout_accuracy_after"] == quality.preference_accuracy(
            s["heldout_chosen_after"], s["heldout_rejected_after"]
        )
    # The base model is measured once: every method starts from the same values.
    for key in ("heldout_accuracy_before", "perplexity_before", "heldout_chosen_logps_before"):
        assert len({s[key] for s in summaries.values()}) == 1, key
    # Same data order and steps for every method: the tokens of each step agree; the losses differ.
    train = {m: _by_kind([r for r in records if r.get("method") == m], "train_step") for m in summaries}
    assert [r["tokens"] for r in train["synpo"]] == [r["tokens"] for r in train["dpo"]]
    assert [r["tokens"] for r in train["synpo"]] == [r["tokens"] for r in train["simpo"]]
    assert len(train["synpo"]) == steps
    assert train["synpo"][0]["loss"] != train["dpo"][0]["loss"]
    evals = _by_kind(records, "eval_step")
    assert {r["method"] for r in evals} == set(quality.METHODS)
    speed = {r["method"]: r for r in _by_kind(records, "speed")}
    assert set(speed) == set(quality.SPEED_METHODS)
    assert all(r["status"] == "ok" and r["steps_per_s"] > 0 and r["peak_bytes"] > 0 for r in speed.values())
    with open(out / "real_model_smoke.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records) and rows[0]["commit"] == meta["commit"]
    for name in ("reward_dynamics", "heldout", "speed"):
        assert (out / "plots" / f"real_model_smoke_{name}.png").stat().st_size > 5000
    assert "quality: 100%" in proc.stderr  # the progress bar reached its end
    assert quality_report.check_doc(out / "real_model_smoke.json", doc) == 0


def test_check_docs_notices_an_edited_page(smoke, tmp_path):
    out, doc, _ = smoke
    edited = tmp_path / "edited.md"
    edited.write_text(doc.read_text().replace("SynPO", "SynP0", 1))
    assert quality_report.check_doc(out / "real_model_smoke.json", edited) == 1
    assert quality_report.check_doc(out / "real_model_smoke.json", tmp_path / "missing.md") == 1


def test_findings_follow_the_numbers(smoke):
    out, _, _ = smoke
    payload = json.loads((out / "real_model_smoke.json").read_text())

    def synpo_finding(chosen_delta):
        data = copy.deepcopy(payload)
        s = next(r for r in data["records"] if r.get("kind") == "summary" and r["method"] == "synpo")
        s["heldout_chosen_logps_after"] = s["heldout_chosen_logps_before"] + chosen_delta
        text = quality_report.render_doc(data)
        return next(line for line in text.splitlines() if "Chosen likelihood under SynPO" in line)

    assert "rose by 0.500" in synpo_finding(0.5) and "**agrees**" in synpo_finding(0.5)
    assert "fell by 0.500" in synpo_finding(-0.5) and "**does not agree**" in synpo_finding(-0.5)
    data = copy.deepcopy(payload)
    for r in data["records"]:
        if r.get("kind") == "speed" and r["method"] == "synpo_fused":
            base = next(x for x in data["records"] if x.get("method") == "dpo_reference_naive")
            r["steps_per_s"] = base["steps_per_s"] * 1.2
    assert "1.20x" in quality_report.render_doc(data) and "is **not met**" in quality_report.render_doc(data)


def test_committed_doc_is_the_render_of_the_committed_results():
    results = ROOT / "benchmarks" / "results" / "real_model.json"
    doc = ROOT / "docs" / "real_model.md"
    assert results.is_file() and doc.is_file()
    proc = _synpo("bench", "quality", "--check-docs", cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    payload = json.loads(results.read_text())
    assert payload["meta"]["preset"] == "cpu"
    for name in ("reward_dynamics", "heldout", "speed"):
        assert (ROOT / "benchmarks" / "results" / "plots" / f"real_model_{name}.png").is_file()


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


def test_methods_differ_only_in_the_loss(tmp_path):
    preset = quality.PRESETS["cpu"]
    runs = {m: quality.method_overrides(preset, m, "t.jsonl", "h.jsonl", tmp_path) for m in quality.METHODS}
    keys = set().union(*runs.values())
    differing = {k for k in keys if len({json.dumps(r.get(k)) for r in runs.values()}) > 1}
    assert differing == {"loss.name", "loss.reference.mode"}
    assert runs["dpo"]["loss.reference.mode"] == "adapter_disabled"
    with pytest.raises(ValueError, match="method"):
        quality.method_overrides(preset, "kto", "t.jsonl", "h.jsonl", tmp_path)


def test_missing_data_files_name_the_option(tmp_path):
    args = argparse.Namespace(sample_split=False, train_file=str(tmp_path / "no.jsonl"), heldout_file=None)
    with pytest.raises(ValueError, match="--train-file"):
        quality.resolve_data(args, quality.PRESETS["cpu"], tmp_path)
    same = tmp_path / "pairs.jsonl"
    same.write_text("{}\n")
    args = argparse.Namespace(sample_split=False, train_file=str(same), heldout_file=str(same))
    with pytest.raises(ValueError, match="--heldout-file"):
        quality.resolve_data(args, quality.PRESETS["cpu"], tmp_path)


def test_cli_reports_bad_options_in_one_line(tmp_path):
    proc = _synpo("bench", "quality", "--render-only", "--results", str(tmp_path / "none.json"), cwd=tmp_path)
    assert proc.returncode != 0 and "--results" in proc.stderr and "Traceback" not in proc.stderr
    proc = _synpo("bench", "quality", "--sample-split", "--steps", "0", "--no-save", cwd=tmp_path)
    assert proc.returncode != 0 and "--steps" in proc.stderr and "Traceback" not in proc.stderr
