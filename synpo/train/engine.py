"""Where training runs: the device, the process group (torch.distributed via DeepSpeed), the DeepSpeed
config filled in from the trainer config, peak memory and seeding."""

from __future__ import annotations

import json
import os
import random
import resource
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from synpo.config import ConfigError, TrainerConfig, read_config_file, resolve_deepspeed_path

__all__ = [
    "Dist",
    "build_deepspeed_config",
    "declare_cpu_to_deepspeed",
    "init_deepspeed_distributed",
    "peak_memory_mb",
    "select_device",
    "set_seed",
    "zero_stage",
]


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a picklable value)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def select_device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise ConfigError(f"train.device: {requested!r} is not a device ({exc})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"train.device: {requested!r} asked for, but CUDA is not available on this machine "
                "(torch.cuda.is_available() is False); use --train.device cpu or auto"
            )
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"train.device: {device} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    return device


def declare_cpu_to_deepspeed() -> None:
    """Tell DeepSpeed that this process computes on the CPU, before anything imports it: its
    accelerator detection otherwise warns "Setting accelerator to CPU. If you have GPU or other
    accelerator, we were unable to detect it", and DeepSpeed is imported even by runs that do not use
    it (transformers' save_pretrained unwraps models through accelerate, which imports DeepSpeed
    whenever it is installed)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init_deepspeed_distributed(device: torch.device, cpu_threads: int | None) -> None:
    if device.type == "cpu":
        declare_cpu_to_deepspeed()  # gloo is the CPU backend
    import deepspeed
    import deepspeed.ops

    if device.type == "cpu":
        # Skip JIT-building the shared-memory all-reduce op (~25 s, and gloo does the job).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # Ranks share the cores: one thread each unless told otherwise.
        torch.set_num_threads(cpu_threads or max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    deepspeed.init_distributed(dist_backend="gloo" if device.type == "cpu" else "nccl")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is the process's peak resident set size, in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_deepspeed_config(config: TrainerConfig, world_size: int) -> dict:
    """The DeepSpeed config with ``auto`` (or absent) batch/accumulation/clipping/precision values
    filled in from the trainer config; an explicit value that disagrees is a ``ConfigError``."""
    raw = config.deepspeed
    if isinstance(raw, str):
        ds = read_config_file(resolve_deepspeed_path(raw), key="deepspeed", fmt="JSON")
    else:
        ds = json.loads(json.dumps(raw))  # deep copy
    if not isinstance(ds, dict):
        raise ConfigError("deepspeed: expected a JSON object")
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(
                f"deepspeed.{section}: the trainer supplies AdamW and the warmup schedule (optim.*); "
                "remove this section from the DeepSpeed config"
            )
    train = config.train
    micro = train.micro_batch_size
    accumulation = train.gradient_accumulation_steps

    def fill(key: str, value, container: dict = ds, where: str = "deepspeed") -> None:
        current = container.get(key, "auto")
        if current == "auto":
            container[key] = value
        elif current != value:
            raise ConfigError(
                f'{where}.{key}: {current!r} disagrees with the trainer config ({value!r}); use "auto"'
            )

    fill("train_micro_batch_size_per_gpu", micro)
    fill("gradient_accumulation_steps", accumulation)
    fill("train_batch_size", micro * accumulation * world_size)
    fill("gradient_clipping", float(config.optim.max_grad_norm or 0.0))
    for name, enabled in (("bf16", train.precision == "bf16"), ("fp16", train.precision == "fp16")):
        section = ds.setdefault(name, {})
        if not isinstance(section, dict):
            raise ConfigError(f"deepspeed.{name}: expected an object")
        fill("enabled", enabled, section, f"deepspeed.{name}")
    zero = ds.get("zero_optimization", {})
    offload = isinstance(zero, dict) and any(
        isinstance(zero.get(k), dict) and zero[k].get("device", "none") != "none"
        for k in ("offload_optimizer", "offload_param")
    )
    if offload:
        # The client torch AdamW runs on the offloaded fp32 partitions; DeepSpeed otherwise insists
        # on its own CPU Adam (a JIT-compiled op).
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    ds.setdefault("steps_per_print", 2**31 - 1)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def zero_stage(ds_config: dict | None) -> int:
    if not ds_config:
        return 0
    return int((ds_config.get("zero_optimization") or {}).get("stage", 0))
