"""``docs/real_model.md`` and the ``real_model_*`` charts, rendered from the results of ``synpo bench
quality`` (``benchmarks/results/real_model.json``). Every number and every finding in the page comes
from that file, by the rules the page states: a rerun with other outcomes renders other sentences.

Before the comparison has run, the file holds the registered protocol and its plan (``"status":
"pending"``): the page is then the protocol and a note that the results are pending.

    python -m synpo.benchmarking.quality_report [--check] [RESULTS.json [DOC.md]]
"""

from __future__ import annotations

import sys
from pathlib import Path

from synpo.benchmarking.common import fmt_bytes, load_results, repo_root
from synpo.benchmarking.plots import _pyplot
from synpo.benchmarking.report import _md_table, provenance_line

_ROOT = repo_root() or Path.cwd()
DEFAULT_DOC = _ROOT / "docs" / "real_model.md"
DEFAULT_RESULTS = _ROOT / "benchmarks" / "results" / "real_model.json"

SPEED_TARGET = 1.5  # the speed issue's target: SynPO fused vs DPO with a reference on full logits
METHOD_ORDER = ("synpo", "dpo", "simpo")
COLORS = {"base": "#7f7f7f", "synpo": "#d62728", "dpo": "#1f77b4", "simpo": "#2ca02c"}
LABELS = {"synpo": "SynPO", "dpo": "DPO", "simpo": "SimPO"}
CRITERIA = ("hallucination", "harmony", "consistency")
CRITERION_RANGE = {"hallucination": "0-5", "harmony": "0-5", "consistency": "0-3"}
CHARTS = ("judge", "selection", "pairs", "dynamics", "speed")


# ---------------------------------------------------------------------------------------------
# The decision rule
# ---------------------------------------------------------------------------------------------


def versus(a_mean: float, a_std: float, b_mean: float, b_std: float) -> str:
    """``"higher"``, ``"lower"`` or ``"no difference"``: a's mean against b's, a difference within the
    larger of the two seed stds counting as none (the protocol's rule). Means equal up to float
    rounding (three seeds' accuracies of 50/53 average to 1 ulp below 50/53) are no difference."""
    diff = a_mean - b_mean
    if abs(diff) <= max(a_std, b_std, 1e-9 * max(abs(a_mean), abs(b_mean))):
        return "no difference"
    return "higher" if diff > 0 else "lower"


def change(before: float, mean: float, std: float) -> str:
    """``"rose"``, ``"fell"`` or ``"no change"``: a mean over seeds against the base model's single
    value, a difference within the seed std counting as none."""
    verdict = versus(mean, std, before, 0.0)
    return {"higher": "rose", "lower": "fell"}.get(verdict, "no change")


def _pm(mean: float, std: float, spec: str = ".2f") -> str:
    return f"{mean:{spec}} ± {std:{spec}}"


def _after(entry: dict, spec: str = ".2f") -> str:
    return _pm(entry["after_mean"], entry["after_std"], spec)


def _label(method: str) -> str:
    return LABELS.get(method, method)


def _methods(summary: dict) -> list[str]:
    return [m for m in METHOD_ORDER if m in summary] + [m for m in summary if m not in METHOD_ORDER]


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def selection_markdown(payload: dict) -> str:
    """Validation judge score per method and rate; the selected rate in bold."""
    summary = payload["summary"]
    grid = payload["protocol"]["lr_grid"]
    header = ["method", *[f"lr {lr:g}" for lr in grid], "selected"]
    rows = []
    for method in _methods(summary):
        s = summary[method]
        scores = {row["lr"]: row["score"] for row in s["validation"]["judge_score"]}
        cells = [f"**{scores[lr]:.2f}**" if lr == s["lr"] else f"{scores[lr]:.2f}" for lr in grid]
        edge = " (grid edge)" if s["lr_at_grid_edge"] else ""
        rows.append([_label(method), *cells, f"{s['lr']:g}{edge}"])
    first = summary[_methods(summary)[0]]
    rows.append(["base model", *[f"{first['validation']['judge_score_before']:.2f}"] * len(grid), "-"])
    return _md_table(header, rows)


def summary_markdown(payload: dict) -> str:
    """The test tables: (a) the judge's scores of the descriptions; (b)-(d) pairs and perplexity."""
    summary = payload["summary"]
    methods = _methods(summary)
    first = summary[methods[0]]
    header = ["", "judge score (0-13.5)", *[f"{c} ({CRITERION_RANGE[c]})" for c in CRITERIA], "words"]
    rows = [
        [
            "base model",
            f"{first['test_judge_score']['before']:.2f}",
            *[f"{first['test_criteria'][c]['before']:.2f}" for c in (*CRITERIA, "words")],
        ]
    ]
    for method in methods:
        s = summary[method]
        rows.append(
            [
                f"{_label(method)} (lr {s['lr']:g})",
                _after(s["test_judge_score"]),
                *[_after(s["test_criteria"][c]) for c in CRITERIA],
                _after(s["test_criteria"]["words"], ".1f"),
            ]
        )
    captions = _md_table(header, rows)
    header = [
        "",
        "accuracy",
        "accuracy, harder",
        "chosen log-prob change",
        "rejected log-prob change",
        "chosen change, harder",
        "rejected change, harder",
        "perplexity ratio",
        "train steps/s",
    ]
    rows = [
        [
            "base model",
            f"{first['test_accuracy']['before']:.2f}",
            f"{first['test_accuracy_hard']['before']:.2f}",
            *["0"] * 4,
            "1",
            "-",
        ]
    ]
    for method in methods:
        s = summary[method]
        rows.append(
            [
                _label(method),
                _after(s["test_accuracy"]),
                _after(s["test_accuracy_hard"]),
                *[
                    _pm(s[k]["mean"], s[k]["std"], ".3f")
                    for k in (
                        "chosen_logp_delta",
                        "rejected_logp_delta",
                        "chosen_logp_delta_hard",
                        "rejected_logp_delta_hard",
                    )
                ],
                _pm(s["perplexity_ratio"]["mean"], s["perplexity_ratio"]["std"], ".3f"),
                _pm(s["train_steps_per_s"]["mean"], s["train_steps_per_s"]["std"], ".3f"),
            ]
        )
    return captions + "\n\n" + _md_table(header, rows)


def speed_markdown(speed: list[dict]) -> str:
    header = ["method", "step", "steps/s", "peak memory", "step memory", "vs DPO + reference (naive)"]
    rows = []
    for r in speed:
        ok = r.get("status") == "ok"
        ratio = r.get("speedup_vs_dpo_reference")
        rows.append(
            [
                r["method"],
                f"{r['step_s']:.2f} s" if ok else f"{r.get('status')}: {r.get('reason')}",
                f"{r['steps_per_s']:.3f}" if ok else "-",
                fmt_bytes(r.get("peak_bytes")) if ok else "-",
                fmt_bytes(r.get("step_bytes")) if ok else "-",
                "-" if ratio is None else f"{ratio:.2f}x",
            ]
        )
    return _md_table(header, rows)


def speed_ratios(speed: list[dict]) -> dict:
    """SynPO fused's steps/s over each DPO-with-reference variant's (None where one did not run)."""
    by = {r["method"]: r for r in speed if r.get("status") == "ok"}
    ours = by.get("synpo_fused")
    out = {}
    for base in ("dpo_reference_naive", "dpo_reference_fused"):
        out[base] = ours["steps_per_s"] / by[base]["steps_per_s"] if ours and base in by else None
    return out


def runs_markdown(payload: dict) -> str:
    """Every run of the protocol, in the order run."""
    header = ["run", "judge score", "accuracy", "accuracy, harder", "perplexity", "steps/s", "wall time"]
    rows = []
    for r in payload["runs"]:
        if r["kind"] == "speed":
            continue
        m = r["metrics"]
        pairs = m.get("pairs")
        rows.append(
            [
                f"`{r['run_id']}`",
                f"{m['judge']['score']:.2f}",
                f"{pairs['standard']['accuracy']:.2f}" if pairs else "-",
                f"{pairs['hard']['accuracy']:.2f}" if pairs else "-",
                f"{m['perplexity']['perplexity']:.2f}" if "perplexity" in m else "-",
                f"{r['train']['steps_per_s']:.3f}" if r.get("train") else "-",
                f"{r['wall_s'] / 60:.1f} min",
            ]
        )
    return _md_table(header, rows)


# ---------------------------------------------------------------------------------------------
# Findings: each follows from the numbers by the protocol's rule
# ---------------------------------------------------------------------------------------------


def _rank_text(summary: dict, get) -> str:
    """``SynPO 9.10 ± 0.20, DPO ...`` for ``get(summary[m]) -> (mean, std)``."""
    return ", ".join(f"{_label(m)} {_pm(*get(summary[m]))}" for m in _methods(summary))


def _versus_text(summary: dict, key_get, ours: str = "synpo") -> dict:
    """SynPO against each other method on one figure: ``{method: verdict}``."""
    a = key_get(summary[ours])
    return {m: versus(*a, *key_get(summary[m])) for m in _methods(summary) if m != ours}


def findings(payload: dict) -> list[str]:
    summary = payload["summary"]
    out = []
    if "synpo" not in summary or len(summary) < 2:
        return ["The comparison needs SynPO and at least one other method."]

    def judge(s):
        return s["test_judge_score"]["after_mean"], s["test_judge_score"]["after_std"]

    verdicts = _versus_text(summary, judge)
    better = [_label(m) for m, v in verdicts.items() if v == "higher"]
    worse = [_label(m) for m, v in verdicts.items() if v == "lower"]
    same = [_label(m) for m, v in verdicts.items() if v == "no difference"]
    parts = []
    if better:
        parts.append(f"better than {' and '.join(better)}")
    if same:
        parts.append(f"no different from {' and '.join(same)}")
    if worse:
        parts.append(f"worse than {' and '.join(worse)}")
    answer = "**yes**" if len(better) == len(verdicts) else ("**no**" if not better else "**partly**")
    base = summary["synpo"]["test_judge_score"]["before"]
    changes = ", ".join(f"{_label(m)} {change(base, *judge(summary[m]))}" for m in _methods(summary))
    out.append(
        f"**Does SynPO train better captions?** {answer}. Judge score of the test descriptions (mean ± std "
        f"over seeds): {_rank_text(summary, judge)}; base model {base:.2f}. By the rule, SynPO's captions "
        f"are {'; '.join(parts)}. Against the base model: {changes}."
    )
    for criterion in CRITERIA:

        def get(s, c=criterion):
            return s["test_criteria"][c]["after_mean"], s["test_criteria"][c]["after_std"]

        v = _versus_text(summary, get)
        before = summary["synpo"]["test_criteria"][criterion]["before"]
        out.append(
            f"**{criterion.capitalize()}** ({CRITERION_RANGE[criterion]}): {_rank_text(summary, get)}; base "
            f"{before:.2f}. SynPO vs "
            + ", ".join(f"{_label(m)}: {verdict}" for m, verdict in v.items())
            + "."
        )
    first = summary["synpo"]
    threshold = payload["protocol"]["saturated_accuracy"]
    base_acc, base_hard = first["test_accuracy"]["before"], first["test_accuracy_hard"]["before"]
    saturated = base_acc >= threshold
    rule = (
        f"The base model already ranks {base_acc:.2f} of the test pairs right (>= {threshold:.2f}): the "
        "standard pairs leave accuracy little room, so the harder condition (best vs second-best "
        f"candidate) is the one to read; there the base model ranks {base_hard:.2f} right."
        if saturated
        else f"The base model ranks {base_acc:.2f} of the test pairs right (below {threshold:.2f}) and "
        f"{base_hard:.2f} of the harder ones."
    )

    def acc(key):
        return lambda s: (s[key]["after_mean"], s[key]["after_std"])

    out.append(
        f"**Preference accuracy** (b). {rule} After training, standard: "
        f"{_rank_text(summary, acc('test_accuracy'))}; "
        f"harder: {_rank_text(summary, acc('test_accuracy_hard'))}. Against the base model: "
        + "; ".join(
            f"{_label(m)} {change(base_acc, *acc('test_accuracy')(summary[m]))} (standard), "
            f"{change(base_hard, *acc('test_accuracy_hard')(summary[m]))} (harder)"
            for m in _methods(summary)
        )
        + "."
    )

    def delta(key):
        return lambda s: (s[key]["mean"], s[key]["std"])

    chosen = delta("chosen_logp_delta")
    rejected = delta("rejected_logp_delta")
    synpo_chosen = change(0.0, *chosen(first))
    out.append(
        "**Chosen likelihood** (c), test pairs, change of the mean token log-prob: "
        + "; ".join(
            f"{_label(m)} chosen {_pm(*chosen(summary[m]), '.3f')} ({change(0.0, *chosen(summary[m]))}), "
            f"rejected {_pm(*rejected(summary[m]), '.3f')} ({change(0.0, *rejected(summary[m]))})"
            for m in _methods(summary)
        )
        + ". The SynPO paper reports that SynPO does not drive the chosen likelihood down: here it "
        + f"{'fell' if synpo_chosen == 'fell' else ('rose' if synpo_chosen == 'rose' else 'did not change')}"
        + f", so this comparison **{'does not agree' if synpo_chosen == 'fell' else 'agrees'}**."
    )

    def ppl(s):
        return s["perplexity_ratio"]["mean"], s["perplexity_ratio"]["std"]

    kept = {m: change(1.0, *ppl(summary[m])) for m in _methods(summary)}
    v = _versus_text(summary, ppl)
    out.append(
        f"**Perplexity** (d) on the fluent text, after / before: {_rank_text(summary, ppl)} "
        + "("
        + ", ".join(f"{_label(m)} {kept[m]}" for m in _methods(summary))
        + "). SynPO vs "
        + ", ".join(f"{_label(m)}: {verdict}" for m, verdict in v.items())
        + ". The SynPO paper reports that SynPO preserves the model's language ability: here its "
        f"perplexity {'rose' if kept['synpo'] == 'rose' else 'did not rise'}, so this comparison "
        f"**{'does not agree' if kept['synpo'] == 'rose' else 'agrees'}**."
    )
    edges = [
        f"{_label(m)} ({summary[m]['lr']:g})" for m in _methods(summary) if summary[m]["lr_at_grid_edge"]
    ]
    out.append(
        "**Rate selection**: "
        + ", ".join(f"{_label(m)} {summary[m]['lr']:g}" for m in _methods(summary))
        + (
            f". At an end of the grid: {', '.join(edges)}; that method's best rate may lie outside the grid."
            if edges
            else ". Every selected rate lies inside the grid."
        )
    )
    ratios = speed_ratios(payload.get("speed") or [])
    if ratios["dpo_reference_naive"] is not None:
        naive, fused = ratios["dpo_reference_naive"], ratios["dpo_reference_fused"]
        met = naive >= SPEED_TARGET
        out.append(
            f"**Speed** (e): SynPO with the fused loss runs **{naive:.2f}x** the training steps/s of DPO "
            f"with a reference model on full logits (the upstream baseline)"
            + (f" and {fused:.2f}x that of DPO with the fused loss" if fused is not None else "")
            + f"; the speed issue's target of {SPEED_TARGET:.1f}x is **{'met' if met else 'not met'}**."
        )
    else:
        out.append("**Speed** (e): the speed measurement did not complete; see its table.")
    return out


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def protocol_markdown(payload: dict) -> list[str]:
    """The pre-registered protocol, from the results file's ``protocol`` and ``plan``."""
    p, plan = payload["protocol"], payload["plan"]
    lora, optim, splits = p["lora"], p["optim"], p["splits"]
    files = p["data_files"]
    gen = p["generation"]
    sampling = gen["sampling"]
    judge = p["judge"]
    grid = ", ".join(f"{lr:g}" for lr in p["lr_grid"])
    seeds = ", ".join(map(str, p["test_seeds"]))
    registered = payload.get("registered")
    when = (
        f"Registered on {registered['date']} (checkout at commit `{registered['commit']}`), before any run"
        if registered
        else "Not registered before the runs"
    )
    overrides = ", ".join(f"`{k}: {v}`" for k, v in p["config_overrides"].items()) or "none"
    thresholds = ", ".join(f">= {t} -> {level}" for t, level in judge["consistency_thresholds"])
    methods = _md_table(
        ["method", "loss hyper-parameters", "source"],
        [
            [
                _label(m),
                ", ".join(f"{k} {v:g}" for k, v in spec["loss"].items())
                + (f"; reference: {spec['reference']}" if spec.get("reference") else ""),
                spec["source"],
            ]
            for m, spec in p["methods"].items()
        ],
    )
    return [
        "## Protocol (pre-registered)",
        "",
        f"{when} (protocol id `{p['id']}`: a hash of everything below, carried by every run; runs "
        "of another id are never mixed in). The test split chooses nothing: no rate, seed, step count "
        "or threshold is read from it.",
        "",
        "**Question.** Does a model trained with SynPO write better scene descriptions than one trained "
        "with DPO or SimPO, each at its own paper's hyper-parameters and its own best learning rate, all "
        "else equal?",
        "",
        f"**Model and training, shared by every run.** `{p['model']}`"
        + (f" (`{p['gguf_file']}`)" if p.get("gguf_file") else "")
        + f", the bundled `{p['config']}` config (changed: {overrides}): LoRA r={lora['r']}, alpha "
        f"{lora['alpha']}, dropout {lora['dropout']} on {', '.join(lora['target_modules'])}; "
        f"{p['steps']} optimizer steps of {p['pairs_per_step']} pairs (micro-batch {p['micro_batch_size']}), "
        f"AdamW, {optim['schedule']} schedule, warm-up ratio {optim['warmup_ratio']}, weight decay "
        f"{optim['weight_decay']}, gradient clipping {optim['max_grad_norm']}; sequences of at most "
        f"{p['max_length']} tokens; the fused loss; {p['cpu_threads']} torch thread per run. A run's seed "
        "sets its LoRA initialisation, dropout and data order; methods with the same seed see the same "
        "pairs in the same order.",
        "",
        f"**Data and splits.** The SmolLM2 pairs pipeline's scenes and scores (`{files['scenes']['path']}`, "
        f"`{files['scores']['path']}`; docs/pairs.md). Each scene belongs to one split by a hash of its id "
        f"alone (crc32(id) / 2^32 below {splits['test_fraction']}: test, the pipeline's own held-out "
        f"split; below {splits['test_fraction'] + splits['validation_fraction']:.1f}: validation; else "
        f"train): {splits['scenes']['train']} train, {splits['scenes']['validation']} validation, "
        f"{splits['scenes']['test']} test scenes. Training pairs: the pipeline's pairs (best against worst "
        f"candidate, score gap >= 4) of the train scenes, {splits['pairs']['train']}. Test pairs: those of "
        f"the test scenes, {splits['pairs']['test']}. No validation or test scene is trained on.",
        "",
        "**Methods**, each with its paper's loss hyper-parameters:",
        "",
        methods,
        "",
        f"**Learning rates and seeds.** One grid for every method: {grid}. Each method trains once per "
        f"rate with seed {p['validation_seed']}; its rate is the one whose model scores highest on (a) "
        f"over the first {splits['judged_scenes']['validation']} validation scenes (ties: the smaller "
        "rate); a rate at an end of the grid is reported as such (the best rate may lie outside it). "
        f"Then each method trains at its rate with seeds {seeds}, scored on the test split. Every run is "
        "kept and listed below.",
        "",
        "**Measures** on the test split, before training (the base model: the adapter off) and after:",
        "",
        f"- (a) *The judge's score of generated descriptions.* The model writes one description of each "
        f"of the {splits['judged_scenes']['test']} test scenes for the pipeline's prompt (the scene's "
        "facts, then the request for 2-4 sentences) through its chat template, with the pipeline's "
        f"sampling (temperature {sampling['temperature']}, top_p {sampling['top_p']}, top_k "
        f"{sampling['top_k']}, at most {sampling['max_new_tokens']} new tokens), seeded per scene from "
        f"seed {gen['seed']} as the candidates stage seeds it (the same seeds for every model). The "
        "pipeline's text judge (`synpo pairs score --judge text`, docs/pairs.md) scores it as one more "
        "candidate of the scene: hallucination 0-5 (facts covered, claims the facts do not make), "
        f"harmony 0-5 (length {judge['words'][0]}-{judge['words'][1]} words, finished, no repetition, "
        "no list or meta-talk, no markup), consistency 0-3 (mean embedding similarity to the scene's "
        f"pipeline candidates, which the base model wrote: {thresholds}); combined 1.1 x hallucination "
        "+ harmony + consistency (0-13.5). Reported: the combined score and each criterion, means over "
        "the scenes; an empty description scores 0. The *validation score* is (a) on the validation "
        "scenes.",
        f"- (b) *Preference accuracy* on the {splits['pairs']['test']} test pairs: the fraction whose "
        "chosen response has the higher mean token log-prob (a tie counts as wrong).",
        "- (c) *Chosen and rejected log-prob change*: the change of the mean token log-prob of the test "
        "pairs' chosen and rejected responses.",
        f"- (d) *Perplexity* on held-out fluent text (`{files['fluent']['path']}`, {p['fluent_paragraphs']} "
        "paragraphs), after / before.",
        "- (e) *Steps/s*, fused vs naive loss, SynPO vs DPO with a reference, by `synpo bench trainer`'s "
        "step on this model (the data's median lengths); and each run's own training steps/s.",
        "",
        f"**The >= {p['saturated_accuracy']:.0%} rule and a harder condition.** If the base model ranks "
        f">= {p['saturated_accuracy']:.0%} of the test pairs right, (b) has little room to show a "
        "difference. A second, harder condition from the same pipeline is therefore measured in every "
        "test run and reported beside the first, never instead of it: each test scene's best candidate "
        "against its second-best (the best of those scoring strictly lower), whatever their gap "
        f"({splits['pairs']['test_hard']} pairs). The results say whether the rule applies.",
        "",
        f"**Statistics and the decision rule.** Every figure is the mean and the sample standard deviation "
        f"(n - 1) over the {len(p['test_seeds'])} test seeds. Two methods differ on a figure only when "
        "their means differ by more than the larger of their two seed stds; otherwise the finding is "
        '"no difference". A method changed a figure from the base model only when its mean differs '
        'from the base value by more than its seed std. "SynPO trains better captions" than a method '
        "means SynPO's mean judge score (a) is higher by this rule.",
        "",
        f"**CPU time.** {plan['runs']} runs (base model per split, "
        f"{plan['by_kind'].get('train-validation', {}).get('runs', 0)} validation, "
        f"{plan['by_kind'].get('train-test', {}).get('runs', 0)} test, one speed measurement), estimated "
        f"at {_hours(plan['estimated_s'])} of CPU time on the shared 2-core machine (one torch thread per "
        "run). `synpo bench quality` runs them in order, saves each as it finishes (`--runs-dir`, "
        "default `benchmarks/results/real_model_runs/`) and continues from them when rerun; `--budget-s` and "
        "`--max-runs` run it in parts, `--max-runs 0` prints the plan.",
    ]


def render_doc(payload: dict) -> str:
    if payload.get("schema") != 2:
        raise ValueError(
            f"results: schema {payload.get('schema')!r}; this page renders schema 2 (synpo bench quality "
            "--register writes it)"
        )
    meta = payload["meta"]
    lines = [
        "# Does SynPO train better captions? SynPO, DPO and SimPO on a real model",
        "",
        f"<!-- Rendered by `synpo bench quality` from benchmarks/results/{payload.get('benchmark')}.json; "
        "do not edit. "
        "Re-render: `synpo bench quality --render-only`; check: `synpo bench quality --check-docs`. -->",
        "",
    ]
    if payload.get("status") != "complete":
        lines += [
            f"**Results pending.** The protocol below was registered on {meta.get('date')}; the "
            "comparison has not run under it yet. `synpo bench quality` runs "
            f"its {payload['plan']['runs']} runs (about {_hours(payload['plan']['estimated_s'])} of CPU "
            "time) and can be stopped and rerun at any point; this page is then rendered from its results. "
            "The earlier single-seed comparison (one shared learning rate, SimPO at TRL's beta, no "
            "generated descriptions) is superseded; it is in the git history of this page.",
            "",
            *protocol_markdown(payload),
            "",
        ]
        return "\n".join(lines)
    plots = f"../benchmarks/results/plots/{payload['benchmark']}"
    speed_batch = meta.get("speed_batch", {})
    lines += [
        provenance_line(meta) + ".",
        "",
        f"Runs from {meta['first_run']} to {meta['last_run']} at commit(s) "
        f"{', '.join(f'`{c}`' for c in meta['runs_commits'])}; the protocol's CPU time: "
        f"**{_hours(meta['cpu_time_s'])}** (the runs' wall times, summed, each on one torch thread; "
        f"planned {_hours(meta['planned_s'])}). Model `{meta['model_source']}` "
        f"({meta['model_config'].get('arch')}, hidden {meta['model_config'].get('hidden')}, "
        f"{meta['model_config'].get('layers')} layers, vocabulary {meta['model_config'].get('vocab')}), "
        f"{meta['trainable_params']:,} trainable LoRA parameters; training pairs: {meta['tokenization']}.",
        "",
        *protocol_markdown(payload),
        "",
        "## Results",
        "",
        "### Rate selection: the validation judge score",
        "",
        selection_markdown(payload),
        "",
        f"### Test split: mean ± std over seeds {', '.join(map(str, payload['protocol']['test_seeds']))}",
        "",
        summary_markdown(payload),
        "",
        "## Findings",
        "",
        *[f"- {text}" for text in findings(payload)],
        "",
        "## Speed and memory on this model",
        "",
        f"`synpo bench trainer`'s step (objective forward, backward, clipping, AdamW) on this model, "
        f"{speed_batch.get('pairs')} pair(s) per step, {speed_batch.get('prompt')} prompt + "
        f"{speed_batch.get('chosen')} chosen / {speed_batch.get('rejected')} rejected tokens per row "
        "(random ids, the data's median lengths); median of "
        f"{payload['protocol']['speed']['steps']} timed steps after "
        f"{payload['protocol']['speed']['warmup_steps']} warm-up, the four methods timed in turn in one "
        f"worker process. Memory: {meta.get('speed_memory')}.",
        "",
        speed_markdown(payload.get("speed") or []),
        "",
        "## An example",
        "",
        *_example_markdown(payload),
        "## Charts",
        "",
        f"![judge scores]({plots}_judge.png)",
        "",
        f"![rate selection]({plots}_selection.png)",
        "",
        f"![pairs and perplexity]({plots}_pairs.png)",
        "",
        f"![training dynamics]({plots}_dynamics.png)",
        "",
        f"![speed and memory]({plots}_speed.png)",
        "",
        "## Every run",
        "",
        runs_markdown(payload),
        "",
    ]
    return "\n".join(lines)


def _example_markdown(payload: dict) -> list[str]:
    out = []
    for example in payload.get("examples") or []:
        out += [
            f"Test scene `{example['id']}`: " + " ".join(example["facts"]),
            "",
        ]
        rows = [("base model", example["base"])] + [
            (f"{_label(m)} (seed {payload['summary'][m]['seeds'][0]})", d)
            for m, d in example["methods"].items()
        ]
        for name, d in rows:
            text = d["text"].replace("\n", " ").replace("|", "/")
            scores = ", ".join(f"{c} {d[c]}" for c in CRITERIA)
            out += [f"- *{name}* (score {d['score']:.1f}: {scores}): {text}", ""]
    return out


# ---------------------------------------------------------------------------------------------
# Charts
# ---------------------------------------------------------------------------------------------


def charts(payload: dict, out_dir: Path, prefix: str) -> list[Path]:
    """The page's charts (complete results only): ``<prefix>_{judge,selection,pairs,dynamics,speed}.png``."""
    plt = _pyplot()
    meta, summary = payload["meta"], payload["summary"]
    methods = _methods(summary)
    test_runs = {
        m: [
            r
            for r in payload["runs"]
            if r["kind"] == "train"
            and r["split"] == "test"
            and r["method"] == m
            and r["lr"] == summary[m]["lr"]
        ]
        for m in methods
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"{meta.get('host_cpu')}, commit {meta.get('commit')}"
    written = []
    names = ["base", *methods]
    colors = [COLORS.get(n, "k") for n in names]
    ticks = ["base", *[_label(m) for m in methods]]

    def bars(ax, values, errors, seeds=None):
        ax.bar(range(len(values)), values, yerr=errors, color=colors, capsize=4)
        for i, points in enumerate(seeds or []):
            ax.plot([i] * len(points), points, "k.", markersize=5)
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels(ticks, fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)

    # (a): the combined judge score and each criterion, base vs each method (mean, std, each seed).
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.8))
    keys = [("score", "judge score (0-13.5)")] + [(c, f"{c} ({CRITERION_RANGE[c]})") for c in CRITERIA]
    for ax, (key, label) in zip(axes, keys):
        entry = lambda s, k=key: s["test_judge_score"] if k == "score" else s["test_criteria"][k]
        first = entry(summary[methods[0]])
        values = [first["before"]] + [entry(summary[m])["after_mean"] for m in methods]
        errors = [0.0] + [entry(summary[m])["after_std"] for m in methods]
        seeds = [[]] + [[r["metrics"]["judge"][key] for r in test_runs[m]] for m in methods]
        bars(ax, values, errors, seeds)
        ax.set_title(label, fontsize=9)
    fig.suptitle(f"(a) test descriptions, before (base) and after training — {title}", fontsize=9)
    fig.tight_layout()
    written.append(_save(fig, out_dir / f"{prefix}_judge.png", plt))

    # Rate selection: the validation judge score against the rate.
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        rows = summary[m]["validation"]["judge_score"]
        ax.plot(
            [r["lr"] for r in rows], [r["score"] for r in rows], "o-", color=COLORS.get(m), label=_label(m)
        )
        chosen = next(r for r in rows if r["lr"] == summary[m]["lr"])
        ax.plot([chosen["lr"]], [chosen["score"]], "o", color=COLORS.get(m), markersize=12, alpha=0.4)
    ax.axhline(
        summary[methods[0]]["validation"]["judge_score_before"], color=COLORS["base"], ls="--", label="base"
    )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("validation judge score")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"rate selection (large marker: selected) — {title}", fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, out_dir / f"{prefix}_selection.png", plt))

    # (b)-(d): accuracy (standard, harder), log-prob changes, perplexity ratio.
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.8))
    for ax, key, label in (
        (axes[0], "test_accuracy", "accuracy, test pairs"),
        (axes[1], "test_accuracy_hard", "accuracy, harder pairs"),
    ):
        first = summary[methods[0]][key]
        bars(
            ax,
            [first["before"]] + [summary[m][key]["after_mean"] for m in methods],
            [0.0] + [summary[m][key]["after_std"] for m in methods],
        )
        ax.set_title(label, fontsize=9)
        ax.set_ylim(0, 1.05)
    width = 0.38
    for offset, key, hatch in (
        (-width / 2, "chosen_logp_delta", ""),
        (width / 2, "rejected_logp_delta", "//"),
    ):
        xs = [i + offset for i in range(len(methods))]
        axes[2].bar(
            xs,
            [summary[m][key]["mean"] for m in methods],
            width,
            yerr=[summary[m][key]["std"] for m in methods],
            color=[COLORS.get(m) for m in methods],
            hatch=hatch,
            capsize=3,
            label=key.split("_")[0],
        )
    axes[2].axhline(0, color="k", linewidth=0.8)
    axes[2].set_xticks(range(len(methods)))
    axes[2].set_xticklabels([_label(m) for m in methods], fontsize=8)
    axes[2].set_title("log-prob change: chosen (plain), rejected (hatched)", fontsize=9)
    axes[2].grid(True, axis="y", alpha=0.3)
    ratios = [summary[m]["perplexity_ratio"] for m in methods]
    axes[3].bar(
        range(len(methods)),
        [r["mean"] for r in ratios],
        yerr=[r["std"] for r in ratios],
        color=[COLORS.get(m) for m in methods],
        capsize=4,
    )
    axes[3].axhline(1.0, color=COLORS["base"], ls="--")
    if max(r["mean"] for r in ratios) > 10:
        axes[3].set_yscale("log")  # a collapsed model beside intact ones
    axes[3].set_xticks(range(len(methods)))
    axes[3].set_xticklabels([_label(m) for m in methods], fontsize=8)
    axes[3].set_title("perplexity, after / before", fontsize=9)
    axes[3].grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"(b)-(d) test pairs and fluent text — {title}", fontsize=9)
    fig.tight_layout()
    written.append(_save(fig, out_dir / f"{prefix}_pairs.png", plt))

    # Training dynamics: chosen and rejected log-prob on the training batches, mean over the test seeds.
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 3.8), squeeze=False)
    for ax, m in zip(axes[0], methods):
        curves = [r["train"]["curve"] for r in test_runs[m] if r.get("train")]
        for key, color in (("chosen_logps", "#2ca02c"), ("rejected_logps", "#d62728")):
            for curve in curves:
                ax.plot([row["step"] for row in curve], [row[key] for row in curve], color=color, alpha=0.25)
            if curves:
                steps = [row["step"] for row in curves[0]]
                mean = [sum(c[i][key] for c in curves) / len(curves) for i in range(len(steps))]
                ax.plot(steps, mean, color=color, linewidth=1.8, label=key.split("_")[0])
        ax.set_title(f"{_label(m)} (lr {summary[m]['lr']:g})", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("mean token log-prob (training batch)")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"training dynamics, each test seed and their mean — {title}", fontsize=9)
    fig.tight_layout()
    written.append(_save(fig, out_dir / f"{prefix}_dynamics.png", plt))

    # (e): speed and memory of the four trainer-benchmark methods.
    ok = [r for r in payload.get("speed") or [] if r.get("status") == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    palette = ["#7f7f7f", "#1f77b4", "#ff7f0e", "#d62728"]
    for ax, (key, scale, label) in zip(
        axes, (("steps_per_s", 1.0, "steps/s"), ("peak_bytes", 1 / 2**30, "peak memory (GiB)"))
    ):
        drawn = ax.bar(range(len(ok)), [r[key] * scale for r in ok], color=palette[: len(ok)])
        for bar in drawn:
            ax.annotate(
                f"{bar.get_height():.3g}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_xticks(range(len(ok)))
        ax.set_xticklabels([r["method"].replace("_", "\n", 1) for r in ok], fontsize=8)
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"(e) training step on this model — {title}", fontsize=9)
    fig.tight_layout()
    written.append(_save(fig, out_dir / f"{prefix}_speed.png", plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def render_all(results: Path, doc: Path | None, plots_dir: Path) -> list[Path]:
    """The charts (``<results stem>_*.png`` in ``plots_dir``, complete results only) and, with ``doc``,
    the page."""
    payload = load_results(results)
    text = render_doc(payload)  # first: an unreadable file writes nothing
    written = []
    if payload.get("status") == "complete":
        written += charts(payload, Path(plots_dir), Path(results).stem)
    if doc is not None:
        Path(doc).parent.mkdir(parents=True, exist_ok=True)
        Path(doc).write_text(text, encoding="utf-8")
        written.append(Path(doc))
    return written


def check_doc(results: Path, doc: Path) -> int:
    """0 when ``doc`` is the render of ``results``; 1 (saying so) otherwise."""
    if not Path(results).is_file():
        raise ValueError(f"results: {results}: no such file")
    expected = render_doc(load_results(results))
    actual = Path(doc).read_text(encoding="utf-8") if Path(doc).is_file() else None
    if actual == expected:
        print(f"{doc}: up to date with {results}")
        return 0
    print(f"{doc}: differs from the render of {results}; run `synpo bench quality --render-only`")
    return 1


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    paths = [a for a in args if a != "--check"]
    results = Path(paths[0]) if paths else DEFAULT_RESULTS
    doc = Path(paths[1]) if len(paths) > 1 else DEFAULT_DOC
    if check:
        return check_doc(results, doc)
    for path in render_all(results, doc, Path(results).parent / "plots"):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
