"""Step time and memory of the 7B configuration under DeepSpeed ZeRO-3 on N GPUs: one GPU measured,
communication computed from volume.

Per micro-batch and GPU (data parallel, the micro-batch per GPU fixed), ZeRO-3 moves, in bf16:

- an all-gather of every parameter for the policy forward, and another for its backward
  (parameters are released after use), each ``(N-1)/N * 2P`` bytes received per GPU;
- for DPO with a reference model (the policy with its adapters disabled, as upstream): a third
  all-gather, for the reference forward;
- a reduce-scatter of the trainable (LoRA) gradients: ``(N-1)/N * 2 P_lora`` bytes.

Ring collectives take ``(N-1)/N * S / busbw`` for ``S`` bytes gathered. ``busbw`` is an assumption
(flags): ~360 GB/s within an 8-GPU NVLink node, ~45 GB/s per GPU across nodes (8 x 400 Gb/s
InfiniBand per node). The compute part of a step is the one-GPU step time measured by
``synpo bench trainer --preset gpu`` (``trainer_gpu.json``); without that file it is estimated from
FLOPs at an assumed achieved rate, and every such number is labelled *estimated*. Step time is
bracketed by full overlap of communication with compute (``max``) and none (sum).

Memory per GPU: parameters ``2P/N``, LoRA weights + gradients + AdamW states ``16 P_lora / N``,
plus what the step itself adds on one GPU (activations, logits; measured: peak minus the weights
and optimizer states), which does not shrink with N, plus ZeRO-3's live gathered parameters
(``stage3_max_live_parameters``, default 1e9 -> 2 GB).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from synpo.benchmarking.common import fmt_bytes, load_results

GiB = 2**30


@dataclass(frozen=True)
class LinkModel:
    intra_node_busbw: float = 360e9  # bytes/s, all-gather within one NVLink node (8 GPUs)
    inter_node_busbw: float = 45e9  # bytes/s per GPU across nodes
    gpus_per_node: int = 8

    def busbw(self, gpus: int) -> float:
        return self.intra_node_busbw if gpus <= self.gpus_per_node else self.inter_node_busbw


def parameter_counts(spec) -> tuple[int, int, int]:
    """``(all parameters, non-embedding matmul parameters, LoRA parameters)`` of a ModelSpec."""
    h, inter, layers, vocab = spec.hidden, spec.intermediate or 2 * spec.hidden, spec.layers, spec.vocab
    per_layer = 4 * h * h + 3 * h * inter + 2 * h  # q/k/v/o, gate/up/down, two norms
    if spec.arch == "qwen2":
        per_layer += 3 * h  # q/k/v biases
    matmul = layers * (4 * h * h + 3 * h * inter)
    total = layers * per_layer + 2 * vocab * h + h  # + embeddings, lm_head, final norm
    r = spec.lora_r
    lora = layers * (4 * (h * r + r * h) + 2 * (h * r + r * inter) + (inter * r + r * h))
    return total, matmul, lora


def estimated_step_flops(spec, batch) -> dict[str, float]:
    """FLOPs of one micro-batch per method (LoRA: the frozen base gets no weight gradients)."""
    _total, matmul, _lora = parameter_counts(spec)
    seq_chosen = batch.prompt + batch.chosen
    seq_rejected = batch.prompt + batch.rejected
    tokens = batch.pairs * (seq_chosen + seq_rejected)
    response = batch.pairs * (batch.chosen + batch.rejected)
    attention_fwd = 2 * spec.layers * spec.hidden * batch.pairs * (seq_chosen**2 + seq_rejected**2)  # causal
    backbone_fwd = 2 * matmul * tokens + attention_fwd
    backbone_bwd = 2 * matmul * tokens + 2 * attention_fwd  # activation gradients only
    head = 2 * spec.vocab * spec.hidden

    def method(reference: bool, fused: bool) -> float:
        rows = response if fused else tokens  # the naive path scores every position
        policy = backbone_fwd + backbone_bwd + 2 * head * rows  # head: forward + input gradient
        ref = backbone_fwd + head * rows if reference else 0.0
        return policy + ref

    return {
        "dpo_reference_naive": method(True, False),
        "dpo_reference_fused": method(True, True),
        "synpo_naive": method(False, False),
        "synpo_fused": method(False, True),
    }


def _one_gpu(trainer_results: Path | None, assumed_flops: float):
    """Per method: (step seconds, step memory beyond weights/optimizer bytes, source)."""
    from synpo.benchmarking.trainer import PRESETS

    spec, batch = next((s, b) for s, b in PRESETS["gpu"].models if s.name == "7b")
    total, _matmul, lora = parameter_counts(spec)
    resident = 2 * total + 16 * lora
    measured = {}
    if trainer_results is not None and Path(trainer_results).is_file():
        data = load_results(trainer_results)
        for rec in data["records"]:
            if rec.get("model") == "7b" and rec.get("status") == "ok":
                measured[rec["method"]] = rec
    flops = estimated_step_flops(spec, batch)
    out = {}
    for method, f in flops.items():
        rec = measured.get(method)
        if rec is not None:
            extra = max(0, rec["peak_bytes"] - resident)
            out[method] = (rec["step_s"], extra, "measured")
        else:
            out[method] = (f / assumed_flops, None, "estimated")
    return spec, batch, total, lora, out


def projection(
    trainer_results: Path | None = None,
    gpus: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
    links: LinkModel | None = None,
    assumed_flops: float = 400e12,
    live_params: float = 1e9,
) -> dict:
    links = links or LinkModel()
    spec, batch, total, lora, one = _one_gpu(trainer_results, assumed_flops)
    rows = []
    for n in gpus:
        frac = (n - 1) / n
        gather_bytes = frac * 2 * total
        reduce_bytes = frac * 2 * lora
        busbw = links.busbw(n)
        row = {"gpus": n, "busbw": busbw if n > 1 else None}
        for method, (t_compute, extra, source) in one.items():
            gathers = 3 if method.startswith("dpo") else 2
            volume = gathers * gather_bytes + reduce_bytes
            t_comm = volume / busbw if n > 1 else 0.0
            memory = None
            if extra is not None:
                memory = 2 * total / n + 16 * lora / n + extra + (2 * live_params if n > 1 else 0)
            row[method] = {
                "compute_s": t_compute,
                "comm_bytes": volume,
                "comm_s": t_comm,
                "step_overlap_s": max(t_compute, t_comm),
                "step_serial_s": t_compute + t_comm,
                "memory_bytes": memory,
                "source": source,
            }
        rows.append(row)
    return {
        "model": spec.description,
        "batch": batch.description,
        "params": total,
        "lora_params": lora,
        "assumed_flops": assumed_flops,
        "links": links,
        "rows": rows,
        "sources": sorted({v[2] for v in one.values()}),
    }


def markdown(proj: dict) -> str:
    est = "estimated" in proj["sources"]
    lines = [
        f"Model: {proj['model']} ({proj['params'] / 1e9:.2f} B parameters, {proj['lora_params'] / 1e6:.0f} M "
        f"LoRA). Micro-batch per GPU: {proj['batch']}.",
        "",
        (
            "One-GPU compute: **estimated** from FLOPs at an assumed "
            f"{proj['assumed_flops'] / 1e12:.0f} TFLOP/s "
            "(no `trainer_gpu.json` with the 7b model yet: run `benchmarks/gpu_suite.sh` on a GPU and "
            "regenerate). Memory needs the measurement and is left blank until then."
            if est
            else "One-GPU compute and memory: **measured** (`benchmarks/results/trainer_gpu.json`, model 7b)."
        ),
        "",
        f"Links: all-gather bus bandwidth {proj['links'].intra_node_busbw / 1e9:.0f} GB/s within a node of "
        f"{proj['links'].gpus_per_node} GPUs, {proj['links'].inter_node_busbw / 1e9:.0f} GB/s across nodes "
        "(assumed).",
        "",
        "| GPUs | comm/step SynPO | comm/step DPO+ref | step SynPO fused (overlap..serial) | "
        "step DPO+ref naive (overlap..serial) | saving vs DPO+ref naive | "
        "reference-free alone (vs DPO+ref fused) | memory/GPU SynPO fused | memory/GPU DPO+ref naive |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def saving(ours, theirs):
        lo = 1 - ours["step_overlap_s"] / theirs["step_overlap_s"]
        hi = 1 - ours["step_serial_s"] / theirs["step_serial_s"]
        return f"{100 * min(lo, hi):.0f}..{100 * max(lo, hi):.0f}%"

    for row in proj["rows"]:
        s, d, df = row["synpo_fused"], row["dpo_reference_naive"], row["dpo_reference_fused"]
        lines.append(
            f"| {row['gpus']} | {fmt_bytes(s['comm_bytes'])} ({s['comm_s'] * 1e3:.0f} ms) | "
            f"{fmt_bytes(d['comm_bytes'])} ({d['comm_s'] * 1e3:.0f} ms) | "
            f"{s['step_overlap_s'] * 1e3:.0f}..{s['step_serial_s'] * 1e3:.0f} ms | "
            f"{d['step_overlap_s'] * 1e3:.0f}..{d['step_serial_s'] * 1e3:.0f} ms | "
            f"{saving(s, d)} | {saving(s, df)} | "
            f"{fmt_bytes(s['memory_bytes'])} | {fmt_bytes(d['memory_bytes'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from synpo.benchmarking.common import default_results_dir

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trainer-results", type=Path, default=default_results_dir() / "trainer_gpu.json")
    parser.add_argument(
        "--intra-gbps", type=float, default=360.0, help="all-gather busbw within a node, GB/s"
    )
    parser.add_argument("--inter-gbps", type=float, default=45.0, help="all-gather busbw across nodes, GB/s")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--assumed-tflops", type=float, default=400.0, help="compute rate when not measured")
    args = parser.parse_args(argv)
    links = LinkModel(args.intra_gbps * 1e9, args.inter_gbps * 1e9, args.gpus_per_node)
    print(markdown(projection(args.trainer_results, links=links, assumed_flops=args.assumed_tflops * 1e12)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
