"""Compatibility module: the trainer now lives in :mod:`synpo.train` (``loop``, ``schedule``, ``engine``)."""

from synpo.train.engine import build_deepspeed_config
from synpo.train.loop import Trainer, TrainResult
from synpo.train.schedule import (
    continued_decay_start,
    describe_training_length,
    linear_warmup_schedule,
    lr_factor,
    training_steps,
)

__all__ = [
    "TrainResult",
    "Trainer",
    "build_deepspeed_config",
    "continued_decay_start",
    "describe_training_length",
    "linear_warmup_schedule",
    "lr_factor",
    "training_steps",
]
