"""``synpo bench quality``: does SynPO train better captions than DPO and SimPO? A pre-registered
comparison on a real model, run resumably and in parts.

    synpo bench quality --max-runs 0        # the plan: every run and its estimated CPU time; runs nothing
    synpo bench quality                     # the whole protocol (continues from the finished runs)
    synpo bench quality --budget-s 3600     # run for about an hour, then stop (rerun to continue)
    synpo bench quality --max-runs 3        # three more runs, then stop
    synpo bench quality --preset smoke      # the embedded tiny model, a few steps (CI, seconds)
    synpo bench quality --register          # write the protocol and the plan (results pending) and the doc
    synpo bench quality --render-only       # docs/real_model.md and the charts from the results
    synpo bench quality --check-docs        # exit 1 when docs/real_model.md differs from that render

The protocol (written out in docs/real_model.md, "Protocol (pre-registered)", by
:mod:`synpo.benchmarking.quality_report` from :func:`protocol`):

- **Data**: the SmolLM2 pairs pipeline's scenes and scores (``synpo/assets/smollm2_pairs``). Scenes are
  split by id (:func:`scene_split`): test = the pipeline's own held-out split (crc32 of the id below 0.2,
  :func:`synpo.pairs.select.is_heldout`), validation = the next 0.2, train = the rest. Training pairs
  are the pipeline's pairs (best vs worst candidate, score gap >= 4, :func:`synpo.pairs.select.select_pair`)
  of train scenes; test pairs those of test scenes; the *harder* test condition pairs each test scene's
  best candidate with its second-best (:func:`harder_pair`).
- **Methods**: each loss with its paper's hyper-parameters (:data:`METHOD_LOSS`), everything else
  shared (the bundled ``smollm2`` config: LoRA r=16, the same steps, batch and data order per seed).
- **Runs**: every method at every rate of the preset's ``lr_grid`` with ``validation_seed``, scored on
  the validation scenes; each method's rate = its best validation judge score (:func:`select_lrs`,
  validation runs only); then every ``test_seeds`` seed at that rate, scored on the test split. The
  base model (adapter off) is scored once per split.
- **Scores**: (a) the model writes one description per scene (the pipeline's prompt, sampling
  settings and per-scene seeding, ``generation_seed``), scored by the pipeline's text judge
  (:class:`synpo.pairs.textjudge.TextJudge`; the description is judged beside the scene's pipeline
  candidates, so its consistency is its similarity to them); (b) preference accuracy on the test pairs
  and on the harder ones; (c) mean token log-prob of their chosen and rejected responses; (d)
  perplexity on held-out fluent text; (e) steps/s, fused vs naive, by ``synpo bench trainer``'s step.

Every finished run is written at once, atomically, to ``<runs dir>/<run id>.json`` (default
``benchmarks/results/real_model_runs/``, committable); a rerun skips them, so a stopped comparison
continues where it stopped. Runs of another protocol (another preset, grid, data, ...) in that folder
are refused, never mixed in. When every planned run is done: ``benchmarks/results/real_model.json``
(``summary[method]``, every run, the protocol, the total CPU time), charts in
``benchmarks/results/plots/real_model_*.png`` and ``docs/real_model.md``, rendered from the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import math
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from synpo.benchmarking import common, presets

METHODS = ("synpo", "dpo", "simpo")
SPEED_METHODS = ("dpo_reference_naive", "dpo_reference_fused", "synpo_naive", "synpo_fused")
SPLITS = ("train", "validation", "test")
ASSETS = Path(__file__).resolve().parent.parent / "assets"
FLUENT_TEXT_PATH = ASSETS / "fluent_heldout.txt"
DEFAULT_PAIRS_DIR = ASSETS / "smollm2_pairs"
IGNORE_INDEX = -100
SCHEMA = 2

# Each method's loss hyper-parameters, from its paper, set explicitly (not left to registry defaults).
METHOD_LOSS = {
    "synpo": {"alpha": 30.0, "beta": 0.2},
    "dpo": {"beta": 0.1},
    # The SimPO README's Llama3-Instruct row (beta 2.5, gamma/beta 0.55): the paper's setting closest
    # to SmolLM2-135M-Instruct (a Llama-architecture instruct model). gamma here is the margin itself.
    "simpo": {"beta": 2.5, "gamma": 2.5 * 0.55},
}
METHOD_SOURCES = {
    "synpo": "the SynPO paper's alpha 30, beta 0.2 (this project's defaults, docs/losses.md)",
    "dpo": "the DPO paper's beta 0.1; the reference is the policy with its LoRA adapter off, as in TRL",
    "simpo": (
        "the SimPO paper's recipe for an instruct Llama (README table, Llama3-Instruct: beta 2.5, "
        "gamma/beta 0.55, so gamma 1.375); the README recommends beta 2.0-2.5 and gamma/beta around 0.5; "
        "no NLL term"
    ),
}
# Scene-id split: test = the pipeline's held-out fraction (its heldout.jsonl), validation the next band.
TEST_FRACTION = 0.2
VALIDATION_FRACTION = 0.2
# The >= 90% rule: a base model this accurate on the test pairs leaves the accuracy little room.
SATURATED_ACCURACY = 0.9


@dataclass(frozen=True)
class QualityPreset:
    name: str
    config: str | None  # a bundled trainer config (None: default.yaml, the embedded tiny model)
    steps: int  # optimizer steps per run
    lr_grid: list  # learning rates, shared by all methods (>= 3 for the protocol)
    validation_seed: int  # the one seed of the validation (rate selection) runs
    test_seeds: list  # the seeds of the test runs at each method's selected rate
    validation_scenes: int | None  # judge at most this many validation scenes (the first by id)
    test_scenes: int | None  # and test scenes (None: all)
    generation_seed: int  # per-scene sampling seed of the descriptions (the same for every model)
    fluent_paragraphs: int  # at most this many paragraphs of the fluent text
    speed_warmup: int
    speed_steps: int
    speed_pairs: int  # pairs per timed step (one optimizer step's worth)
    speed_model: str | None  # a synpo.benchmarking.trainer model spec name instead of the config's
    overrides: dict = field(default_factory=dict)  # further trainer config keys
    # Rough seconds on the shared 2-core machine, for the plan: a model load, a training step per
    # method, a description (generation + judge), a forward of one pair, the speed measurement.
    est_load_s: float = 25.0
    est_step_s: dict = field(default_factory=lambda: {"synpo": 7.0, "dpo": 8.5, "simpo": 7.0})
    est_describe_s: float = 4.5
    est_forward_s: float = 1.2
    est_speed_s: float = 240.0
    description: str = ""

    def __post_init__(self):
        for name in ("steps", "fluent_paragraphs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(
                    f"quality.{self.name}.{name}: must be an int >= 1, got {getattr(self, name)!r}"
                )
        if not self.lr_grid or any(not isinstance(lr, (int, float)) or lr <= 0 for lr in self.lr_grid):
            raise ValueError(f"quality.{self.name}.lr_grid: positive learning rates, got {self.lr_grid!r}")
        if len(set(self.lr_grid)) != len(self.lr_grid):
            raise ValueError(f"quality.{self.name}.lr_grid: repeated rate in {self.lr_grid!r}")
        if not self.test_seeds or len(set(self.test_seeds)) != len(self.test_seeds):
            raise ValueError(f"quality.{self.name}.test_seeds: distinct seeds, got {self.test_seeds!r}")
        for name in ("validation_scenes", "test_scenes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"quality.{self.name}.{name}: an int >= 1 or null, got {value!r}")


def _preset(name: str, entry: dict) -> QualityPreset:
    return presets.from_mapping(QualityPreset, {**entry, "name": name}, f"quality.{name}")


PRESETS = presets.load("quality", _preset)


# ---------------------------------------------------------------------------------------------
# The measures (plain PyTorch on full logits, independent of the kernels under comparison)
# ---------------------------------------------------------------------------------------------


def mean_token_logprobs(logits, labels, ignore_index: int = IGNORE_INDEX):
    """Per row, the mean log-prob of the labelled tokens (``labels[:, t]`` scored by
    ``logits[:, t - 1]``, ``ignore_index`` skipped), float64 ``(rows,)``."""
    import torch

    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits, labels: expected (rows, T, V) and (rows, T), got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    target = labels[:, 1:]
    mask = target != ignore_index
    counts = mask.sum(-1)
    if bool((counts == 0).any()):
        raise ValueError("labels: a row has no labelled token to score")
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1).double()
    return (token * mask).sum(-1) / counts


def preference_accuracy(chosen, rejected) -> float:
    """The fraction of pairs with ``chosen > rejected`` (strictly: a tie counts as wrong)."""
    chosen, rejected = list(map(float, chosen)), list(map(float, rejected))
    if len(chosen) != len(rejected) or not chosen:
        raise ValueError(
            f"chosen, rejected: expected equally many (>= 1) values, got {len(chosen)} and {len(rejected)}"
        )
    return sum(c > r for c, r in zip(chosen, rejected)) / len(chosen)


def heldout_preferences(model, dataset, collator) -> dict:
    """Mean token log-prob of each held-out pair's chosen and rejected response under ``model``
    (eval mode, no grad, one pair per forward), and the preference accuracy from them."""
    import torch

    from synpo.objective import model_inputs

    chosen, rejected = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(len(dataset)):
                batch = collator([dataset[i]])
                if batch.get("empty"):
                    continue
                logits = model(**model_inputs(batch), use_cache=False, return_dict=True).logits
                m = mean_token_logprobs(logits, batch["labels"])
                chosen.append(float(m[0]))
                rejected.append(float(m[1]))
    finally:
        model.train(was_training)
    return {
        "accuracy": preference_accuracy(chosen, rejected),
        "chosen_logps": statistics.fmean(chosen),
        "rejected_logps": statistics.fmean(rejected),
        "pairs": len(chosen),
        "chosen": chosen,
        "rejected": rejected,
    }


def read_paragraphs(path: Path) -> list[str]:
    """Blank-line separated paragraphs of ``path`` (lines starting with ``#`` are comments)."""
    lines = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if not ln.startswith("#")]
    paragraphs, current = [], []
    for line in [*lines, ""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    return paragraphs


def perplexity(model, tokenizer, texts: list[str]) -> dict:
    """Token-level perplexity of ``texts`` (each tokenized alone, every token after the first
    scored): ``exp(total NLL / scored tokens)``."""
    import torch

    if not texts:
        raise ValueError("texts: no text to score")
    nll, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for text in texts:
                ids = tokenizer(text, return_tensors="pt")["input_ids"]
                if ids.shape[1] < 2:
                    raise ValueError(f"texts: {text[:40]!r} has fewer than two tokens")
                logits = model(input_ids=ids, use_cache=False, return_dict=True).logits
                mean = mean_token_logprobs(logits, ids)
                scored = ids.shape[1] - 1
                nll -= float(mean[0]) * scored
                count += scored
    finally:
        model.train(was_training)
    return {"perplexity": math.exp(nll / count), "nll_per_token": nll / count, "tokens": count}


# ---------------------------------------------------------------------------------------------
# Data: the pipeline's scenes and scores, split by scene id
# ---------------------------------------------------------------------------------------------


def scene_split(scene_id: str) -> str:
    """``"test"``, ``"validation"`` or ``"train"``, from a hash of the id alone (the pipeline's
    :func:`~synpo.pairs.select.is_heldout`): independent of which other scenes exist and of their order."""
    from synpo.pairs.select import is_heldout

    if not isinstance(scene_id, str) or not scene_id:
        raise ValueError(f"scene_id: a non-empty string, got {scene_id!r}")
    if is_heldout(scene_id, TEST_FRACTION):
        return "test"
    if is_heldout(scene_id, TEST_FRACTION + VALIDATION_FRACTION):
        return "validation"
    return "train"


def harder_pair(scores_record: dict) -> dict | None:
    """The harder condition's pair of one scene: its best candidate (``select_pair``'s rule: highest
    score, lowest index among ties) against its second-best (the best of those scoring strictly less),
    whatever the gap; None when fewer than two distinct scores."""
    scored = [
        c
        for c in scores_record.get("candidates") or []
        if isinstance(c, dict) and c.get("status") == "ok" and isinstance(c.get("score"), (int, float))
    ]
    if not scored:
        return None
    chosen = max(scored, key=lambda c: (c["score"], -c["index"]))
    below = [c for c in scored if c["score"] < chosen["score"]]
    if not below:
        return None
    rejected = max(below, key=lambda c: (c["score"], -c["index"]))
    return {
        "id": scores_record["id"],
        "prompt": scores_record["prompt"],
        "chosen": chosen["text"],
        "rejected": rejected["text"],
        "chosen_score": chosen["score"],
        "rejected_score": rejected["score"],
        "score_gap": round(chosen["score"] - rejected["score"], 6),
        "chosen_index": chosen["index"],
        "rejected_index": rejected["index"],
    }


@dataclass
class ProtocolData:
    """What the protocol reads from a pairs folder (``scenes.jsonl`` and ``scores.jsonl``)."""

    pairs_dir: Path
    scenes: dict  # id -> synpo.pairs.scenes.Scene
    scores: dict  # id -> the scores record (the pipeline's candidates and their judge scores)
    split_ids: dict  # split -> sorted scene ids
    judged_ids: dict  # "validation" / "test" -> the scene ids whose descriptions are judged
    pairs: dict  # "train" / "test" / "test_hard" -> pair records

    def counts(self) -> dict:
        return {
            "scenes": {s: len(self.split_ids[s]) for s in SPLITS},
            "judged_scenes": {s: len(ids) for s, ids in self.judged_ids.items()},
            "pairs": {k: len(v) for k, v in self.pairs.items()},
        }


def load_protocol_data(
    pairs_dir: str | Path, validation_scenes: int | None = None, test_scenes: int | None = None
) -> ProtocolData:
    """The splits, pairs and judged scenes of ``pairs_dir``; a missing or inconsistent file is a
    ValueError naming it (``--pairs-dir``)."""
    from synpo.pairs.io import latest_by_id
    from synpo.pairs.scenes import read_scenes
    from synpo.pairs.select import DEFAULT_MIN_SCORE_GAP, select_pair

    pairs_dir = Path(pairs_dir)
    paths = {name: pairs_dir / f"{name}.jsonl" for name in ("scenes", "scores")}
    for name, path in paths.items():
        if not path.is_file():
            raise ValueError(
                f"--pairs-dir: {path}: no such file (the pairs pipeline's {name} stage writes it)"
            )
    try:
        scenes = {s.id: s for s in read_scenes(paths["scenes"])}
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(f"--pairs-dir: {exc}") from exc
    scores = {i: r for i, r in latest_by_id(paths["scores"]).items() if r.get("status") == "ok"}
    unknown = sorted(set(scores) - set(scenes))
    if unknown:
        raise ValueError(
            f"--pairs-dir: {paths['scores']}: {len(unknown)} scored ids not in scenes.jsonl, "
            f"e.g. {unknown[0]!r}"
        )
    split_ids = {s: [] for s in SPLITS}
    for scene_id in sorted(scenes):
        split_ids[scene_split(scene_id)].append(scene_id)
    # A scene is judged only with pipeline candidates to compare its description with (consistency).
    judgeable = {s: [i for i in split_ids[s] if len(_reference_texts(scores.get(i))) >= 2] for s in SPLITS}
    judged = {
        "validation": judgeable["validation"][:validation_scenes],
        "test": judgeable["test"][:test_scenes],
    }
    pairs = {"train": [], "test": [], "test_hard": []}
    for scene_id in sorted(scores):
        split = scene_split(scene_id)
        selection = select_pair(scores[scene_id], min_score_gap=DEFAULT_MIN_SCORE_GAP)
        if selection.record is not None and split in ("train", "test"):
            pairs[split].append(selection.record)
        if split == "test":
            hard = harder_pair(scores[scene_id])
            if hard is not None:
                pairs["test_hard"].append(hard)
    for key, records in pairs.items():
        if not records:
            raise ValueError(f"--pairs-dir: {pairs_dir}: no {key.replace('_', ' ')} pairs")
    for split, ids in judged.items():
        if not ids:
            raise ValueError(
                f"--pairs-dir: {pairs_dir}: no {split} scene with scored candidates to judge against"
            )
    return ProtocolData(pairs_dir, scenes, scores, split_ids, judged, pairs)


def _reference_texts(scores_record: dict | None) -> list[str]:
    """The scene's non-empty pipeline candidates: what a description's consistency is measured against."""
    if not scores_record:
        return []
    out = []
    for c in scores_record.get("candidates") or []:
        text = c.get("text") if isinstance(c, dict) else None
        if isinstance(text, str) and text.strip():
            out.append(text.strip())
    return out


def write_pairs(records: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    common._atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def _file_info(path: Path) -> dict:
    """Path (relative to the checkout when inside it), hash and non-empty lines of a data file."""
    data = Path(path).read_bytes()
    shown = str(path)
    with contextlib.suppress(ValueError, TypeError):
        shown = str(Path(path).resolve().relative_to(Path(common.repo_root()).resolve()))
    return {
        "path": shown,
        "sha256": hashlib.sha256(data).hexdigest(),
        "lines": sum(1 for ln in data.decode().splitlines() if ln.strip()),
    }


# ---------------------------------------------------------------------------------------------
# (a) Descriptions written by the model, scored by the pipeline's text judge
# ---------------------------------------------------------------------------------------------

CRITERIA = ("hallucination", "harmony", "consistency")


def judge_description(judge, data: ProtocolData, scene_id: str, text: str) -> dict:
    """One description of ``scene_id`` scored by the pipeline's text judge (``judge``, a
    :class:`~synpo.pairs.textjudge.TextJudge`) as one more candidate beside the scene's pipeline
    candidates: its hallucination and harmony are the judge's, its consistency is its mean embedding
    similarity to them. ``{score, hallucination, harmony, consistency, words, empty}``; an empty
    description scores 0 on every criterion."""
    from synpo.pairs.text import scene_instruction

    scene = data.scenes[scene_id]
    references = _reference_texts(data.scores.get(scene_id))
    record = {
        "id": scene_id,
        "prompt": scene_instruction(scene.facts),
        "candidates": [{"index": i, "text": t} for i, t in enumerate([text, *references])],
    }
    entry = judge.score_scene(record, scene.facts)["candidates"][0]
    words = len(text.split())
    if entry.get("status") != "ok":
        return {"score": 0.0, **dict.fromkeys(CRITERIA, 0), "words": words, "empty": True}
    return {"score": entry["score"], **{c: entry[c] for c in CRITERIA}, "words": words, "empty": False}


def describe_scenes(
    model, tokenizer, data: ProtocolData, scene_ids: list[str], seed: int, judge, step=None
) -> dict:
    """(a) on ``scene_ids``: ``model`` writes one description per scene (the pipeline's
    :class:`~synpo.pairs.text.TextGenerator`, instruction and sampling settings, seeded per scene
    from ``seed`` as the candidates stage is), each scored by :func:`judge_description`. The means
    over the scenes, and each scene's text and scores under ``"scenes"``. ``step()`` after each scene."""
    import torch

    from synpo.pairs.candidates import video_seed
    from synpo.pairs.text import TEXT_SAMPLING, TextGenerator, scene_instruction

    generator = TextGenerator(model, tokenizer)
    was_training = model.training
    model.eval()
    rows = []
    try:
        for scene_id in scene_ids:
            torch.manual_seed(video_seed(seed, scene_id))
            text = generator.generate(scene_instruction(data.scenes[scene_id].facts), TEXT_SAMPLING, 1)[0]
            rows.append({"id": scene_id, "text": text, **judge_description(judge, data, scene_id, text)})
            if step is not None:
                step()
    finally:
        model.train(was_training)
    means = {key: statistics.fmean(r[key] for r in rows) for key in ("score", *CRITERIA, "words")}
    return {**means, "empty": sum(r["empty"] for r in rows), "n": len(rows), "scenes": rows}


_JUDGES: dict = {}


def text_judge():
    """The pipeline's text judge, its sentence-embedding model loaded once per process."""
    if "text" not in _JUDGES:
        from synpo.pairs.textjudge import TextJudge

        _JUDGES["text"] = TextJudge()
    return _JUDGES["text"]


# ---------------------------------------------------------------------------------------------
# The protocol, its runs and their persistence
# ---------------------------------------------------------------------------------------------


def method_overrides(
    preset: QualityPreset, method: str, lr: float, seed: int, train_file, output_dir
) -> dict:
    """Trainer config overrides of one run: the loss and its paper's hyper-parameters differ between
    methods; the rate and the seed between runs; everything else is shared."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if not isinstance(lr, (int, float)) or lr <= 0:
        raise ValueError(f"lr: a positive learning rate, got {lr!r}")
    overrides = {
        **preset.overrides,
        "data.train_file": str(train_file),
        "loss.name": method,
        **{f"loss.{key}": value for key, value in METHOD_LOSS[method].items()},
        "optim.lr": float(lr),
        "train.seed": int(seed),
        "train.max_steps": preset.steps,
        "logging.eval_every": 0,  # the protocol's own measures replace the trainer's evaluation
        "logging.progress_bar": False,
        "checkpoint.output_dir": str(output_dir),
        "checkpoint.save_every": 0,
        "checkpoint.save_at_end": False,
        "checkpoint.overwrite": True,
        "checkpoint.resume": None,  # a stopped run starts over: the run, not the step, is what resumes
    }
    if method == "dpo":
        overrides["loss.reference.mode"] = "adapter_disabled"  # as upstream
    return overrides


@dataclass(frozen=True)
class RunSpec:
    """One run of the protocol: ``base`` (the base model scored on a split), ``train`` (a method at a
    rate and seed, scored on its split) or ``speed`` (fused vs naive steps/s)."""

    kind: str
    split: str | None = None
    method: str | None = None
    lr: float | None = None  # None: a test run whose rate the validation runs have not chosen yet
    seed: int | None = None

    @property
    def run_id(self) -> str:
        if self.kind == "speed":
            return "speed"
        if self.kind == "base":
            return f"base-{self.split}"
        rate = "TBD" if self.lr is None else f"{self.lr:g}"
        return f"{self.split}-{self.method}-lr{rate}-seed{self.seed}"


def plan_runs(preset: QualityPreset, selected: dict | None = None) -> list[RunSpec]:
    """The protocol's runs in order: validation first (they choose the rates), then test, then speed.
    ``selected``: each method's chosen rate, once the validation runs are done."""
    runs = [RunSpec("base", "validation")]
    runs += [
        RunSpec("train", "validation", m, float(lr), preset.validation_seed)
        for lr in preset.lr_grid
        for m in METHODS
    ]
    runs.append(RunSpec("base", "test"))
    runs += [
        RunSpec("train", "test", m, None if selected is None else selected[m], seed)
        for seed in preset.test_seeds
        for m in METHODS
    ]
    runs.append(RunSpec("speed"))
    return runs


def estimate_s(spec: RunSpec, preset: QualityPreset, data: ProtocolData) -> float:
    """Rough seconds of one run on the shared 2-core machine, from the preset's estimates."""
    if spec.kind == "speed":
        return preset.est_speed_s
    counts = data.counts()
    describe = counts["judged_scenes"][spec.split] * preset.est_describe_s
    if spec.split == "test":
        pairs = counts["pairs"]["test"] + counts["pairs"]["test_hard"]
        describe += (pairs + preset.fluent_paragraphs / 3) * preset.est_forward_s  # a paragraph ~ 1/3 pair
    train = preset.steps * preset.est_step_s[spec.method] if spec.kind == "train" else 0.0
    return preset.est_load_s + train + describe


def protocol(preset: QualityPreset, data: ProtocolData, texts: list[str]) -> dict:
    """Everything the results depend on, and its id (a hash): the runs dir holds runs of one id."""
    from synpo.config import load_config
    from synpo.pairs.text import TEXT_SAMPLING
    from synpo.pairs.textjudge import judge_settings

    cfg = load_config(preset.config, dict(preset.overrides))
    body = {
        "preset": preset.name,
        "config": preset.config or "default (embedded tiny model)",
        "config_overrides": dict(preset.overrides),
        "model": cfg.model.name_or_path or "embedded tiny model",
        "gguf_file": cfg.model.gguf_file,
        "lora": asdict(cfg.lora),
        "optim": {
            k: getattr(cfg.optim, k) for k in ("schedule", "warmup_ratio", "weight_decay", "max_grad_norm")
        },
        "steps": preset.steps,
        "pairs_per_step": cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps,
        "micro_batch_size": cfg.train.micro_batch_size,
        "max_length": cfg.data.max_length,
        "cpu_threads": cfg.train.cpu_threads,
        "methods": {
            m: {
                "loss": METHOD_LOSS[m],
                "source": METHOD_SOURCES[m],
                "reference": "adapter_disabled" if m == "dpo" else None,
            }
            for m in METHODS
        },
        "lr_grid": [float(lr) for lr in preset.lr_grid],
        "validation_seed": preset.validation_seed,
        "test_seeds": list(preset.test_seeds),
        "splits": {
            "test_fraction": TEST_FRACTION,
            "validation_fraction": VALIDATION_FRACTION,
            **data.counts(),
        },
        "generation": {"seed": preset.generation_seed, "sampling": TEXT_SAMPLING.to_dict(), "per_scene": 1},
        "judge": judge_settings(),
        "saturated_accuracy": SATURATED_ACCURACY,
        "fluent_paragraphs": len(texts),
        "speed": {
            "warmup_steps": preset.speed_warmup,
            "steps": preset.speed_steps,
            "pairs": preset.speed_pairs,
            "model": preset.speed_model,
        },
        "data_files": {
            "scenes": _file_info(data.pairs_dir / "scenes.jsonl"),
            "scores": _file_info(data.pairs_dir / "scores.jsonl"),
            "fluent": _file_info(FLUENT_TEXT_PATH),
        },
    }
    # The id ignores where the files are (a checkout elsewhere runs the same protocol), not what.
    hashed = {**body, "data_files": {k: v["sha256"] for k, v in body["data_files"].items()}}
    digest = hashlib.sha256(json.dumps(hashed, sort_keys=True, default=str).encode()).hexdigest()
    return {"id": digest[:12], **body}


def load_runs(runs_dir: Path, protocol_id: str) -> dict[str, dict]:
    """The finished runs in ``runs_dir`` by run id; runs of another protocol are a ValueError (they
    would be mixed into this one's results)."""
    runs_dir = Path(runs_dir)
    done: dict[str, dict] = {}
    if not runs_dir.is_dir():
        return done
    other = []
    for path in sorted(runs_dir.glob("*.json")):  # a half-written file is a *.json.tmp: never read
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"--runs-dir: {path}: not a run file ({exc})") from exc
        if not isinstance(record, dict) or "run_id" not in record:
            raise ValueError(f"--runs-dir: {path}: not a run file (no run_id)")
        if record.get("protocol_id") != protocol_id:
            other.append(f"{path.name} ({record.get('protocol_id')})")
            continue
        done[record["run_id"]] = record
    if other:
        raise ValueError(
            f"--runs-dir {runs_dir}: {len(other)} run(s) of another protocol, e.g. {other[0]}, this one is "
            f"{protocol_id}: pass another --runs-dir, or remove them to start this protocol there"
        )
    return done


def save_run(runs_dir: Path, record: dict) -> Path:
    """Write one finished run, atomically (a killed write leaves a ``.tmp`` file, never a half run)."""
    path = Path(runs_dir) / f"{record['run_id']}.json"
    common._atomic_write(path, json.dumps(record, indent=1, default=str) + "\n")
    return path


def validation_scores(runs) -> dict[str, dict[float, float]]:
    """``{method: {lr: validation judge score}}`` from the validation runs among ``runs`` (others ignored)."""
    out: dict[str, dict[float, float]] = {}
    for r in runs:
        if r.get("kind") == "train" and r.get("split") == "validation":
            out.setdefault(r["method"], {})[float(r["lr"])] = r["metrics"]["judge"]["score"]
    return out


def select_lrs(runs, lr_grid, methods=METHODS) -> dict[str, float]:
    """Each method's rate: the grid rate of its best validation judge score (ties: the smaller rate).
    Only validation runs are read; a missing one is a ValueError."""
    scores = validation_scores(runs)
    selected = {}
    for method in methods:
        by_lr = scores.get(method, {})
        missing = [lr for lr in lr_grid if float(lr) not in by_lr]
        if missing:
            raise ValueError(f"runs: no validation run of {method} at lr {missing[0]:g}")
        best = max(by_lr[float(lr)] for lr in lr_grid)
        selected[method] = min(float(lr) for lr in lr_grid if by_lr[float(lr)] == best)
    return selected


def _selection(done: dict, preset: QualityPreset) -> dict | None:
    """The selected rates once every validation run is done, else None."""
    try:
        return select_lrs(done.values(), preset.lr_grid)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# Executing runs
# ---------------------------------------------------------------------------------------------


def loss_hyperparameters(loss) -> dict:
    """A method's loss hyper-parameters as trained: the config's, else the registry's defaults."""
    from synpo_kernels.loss_registry import get_loss

    return {p.name: loss.params.get(p.name, p.default) for p in get_loss(loss.name).params}


@contextlib.contextmanager
def _watch_steps(path: Path, bar):
    """Advances a progress bar as the trainer appends training rows to its metrics file."""
    seen = 0
    stop = threading.Event()

    def poll() -> None:
        nonlocal seen
        with contextlib.suppress(OSError):
            rows = sum('"split"' not in ln for ln in path.read_text().splitlines() if ln.strip())
            if rows > seen:
                bar.update(rows - seen)
                seen = rows

    def run() -> None:
        while not stop.wait(0.5):
            poll()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        poll()


class _Progress:
    """The bar runs over the plan's estimated seconds: a run moves it by its estimate (its steps and
    descriptions as they happen, the rest when it ends), so the bar's ETA is the plan's remaining
    estimate scaled by the pace seen so far."""

    def __init__(self, bar):
        self.bar = bar
        self._end = bar.n

    def begin(self, spec: RunSpec, est: float, index: int, total: int) -> None:
        self._end = self.bar.n + est
        self.bar.set_postfix_str(f"run {index}/{total}: {spec.run_id}")

    def advance(self, seconds: float) -> None:
        step = min(seconds, self._end - self.bar.n)
        if step > 0:
            self.bar.update(step)

    def end(self) -> None:
        if self._end > self.bar.n:
            self.bar.update(self._end - self.bar.n)


class _Scaled:
    """A ``bar.update(n)`` for :func:`_watch_steps` that advances ``progress`` by n steps' estimate."""

    def __init__(self, progress: _Progress | None, seconds: float):
        self.progress, self.seconds = progress, seconds

    def update(self, n: int) -> None:
        if self.progress is not None:
            self.progress.advance(n * self.seconds)


@dataclass
class _Context:
    preset: QualityPreset
    data: ProtocolData
    protocol: dict
    texts: list
    files: dict  # "train" / "test" / "test_hard" -> the pairs file
    work: Path
    keep_work: bool
    timeout_s: float
    progress: _Progress | None = None


def _advance(ctx: _Context, seconds: float) -> None:
    if ctx.progress is not None:
        ctx.progress.advance(seconds)


def execute_run(spec: RunSpec, ctx: _Context, done: dict) -> dict:
    """Run one planned run; its record (not yet saved)."""
    if spec.kind == "train" and spec.lr is None:
        raise ValueError(f"{spec.run_id}: the rate is chosen by the validation runs, which are not all done")
    started, cpu_started = time.perf_counter(), time.process_time()
    if spec.kind == "speed":
        out = _speed_run(ctx, done)
    elif spec.kind in ("base", "train"):
        out = _model_run(spec, ctx)
    else:
        raise ValueError(f"spec.kind: expected base, train or speed, got {spec.kind!r}")
    provenance = common.provenance("cpu")
    return {
        "run_id": spec.run_id,
        "protocol_id": ctx.protocol["id"],
        "kind": spec.kind,
        "split": spec.split,
        "method": spec.method,
        "lr": spec.lr,
        "seed": spec.seed,
        **out,
        "wall_s": time.perf_counter() - started,
        "cpu_s": time.process_time() - cpu_started,
        "provenance": {
            k: provenance.get(k) for k in ("commit", "date", "host_cpu", "load_average", "torch", "device")
        },
    }


def _model_run(spec: RunSpec, ctx: _Context) -> dict:
    from synpo.train.loop import Trainer

    preset = ctx.preset
    method = spec.method or METHODS[0]  # a base run loads the model as a run would; it trains nothing
    lr = spec.lr if spec.kind == "train" else preset.lr_grid[0]
    seed = spec.seed if spec.kind == "train" else preset.validation_seed
    out_dir = ctx.work / "runs" / spec.run_id
    shutil.rmtree(out_dir, ignore_errors=True)
    overrides = method_overrides(preset, method, lr, seed, ctx.files["train"], out_dir)
    trainer = Trainer(preset.config, overrides=overrides).setup()
    try:
        _advance(ctx, preset.est_load_s)
        info = _run_info(trainer)
        train = None
        if spec.kind == "train":
            train_started = time.perf_counter()
            metrics_file = trainer.output_dir / trainer.config.logging.metrics_file
            with _watch_steps(metrics_file, _Scaled(ctx.progress, preset.est_step_s[method])):
                result = trainer.train()
            if result.interrupted:
                # The trainer stopped on SIGTERM/SIGINT; the finished runs are on disk, this one is not.
                raise SystemExit(
                    f"synpo bench quality: {spec.run_id} stopped by {result.stop_signal or 'a request'}; "
                    "the finished runs are kept: rerun the same command to continue"
                )
            train = _train_summary(result, time.perf_counter() - train_started)
        else:
            trainer.release_run_lock()
        metrics, details = _evaluate(trainer, spec, ctx, trained=spec.kind == "train")
    finally:
        del trainer
        gc.collect()
        if not ctx.keep_work:
            shutil.rmtree(out_dir, ignore_errors=True)
    return {"metrics": metrics, "train": train, "info": info, "details": details}


def _run_info(trainer) -> dict:
    policy = trainer.policy
    return {
        "model_source": trainer.model_source,
        "trainable_params": sum(p.numel() for p in policy.parameters() if p.requires_grad),
        "train_pairs": len(trainer.dataset),
        # The read report without its file name (a temporary path).
        "read": trainer.read_report.summary().removeprefix(f"{trainer.read_report.path}: "),
        "tokenization": trainer.dataset.encoder.stats.summary(),
        "hyperparameters": loss_hyperparameters(trainer.config.loss),
        "lr": trainer.config.optim.lr,
        "seed": trainer.config.train.seed,
        "pair_lengths": _pair_lengths(trainer.dataset),
        "model_config": _model_shape(policy),
    }


_CURVE_KEYS = (
    "step",
    "loss",
    "chosen_logps",
    "rejected_logps",
    "reward_margin",
    "grad_norm",
    "tokens",
    "step_time_s",
)


def _train_summary(result, train_s: float) -> dict:
    # The first step pays one-off costs (allocations, first calls); the rate is the median of the rest.
    times = [r["step_time_s"] for r in result.history[1:]] or [r["step_time_s"] for r in result.history]
    return {
        "steps": result.global_step,
        "step_s": statistics.median(times),
        "steps_per_s": 1.0 / statistics.median(times),
        "wall_s": train_s,
        "peak_memory_mb": max(r.get("peak_memory_mb") or 0 for r in result.history),
        "curve": [{k: r.get(k) for k in _CURVE_KEYS} for r in result.history],
    }


def _evaluate(trainer, spec: RunSpec, ctx: _Context, trained: bool) -> tuple[dict, dict]:
    """The split's measures of the trainer's model: the base model (adapter off) when not ``trained``.
    Test: (b)-(c) on the test pairs and the harder ones, (d) perplexity; both splits: (a) last."""
    from synpo.data import PreferenceCollator, PreferenceDataset, read_preference_jsonl

    policy, preset = trainer.policy, ctx.preset
    metrics: dict = {}
    details: dict = {}
    with contextlib.nullcontext() if trained else policy.disable_adapter():
        if spec.split == "test":
            collator = PreferenceCollator(trainer.tokenizer.pad_token_id)  # one pair per forward, unshared
            for condition, key in (("standard", "test"), ("hard", "test_hard")):
                examples, _ = read_preference_jsonl(ctx.files[key], min_score_gap=None)
                # The trainer's own encoder (template, system prompt, max_length), a fresh one per set.
                dataset = PreferenceDataset(examples, trainer._make_encoder())
                pref = heldout_preferences(policy, dataset, collator)
                metrics.setdefault("pairs", {})[condition] = {
                    k: pref[k] for k in ("accuracy", "chosen_logps", "rejected_logps", "pairs")
                }
                details.setdefault("pairs", {})[condition] = {
                    "chosen": pref["chosen"],
                    "rejected": pref["rejected"],
                }
                _advance(ctx, pref["pairs"] * preset.est_forward_s)
            metrics["perplexity"] = perplexity(policy, trainer.tokenizer, ctx.texts)
            _advance(ctx, len(ctx.texts) / 3 * preset.est_forward_s)
        if trained and hasattr(policy, "merge_adapter"):
            # Sampling is ~1.5x faster with the adapter merged into the weights; nothing runs after it.
            policy.merge_adapter()
        judged = describe_scenes(
            policy,
            trainer.tokenizer,
            ctx.data,
            ctx.data.judged_ids[spec.split],
            preset.generation_seed,
            text_judge(),
            step=lambda: _advance(ctx, preset.est_describe_s),
        )
    metrics["judge"] = {k: v for k, v in judged.items() if k != "scenes"}
    details["descriptions"] = judged["scenes"]
    return metrics, details


def _speed_run(ctx: _Context, done: dict) -> dict:
    """(e): the trainer benchmark's step on this model (its shape and the data's median lengths from a
    finished training run), fused vs naive, SynPO vs DPO with a reference, in a worker process."""
    from synpo.config import load_config

    source = next((r for r in done.values() if r.get("kind") == "train" and r.get("info")), None)
    if source is None:
        raise ValueError("speed: needs a finished training run (its model shape and pair lengths)")
    cfg = load_config(ctx.preset.config, dict(ctx.preset.overrides))
    task = speed_task(ctx.preset, source["info"], cfg.lora)
    records = measure_speed(task, ctx.preset, ctx.timeout_s)
    return {"metrics": {"speed": records}, "info": {"batch": task["batch"], "memory": MEMORY_METHOD}}


def _pair_lengths(dataset) -> dict:
    pairs = [dataset[i] for i in range(len(dataset))]
    return {
        "prompt": int(statistics.median(len(p.prompt_ids) for p in pairs)),
        "chosen": int(statistics.median(len(p.chosen_ids) for p in pairs)),
        "rejected": int(statistics.median(len(p.rejected_ids) for p in pairs)),
    }


def _model_shape(policy) -> dict:
    config = policy.config
    return {
        "arch": config.model_type,
        "hidden": config.hidden_size,
        "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads,
        "intermediate": config.intermediate_size,
        "vocab": config.vocab_size,
    }


# ---------------------------------------------------------------------------------------------
# Speed: synpo bench trainer's step code on this model, in a worker process
# ---------------------------------------------------------------------------------------------


def speed_task(preset: QualityPreset, summary: dict, lora) -> dict:
    """The worker task: the four trainer-benchmark methods on this model, timed in turn."""
    from synpo.benchmarking import trainer as tb

    lengths = summary["pair_lengths"]
    batch = tb.BatchSpec(preset.speed_pairs, lengths["prompt"], lengths["chosen"], lengths["rejected"])
    if preset.speed_model is not None:
        spec = tb.MODELS[preset.speed_model]
    else:
        shape = summary["model_config"]
        spec = tb.ModelSpec(
            preset.config,
            shape["arch"],
            hidden=shape["hidden"],
            layers=shape["layers"],
            heads=shape["heads"],
            intermediate=shape["intermediate"],
            vocab=shape["vocab"],
            lora_r=lora.r,
            lora_alpha=lora.alpha,
        )
    return {
        "group": "speed",
        "model": asdict(spec),
        "batch": asdict(batch),
        "methods": list(SPEED_METHODS),
        "config": None if preset.speed_model else preset.config,
    }


def run_task(task: dict, settings: dict, context: dict) -> dict:
    """Worker entry (``python -m synpo.benchmarking.worker quality``): build the model (the bundled
    trainer config's, LoRA from it; or a trainer-benchmark spec) and time the methods in turn."""
    import torch

    from synpo.benchmarking import trainer as tb

    if settings.get("threads"):
        torch.set_num_threads(settings["threads"])
    t0 = time.perf_counter()
    if task.get("config"):
        from synpo.config import load_config
        from synpo.models import apply_lora, load_model

        cfg = load_config(task["config"])
        loaded = load_model(cfg.model, device=torch.device("cpu"), seed=cfg.train.seed)
        model = loaded.model
        model.config.use_cache = False
        torch.manual_seed(cfg.train.seed)
        model = apply_lora(model, cfg.lora)
        model.train()
        pad, vocab = loaded.tokenizer.pad_token_id, model.config.vocab_size
    else:
        model, pad, vocab = tb.build_model(tb.ModelSpec(**task["model"]), "cpu")
    build_s = time.perf_counter() - t0
    # The step code takes a batch per layout (unshared rows, or prompt-shared rows) its methods use.
    layouts = {tb.METHODS[m].shared for m in task["methods"]}
    spec = tb.BatchSpec(**task["batch"])
    batches = {shared: tb.build_batch(spec, vocab, pad, "cpu", shared=shared) for shared in layouts}
    results = tb._measure_methods(
        model, batches, task["methods"], "cpu", settings["warmup_steps"], settings["steps"], False
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    for result in results.values():
        result.update(trainable_params=trainable, total_params=total, model_build_s=build_s)
    return {"status": "ok", "methods": results}


MEMORY_METHOD = (
    "peak RSS of the worker process during one optimizer step (VmHWM reset before it; weights, every "
    "method's optimizer state and the step's own allocations); step memory = that peak above the RSS "
    "just before the step (glibc mmap threshold fixed)"
)


def measure_speed(task: dict, preset: QualityPreset, timeout_s: float) -> list[dict]:
    from synpo.benchmarking import runner
    from synpo.benchmarking import trainer as tb

    settings = {
        "device": "cpu",
        "warmup_steps": preset.speed_warmup,
        "steps": preset.speed_steps,
        "autocast_bf16": False,
        "threads": preset.overrides.get("train.cpu_threads"),  # as the training runs
    }
    results = runner.run_tasks(
        "quality",
        [task],
        settings=settings,
        isolation="group",
        timeout_s=timeout_s,
        describe=lambda t: "speed: " + " + ".join(t["methods"]),
        summarize=tb._summarize,
        desc="speed",
        env=common.worker_env("cpu"),
    )
    records = tb.build_records(preset, *tb.per_method([task], results), MEMORY_METHOD)
    return [{"kind": "speed", **{k: v for k, v in r.items() if k != "benchmark"}} for r in records]


# ---------------------------------------------------------------------------------------------
# Results: the summary of the finished runs
# ---------------------------------------------------------------------------------------------


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0.0 for a single value) of ``values``."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("values: nothing to summarize")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _before_after(before: float, afters: list[float]) -> dict:
    mean, std = mean_std(afters)
    return {"before": before, "after_mean": mean, "after_std": std}


def _delta(afters: list[float], before: float) -> dict:
    mean, std = mean_std([a - before for a in afters])
    return {"mean": mean, "std": std}


def summarize(runs: list[dict], lr_grid) -> dict:
    """``summary[method]`` from the finished runs: the selected rate (validation runs only), and over
    the test seeds at that rate the mean and std of every figure, beside the base model's value."""
    by_id = {r["run_id"]: r for r in runs}
    missing = [k for k in ("base-validation", "base-test") if k not in by_id]
    if missing:
        raise ValueError(f"runs: {missing[0]} is not among the finished runs")
    base_val, base_test = by_id["base-validation"]["metrics"], by_id["base-test"]["metrics"]
    selected = select_lrs(runs, lr_grid)
    scores = validation_scores(runs)
    grid = sorted(float(lr) for lr in lr_grid)
    summary = {}
    for method in METHODS:
        tests = sorted(
            (
                r
                for r in runs
                if r.get("kind") == "train"
                and r.get("split") == "test"
                and r["method"] == method
                and float(r["lr"]) == selected[method]
            ),
            key=lambda r: r["seed"],
        )
        if not tests:
            raise ValueError(f"runs: no test run of {method} at its selected lr {selected[method]:g}")
        judge = [r["metrics"]["judge"] for r in tests]
        pairs = {c: [r["metrics"]["pairs"][c] for r in tests] for c in ("standard", "hard")}
        base_pairs = base_test["pairs"]
        summary[method] = {
            "lr": selected[method],
            "lr_at_grid_edge": selected[method] in (grid[0], grid[-1]) and len(grid) > 1,
            "validation": {
                "judge_score_before": base_val["judge"]["score"],
                "judge_score": [{"lr": lr, "score": scores[method][lr]} for lr in grid],
            },
            "seeds": [r["seed"] for r in tests],
            "test_judge_score": _before_after(base_test["judge"]["score"], [j["score"] for j in judge]),
            "test_criteria": {
                c: _before_after(base_test["judge"][c], [j[c] for j in judge]) for c in (*CRITERIA, "words")
            },
            "test_accuracy": _before_after(
                base_pairs["standard"]["accuracy"], [p["accuracy"] for p in pairs["standard"]]
            ),
            "test_accuracy_hard": _before_after(
                base_pairs["hard"]["accuracy"], [p["accuracy"] for p in pairs["hard"]]
            ),
            "chosen_logp_delta": _delta(
                [p["chosen_logps"] for p in pairs["standard"]], base_pairs["standard"]["chosen_logps"]
            ),
            "rejected_logp_delta": _delta(
                [p["rejected_logps"] for p in pairs["standard"]], base_pairs["standard"]["rejected_logps"]
            ),
            "chosen_logp_delta_hard": _delta(
                [p["chosen_logps"] for p in pairs["hard"]], base_pairs["hard"]["chosen_logps"]
            ),
            "rejected_logp_delta_hard": _delta(
                [p["rejected_logps"] for p in pairs["hard"]], base_pairs["hard"]["rejected_logps"]
            ),
            "perplexity_ratio": dict(
                zip(
                    ("mean", "std"),
                    mean_std(
                        r["metrics"]["perplexity"]["perplexity"] / base_test["perplexity"]["perplexity"]
                        for r in tests
                    ),
                )
            ),
            "train_steps_per_s": dict(
                zip(("mean", "std"), mean_std(r["train"]["steps_per_s"] for r in tests))
            ),
        }
    return summary


def _run_entry(record: dict) -> dict:
    """A run as the results file lists it: its identity, measures and costs (texts stay in the run file)."""
    entry = {k: record.get(k) for k in ("run_id", "kind", "method", "lr", "seed", "split")}
    metrics = record.get("metrics") or {}
    entry["metrics"] = {k: v for k, v in metrics.items() if k != "speed"}
    train = record.get("train")
    if train:
        entry["train"] = {k: v for k, v in train.items() if k != "curve"}
        entry["train"]["curve"] = [
            {k: row.get(k) for k in ("step", "loss", "chosen_logps", "rejected_logps", "tokens")}
            for row in train["curve"]
        ]
    entry.update(
        wall_s=record.get("wall_s"), cpu_s=record.get("cpu_s"), commit=record["provenance"].get("commit")
    )
    return entry


def _examples(runs: list[dict], summary: dict, count: int = 1) -> list[dict]:
    """The first judged test scenes: the base model's description and each method's (first seed)."""
    by_id = {r["run_id"]: r for r in runs}
    base = by_id["base-test"]["details"]["descriptions"]
    out = []
    for position, row in enumerate(base[:count]):
        example = {"id": row["id"], "base": row, "methods": {}}
        for method, s in summary.items():
            run = by_id[RunSpec("train", "test", method, s["lr"], s["seeds"][0]).run_id]
            example["methods"][method] = run["details"]["descriptions"][position]
        out.append(example)
    return out


def build_results(ctx: _Context, done: dict, plan: list[RunSpec], stem: str = "real_model") -> dict:
    """The results file of a finished protocol (every planned run in ``done``)."""
    import peft
    import transformers

    import synpo

    runs = [done[s.run_id] for s in plan]
    model_runs = [r for r in runs if r["kind"] != "speed"]
    summary = summarize(model_runs, ctx.preset.lr_grid)
    first = next(r for r in runs if r["kind"] == "train")
    examples = _examples(model_runs, summary)
    for example in examples:
        example["facts"] = list(ctx.data.scenes[example["id"]].facts)
    commits = sorted({r["provenance"].get("commit") for r in runs})
    dates = sorted(r["provenance"].get("date") for r in runs)
    speed = done["speed"]
    meta = {
        **common.provenance("cpu"),
        "preset": ctx.preset.name,
        "preset_description": ctx.preset.description,
        "cpu_threads": ctx.preset.overrides.get("train.cpu_threads") or common.default_threads(),
        "runs_commits": commits,
        "first_run": dates[0],
        "last_run": dates[-1],
        # The protocol's CPU time: the runs' wall times, summed (each run on one torch thread, model
        # loads included; the process CPU time would miss the speed run's worker process).
        "cpu_time_s": sum(r["wall_s"] for r in runs),
        "process_cpu_s": sum(r["cpu_s"] for r in runs),
        "planned_s": sum(estimate_s(s, ctx.preset, ctx.data) for s in plan),
        "model_source": first["info"]["model_source"],
        "trainable_params": first["info"]["trainable_params"],
        "model_config": first["info"]["model_config"],
        "pair_lengths": first["info"]["pair_lengths"],
        "tokenization": first["info"]["tokenization"],
        "hyperparameters": {
            m: next(r["info"]["hyperparameters"] for r in runs if r["kind"] == "train" and r["method"] == m)
            for m in METHODS
        },
        "speed_batch": speed["info"]["batch"],
        "speed_memory": speed["info"]["memory"],
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "synpo": getattr(synpo, "__version__", None),
    }
    return {
        "benchmark": stem,
        "schema": SCHEMA,
        "status": "complete",
        "meta": meta,
        "protocol": ctx.protocol,
        "plan": _plan_info(plan, ctx),
        "summary": summary,
        "runs": [_run_entry(r) for r in runs],
        "speed": speed["metrics"]["speed"],
        "examples": examples,
    }


def pending_results(ctx: _Context, plan: list[RunSpec], stem: str = "real_model") -> dict:
    """The results file before any result: the registered protocol and its plan."""
    provenance = common.provenance("cpu")
    meta = {
        k: provenance.get(k)
        for k in ("device", "device_kind", "host_cpu", "torch", "triton", "commit", "date")
    }
    meta.update(preset=ctx.preset.name, preset_description=ctx.preset.description)
    return {
        "benchmark": stem,
        "schema": SCHEMA,
        "status": "pending",
        "registered": {"commit": meta["commit"], "date": meta["date"]},
        "meta": meta,
        "protocol": ctx.protocol,
        "plan": _plan_info(plan, ctx),
    }


def _plan_info(plan: list[RunSpec], ctx: _Context) -> dict:
    estimates = [estimate_s(s, ctx.preset, ctx.data) for s in plan]
    kinds: dict = {}
    for spec, est in zip(plan, estimates):
        key = spec.kind if spec.kind != "train" else f"train-{spec.split}"
        count, seconds = kinds.get(key, (0, 0.0))
        kinds[key] = (count + 1, seconds + est)
    return {
        "runs": len(plan),
        "estimated_s": sum(estimates),
        "by_kind": {k: {"runs": n, "estimated_s": s} for k, (n, s) in kinds.items()},
    }


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def _minutes(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.1f} min"


def print_plan(preset: QualityPreset, ctx: _Context, plan: list[RunSpec], done: dict, runs_dir: Path) -> None:
    proto, counts = ctx.protocol, ctx.data.counts()
    grid = ", ".join(f"{lr:g}" for lr in preset.lr_grid)
    print(
        f"synpo bench quality --preset {preset.name}: protocol {proto['id']}; "
        f"{preset.config or 'the tiny model'}, "
        f"{preset.steps} steps of {proto['pairs_per_step']} pairs; lr grid {grid}; validation seed "
        f"{preset.validation_seed}; test seeds {', '.join(map(str, preset.test_seeds))}",
        flush=True,
    )
    print(
        f"data {ctx.data.pairs_dir}: scenes train/validation/test {counts['scenes']['train']}/"
        f"{counts['scenes']['validation']}/{counts['scenes']['test']} (judged: validation "
        f"{counts['judged_scenes']['validation']}, test {counts['judged_scenes']['test']}); pairs: train "
        f"{counts['pairs']['train']}, test {counts['pairs']['test']}, "
        f"test harder {counts['pairs']['test_hard']}"
    )
    print(f"runs dir {runs_dir}; plan (estimated CPU time, one torch thread per run):")
    total = remaining = 0.0
    for index, spec in enumerate(plan, start=1):
        est = estimate_s(spec, preset, ctx.data)
        total += est
        state = "done" if spec.run_id in done else "todo"
        if state == "todo":
            remaining += est
        print(f"  {index:3d}. [{state}] {spec.run_id:<40} ~{_minutes(est)}")
    finished = sum(s.run_id in done for s in plan)
    print(
        f"plan: {len(plan)} runs, ~{_minutes(total)} of CPU time in all; {finished} done, "
        f"{len(plan) - finished} to run (~{_minutes(remaining)})",
        flush=True,
    )


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except ValueError as exc:  # bad options or data: one line, not a traceback
        raise SystemExit(f"synpo bench quality: {exc}") from exc


def _run(args: argparse.Namespace) -> int:
    from synpo.benchmarking import quality_report

    results_dir = common.results_dir(args)
    preset = PRESETS[args.preset]
    stem = "real_model" if preset.name == "cpu" else f"real_model_{preset.name}"
    doc = Path(args.doc) if args.doc else (quality_report.DEFAULT_DOC if preset.name == "cpu" else None)
    if args.render_only or args.check_docs:
        results = Path(args.results) if args.results else results_dir / f"{stem}.json"
        if not results.is_file():
            raise ValueError(f"--results: {results}: no such file (run the comparison first)")
        if args.check_docs:
            return quality_report.check_doc(results, doc or quality_report.DEFAULT_DOC)
        written = quality_report.render_all(results, doc, results_dir / "plots")
        print("\n".join(f"wrote {p}" for p in written))
        return 0
    for option in ("steps", "max_runs", "budget_s"):
        value = getattr(args, option)
        if value is not None and value < (1 if option == "steps" else 0):
            bound = 1 if option == "steps" else 0
            raise ValueError(f"--{option.replace('_', '-')}: must be >= {bound}, got {value}")
    if args.steps:
        preset = replace(preset, steps=args.steps)
    data = load_protocol_data(
        args.pairs_dir or DEFAULT_PAIRS_DIR, preset.validation_scenes, preset.test_scenes
    )
    texts = read_paragraphs(FLUENT_TEXT_PATH)[: preset.fluent_paragraphs]
    runs_dir = Path(args.runs_dir) if args.runs_dir else results_dir / f"{stem}_runs"
    with tempfile.TemporaryDirectory(prefix="synpo-quality-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        ctx = _Context(
            preset, data, protocol(preset, data, texts), texts, {}, work, bool(args.work_dir), args.timeout
        )
        done = load_runs(runs_dir, ctx.protocol["id"])
        plan = plan_runs(preset, _selection(done, preset))
        if args.register:
            return _register(ctx, plan, results_dir / f"{stem}.json", doc, done)
        print_plan(preset, ctx, plan, done, runs_dir)
        if args.max_runs == 0:
            return 0
        for key in ("train", "test", "test_hard"):
            ctx.files[key] = write_pairs(data.pairs[key], work / "data" / f"{key}_pairs.jsonl")
        executed, stopped = _execute_plan(ctx, done, runs_dir, args.max_runs, args.budget_s)
    plan = plan_runs(preset, _selection(done, preset))
    finished = sum(s.run_id in done for s in plan)
    print(f"executed {executed} run(s); {finished} of {len(plan)} runs of the protocol done ({runs_dir})")
    if finished < len(plan):
        print(f"stopped: {stopped}; rerun the same command to continue from the finished runs")
        return 0
    payload = build_results(ctx, done, plan, stem)
    json_path = results_dir / f"{stem}.json"
    payload["registered"] = _registration(json_path, ctx.protocol["id"])
    meta = payload["meta"]
    print(f"protocol CPU time {_minutes(meta['cpu_time_s'])} (planned {_minutes(meta['planned_s'])})")
    print(quality_report.summary_markdown(payload))
    if not args.no_save:
        common._atomic_write(json_path, json.dumps(payload, indent=1, default=str) + "\n")
        print(f"results: {json_path}")
        for path in quality_report.render_all(json_path, doc, results_dir / "plots"):
            print(f"wrote {path}")
    return 0


def _registration(json_path: Path, protocol_id: str) -> dict | None:
    """When and where this protocol was registered: from the pending results it replaces (None when
    it was not registered before its runs)."""
    if not json_path.is_file():
        return None
    with contextlib.suppress(json.JSONDecodeError, OSError):
        existing = json.loads(json_path.read_text(encoding="utf-8"))
        if existing.get("protocol", {}).get("id") == protocol_id:
            return existing.get("registered")
    return None


def _register(ctx: _Context, plan: list[RunSpec], json_path: Path, doc: Path | None, done: dict) -> int:
    """Write the protocol and its plan as the (pending) results and render the doc from them."""
    from synpo.benchmarking import quality_report

    if json_path.is_file():
        existing = json.loads(json_path.read_text(encoding="utf-8"))
        if existing.get("status") == "complete":
            raise ValueError(
                f"--register: {json_path} holds finished results; it only writes before any result"
            )
    if done:
        raise ValueError(
            f"--register: {len(done)} run(s) of this protocol already finished: register before any run"
        )
    common._atomic_write(
        json_path, json.dumps(pending_results(ctx, plan, json_path.stem), indent=1, default=str) + "\n"
    )
    print(f"registered protocol {ctx.protocol['id']}: {json_path}")
    for path in quality_report.render_all(json_path, doc, json_path.parent / "plots"):
        print(f"wrote {path}")
    return 0


def _execute_plan(ctx: _Context, done: dict, runs_dir: Path, max_runs: int | None, budget_s: float | None):
    """Run the plan's unfinished runs in order, each saved as it finishes; ``(executed, why stopped)``."""
    from tqdm.auto import tqdm

    preset = ctx.preset
    plan = plan_runs(preset, _selection(done, preset))
    estimates = {s.run_id: estimate_s(s, preset, ctx.data) for s in plan}
    finished = sum(v for k, v in estimates.items() if k in done)
    executed, started, stopped = 0, time.perf_counter(), "all runs done"
    interactive = sys.stderr.isatty()
    bar_format = "{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} (est. CPU time){postfix}"
    with tqdm(
        total=sum(estimates.values()),
        initial=finished,
        desc="quality",
        bar_format=bar_format,
        mininterval=0.5 if interactive else 10,
    ) as bar:
        ctx.progress = _Progress(bar)
        while True:
            plan = plan_runs(preset, _selection(done, preset))
            pending = [s for s in plan if s.run_id not in done]
            if not pending:
                break
            spec = pending[0]
            est = estimate_s(spec, preset, ctx.data)
            if max_runs is not None and executed >= max_runs:
                stopped = f"--max-runs {max_runs} reached"
                break
            if budget_s is not None and time.perf_counter() - started + est > budget_s:
                stopped = (
                    f"--budget-s {budget_s:g}: the next run ({spec.run_id}, ~{_minutes(est)}) would not fit"
                )
                break
            ctx.progress.begin(spec, est, len(plan) - len(pending) + 1, len(plan))
            record = execute_run(spec, ctx, done)
            record["est_s"] = est
            save_run(runs_dir, record)
            done[spec.run_id] = record
            executed += 1
            ctx.progress.end()
            bar.write(
                f"finished {spec.run_id} in {record['wall_s']:.0f} s (estimated {est:.0f} s){_brief(record)}"
            )
        ctx.progress = None
    return executed, stopped


def _brief(record: dict) -> str:
    metrics = record.get("metrics") or {}
    parts = []
    if "judge" in metrics:
        parts.append(f"judge {metrics['judge']['score']:.2f}")
    if "pairs" in metrics:
        parts.append(f"accuracy {metrics['pairs']['standard']['accuracy']:.2f}")
    if "perplexity" in metrics:
        parts.append(f"perplexity {metrics['perplexity']['perplexity']:.1f}")
    return f": {', '.join(parts)}" if parts else ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="cpu", help="model, grid, seeds and sizes (default: cpu)"
    )
    parser.add_argument(
        "--pairs-dir",
        default=None,
        help=f"the pairs pipeline's folder: scenes.jsonl and scores.jsonl (default: {DEFAULT_PAIRS_DIR})",
    )
    parser.add_argument(
        "--runs-dir",
        default=None,
        help="where each finished run is saved and found again (default: <output dir>/real_model_runs; "
        "--preset NAME: real_model_NAME_runs)",
    )
    parser.add_argument(
        "--max-runs",
        type=int,
        default=None,
        help="run at most N more runs, then stop (0: print the plan only)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="start no run that would end, by its estimate, more than this many seconds after the start",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps per run (default: the preset's; another protocol)",
    )
    parser.add_argument(
        "--register",
        action="store_true",
        help="write the protocol and its plan as the pending results and render the doc from them; no run",
    )
    parser.add_argument(
        "--work-dir",
        default=None,
        help="where the runs write and keep their files (default: a temporary directory)",
    )
    parser.add_argument(
        "--timeout", type=float, default=1200.0, help="seconds before the speed worker is stopped"
    )
    parser.add_argument(
        "--output-dir",
        default=None,
        help="where results and plots go (default: benchmarks/results in a checkout; --preset smoke: "
        "./runs/bench-smoke)",
    )
    parser.add_argument(
        "--no-save", action="store_true", help="save the runs but not the results, doc and charts"
    )
    parser.add_argument(
        "--doc", default=None, help="the rendered page (default: docs/real_model.md for --preset cpu)"
    )
    parser.add_argument("--results", default=None, help="with --render-only/--check-docs: the results JSON")
    parser.add_argument(
        "--render-only", action="store_true", help="render the doc and charts from the results JSON; no run"
    )
    parser.add_argument(
        "--check-docs", action="store_true", help="exit 1 when the doc differs from the render of the results"
    )
