"""The LR schedule (linear warmup, then linear decay or constant; continued across a resume that changes
the run's length) and the run's length in optimizer steps."""

from __future__ import annotations

from typing import Any

import torch

from synpo.config import TrainerConfig
from synpo.data import DataError

__all__ = [
    "FEW_STEPS_PER_EPOCH",
    "batch_size_problem",
    "continued_decay_start",
    "describe_training_length",
    "linear_warmup_schedule",
    "lr_factor",
    "restore_lr_schedule",
    "training_steps",
]


def lr_factor(
    *,
    total_steps: int,
    warmup_steps: int,
    schedule: str = "linear",
    decay_start: tuple[int, float] | None = None,
):
    """The LR multiplier of the optimizer step about to be taken (``step`` counts steps done).

    Warmup: ``(step + 1) / warmup_steps``, so the first step already trains (transformers'
    ``get_linear_schedule_with_warmup`` gives it lr 0) and step ``warmup_steps`` (1-based) runs at the
    peak. Then constant, or a linear decay from ``decay_start = (step, factor)`` to 0 at
    ``total_steps``; the default ``(warmup_steps, 1.0)`` is transformers' decay exactly. A resumed run
    whose length changed passes the point it resumes from (see :func:`restore_lr_schedule`).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps: must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps: must be in [0, total_steps], got {warmup_steps}")
    if schedule not in ("linear", "constant"):
        raise ValueError(f"schedule: must be 'linear' or 'constant', got {schedule!r}")
    anchor_step, anchor_factor = decay_start if decay_start is not None else (warmup_steps, 1.0)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        return max(0.0, anchor_factor * (total_steps - step) / max(1, total_steps - anchor_step))

    return factor


def continued_decay_start(old: dict, step: int) -> list | None:
    """Where the linear decay of a resumed run starts when the run's length changed (``old``: the
    checkpoint's schedule parameters, ``step``: optimizer steps done).

    Choice: the LR stays continuous. The decay restarts from the LR the old schedule gives the step
    about to be taken and falls linearly to 0 at the new total, so the resume step trains at exactly
    the LR it would have had and the rest of the run decays evenly. (Rebuilding the whole schedule for
    the new total, as transformers does on resume, makes the LR jump at the resume step: up when the
    run is extended.) Resuming in warmup, or before an earlier restart point, only moves the end
    point. Resuming from the old run's last step, where its decay reached 0, continues from the LR of
    that last step instead, so that extending a finished run still trains.
    """
    anchor_step = old["decay_start"][0] if old.get("decay_start") else old["warmup_steps"]
    if step <= anchor_step:
        return old.get("decay_start")
    old_factor = lr_factor(**old)
    return [step, old_factor(min(step, old["total_steps"] - 1))]


def linear_warmup_schedule(
    optimizer,
    *,
    total_steps: int,
    warmup_steps: int,
    schedule: str = "linear",
    decay_start: tuple[int, float] | None = None,
):
    """LambdaLR of :func:`lr_factor`: linear warmup over ``warmup_steps`` (the first step above 0),
    then linear decay to 0 at ``total_steps`` (``schedule="linear"``, as transformers'
    ``get_linear_schedule_with_warmup`` from the end of warmup on) or constant."""
    factor = lr_factor(
        total_steps=total_steps, warmup_steps=warmup_steps, schedule=schedule, decay_start=decay_start
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def training_steps(config: TrainerConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: ``train.max_steps`` when set (it overrides ``train.epochs``, as in
    transformers), else ``train.epochs`` x steps per epoch."""
    if config.train.max_steps is not None:
        return config.train.max_steps
    return steps_per_epoch * config.train.epochs


def describe_training_length(config: TrainerConfig, steps_per_epoch: int, total_steps: int) -> str:
    """What will run, for the start-up log: steps, and the epochs they amount to."""
    if config.train.max_steps is None:
        return (
            f"{total_steps} optimizer steps: train.epochs {config.train.epochs} x "
            f"{steps_per_epoch} steps per epoch"
        )
    return (
        f"{total_steps} optimizer steps (train.max_steps; it overrides train.epochs "
        f"{config.train.epochs}): {total_steps / steps_per_epoch:.4g} epochs of {steps_per_epoch} steps"
    )


# Fewer optimizer steps per epoch than this: one step takes most of the data (the upstream recipe's
# accumulation of 32 on a small file), the weights barely move; warned, with a smaller accumulation.
FEW_STEPS_PER_EPOCH = 4
# The steps per epoch the suggested accumulation aims for.
SUGGESTED_STEPS_PER_EPOCH = 8


def batch_size_problem(config: TrainerConfig, num_pairs: int, world_size: int) -> str | None:
    """One line when an optimizer step (``train.micro_batch_size x train.gradient_accumulation_steps x
    world size`` pairs) leaves fewer than :data:`FEW_STEPS_PER_EPOCH` steps per epoch of
    ``num_pairs``, naming the setting to change; None when there are enough, or nothing smaller to
    suggest (accumulation and micro-batch 1: the data is that small). Not one step: a
    :class:`~synpo.data.DataError` saying the same."""
    train = config.train
    micro, accumulation = train.micro_batch_size, train.gradient_accumulation_steps
    per_step = micro * accumulation * world_size
    steps = num_pairs // per_step
    if steps >= FEW_STEPS_PER_EPOCH or (steps > 0 and micro * accumulation == 1):
        return None
    batch = (
        f"{per_step} pairs (train.micro_batch_size {micro} x "
        f"train.gradient_accumulation_steps {accumulation}"
        + (f" x world size {world_size})" if world_size > 1 else ")")
    )
    better = max(1, num_pairs // (micro * world_size * SUGGESTED_STEPS_PER_EPOCH))
    better_steps = num_pairs // (micro * better * world_size)
    if better < accumulation and better_steps > steps:
        fix = f"lower train.gradient_accumulation_steps ({better} gives {better_steps} steps per epoch)"
    elif micro > 1:
        fix = "lower train.micro_batch_size"
    else:
        fix = "use fewer processes"
    if steps == 0:
        raise DataError(
            f"{num_pairs} pairs cannot fill one optimizer step of {batch}: {fix}, or use more data"
        )
    times = "once" if steps == 1 else f"{steps} times"
    return (
        f"{num_pairs} pairs make only {steps} optimizer step{'s' if steps > 1 else ''} per epoch of "
        f"{batch}, {num_pairs - steps * per_step} left over: the weights change {times} per pass over "
        f"the data; {fix}"
    )


def restore_lr_schedule(
    scheduler, lr_schedule: dict, total_steps: int, optim, state: dict, changes: list[tuple[str, Any, Any]]
) -> dict:
    """Re-create the checkpoint's LR schedule (its parameters are in the trainer state) for the
    run's possibly new length, and apply the configured LR and AdamW settings (``optim``: the config's
    optim section; the optimizer and scheduler states just loaded carry the checkpoint's). Returns the
    schedule's parameters (``lr_schedule``: the configured ones)."""
    changed = {key for key, _, _ in changes}
    old = state.get("lr_schedule") or dict(lr_schedule, total_steps=state["total_steps"])
    if changed & {"optim.warmup_steps", "optim.warmup_ratio", "optim.schedule"}:
        params = dict(lr_schedule)  # a different schedule, asked for explicitly: as configured
    else:
        params = dict(old, total_steps=total_steps, warmup_steps=min(old["warmup_steps"], total_steps))
        if total_steps != old["total_steps"] and old["schedule"] == "linear":
            params["decay_start"] = continued_decay_start(old, state["step"])
    factor = lr_factor(**params)
    cfg = optim
    scheduler.lr_lambdas = [factor] * len(scheduler.lr_lambdas)
    scheduler.base_lrs = [cfg.lr] * len(scheduler.base_lrs)
    # The LR of the step about to be taken, computed as LambdaLR does (the same bits when nothing
    # changed).
    lrs = [base * fn(scheduler.last_epoch) for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for index, (group, lr) in enumerate(zip(scheduler.optimizer.param_groups, lrs)):
        group["lr"] = lr
        group["initial_lr"] = cfg.lr
        if changed & {"optim.betas", "optim.eps", "optim.weight_decay"}:
            group["betas"] = tuple(cfg.betas)
            group["eps"] = cfg.eps
            if index == 0:  # the decayed group (see Trainer._param_groups)
                group["weight_decay"] = cfg.weight_decay
    scheduler._last_lr = lrs
    return params
