"""Evaluation on the held-out pairs: the evaluation pass, when it is due, and the best evaluation so far
(``checkpoint.keep_best``)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch

from synpo import checkpoint as ckpt
from synpo.train import metrics as m
from synpo.train.engine import Dist

__all__ = ["eval_due", "evaluate", "format_eval_row", "record_eval", "restore_eval_state"]

logger = logging.getLogger("synpo.train")


def evaluate(
    dataset,
    *,
    module: torch.nn.Module,
    collator,
    dist: Dist,
    micro_batch_size: int,
    to_device: Callable[[dict], dict],
    lockstep: bool,
) -> dict[str, float]:
    """Evaluate ``module`` (the objective, or its DeepSpeed engine: then ``lockstep``, every rank runs
    every forward) on ``dataset``; see :meth:`synpo.train.loop.Trainer.evaluate`."""
    started = time.perf_counter()
    n, size = len(dataset), micro_batch_size
    chunks = [list(range(s, min(s + size, n))) for s in range(0, n, size)]
    mine = chunks[dist.rank :: dist.world_size]
    # Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively).
    rounds = math.ceil(len(chunks) / dist.world_size)
    sums = m.zeros(m.EVAL_SUMS)
    rng = ckpt.capture_rng_state()
    was_training = module.training
    module.eval()
    fallback = None
    try:
        with torch.no_grad():
            for r in range(rounds):
                real = r < len(mine)
                raw = collator([dataset[i] for i in (mine[r] if real else chunks[0])])
                if raw.get("empty"):
                    sums[m.EVAL_SKIPPED] += float(real)
                    if not lockstep or fallback is None:
                        continue
                    batch, real = fallback, False  # keep the ranks' forwards in step
                else:
                    batch = fallback = to_device(raw)
                loss, metrics = module(**batch)
                if not real:
                    continue
                if bool(torch.isfinite(loss)):
                    metrics = metrics.cpu()
                    sums[m.OBJECTIVE] += metrics
                    sums[m.EVAL_LOSS] += float(loss) * float(metrics[m.PAIRS])
                else:
                    sums[m.EVAL_SKIPPED] += 1
    finally:
        module.train(was_training)
        ckpt.restore_rng_state(rng)
    if dist.distributed:
        sums = dist.all_reduce_sum(sums.to(dist.device)).cpu()
    pairs = float(sums[m.PAIRS])
    mean = (lambda total: float(total) / pairs) if pairs else (lambda total: float("nan"))
    result = {"eval_loss": mean(sums[m.EVAL_LOSS])}
    for i, name in m.MEAN_METRICS:
        result[f"eval_{name}"] = mean(sums[i])
    result["eval_pairs"] = int(pairs)
    skipped = sums[m.EVAL_SKIPPED]
    if skipped:
        result["eval_skipped_batches"] = int(skipped)
        if dist.is_main:
            logger.warning("evaluation: %d micro-batches skipped (non-finite loss)", int(skipped))
    result["eval_seconds"] = time.perf_counter() - started
    return result


def eval_due(step: int, *, has_eval_data: bool, eval_every: int | None, total_steps: int) -> bool:
    """Evaluate after optimizer step ``step``: every ``logging.eval_every`` steps and at the end."""
    if not has_eval_data or step <= 0:
        return False
    return step == total_steps or bool(eval_every and step % eval_every == 0)


def restore_eval_state(state: dict, wanted: tuple[str, str] | None, dist: Dist) -> dict:
    """The checkpoint's evaluation schedule and best-so-far (``state``: its trainer state; ``wanted``:
    the configured keep_best ``(metric, mode)``, a different one starts a new best)."""
    saved = state.get("eval") or {}
    eval_state = {"last_step": int(saved.get("last_step", 0)), "best": saved.get("best")}
    best = eval_state["best"]
    if best is not None and (wanted is None or (best["metric"], best["mode"]) != wanted):
        if wanted is not None and dist.is_main:
            logger.warning(
                "checkpoint.keep_best changed (%s, %s -> %s, %s): the best checkpoint restarts",
                best["metric"],
                best["mode"],
                *wanted,
            )
        eval_state["best"] = None
    return eval_state


def record_eval(eval_state: dict, row: dict, wanted: tuple[str, str] | None) -> bool:
    """Record the evaluation ``row`` in ``eval_state`` (its step; the best so far under keep_best
    ``wanted``); True when it is a new best."""
    step = row["step"]
    eval_state["last_step"] = step
    better = False
    if wanted is not None:
        name, mode = wanted
        value, best = row[name], eval_state["best"]
        better = math.isfinite(value) and (
            best is None or (value < best["value"] if mode == "min" else value > best["value"])
        )
        if better:
            eval_state["best"] = {"metric": name, "mode": mode, "value": value, "step": step}
    return better


def format_eval_row(row: dict) -> str:
    """``eval step 10: loss -0.5123, reward_accuracy 0.625, ... (16 pairs, 0.41 s)``."""
    shown = ("loss", "reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps")
    values = ", ".join(f"{name} {row[f'eval_{name}']:.4g}" for name in shown)
    return f"eval step {row['step']}: {values} ({row['eval_pairs']} pairs, {row['eval_seconds']:.2f} s)"
