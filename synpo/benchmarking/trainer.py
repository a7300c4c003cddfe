"""``synpo bench trainer``: what dropping the reference model buys in a training step.

Four methods on the same model, LoRA adapters and batch, each an optimizer step exactly as the
trainer's plain path runs it (:class:`synpo.objective.PreferenceObjective` forward, backward, gradient
clipping, AdamW step):

- ``dpo_reference_naive``: DPO with a reference model (the policy with its LoRA adapters disabled,
  one no-grad forward over both captions) and full logits, as the upstream DPO baseline;
- ``dpo_reference_fused``: the same with the fused lm_head loss;
- ``synpo_naive``: SynPO (no reference) on full logits, as the upstream SynPO code;
- ``synpo_fused``: SynPO with the fused lm_head loss (no logits, prompt/video positions skipped);
- ``synpo_fused_shared`` / ``dpo_reference_fused_shared``: the same with prefix sharing
  (:mod:`synpo.prefix_sharing`): one ``[prompt, chosen, rejected]`` row per pair, the prompt, video
  frames and vision tower computed once (the reference pass too).

Batches are video-captioning shaped: a long prompt (video tokens + instruction) and a shorter
caption per row, ``[chosen; rejected]``, collated by the trainer's own collator. Models are random
(built locally, no download): the embedded tiny Llama and a small Qwen2 on CPU, a 7B-class Qwen2
(hidden 4096, 32 layers, V=152064, bf16, LoRA r=128 as upstream) on one GPU; a tiny LLaVA (CLIP
tower, video frames as images) for video-shaped batches whose frames go through the vision tower.

Reported per method: median step time, steps/s, tokens/s (all sequence tokens of the batch),
peak memory (GPU: ``max_memory_allocated`` in the step, weights included; CPU: peak RSS in the
method's own process) and the part added by the step itself, and SynPO-fused vs DPO-reference.

``--interleave`` (the ``cpu-interleaved`` preset's default) runs the methods of a model in one
process and times them in turn, one step each per round, so that the load of a shared machine hits
every method alike. ``cpu-interleaved``: a Llama with hidden 256, 4 layers, V=32000, LoRA r=64, one
pair of 1024 prompt/video positions + a ~128-token caption, 10 steps.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass

from synpo.benchmarking import common, presets


@dataclass(frozen=True)
class ModelSpec:
    name: str
    arch: str  # "llama" or "qwen2"
    hidden: int
    layers: int
    heads: int
    intermediate: int | None = None  # None: the tiny builder's default (2 x hidden)
    vocab: int | None = None  # None: the embedded tiny tokenizer's vocabulary
    dtype: str = "float32"
    lora_r: int = 8
    lora_alpha: int = 16
    gradient_checkpointing: bool = False
    kv_heads: int | None = None  # None: heads (no grouped-query attention)
    # A tiny LLaVA (synpo.tiny.build_tiny_vlm: CLIP tower, frozen) whose frames are image_size^2
    # pixels, (image_size / 8)^2 tokens each; arch/vocab then are the tiny Llama's.
    vision: bool = False
    image_size: int = 32

    @property
    def description(self) -> str:
        vocab = self.vocab or "tiny-tokenizer"
        ckpt = ", gradient checkpointing" if self.gradient_checkpointing else ""
        heads = f", {self.heads} heads" + (f" ({self.kv_heads} KV)" if self.kv_heads else "")
        vlm = (
            f"LLaVA (CLIP tower, frozen, {self.image_size}x{self.image_size} frames = "
            f"{self.frame_tokens} tokens each) on "
            if self.vision
            else ""
        )
        return (
            f"{vlm}{self.arch} hidden {self.hidden}, {self.layers} layers{heads}, V={vocab}, {self.dtype} "
            f"weights, LoRA r={self.lora_r} alpha={self.lora_alpha} on q/k/v/o/gate/up/down{ckpt}"
        )

    @property
    def frame_tokens(self) -> int:
        from synpo.tiny import TINY_PATCH_SIZE

        return (self.image_size // TINY_PATCH_SIZE) ** 2


@dataclass(frozen=True)
class BatchSpec:
    pairs: int
    prompt: int  # positions before the caption: video tokens and the instruction
    chosen: int  # caption tokens (EOS included)
    rejected: int
    frames: int = 0  # video frames (a vision model's): their tokens are part of ``prompt``

    @property
    def description(self) -> str:
        video = f" ({self.frames} video frames among them)" if self.frames else ""
        return (
            f"{self.pairs} pair(s) = {2 * self.pairs} rows, {self.prompt} prompt/video positions{video} + "
            f"{self.chosen} (chosen) / {self.rejected} (rejected) caption tokens per row"
        )

    @property
    def short(self) -> str:
        return f"P={self.prompt} R={self.chosen}/{self.rejected} x{self.pairs}"

    @property
    def tokens(self) -> int:
        return self.pairs * (2 * self.prompt + self.chosen + self.rejected)


@dataclass(frozen=True)
class TrainerPreset:
    name: str
    device: str
    models: tuple[tuple[ModelSpec, BatchSpec], ...]
    warmup_steps: int
    steps: int
    isolation: str  # "group": a process per (model, method) on CPU (own RSS); per model on GPU
    per_method_process: bool
    autocast_bf16: bool = False
    interleave: bool = False  # all methods of a model in one process, timed in turn step by step
    budget_s: float | None = None
    threads: int | None = None  # torch CPU threads per worker; see synpo.benchmarking.kernels.Preset
    methods: tuple[str, ...] = ()  # the methods run by default (empty: all of METHODS)
    description: str = ""


@dataclass(frozen=True)
class Method:
    loss: str
    impl: str  # "fused" or "naive"
    shared: bool  # prefix sharing
    description: str


METHODS = {
    "dpo_reference_naive": Method("dpo", "naive", False, "DPO + reference model, naive logits (upstream)"),
    "dpo_reference_fused": Method("dpo", "fused", False, "DPO + reference model, fused loss"),
    "dpo_reference_fused_shared": Method(
        "dpo", "fused", True, "DPO + reference model, fused loss, prefix sharing (reference pass too)"
    ),
    "synpo_naive": Method("synpo", "naive", False, "SynPO, naive logits (upstream SynPO)"),
    "synpo_fused": Method("synpo", "fused", False, "SynPO, fused loss (this library)"),
    "synpo_fused_shared": Method("synpo", "fused", True, "SynPO, fused loss + prefix sharing (this library)"),
}
BASELINE = "dpo_reference_naive"
OURS = "synpo_fused"
OURS_SHARED = "synpo_fused_shared"

MODELS = {
    name: presets.from_mapping(ModelSpec, {**entry, "name": name}, f"models.{name}")
    for name, entry in presets.section("models").items()
}


def _preset(name: str, entry: dict) -> TrainerPreset:
    where = f"trainer.{name}"
    models = []
    for i, item in enumerate(entry.get("models", ())):
        item, at = dict(item), f"{where}.models[{i}]"
        model = item.pop("model", None)
        if model not in MODELS:
            raise presets.invalid(at, f"model must be one of {list(MODELS)}, got {model!r}")
        models.append((MODELS[model], presets.from_mapping(BatchSpec, item, at)))
    methods = tuple(entry.pop("methods", ()))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise presets.invalid(where, f"methods: unknown {unknown}; known: {list(METHODS)}")
    return presets.from_mapping(
        TrainerPreset, {**entry, "name": name, "models": tuple(models), "methods": methods}, where
    )


PRESETS = presets.load("trainer", _preset)


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------


def build_model(spec: ModelSpec, device: str, seed: int = 0):
    """``(peft model, pad id, vocabulary size)``: random weights built locally, LoRA applied."""
    import torch

    from synpo import tiny
    from synpo.config import UPSTREAM_LORA_TARGETS, LoraConfig
    from synpo.models import apply_lora

    dtype = getattr(torch, spec.dtype)
    if spec.vision:
        model, processor = tiny.build_tiny_vlm(
            seed=seed,
            hidden_size=spec.hidden,
            layers=spec.layers,
            heads=spec.heads,
            image_size=spec.image_size,
            vocab_size=spec.vocab,
        )
        model = model.to(device=device, dtype=dtype)
        from synpo.models import freeze_vision

        freeze_vision(model)
        pad, vocab = processor.tokenizer.pad_token_id, model.config.text_config.vocab_size
    elif spec.vocab is None:
        model, tokenizer = tiny.build_tiny_causal_lm(
            arch=spec.arch, hidden_size=spec.hidden, layers=spec.layers, heads=spec.heads, seed=seed
        )
        model = model.to(device=device, dtype=dtype)
        pad, vocab = tokenizer.pad_token_id, len(tokenizer)
    else:
        pad, vocab = 0, spec.vocab
        model = tiny.build_random_causal_lm(
            vocab_size=vocab,
            arch=spec.arch,
            hidden_size=spec.hidden,
            layers=spec.layers,
            heads=spec.heads,
            kv_heads=spec.kv_heads,
            intermediate_size=spec.intermediate,
            max_position_embeddings=8192,
            special_token_ids=(1, 2, pad),
            seed=seed,
            dtype=dtype,
            device=device,
        )
    model.config.use_cache = False
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(
        enabled=True,
        r=spec.lora_r,
        alpha=spec.lora_alpha,
        dropout=0.05,
        target_modules=list(UPSTREAM_LORA_TARGETS),
    )
    torch.manual_seed(seed)  # the builders leave the global RNG alone; LoRA's init draws from it
    model = apply_lora(model, lora)
    model.train()
    return model, pad, vocab


def build_batch(
    spec: BatchSpec,
    vocab: int,
    pad: int,
    device: str,
    seed: int = 0,
    *,
    shared: bool = False,
    model_spec: ModelSpec | None = None,
    image_token: int | None = None,
    dtype=None,
) -> dict:
    """A collated batch of random token ids (ids 0-5 are special tokens): ``[chosen; rejected]`` rows,
    or with ``shared`` one ``[prompt, chosen, rejected]`` row per pair. With ``spec.frames`` the prompt
    starts with that many frames' image tokens (``image_token``) and the pair carries random frames."""
    import torch

    from synpo.data import EncodedPair, PreferenceCollator

    gen = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(6, vocab, (n,), generator=gen).tolist()

    pairs = []
    for i in range(spec.pairs):
        prompt, vision = ids(spec.prompt), {}
        if spec.frames:
            size, n_image = model_spec.image_size, spec.frames * model_spec.frame_tokens
            if n_image >= spec.prompt:
                raise ValueError(f"prompt: {spec.prompt} positions cannot hold {n_image} frame tokens")
            prompt[:n_image] = [image_token] * n_image
            vision["pixel_values"] = torch.randn(spec.frames, 3, size, size, generator=gen).to(dtype)
        pairs.append(
            EncodedPair(
                index=i,
                prompt_ids=prompt,
                chosen_ids=ids(spec.chosen),
                rejected_ids=ids(spec.rejected),
                vision_inputs=vision,
            )
        )
    batch = PreferenceCollator(pad_token_id=pad, prefix_sharing=shared)(pairs)
    # tokens/s counts the pairs' tokens (both rows' prompts), whatever a method computes of them.
    batch["pair_tokens"] = spec.tokens
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def make_step(model, batch: dict, method: str, autocast: bool = False):
    """``(step, optimizer)``: ``step()`` runs one optimizer step of ``method`` as the trainer's plain
    path does (objective forward, backward, gradient clipping, AdamW) and returns the loss."""
    import torch

    from synpo.objective import PreferenceObjective

    spec = METHODS[method]
    objective = PreferenceObjective(
        model,
        loss=spec.loss,
        impl=spec.impl,
        reference_mode="adapter_disabled" if spec.loss == "dpo" else None,
        autocast_dtype=torch.bfloat16 if autocast else None,
        prefix_sharing=spec.shared,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-6)  # upstream learning rate

    def step() -> float:
        loss, _metrics = objective(**batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().item()  # one host sync per step, as the trainer's finiteness check

    return step, optimizer


def _oom(exc: BaseException, what: str = "") -> dict:
    if not common.is_out_of_memory(exc):
        raise exc
    return {"status": "oom", "reason": f"{what}{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}


def _measure_methods(
    model, batches, methods, device: str, warmup: int, steps: int, autocast: bool, profile_top: int = 0
) -> dict:
    """``{method: result}``. Several methods are timed in turn, one step each per round (load on a
    shared machine hits them alike); then one more step each under :class:`common.PeakMemory`, and
    with ``profile_top`` one more under ``torch.profiler`` (:func:`common.profile_top_ops`; never
    timed). ``batches``: ``{shared: batch}``."""
    runs = {method: make_step(model, batches[METHODS[method].shared], method, autocast) for method in methods}
    out: dict[str, dict] = {}
    times: dict[str, list[float]] = {method: [] for method in methods}
    losses: dict[str, float] = {}

    def attempt(method: str, phase: str) -> None:
        step = runs[method][0]
        try:
            if phase == "warmup":
                step()
            elif phase == "timed":
                common.synchronize(device)
                t0 = time.perf_counter()
                losses[method] = step()
                common.synchronize(device)
                times[method].append(time.perf_counter() - t0)
            elif phase == "memory":
                with common.PeakMemory(device) as mem:
                    step()
                out[method] = _step_result(
                    times[method], losses[method], mem, batches[METHODS[method].shared]
                )
            else:
                try:
                    out[method]["profile"] = common.profile_top_ops(step, device, profile_top)
                except Exception as exc:  # the measured step stands; only its profile is missing
                    out[method]["profile_error"] = _oom(exc, "profiling: ")["reason"]
                    common.release_free_memory(device)
        except Exception as exc:
            out[method] = _oom(exc)  # re-raises anything but out of memory
            runs.pop(method)[1].zero_grad(set_to_none=True)
            common.release_free_memory(device)

    try:
        phases = (("warmup", warmup), ("timed", steps), ("memory", 1), ("profile", int(profile_top > 0)))
        for phase, rounds in phases:
            for _ in range(rounds):
                for method in list(runs):
                    attempt(method, phase)
    finally:
        for _step, optimizer in runs.values():
            optimizer.zero_grad(set_to_none=True)
    return {method: out[method] for method in methods}


def _step_result(times: list[float], loss: float, mem: common.PeakMemory, batch: dict) -> dict:
    step_s = statistics.median(times)
    tokens = batch["pair_tokens"]
    return {
        "status": "ok",
        "step_s": step_s,
        "min_step_s": min(times),
        "times_s": times,
        "steps_per_s": 1.0 / step_s,
        "tokens_per_s": tokens / step_s,
        "response_tokens_per_s": batch["num_response_tokens"] / step_s,
        "tokens_per_step": tokens,
        "peak_bytes": mem.total_bytes,
        "step_bytes": mem.peak_bytes,
        "memory_exact": mem.exact,
        "loss": loss,
    }


def run_task(task: dict, settings: dict, context: dict) -> dict:
    """Worker entry: one (model, method), or with ``methods`` all of them interleaved (the result
    then holds ``methods: {method: result}``). The model and batch are reused by the next task of the
    same model in this process (LoRA weights drift between methods, which timing does not see)."""
    import torch

    device = settings["device"]
    if settings.get("threads"):
        torch.set_num_threads(settings["threads"])
    spec = ModelSpec(**task["model"])
    batch_spec = BatchSpec(**task["batch"])
    if context.get("model_name") != spec.name:
        context.clear()
        common.release_free_memory(device)
        try:
            t0 = time.perf_counter()
            model, pad, vocab = build_model(spec, device)
            context["build_s"] = time.perf_counter() - t0
        except Exception as exc:
            return _oom(exc, "building the model: ")
        context.update(model_name=spec.name, model=model, pad=pad, vocab=vocab)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        context["params"] = (trainable, sum(p.numel() for p in model.parameters()))
    if context.get("batch_spec") != batch_spec:  # a sweep: the next size on the same model
        model = context["model"]
        image_token = getattr(getattr(model, "config", None), "image_token_index", None)
        context["batches"] = {
            shared: build_batch(
                batch_spec,
                context["vocab"],
                context["pad"],
                device,
                shared=shared,
                model_spec=spec,
                image_token=image_token,
                dtype=getattr(torch, spec.dtype),
            )
            for shared in (False, True)
        }
        context["batch_spec"] = batch_spec
    common.release_free_memory(device)  # the previous method's optimizer state and graphs
    results = _measure_methods(
        context["model"],
        context["batches"],
        task.get("methods") or [task["method"]],
        device,
        settings["warmup_steps"],
        settings["steps"],
        settings["autocast_bf16"],
        settings.get("profile_top", 0),
    )
    for result in results.values():
        result["trainable_params"], result["total_params"] = context["params"]
        result["model_build_s"] = context["build_s"]
    return {"status": "ok", "methods": results} if "methods" in task else results[task["method"]]


def per_method(tasks: list[dict], results: list[dict]) -> tuple[list[dict], list[dict]]:
    """Interleaved tasks (several ``methods``) and their results, split into one per method."""
    out_tasks, out_results = [], []
    for task, result in zip(tasks, results):
        for method in task.get("methods") or [task["method"]]:
            out_tasks.append({**task, "method": method})
            out_results.append(result["methods"][method] if "methods" in result else result)
    return out_tasks, out_results


def _summarize(result: dict) -> str:
    if "methods" in result:
        return "; ".join(f"{m} {_summarize(r)}" for m, r in result["methods"].items())
    if result.get("status") != "ok":
        return f"{result.get('status')} {result.get('reason') or ''}"
    return f"{common.fmt_seconds(result['step_s'])}/step, peak {common.fmt_bytes(result['peak_bytes'])}"


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def build_records(
    preset: TrainerPreset, tasks: list[dict], results: list[dict], memory_method: str
) -> list[dict]:
    records = []
    for task, res in zip(tasks, results):
        spec, batch = ModelSpec(**task["model"]), BatchSpec(**task["batch"])
        method = METHODS[task["method"]]
        records.append(
            {
                "benchmark": "trainer",
                "preset": preset.name,
                "model": spec.name,
                "case": f"{spec.name} {batch.short}",
                "model_description": spec.description,
                "batch_description": batch.description,
                "hidden": spec.hidden,
                "layers": spec.layers,
                "vocab": spec.vocab,
                "weights_dtype": spec.dtype,
                "lora_r": spec.lora_r,
                "pairs": batch.pairs,
                "prompt_positions": batch.prompt,
                "chosen_tokens": batch.chosen,
                "rejected_tokens": batch.rejected,
                "frames": batch.frames,
                "method": task["method"],
                "method_description": method.description,
                "loss": method.loss,
                "loss_impl": method.impl,
                "prefix_sharing": method.shared,
                "status": res.get("status"),
                "reason": res.get("reason"),
                "step_s": res.get("step_s"),
                "min_step_s": res.get("min_step_s"),
                "steps_per_s": res.get("steps_per_s"),
                "tokens_per_s": res.get("tokens_per_s"),
                "response_tokens_per_s": res.get("response_tokens_per_s"),
                "tokens_per_step": res.get("tokens_per_step"),
                "peak_bytes": res.get("peak_bytes"),
                "step_bytes": res.get("step_bytes"),
                "memory_method": memory_method if res.get("status") == "ok" else None,
                "loss_value": res.get("loss"),
                "trainable_params": res.get("trainable_params"),
                "total_params": res.get("total_params"),
                "times_s": res.get("times_s"),
                "profile": res.get("profile"),
            }
        )
    for case in {r["case"] for r in records}:
        recs = {r["method"]: r for r in records if r["case"] == case}
        base = recs.get(BASELINE)
        for rec in recs.values():
            ok = rec["status"] == "ok" and base is not None and base["status"] == "ok"
            rec["speedup_vs_dpo_reference"] = base["step_s"] / rec["step_s"] if ok else None
            rec["memory_vs_dpo_reference"] = rec["peak_bytes"] / base["peak_bytes"] if ok else None
        ours = recs.get(OURS)
        if ours and ours.get("speedup_vs_dpo_reference"):
            ours["synpo_fused_vs_dpo_reference"] = {
                "speedup": ours["speedup_vs_dpo_reference"],
                "memory_ratio": ours["memory_vs_dpo_reference"],
                "synpo_peak_bytes": ours["peak_bytes"],
                "dpo_peak_bytes": base["peak_bytes"],
            }
        shared, unshared = recs.get(OURS_SHARED), recs.get(OURS)
        if shared and unshared and shared["status"] == unshared["status"] == "ok":
            from synpo.prefix_sharing import token_bound

            prompt = shared["prompt_positions"]
            response = (shared["chosen_tokens"] + shared["rejected_tokens"]) / 2
            bound = token_bound(prompt, response)
            speedup = unshared["step_s"] / shared["step_s"]
            shared["prefix_sharing_vs_unshared"] = {
                "speedup": speedup,
                "token_bound": bound,
                "fraction_of_bound": speedup / bound,
                "memory_ratio": shared["peak_bytes"] / unshared["peak_bytes"],
                "step_memory_ratio": (
                    shared["step_bytes"] / unshared["step_bytes"] if unshared.get("step_bytes") else None
                ),
                "vs_dpo_reference": shared.get("speedup_vs_dpo_reference"),
            }
    return records


def run(args: argparse.Namespace) -> int:
    from synpo.benchmarking import report, runner

    preset = PRESETS[args.preset]
    import torch

    if preset.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--preset {preset.name} needs a CUDA device (none here); use --preset cpu")
    device = preset.device
    methods = args.methods or list(preset.methods or METHODS)
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"--methods: unknown method {m!r}; one of {list(METHODS)}")
    interleave = args.interleave or preset.interleave
    tasks = []
    for spec, batch in preset.models:
        if args.models and spec.name not in args.models:
            continue
        task = {"group": spec.name, "model": asdict(spec), "batch": asdict(batch)}
        if interleave:
            tasks.append({**task, "methods": methods})
            continue
        for method in methods:
            group = f"{spec.name}/{method}" if preset.per_method_process else spec.name
            tasks.append({**task, "group": group, "method": method})
    settings = {
        "device": device,
        "warmup_steps": args.warmup_steps if args.warmup_steps is not None else preset.warmup_steps,
        "steps": args.steps if args.steps is not None else preset.steps,
        "autocast_bf16": preset.autocast_bf16,
        "threads": preset.threads if args.threads is None else args.threads,
        "profile_top": getattr(args, "profile_top", 0),
    }
    isolation = args.isolation or preset.isolation
    if device == "cuda":
        memory_method = (
            "cuda max_memory_allocated in the step (weights included); "
            "step memory = above what was allocated before it"
        )
    else:
        separate = preset.per_method_process and isolation != "none" and not interleave
        processes = "one process per method" if separate else "shared process"
        memory_method = (
            "peak RSS of the step (weights included); step memory = above the RSS before it "
            f"({processes}; glibc mmap threshold fixed)"
        )
    env = common.worker_env(device, args.worker_env)
    meta = {
        **common.run_meta(device, preset, isolation, settings["threads"], env),
        "warmup_steps": settings["warmup_steps"],
        "steps": settings["steps"],
        "interleaved": interleave,
        "memory_method": memory_method,
        "autocast": "bf16" if preset.autocast_bf16 else None,
        "profile_top": settings["profile_top"],
        "methods": {k: v.description for k, v in METHODS.items()},
    }
    print(
        f"synpo bench trainer --preset {preset.name}: {len(tasks)} runs on {meta['device']} "
        f"(torch {meta['torch']}, commit {meta['commit']})",
        flush=True,
    )
    results = runner.run_tasks(
        "trainer",
        tasks,
        settings=settings,
        isolation=isolation,
        timeout_s=args.timeout,
        budget_s=args.budget_s if args.budget_s is not None else preset.budget_s,
        describe=lambda t: " ".join(
            (t["model"]["name"], BatchSpec(**t["batch"]).short, t.get("method") or " + ".join(t["methods"]))
        ),
        summarize=_summarize,
        desc="trainer",
        env=env,
    )
    records = build_records(preset, *per_method(tasks, results), memory_method)
    table = report.trainer_markdown(records, meta)
    return common.finish(args, f"trainer_{preset.name}", records, meta, table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="cpu", help="models and batches (default: cpu)"
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        help=f"subset of the preset's models ({', '.join(MODELS)})",
    )
    parser.add_argument(
        "--methods", nargs="+", default=None, metavar="METHOD", help=f"subset of {list(METHODS)}"
    )
    parser.add_argument(
        "--warmup-steps", type=int, default=None, help="untimed steps (default: the preset's)"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: the preset's)")
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="the methods of a model in one process, timed in turn step by step (default: the preset's)",
    )
    parser.add_argument(
        "--profile-top",
        type=int,
        default=0,
        metavar="N",
        help="after the timed steps, one more step per method under torch.profiler; its N ops with the "
        "most self time (host; and kernels on CUDA) go into the results and the report (default 0: none)",
    )
    common.add_run_arguments(parser)
