"""``synpo bench kernels``: the ops against the naive path and the peers, forward and forward+backward.

Ops (all three with the Hugging Face label convention, ``-100`` = not scored):

- ``token_logprobs``: per-token log-probs from ``(n, V)`` logits;
- ``fused_linear_token_logprobs``: the same from hidden states ``(n, D)`` and the lm_head ``(V, D)``,
  with a random per-token upstream gradient (the case where per-token gradients must be exact);
- ``synpo_loss``: the fused lm_head -> SynPO loss on a ``[chosen; rejected]`` batch ``(2B, T, D)``
  whose first ``prompt`` positions per row are prompt/video tokens.

Implementations (``IMPLEMENTATIONS``): ``synpo_kernels`` (ours; two settings of it run when named in
``--impls``: ``synpo_kernels_fp32acc``, fp32 weight-gradient accumulation, and ``synpo_kernels_torch``,
the torch backend), ``naive`` (the upstream path: full
logits over every position, fp32 log_softmax and softmax materialized), ``torch_compile`` (the
reference of :mod:`synpo_kernels.reference` under ``torch.compile``), Liger-Kernel (cross entropy /
fused linear cross entropy with ``reduction='none'``, and its chunked SimPO loss: the closest
reference-free preference loss it has, a different loss with the same cost structure), Cut
Cross-Entropy (``reduction='none'``) and PyTorch's ``linear_cross_entropy`` when the installed torch
has it. Per-token peers feed their log-probs into the SynPO formula of the reference. A peer that is
not installed is reported ``missing``; a Triton-only peer on CPU ``unsupported``; neither is dropped.

Metrics per (op, size, implementation, pass): median time (GPU: CUDA events after warm-up; CPU:
wall clock), peak memory beyond the inputs (GPU: ``max_memory_allocated``; CPU: peak RSS in the
implementation's own process), achieved TFLOP/s of the useful work (``2nDV`` forward, ``6nDV``
forward+backward, ``n`` = scored tokens) and its % of the floor at the GEMM rate measured in the same
run (for ``token_logprobs``: bytes at the measured copy bandwidth), the ratio of each implementation's
time and memory to ours, and a check of its outputs and gradient norms against ours.

Presets (``--preset``): ``smoke`` (CI, seconds), ``cpu`` (the sweep in the README), ``cpu-large``
(fused vs naive at the larger CPU shapes: token op n=4096 V=32000, SynPO n=4096 D=1024 V=32768 as 8
pairs of 256-token or 4 pairs of 512-token responses, a video batch of 4 rows x (2048 + 256) positions,
each run in a fresh process; ~10 min) and ``gpu``. ``--worker-env THP_MEM_ALLOC_ENABLE=1`` runs the
workers with transparent huge pages for every allocation (which speeds up the naive path's large
temporaries the most).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass

from synpo.benchmarking import common, presets

OPS = ("token_logprobs", "fused_linear_token_logprobs", "synpo_loss")
PASSES = ("fwd", "fwd+bwd")
OURS = "synpo_kernels"

DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class Implementation:
    name: str
    label: str
    ops: tuple[str, ...]
    module: str | None = None  # importable module that must exist (peers)
    cuda_only: str | None = None  # why it cannot run on CPU, when it cannot
    loss_differs: bool = False  # computes a different loss (its values are not comparable)
    opt_in: bool = False  # a setting of ours: run and listed only when named in --impls


IMPLEMENTATIONS = {
    impl.name: impl
    for impl in (
        Implementation(OURS, "synpo_kernels (this library)", OPS),
        Implementation(
            "synpo_kernels_fp32acc",
            "synpo_kernels, weight_grad_accumulation='fp32' (an fp32 V x D buffer; bf16 weights)",
            ("synpo_loss",),
            opt_in=True,
        ),
        Implementation(
            "synpo_kernels_torch",
            "synpo_kernels, backend='torch' (cuBLAS GEMMs + the compiled token op instead of Triton on CUDA)",
            ("synpo_loss",),
            opt_in=True,
        ),
        Implementation(
            "naive",
            "naive upstream path: full fp32 logits, log_softmax and softmax materialized",
            OPS,
        ),
        Implementation("torch_compile", "torch.compile of synpo_kernels.reference", OPS),
        Implementation(
            "liger_ce",
            "Liger-Kernel LigerCrossEntropyLoss(reduction='none')",
            ("token_logprobs",),
            module="liger_kernel",
            cuda_only="Liger-Kernel's Triton kernels need a CUDA device",
        ),
        Implementation(
            "liger_flce",
            "Liger-Kernel LigerFusedLinearCrossEntropyLoss(reduction='none'), per-token gradients",
            ("fused_linear_token_logprobs", "synpo_loss"),
            module="liger_kernel",
            cuda_only="Liger-Kernel's Triton kernels need a CUDA device",
        ),
        Implementation(
            "liger_simpo",
            "Liger-Kernel LigerFusedLinearSimPOLoss: chunked SimPO (a different loss, same cost structure)",
            ("synpo_loss",),
            module="liger_kernel",
            loss_differs=True,
        ),
        Implementation(
            "cce",
            "Cut Cross-Entropy linear_cross_entropy(reduction='none')",
            ("fused_linear_token_logprobs", "synpo_loss"),
            module="cut_cross_entropy",
            cuda_only="Cut Cross-Entropy's Triton kernels need a CUDA device",
        ),
        Implementation(
            "torch_lce",
            "torch.nn.functional.linear_cross_entropy(reduction='none'), chunked options when available",
            ("fused_linear_token_logprobs", "synpo_loss"),
        ),
    )
}


# ---------------------------------------------------------------------------------------------
# Sizes and presets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One size of one op. ``tokens`` = scored tokens n; for ``synpo_loss`` n = rows * (seq - prompt)."""

    op: str
    vocab: int
    dtype: str
    tokens: int = 0
    hidden: int | None = None
    rows: int | None = None
    seq: int | None = None
    prompt: int | None = None
    shape: str = "text"  # "text" or "video" (long prompt/video prefix, short response)
    priority: int = 1  # 0: run before the others (the headline sizes, when a time budget cuts a sweep)

    def __post_init__(self):
        if self.op == "synpo_loss":
            object.__setattr__(self, "tokens", self.rows * (self.seq - self.prompt))

    @property
    def positions(self) -> int:
        """Positions whose logits the naive path computes (every position of every row)."""
        return self.rows * self.seq if self.op == "synpo_loss" else self.tokens

    @property
    def label(self) -> str:
        dt = DTYPE_SHORT.get(self.dtype, self.dtype)
        if self.op == "token_logprobs":
            return f"n={self.tokens} V={self.vocab} {dt}"
        if self.op == "fused_linear_token_logprobs":
            return f"n={self.tokens} D={self.hidden} V={self.vocab} {dt}"
        kind = "video " if self.shape == "video" else ""
        return (
            f"{kind}2B={self.rows} T={self.seq} prompt={self.prompt} (n={self.tokens}) "
            f"D={self.hidden} V={self.vocab} {dt}"
        )


@dataclass(frozen=True)
class Preset:
    name: str
    device: str  # "cpu" or "cuda"
    cases: tuple[Case, ...]
    warmup: int
    repeats: int
    isolation: str  # see synpo.benchmarking.runner
    gemm_size: int
    copy_bytes: int
    run_impls: tuple[str, ...] | None = None  # None: every implementation
    why_not_run: str = ""
    budget_s: float | None = None
    # torch CPU threads per worker (None: torch's default, all cores). The CPU presets use one: on a
    # shared machine, OpenMP barriers waiting for a descheduled second thread cost up to 100x.
    threads: int | None = None
    max_pass_s: float | None = None  # timed calls stop early once they took this long (slow peers)
    description: str = ""


def _preset(name: str, entry: dict) -> Preset:
    where = f"kernels.{name}"
    cases = []
    for i, item in enumerate(entry.get("cases", ())):
        case = presets.from_mapping(Case, item, f"{where}.cases[{i}]")
        if case.op not in OPS:
            raise presets.invalid(f"{where}.cases[{i}]", f"op must be one of {list(OPS)}, got {case.op!r}")
        cases.append(case)
    run_impls = entry.get("run_impls")
    if run_impls is not None:
        unknown = sorted(set(run_impls) - set(IMPLEMENTATIONS))
        if unknown:
            raise presets.invalid(where, f"unknown run_impls {unknown} (known: {list(IMPLEMENTATIONS)})")
        run_impls = tuple(run_impls)
    fields = {**entry, "name": name, "cases": tuple(cases), "run_impls": run_impls}
    return presets.from_mapping(Preset, fields, where)


PRESETS = presets.load("kernels", _preset)


# ---------------------------------------------------------------------------------------------
# Worker side: inputs, implementations, one task
# ---------------------------------------------------------------------------------------------


def make_inputs(case: Case, device: str, requires_grad: bool) -> dict:
    """Deterministic inputs of ``case`` (logits ~ N(0, 4), as a trained model's spread)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    dtype = getattr(torch, case.dtype)

    def randn(*shape, scale=1.0):
        return torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(scale)

    out: dict = {}
    if case.op == "token_logprobs":
        out["logits"] = randn(case.tokens, case.vocab, scale=2.0).requires_grad_(requires_grad)
        out["labels"] = torch.randint(0, case.vocab, (case.tokens,), generator=gen, device=device)
    elif case.op == "fused_linear_token_logprobs":
        out["hidden"] = randn(case.tokens, case.hidden).requires_grad_(requires_grad)
        out["weight"] = randn(case.vocab, case.hidden, scale=2.0 / case.hidden**0.5).requires_grad_(
            requires_grad
        )
        out["labels"] = torch.randint(0, case.vocab, (case.tokens,), generator=gen, device=device)
    else:
        out["hidden"] = randn(case.rows, case.seq, case.hidden).requires_grad_(requires_grad)
        out["weight"] = randn(case.vocab, case.hidden, scale=2.0 / case.hidden**0.5).requires_grad_(
            requires_grad
        )
        labels = torch.randint(0, case.vocab, (case.rows, case.seq), generator=gen, device=device)
        labels[:, : case.prompt] = -100
        out["labels"] = labels
    if case.op != "synpo_loss":
        out["grad_out"] = torch.randn(case.tokens, generator=gen, device=device, dtype=torch.float32)
    return out


def _synpo_from_label_logp(token_logp, labels):
    """SynPO loss (reference formula) from per-token log-probs reported at the labels' positions."""
    from synpo_kernels import reference as R

    stats = R.row_stats_from_token_logprobs(token_logp.float(), R.response_mask(labels))
    return R.synpo_loss_from_stats(stats).mean()


def _label_positions(aligned_logp):
    """Per-token log-probs aligned with the logits (t scores label t+1) -> at the labels' positions."""
    import torch

    out = torch.zeros_like(aligned_logp)
    out[..., 1:] = aligned_logp[..., :-1]
    return out


def naive_synpo_loss(hidden, weight, labels, alpha: float = 30.0, beta: float = 0.2):
    """The upstream computation: logits for every position (prompt and video tokens included) in
    fp32, log_softmax and softmax both materialized, gathered at the shifted labels."""
    import torch

    from synpo_kernels import reference as R

    logits = (hidden @ weight.t()).float()
    logp_all = logits.log_softmax(-1)
    p_all = logits.softmax(-1)
    aligned = R.shift_labels(labels)
    valid = aligned != -100
    index = torch.where(valid, aligned, 0).unsqueeze(-1)
    token_logp = logp_all.gather(-1, index).squeeze(-1) * valid
    token_p = p_all.gather(-1, index).squeeze(-1) * valid
    count = valid.sum(-1)
    mean_logp = token_logp.sum(-1) / count
    mean_p = token_p.sum(-1) / count
    half = labels.shape[0] // 2
    margin = mean_logp[:half].exp() - mean_logp[half:].exp()
    return (-torch.sigmoid(alpha * margin) - beta * mean_p[:half]).mean()


def _torch_lce():
    import torch
    import torch.nn.functional as F

    options_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    options = options_cls() if options_cls is not None else None

    def nll(hidden2d, weight, targets):
        return F.linear_cross_entropy(hidden2d, weight, targets, reduction="none", options=options)

    return nll, ("chunked (LinearCrossEntropyOptions())" if options is not None else "reference path")


def build_impl(name: str, op: str, context: dict):
    """``(fn, note)``: ``fn(inputs)`` returns per-token log-probs (token ops) or the loss."""
    import torch

    import synpo_kernels as sk
    from synpo_kernels import reference as R

    note = ""
    if name == OURS:
        if op == "token_logprobs":
            return (lambda x: sk.token_logprobs(x["logits"], x["labels"], shift=False)), note
        if op == "fused_linear_token_logprobs":
            return (
                lambda x: sk.fused_linear_token_logprobs(x["hidden"], x["weight"], x["labels"], shift=False)
            ), note
        return (lambda x: sk.fused_linear_synpo_loss(x["hidden"], x["weight"], x["labels"])), note
    if name in ("synpo_kernels_fp32acc", "synpo_kernels_torch"):
        options = {"weight_grad_accumulation": "fp32"} if name.endswith("fp32acc") else {"backend": "torch"}
        return (lambda x: sk.fused_linear_synpo_loss(x["hidden"], x["weight"], x["labels"], **options)), note
    if name == "naive":
        if op == "token_logprobs":
            return (
                lambda x: x["logits"].float().log_softmax(-1).gather(-1, x["labels"][:, None])[:, 0]
            ), note
        if op == "fused_linear_token_logprobs":
            return (
                lambda x: (
                    (x["hidden"] @ x["weight"].t())
                    .float()
                    .log_softmax(-1)
                    .gather(-1, x["labels"][:, None])[:, 0]
                )
            ), note
        return (lambda x: naive_synpo_loss(x["hidden"], x["weight"], x["labels"])), note
    if name == "torch_compile":
        key = ("compiled", op)
        if key not in context:
            import torch._dynamo

            # One compiled function per op serves every size and both passes (static shapes each).
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            if op == "token_logprobs":

                def reference(logits, labels):
                    return R.token_logprobs_ref(logits, labels, shift=False, dtype=torch.float32)

            elif op == "fused_linear_token_logprobs":

                def reference(hidden, weight, labels):
                    return R.token_logprobs_ref(hidden @ weight.t(), labels, shift=False, dtype=torch.float32)

            else:

                def reference(hidden, weight, labels):
                    return R.synpo_loss_ref(hidden @ weight.t(), labels, dtype=torch.float32)

            context[key] = torch.compile(reference, dynamic=False)
        compiled = context[key]
        if op == "token_logprobs":
            return (lambda x: compiled(x["logits"], x["labels"])), note
        return (lambda x: compiled(x["hidden"], x["weight"], x["labels"])), note
    if name == "liger_ce":
        from liger_kernel.transformers import LigerCrossEntropyLoss

        ce = LigerCrossEntropyLoss(reduction="none")
        return (lambda x: -ce(x["logits"], x["labels"])), "writes its gradient into the logits in place"
    if name == "liger_flce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        flce = LigerFusedLinearCrossEntropyLoss(reduction="none")
        if op == "fused_linear_token_logprobs":
            return (lambda x: -flce(x["weight"], x["hidden"], x["labels"])), note

        def liger_flce_synpo(x):
            h, y = x["hidden"], x["labels"]
            aligned = R.shift_labels(y)
            nll = flce(x["weight"], h.reshape(-1, h.shape[-1]), aligned.reshape(-1)).view(y.shape)
            return _synpo_from_label_logp(_label_positions(-nll.float()), y)

        return liger_flce_synpo, note
    if name == "liger_simpo":
        from liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss

        simpo = LigerFusedLinearSimPOLoss()

        def liger_simpo(x):
            out = simpo(x["weight"], x["hidden"][:, :-1], x["labels"][:, 1:])
            return out[0] if isinstance(out, tuple) else out

        return liger_simpo, "SimPO loss (no SynPO mean-probability term in its interface)"
    if name == "cce":
        from cut_cross_entropy import linear_cross_entropy

        if op == "fused_linear_token_logprobs":
            return (
                lambda x: -linear_cross_entropy(x["hidden"], x["weight"], x["labels"], reduction="none")
            ), note

        def cce_synpo(x):
            y = x["labels"]
            nll = linear_cross_entropy(x["hidden"], x["weight"], y, shift=1, reduction="none")
            token_logp = torch.zeros(y.shape, dtype=torch.float32, device=y.device)
            token_logp[:, 1:] = -nll.float()  # CCE reports shifted losses at label positions 1..T-1
            return _synpo_from_label_logp(token_logp, y)

        return cce_synpo, note
    if name == "torch_lce":
        nll_fn, note = _torch_lce()
        if op == "fused_linear_token_logprobs":
            return (lambda x: -nll_fn(x["hidden"], x["weight"], x["labels"])), note

        def torch_lce_synpo(x):
            h, y = x["hidden"], x["labels"]
            aligned = R.shift_labels(y)
            nll = nll_fn(h.reshape(-1, h.shape[-1]), x["weight"], aligned.reshape(-1)).view(y.shape)
            return _synpo_from_label_logp(_label_positions(-nll.float()), y)

        return torch_lce_synpo, note
    raise ValueError(f"unknown implementation {name!r}")


def _grad_tensors(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if getattr(v, "requires_grad", False)}


def _call(fn, inputs: dict, pass_name: str):
    import torch

    if pass_name == "fwd":
        with torch.no_grad():
            return fn(inputs)
    for t in _grad_tensors(inputs).values():
        t.grad = None
    out = fn(inputs)
    if out.dim() == 0:
        out.backward()
    else:
        out.backward(inputs["grad_out"])
    return out


def _checksums(out, inputs: dict) -> dict:
    sums = {"out_checksum": float(out.detach().double().sum())}
    for name, t in _grad_tensors(inputs).items():
        sums[f"grad_norm_{name}"] = float(t.grad.double().norm()) if t.grad is not None else None
    return sums


def _run_pass(case: Case, impl: str, pass_name: str, settings: dict, context) -> dict:
    device = settings["device"]
    common.release_free_memory(device)
    inputs = make_inputs(case, device, requires_grad=(pass_name == "fwd+bwd"))
    fn, note = build_impl(impl, case.op, context)
    result: dict = {"status": "ok"}
    if note:
        result["note"] = note
    try:
        t0 = time.perf_counter()
        out = _call(fn, inputs, pass_name)  # on pristine inputs (some peers overwrite theirs)
        common.synchronize(device)
        result["first_call_s"] = time.perf_counter() - t0  # includes compilation, autotuning
        result.update(_checksums(out, inputs))
        del out
        timing = common.measure(
            lambda: _call(fn, inputs, pass_name),
            device,
            warmup=max(0, settings["warmup"] - 1),  # the first call above was one
            repeats=settings["repeats"],
            max_total_s=settings.get("max_pass_s"),
        )
        result.update(timing)
        for t in _grad_tensors(inputs).values():
            t.grad = None  # the measured call allocates its gradients itself
        with common.PeakMemory(device) as mem:
            out = _call(fn, inputs, pass_name)
            del out
        result["peak_bytes"] = mem.peak_bytes
        result["total_peak_bytes"] = mem.total_bytes
        # The gradients the pass returns are part of its peak; what is left is its workspace.
        result["grad_bytes"] = sum(t.numel() * t.element_size() for t in _grad_tensors(inputs).values())
        result["memory_exact"] = mem.exact
    except Exception as exc:
        if not common.is_out_of_memory(exc):
            raise
        result = {"status": "oom", "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    finally:
        inputs.clear()
        common.release_free_memory(device)
    return result


def run_task(task: dict, settings: dict, context: dict) -> dict:
    """Worker entry: a ``rates`` task or one (op, size, implementation) with both passes."""
    import torch

    if settings.get("threads"):
        torch.set_num_threads(settings["threads"])
    if task["kind"] == "rates":
        return {"status": "ok", **_reference_rates(settings, context)}
    case = Case(**task["case"])
    passes = {}
    for pass_name in task["passes"]:
        passes[pass_name] = _run_pass(case, task["impl"], pass_name, settings, context)
    return {"status": "ok", "passes": passes, "rates": _reference_rates(settings, context)}


def _reference_rates(settings: dict, context: dict) -> dict:
    """GEMM rate and copy bandwidth, measured once per worker process: the floors of the runs in
    that process are taken at rates measured under the same conditions (on a shared CPU, the load
    of the moment)."""
    if "rates" not in context:
        spec, device = settings["rates"], settings["device"]
        rates = common.measure_matmul_rate(device, spec["dtype"], spec["gemm_size"])
        rates.update(common.measure_copy_bandwidth(device, spec["copy_bytes"]))
        context["rates"] = rates
    return context["rates"]


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def estimate_peak_bytes(case: Case, impl: str) -> int:
    """A rough upper estimate of an implementation's peak memory (guards the host on CPU runs)."""
    elt = {"float32": 4, "bfloat16": 2, "float16": 2}.get(case.dtype, 4)
    n, big_v = case.tokens, case.vocab
    grads = 0
    if case.hidden:
        grads = (case.positions * case.hidden + big_v * case.hidden) * max(elt, 4)
    if impl == "naive":
        per = {
            "token_logprobs": 12 + elt,
            "fused_linear_token_logprobs": 12 + 2 * elt,
            "synpo_loss": 20 + 2 * elt,
        }
        return case.positions * big_v * per[case.op] + grads
    if impl == "torch_compile":
        return case.positions * big_v * (8 + elt) + grads
    if impl == "liger_simpo":
        return 2 * (case.seq or 1) * big_v * 16 + grads
    return min(n * big_v * elt, 1 << 30) + grads


def _status_for(
    impl_name: str, op: str, preset: Preset, device: str, selected: set[str] | None
) -> dict | None:
    """A result that needs no run (missing, unsupported, not selected), or None to run it."""
    import importlib.util

    impl = IMPLEMENTATIONS[impl_name]
    if impl.module and importlib.util.find_spec(impl.module) is None:
        package = impl.module.replace("_", "-")
        return {"status": "missing", "reason": f"{package} is not installed (pip install {package})"}
    if impl_name == "torch_lce":
        import torch.nn.functional as F

        if not hasattr(F, "linear_cross_entropy"):
            import torch

            return {
                "status": "missing",
                "reason": f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy",
            }
    if impl.cuda_only and not device.startswith("cuda"):
        return {"status": "unsupported", "reason": f"unsupported on cpu: {impl.cuda_only}"}
    if selected is not None and impl_name not in selected:
        return {"status": "skipped", "reason": "not selected (--impls)"}
    if preset.run_impls is not None and impl_name not in preset.run_impls and not impl.opt_in:
        return {"status": "skipped", "reason": preset.why_not_run}
    return None


def plan_tasks(preset: Preset, device: str, ops, impls, max_memory: int | None):
    """``(tasks to run, records settled without a run)``; records are per (case, impl, pass)."""
    selected = set(impls) if impls else None
    tasks, settled = [], []
    for case in preset.cases:
        if ops and case.op not in ops:
            continue
        for impl_name, impl in IMPLEMENTATIONS.items():
            if case.op not in impl.ops or (impl.opt_in and (selected is None or impl_name not in selected)):
                continue
            fixed = _status_for(impl_name, case.op, preset, device, selected)
            if fixed is None and max_memory is not None and not device.startswith("cuda"):
                need = estimate_peak_bytes(case, impl_name)
                if need > max_memory:
                    fixed = {
                        "status": "oom",
                        "reason": f"not run: estimated peak {common.fmt_bytes(need)} exceeds the memory "
                        f"limit {common.fmt_bytes(max_memory)} (--max-memory-gb)",
                    }
            if fixed is not None:
                settled += [(case, impl_name, p, fixed) for p in PASSES]
                continue
            tasks.append(
                {
                    "kind": "case",
                    "group": f"{case.op}/{impl_name}",
                    "case": asdict(case),
                    "impl": impl_name,
                    "passes": list(PASSES),
                }
            )
    # Headline sizes first (a time budget cuts the end of a sweep), the sweep's order otherwise.
    tasks.sort(key=lambda t: (t["case"]["priority"], -OPS.index(t["case"]["op"])))
    return tasks, settled


def _useful_work(case: Case, pass_name: str) -> tuple[float | None, float | None]:
    """(FLOPs, bytes) of useful work: 2nDV / 6nDV for the linear ops; row-pass bytes for token op."""
    if case.op == "token_logprobs":
        elt = {"float32": 4, "bfloat16": 2, "float16": 2}.get(case.dtype, 4)
        reads_writes = 1 if pass_name == "fwd" else 3  # read; read twice + write the gradient
        return None, float(reads_writes * case.tokens * case.vocab * elt)
    factor = 2 if pass_name == "fwd" else 6
    return float(factor * case.tokens * case.hidden * case.vocab), None


def _close(a, b, rtol) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if not (math.isfinite(a) and math.isfinite(b)):
        return False
    return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-30) + 1e-6


def _check(rec: dict, ours: dict | None) -> str:
    """``ok`` when outputs and gradient norms match ours within the dtype's tolerance."""
    if rec.get("status") != "ok" or ours is None or ours.get("status") != "ok":
        return "-"
    if rec["impl"] == OURS:
        return "ref"
    if IMPLEMENTATIONS[rec["impl"]].loss_differs:
        return "n/a (other loss)"
    rtol = 2e-2 if rec["dtype"] != "float32" else 2e-3
    keys = [k for k in ours if k == "out_checksum" or k.startswith("grad_norm_")]
    bad = [
        k.replace("grad_norm_", "grad ").replace("out_checksum", "output")
        for k in keys
        if not _close(rec.get(k), ours.get(k), rtol)
    ]
    return "ok" if not bad else "differs: " + ", ".join(bad)


def build_records(preset: Preset, tasks, results, settled, rates: dict, memory_method: str) -> list[dict]:
    """Long-format records (one per op, size, implementation, pass) with the derived metrics."""
    raw: list[tuple[Case, str, str, dict]] = list(settled)
    for task, result in zip(tasks, results):
        case = Case(**task["case"])
        task_rates = result.get("rates") or rates
        for pass_name in task["passes"]:
            if result.get("status") == "ok":
                raw.append(
                    (case, task["impl"], pass_name, {**result["passes"][pass_name], "_rates": task_rates})
                )
            else:
                raw.append((case, task["impl"], pass_name, result))
    order = {c: i for i, c in enumerate(preset.cases)}
    impl_order = {name: i for i, name in enumerate(IMPLEMENTATIONS)}
    raw.sort(key=lambda r: (OPS.index(r[0].op), order[r[0]], impl_order[r[1]], PASSES.index(r[2])))
    records = []
    for case, impl, pass_name, res in raw:
        flops, nbytes = _useful_work(case, pass_name)
        rec = {
            "benchmark": "kernels",
            "preset": preset.name,
            "op": case.op,
            "size": case.label,
            "shape": case.shape,
            "tokens": case.tokens,
            "positions": case.positions,
            "hidden": case.hidden,
            "vocab": case.vocab,
            "dtype": case.dtype,
            "rows": case.rows,
            "seq": case.seq,
            "prompt": case.prompt,
            "impl": impl,
            "pass": pass_name,
            "status": res.get("status"),
            "reason": res.get("reason"),
            "note": res.get("note"),
            "median_s": res.get("median_s"),
            "min_s": res.get("min_s"),
            "repeats": res.get("repeats"),
            "first_call_s": res.get("first_call_s"),
            "peak_bytes": res.get("peak_bytes"),
            "total_peak_bytes": res.get("total_peak_bytes"),
            "grad_bytes": res.get("grad_bytes"),
            "workspace_bytes": (
                max(0, res["peak_bytes"] - res.get("grad_bytes", 0))
                if res.get("peak_bytes") is not None
                else None
            ),
            "memory_method": memory_method if res.get("status") == "ok" else None,
            "memory_exact": res.get("memory_exact"),
            "useful_flops": flops,
            "useful_bytes": nbytes,
            "out_checksum": res.get("out_checksum"),
            "times_s": res.get("times_s"),
        }
        for key, value in res.items():
            if key.startswith("grad_norm_"):
                rec[key] = value
        rates_here = res.get("_rates") or rates
        rec["gemm_rate_flops_per_s"] = rates_here.get("flops_per_s")
        rec["copy_bytes_per_s"] = rates_here.get("bytes_per_s")
        if rec["status"] == "ok" and rec["median_s"]:
            t = rec["median_s"]
            if flops is not None:
                rec["achieved_tflops"] = flops / t / 1e12
                if rates_here.get("flops_per_s"):
                    rec["floor_s"] = flops / rates_here["flops_per_s"]
                    rec["floor_kind"] = f"{'2' if pass_name == 'fwd' else '6'}nDV at the measured GEMM rate"
            elif nbytes is not None:
                rec["achieved_gbps"] = nbytes / t / 1e9
                if rates_here.get("bytes_per_s"):
                    rec["floor_s"] = nbytes / rates_here["bytes_per_s"]
                    rec["floor_kind"] = "bytes at the measured copy bandwidth"
            if rec.get("floor_s"):
                rec["pct_of_floor"] = 100.0 * rec["floor_s"] / t
        records.append(rec)
    ours = {(r["op"], r["size"], r["pass"]): r for r in records if r["impl"] == OURS}
    for rec in records:
        mine = ours.get((rec["op"], rec["size"], rec["pass"]))
        ok = rec["status"] == "ok" and mine is not None and mine["status"] == "ok"
        rec["time_vs_ours"] = rec["median_s"] / mine["median_s"] if ok and mine["median_s"] else None
        rec["memory_vs_ours"] = (
            rec["peak_bytes"] / mine["peak_bytes"]
            if ok and rec["peak_bytes"] is not None and mine["peak_bytes"]
            else None
        )
        rec["check"] = _check(rec, mine)
    return records


def _summarize_task(result: dict) -> str:
    if result.get("status") != "ok":
        return f"{result.get('status')} {result.get('reason') or ''}".strip()
    if "passes" not in result:
        return "ok"
    parts = []
    for name, res in result["passes"].items():
        if res.get("status") == "ok":
            parts.append(
                f"{name} {common.fmt_seconds(res['median_s'])}, {common.fmt_bytes(res.get('peak_bytes'))}"
            )
        else:
            parts.append(f"{name} {res.get('status')}")
    return "; ".join(parts)


def resolve_device(requested: str | None, preset: Preset) -> str:
    import torch

    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        return requested
    if preset.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--preset {preset.name} needs a CUDA device (none here); use --preset cpu")
    return preset.device


def require_cuda_kernels(device: str, impls) -> None:
    """Refuse to time the PyTorch fallback as ``synpo_kernels`` on a CUDA device.

    Without the compiled CUDA kernels (not built, built without CUDA, or built against another
    torch), ``token_logprobs`` on CUDA runs the PyTorch fallback: its numbers are not the library's.
    """
    import synpo_kernels

    if not device.startswith("cuda") or synpo_kernels.HAS_CUDA_KERNELS or (impls and OURS not in impls):
        return
    why = synpo_kernels.EXT_IMPORT_ERROR or "synpo_kernels._C was built without the CUDA kernels"
    raise SystemExit(
        f"synpo bench kernels: synpo_kernels would run on its PyTorch fallback on {device} ({why}), "
        "and would be recorded as this library. Build the CUDA kernels first (a CUDA torch, "
        "CUDA_HOME, SYNPO_CUDA_ARCH_LIST=9.0a for Hopper: pip install --no-build-isolation .), or "
        f"leave {OURS} out with --impls."
    )


def run(args: argparse.Namespace) -> int:
    """``synpo bench kernels``: plan, run, derive, write, print."""
    from synpo.benchmarking import report, runner

    preset = PRESETS[args.preset]
    device = resolve_device(args.device, preset)
    require_cuda_kernels(device, args.impls)
    ops = args.ops or None
    for name in args.impls or ():
        if name not in IMPLEMENTATIONS:
            raise SystemExit(f"--impls: unknown implementation {name!r}; one of {sorted(IMPLEMENTATIONS)}")
    max_memory = None
    if not device.startswith("cuda"):
        if args.max_memory_gb:
            max_memory = int(args.max_memory_gb * 2**30)
        else:
            avail = common.available_host_memory()
            max_memory = int(0.7 * avail) if avail else None
    tasks, settled = plan_tasks(preset, device, ops, args.impls, max_memory)
    dtype = preset.cases[0].dtype
    rates_task = {"kind": "rates", "group": tasks[0]["group"] if tasks else "rates"}
    settings = {
        "device": device,
        "warmup": args.warmup if args.warmup is not None else preset.warmup,
        "repeats": args.repeats if args.repeats is not None else preset.repeats,
        "threads": preset.threads if args.threads is None else args.threads,
        "max_pass_s": preset.max_pass_s,
        "rates": {"dtype": dtype, "gemm_size": preset.gemm_size, "copy_bytes": preset.copy_bytes},
    }
    isolation = args.isolation or preset.isolation
    env = common.worker_env(device, args.worker_env)
    meta = {
        **common.run_meta(device, preset, isolation, settings["threads"], env),
        "warmup": settings["warmup"],
        "repeats": settings["repeats"],
        "max_pass_s": settings["max_pass_s"],
        "implementations": {k: v.label for k, v in IMPLEMENTATIONS.items()},
    }
    print(
        f"synpo bench kernels --preset {preset.name}: {len(tasks)} runs on {meta['device']} "
        f"(torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']})",
        flush=True,
    )
    budget = args.budget_s if args.budget_s is not None else preset.budget_s
    results = runner.run_tasks(
        "kernels",
        [rates_task, *tasks],
        settings=settings,
        isolation=isolation,
        timeout_s=args.timeout,
        budget_s=budget,
        describe=lambda t: (
            "GEMM/copy rates" if t["kind"] == "rates" else f"{t['impl']} {Case(**t['case']).label}"
        ),
        summarize=_summarize_task,
        desc="kernels",
        env=env,
    )
    rates = results[0] if results[0].get("status") == "ok" else {}
    meta["gemm_rate_flops_per_s"] = rates.get("flops_per_s")
    meta["gemm"] = f"{rates.get('gemm_size')}^3 {rates.get('gemm_dtype')}" if rates else None
    meta["copy_bandwidth_bytes_per_s"] = rates.get("bytes_per_s")
    measured = [r["rates"] for r in results[1:] if r.get("rates")] + ([rates] if rates else [])
    if measured:
        # Each worker measures its own reference rates (the floor of its runs): their spread shows
        # how much the machine's load moved during the sweep.
        meta["gemm_rate_range_flops_per_s"] = [
            min(r["flops_per_s"] for r in measured),
            max(r["flops_per_s"] for r in measured),
        ]
        meta["copy_bandwidth_range_bytes_per_s"] = [
            min(r["bytes_per_s"] for r in measured),
            max(r["bytes_per_s"] for r in measured),
        ]
    if device.startswith("cuda"):
        memory_method = "cuda max_memory_allocated - allocated before the call"
    else:
        processes = {
            "task": "a fresh process per run",
            "group": "one process per implementation and op",
            "none": "shared process",
        }[isolation]
        memory_method = f"peak RSS - RSS before the call ({processes}; glibc mmap threshold fixed)"
    meta["memory_method"] = memory_method
    records = build_records(preset, tasks, results[1:], settled, rates, memory_method)
    table = report.kernels_markdown(records, meta)
    return common.finish(args, f"kernels_{preset.name}", records, meta, table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="sweep (default: cpu)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the preset's)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=None, help="subset of ops")
    parser.add_argument(
        "--impls",
        nargs="+",
        default=None,
        metavar="IMPL",
        help=f"subset of {[k for k, v in IMPLEMENTATIONS.items() if not v.opt_in]}, plus the opt-in "
        f"{[k for k, v in IMPLEMENTATIONS.items() if v.opt_in]}",
    )
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls (default: the preset's)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default: the preset's)")
    parser.add_argument(
        "--max-memory-gb",
        type=float,
        default=None,
        help="CPU: skip runs estimated above this (default 70%% of free)",
    )
    common.add_run_arguments(parser)
