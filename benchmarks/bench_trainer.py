"""Benchmark: training steps/s of SynPO (fused, reference-free) against DPO with a reference model and
naive full logits (the upstream setup), same model and data, video-captioning-shaped batches.

Each optimizer step is what :class:`synpo.Trainer` runs: ``PreferenceObjective`` forward (backbone,
then the loss; for DPO also the reference forward, here the policy with its LoRA adapters disabled as
upstream), backward, gradient clipping and an AdamW step. Batches look like video captioning: a long
prompt of video/prompt tokens (all labels -100) and a short caption per row, ``[chosen; rejected]``.

Methods (all in one process, interleaved step by step so that machine load hits them alike):

- ``synpo_fused``: SynPO, ``fused_linear_preference_loss`` on the response positions' hidden states;
- ``dpo_naive_ref``: DPO, full logits for every position (policy and reference), as upstream;
- ``synpo_naive`` / ``dpo_fused_ref``: the two halves of the gain (fusion alone, reference alone).

The headline is ``synpo_fused`` steps/s divided by ``dpo_naive_ref`` steps/s (target: >= 1.5).

    python benchmarks/bench_trainer.py                       # CPU default: 4-layer, D=256, V=32000
    python benchmarks/bench_trainer.py --device cuda --hidden 2048 --layers 16 --heads 16 \\
        --vocab 151936 --prompt-len 2048 --response-len 256 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

METHODS = {
    # name: (loss, impl, needs reference)
    "synpo_fused": ("synpo", "fused"),
    "dpo_naive_ref": ("dpo", "naive"),
    "synpo_naive": ("synpo", "naive"),
    "dpo_fused_ref": ("dpo", "fused"),
}


def build_model(args, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from synpo.config import LoraConfig
    from synpo.models import apply_lora

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.prompt_len + 2 * args.response_len + 8,
        tie_word_embeddings=False,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.full_finetune:
        return model.train()
    lora = LoraConfig(enabled=True, r=args.lora_r, alpha=args.lora_r // 2, dropout=0.05)
    return apply_lora(model, lora).train()


def video_batches(args, vocab: int, count: int):
    """Collated [chosen; rejected] micro-batches: prompt_len video/prompt tokens + a caption per row."""
    from synpo.data import EncodedPair, PreferenceCollator

    generator = torch.Generator().manual_seed(1)
    collate = PreferenceCollator(pad_token_id=0)
    batches = []
    for b in range(count):
        pairs = []
        for i in range(args.pairs):

            def ids(n):
                return torch.randint(1, vocab, (n,), generator=generator).tolist()

            # Captions vary in length around response_len (the chosen one is usually longer).
            chosen = args.response_len + (i % 3) * 8
            rejected = max(8, args.response_len - 24 + (i % 2) * 8)
            pairs.append(EncodedPair(b * args.pairs + i, ids(args.prompt_len), ids(chosen), ids(rejected)))
        batches.append(collate(pairs))
    return batches


def run(args) -> dict:
    from synpo.losses import PreferenceObjective
    from synpo.trainer import linear_warmup_schedule

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    methods = args.methods
    setups = {}
    for name in methods:
        loss, impl = METHODS[name]
        policy = build_model(args, device, dtype)
        reference_mode = None
        if loss == "dpo":
            reference_mode = "copy" if args.full_finetune else "adapter_disabled"
        reference = None
        if reference_mode == "copy":
            reference = build_model(args, device, dtype)
        objective = PreferenceObjective(
            policy, loss=loss, impl=impl, reference_mode=reference_mode, reference=reference
        ).to(device)
        params = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        scheduler = linear_warmup_schedule(optimizer, total_steps=10_000, warmup_steps=10)
        setups[name] = (objective, params, optimizer, scheduler)

    batches = [
        {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
        for b in video_batches(args, args.vocab, args.accumulation)
    ]

    def step(name: str) -> float:
        objective, params, optimizer, scheduler = setups[name]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in batches:
            loss, _ = objective(**batch)
            (loss / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    peak = {}
    for name in methods:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):
            step(name)
        if device.type == "cuda":
            peak[name] = torch.cuda.max_memory_allocated(device) / 2**30
    times = {name: [] for name in methods}
    for index in range(args.steps):
        for name in methods:  # interleaved: load on a shared machine affects every method alike
            times[name].append(step(name))
        progress = "  ".join(f"{name} {times[name][-1]:.2f}s" for name in methods)
        print(f"step {index + 1}/{args.steps}: {progress}", file=sys.stderr, flush=True)

    tokens_per_row = args.prompt_len + args.response_len
    rows = 2 * args.pairs * args.accumulation
    response_tokens = sum(int((b["response_labels"] != -100).sum()) for b in batches)
    all_positions = sum(int(b["attention_mask"].sum()) for b in batches)
    results = {
        "shape": {
            "hidden": args.hidden,
            "layers": args.layers,
            "heads": args.heads,
            "vocab": args.vocab,
            "pairs_per_micro_batch": args.pairs,
            "accumulation": args.accumulation,
            "prompt_len": args.prompt_len,
            "response_len": args.response_len,
            "rows_per_step": rows,
            "positions_per_step": all_positions,
            "response_tokens_per_step": response_tokens,
            "lora_r": None if args.full_finetune else args.lora_r,
            "dtype": args.dtype,
            "gradient_checkpointing": args.gradient_checkpointing,
        },
        "approx_tokens_per_row": tokens_per_row,
        "methods": {},
    }
    for name in methods:
        median = statistics.median(times[name])
        results["methods"][name] = {
            "median_step_s": median,
            "min_step_s": min(times[name]),
            "steps_per_s": 1.0 / median,
            "peak_memory_gib": peak.get(name),
        }
    if "synpo_fused" in methods and "dpo_naive_ref" in methods:
        ours, theirs = results["methods"]["synpo_fused"], results["methods"]["dpo_naive_ref"]
        # Median steps/s is the headline; the ratio of best steps is reported too because on a
        # shared machine interference only ever adds time.
        results["speedup_synpo_fused_vs_dpo_naive_ref"] = theirs["median_step_s"] / ours["median_step_s"]
        results["speedup_best_step"] = theirs["min_step_s"] / ours["min_step_s"]
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument(
        "--prompt-len", type=int, default=1024, help="video/prompt tokens per row (labels -100)"
    )
    parser.add_argument(
        "--response-len", type=int, default=128, help="caption tokens (chosen; rejected ~24 fewer)"
    )
    parser.add_argument("--pairs", type=int, default=1, help="pairs per micro-batch (upstream: 1)")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument("--full-finetune", action="store_true", help="no LoRA; DPO then uses a frozen copy")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method (interleaved)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    results = run(args)
    try:
        from _common import provenance

        results["meta"] = provenance(args.device)
    except Exception as exc:  # provenance is informative only
        results["meta"] = {"error": repr(exc)}

    shape = results["shape"]
    print(
        f"model: Llama D={shape['hidden']} L={shape['layers']} V={shape['vocab']}"
        f" ({'full fine-tune' if args.full_finetune else f'LoRA r={args.lora_r}'}),"
        f" {args.dtype}, {args.device}"
    )
    print(
        f"batch: {shape['pairs_per_micro_batch']} pair(s) x {shape['accumulation']} micro-batches per step; "
        f"rows of {shape['prompt_len']} prompt/video tokens + ~{shape['response_len']} caption tokens; "
        f"{shape['response_tokens_per_step']} scored of {shape['positions_per_step']} positions per step"
    )
    print(f"{'method':<16}{'step (median)':>16}{'step (best)':>14}{'steps/s':>10}{'peak GiB':>10}")
    for name, row in results["methods"].items():
        peak = "-" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.2f}"
        print(
            f"{name:<16}{row['median_step_s'] * 1e3:>13.1f} ms{row['min_step_s'] * 1e3:>11.1f} ms"
            f"{row['steps_per_s']:>10.3f}{peak:>10}"
        )
    if "speedup_synpo_fused_vs_dpo_naive_ref" in results:
        ratio = results["speedup_synpo_fused_vs_dpo_naive_ref"]
        print(
            f"SynPO fused (reference-free) vs DPO naive with reference: {ratio:.2f}x steps/s "
            f"(median; best-step ratio {results['speedup_best_step']:.2f}x; target >= 1.5x)"
        )
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
