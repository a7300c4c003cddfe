"""``synpo.Trainer``: SynPO (and DPO/IPO/SimPO/CPO/ORPO) training on one CPU, one GPU or many GPUs.

One loop serves two back ends:

- plain PyTorch (single process): AdamW, linear warmup/decay, gradient accumulation, clipping,
  optional bf16 autocast;
- DeepSpeed (ZeRO 1/2/3, offload; launched with ``deepspeed`` or ``torchrun``): the same client
  AdamW and schedule handed to ``deepspeed.initialize``; under ZeRO-3 ``lm_head.weight`` is
  registered as an external parameter of :class:`~synpo.losses.PreferenceObjective`, so the fused
  loss that reads it inside that module's forward gets the gathered weight, in backward as well.

Both use the same data order (:class:`~synpo.data.PairBatchPlan`): one process with accumulation
``A*W`` and ``W`` ranks with accumulation ``A`` see the same pairs in every optimizer step, so their
losses agree to floating-point tolerance. Checkpoints are atomic and resume exactly (weights,
optimizer, scheduler, data position, RNG), carry a manifest that resuming verifies (falling back to
the newest intact one), and refuse a resume whose config changed (unless allowed); SIGTERM and
Ctrl-C (SIGINT) finish the step, save and stop; one run at a time holds the output directory's lock;
a non-finite loss skips its micro-batch (counted, logged) without touching the optimizer.

Evaluation (``data.eval_file`` or ``data.eval_split``) runs every ``logging.eval_every`` optimizer
steps and at the end, under ``no_grad`` in eval mode, without touching the training RNG; its rows go
to the same metrics log (``"split": "eval"``) and to the reporters of ``logging.report_to``
(:mod:`synpo.reporting`); ``checkpoint.keep_best`` keeps the best evaluated checkpoint in ``best/``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import resource
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synpo import checkpoint as ckpt
from synpo.config import (
    ConfigError,
    TrainerConfig,
    best_metric,
    config_changes,
    config_from_dict,
    config_to_dict,
    format_change,
    load_config,
    unexpected_resume_changes,
)
from synpo.data import (
    SAMPLE_PAIRS_PATH,
    DataError,
    PairBatchPlan,
    PairEncoder,
    PreferenceCollator,
    PreferenceDataset,
    read_preference_jsonl,
    split_eval_examples,
)
from synpo.losses import METRIC_NAMES, PreferenceObjective
from synpo.models import (
    apply_lora,
    build_reference,
    load_model,
    resolve_reference_mode,
    trainable_parameter_count,
)
from synpo.reporting import build_reporter, resolve_report_to
from synpo.run_lock import RunDirLock, RunLockError

__all__ = ["TrainResult", "Trainer", "linear_warmup_schedule"]

logger = logging.getLogger("synpo.train")

# Per-step metric sums: METRIC_NAMES (from the objective), then these.
_LOSS, _FINITE, _TOKENS, _SKIPPED = range(len(METRIC_NAMES), len(METRIC_NAMES) + 4)
_SUMS_SIZE = len(METRIC_NAMES) + 4

# Keys of a collated batch moved to the device (everything else is bookkeeping).
_HOST_KEYS = frozenset(
    {
        "num_tokens",
        "num_response_tokens",
        "truncated_rows",
        "tokens_cut",
        "padded_width",
        "dropped_pairs",
        "empty",
    }
)


@dataclass
class TrainResult:
    output_dir: Path
    metrics_file: Path
    global_step: int
    total_steps: int
    last_checkpoint: Path | None
    final_model_dir: Path | None
    interrupted: bool  # stopped by SIGTERM/SIGINT or request_stop() (after saving)
    history: list[dict] = field(default_factory=list)  # the metrics rows logged by this process
    summary: dict = field(default_factory=dict)
    stop_signal: str | None = None  # "SIGTERM" / "SIGINT" when a signal stopped the run
    eval_history: list[dict] = field(default_factory=list)  # the evaluation rows of this process


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
    whose length changed passes the point it resumes from (see ``Trainer._restore_lr_schedule``).
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


# ---------------------------------------------------------------------------------------------
# Process group / device.
# ---------------------------------------------------------------------------------------------


@dataclass
class _Dist:
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


def _select_device(requested: str, local_rank: int) -> torch.device:
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


def _init_deepspeed_distributed(device: torch.device, cpu_threads: int | None) -> None:
    if device.type == "cpu":
        # Must precede DeepSpeed's accelerator detection; gloo is the CPU backend.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    if device.type == "cpu":
        # Skip JIT-building the shared-memory all-reduce op (~25 s, and gloo does the job).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # Ranks share the cores: one thread each unless told otherwise.
        torch.set_num_threads(cpu_threads or max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    deepspeed.init_distributed(dist_backend="gloo" if device.type == "cpu" else "nccl")


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is the process's peak resident set size, in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def _load_model_or_config_error(model_cfg, *, device: torch.device, seed: int):
    """``load_model``, with a model that cannot be found or read turned into a one-line ConfigError."""
    try:
        return load_model(model_cfg, device=device, seed=seed)
    except (OSError, ValueError) as exc:
        if model_cfg.name_or_path is None:
            raise
        name = model_cfg.name_or_path
        if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
            raise ConfigError(f"model.name_or_path: {name}: no such directory") from exc
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"model.name_or_path: cannot load {model_cfg.name_or_path!r}: {first_line}"
        ) from exc


def _write_stderr(text: str) -> None:
    """Write from a signal handler (no buffered stream, which may be in use by the interrupted code)."""
    with contextlib.suppress(OSError):
        os.write(2, text.encode())


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# DeepSpeed config.
# ---------------------------------------------------------------------------------------------


def build_deepspeed_config(config: TrainerConfig, world_size: int) -> dict:
    """The DeepSpeed config with ``auto`` (or absent) batch/accumulation/clipping/precision values
    filled in from the trainer config; an explicit value that disagrees is a ``ConfigError``."""
    raw = config.deepspeed
    if isinstance(raw, str):
        path = Path(raw)
        if not path.is_file():
            raise ConfigError(f"deepspeed: config file not found: {path}")
        try:
            ds = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"deepspeed: {path} is not valid JSON ({exc})") from exc
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


def _zero_stage(ds_config: dict | None) -> int:
    if not ds_config:
        return 0
    return int((ds_config.get("zero_optimization") or {}).get("stage", 0))


# ---------------------------------------------------------------------------------------------
# The trainer.
# ---------------------------------------------------------------------------------------------


class Trainer:
    """Preference-optimization trainer.

    ``Trainer(config)`` where ``config`` is a :class:`~synpo.config.TrainerConfig`, a nested dict, a
    YAML path, or None (the bundled default: the tiny model on the sample pairs). ``overrides`` are
    dotted keys (``{"train.max_steps": 10}``). Call :meth:`train`; :meth:`setup` builds everything
    first (model, data, optimizer, DeepSpeed engine) and is called by :meth:`train` when needed.
    """

    def __init__(
        self,
        config: TrainerConfig | dict | str | os.PathLike | None = None,
        *,
        overrides: dict[str, Any] | None = None,
    ):
        if config is None or isinstance(config, (str, os.PathLike)):
            self.config = load_config(config, overrides)
        elif isinstance(config, dict):
            from synpo.config import apply_overrides

            self.config = config_from_dict(apply_overrides(config, overrides or {}))
        elif isinstance(config, TrainerConfig):
            if overrides:
                from synpo.config import apply_overrides

                self.config = config_from_dict(apply_overrides(config_to_dict(config), overrides))
            else:
                self.config = config.validate()
        else:
            raise TypeError(
                f"config: expected a TrainerConfig, dict, path or None, got {type(config).__name__}"
            )
        self._is_setup = False
        self._stop_requested = False
        self._stop_signal: str | None = None
        self.output_dir = Path(self.config.checkpoint.output_dir)
        self._run_lock: RunDirLock | None = None
        # Evaluation schedule and best-so-far (saved in checkpoints): the step last evaluated, and
        # {"metric", "mode", "value", "step"} of the best evaluation under checkpoint.keep_best.
        self._eval_state: dict[str, Any] = {"last_step": 0, "best": None}

    # -- setup -------------------------------------------------------------------------------------

    def setup(self) -> Trainer:
        if self._is_setup:
            return self
        try:
            return self._setup()
        except BaseException:
            self.release_run_lock()  # a failed setup must not keep the output directory locked
            raise

    def _setup(self) -> Trainer:
        cfg = self.config
        self.use_deepspeed = cfg.deepspeed is not None
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size > 1 and not self.use_deepspeed:
            raise ConfigError("deepspeed: multi-process training (WORLD_SIZE > 1) needs a DeepSpeed config")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = _select_device(cfg.train.device, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if device.type == "cpu" and cfg.train.cpu_threads:
            torch.set_num_threads(cfg.train.cpu_threads)
        if self.use_deepspeed:
            _init_deepspeed_distributed(device, cfg.train.cpu_threads)
            import torch.distributed as dist

            self.dist = _Dist(
                dist.get_rank(), local_rank, dist.get_world_size(), device, dist.get_world_size() > 1
            )
        else:
            self.dist = _Dist(0, 0, 1, device, False)
        if cfg.train.precision == "fp16" and not self.use_deepspeed:
            raise ConfigError("train.precision: fp16 needs DeepSpeed (loss scaling); use bf16 or fp32")
        self.ds_config = build_deepspeed_config(cfg, self.dist.world_size) if self.use_deepspeed else None
        self.report_to = resolve_report_to(cfg.logging.report_to)
        self.acquire_run_lock()  # before the slow part: a second run into this directory stops here

        # Model (same seed on every rank: identical initial weights and LoRA init).
        _set_seed(cfg.train.seed)
        loaded = _load_model_or_config_error(cfg.model, device=device, seed=cfg.train.seed)
        self.tokenizer, self.processor, self.is_vision = loaded.tokenizer, loaded.processor, loaded.is_vision
        policy = loaded.model
        reference_mode = resolve_reference_mode(cfg.loss, cfg.lora.enabled)
        reference = None
        if reference_mode == "copy":
            reference = build_reference(policy, cfg.loss, cfg.model, seed=cfg.train.seed)
        if cfg.lora.enabled:
            policy = apply_lora(policy, cfg.lora)
        self.policy = policy
        trainable, total = trainable_parameter_count(policy)
        self.model_source = loaded.source

        # Data.
        self._setup_data()

        # Objective, optimizer, schedule.
        autocast = torch.bfloat16 if (cfg.train.precision == "bf16" and not self.use_deepspeed) else None
        self.objective = PreferenceObjective(
            policy,
            loss=cfg.loss.name,
            loss_options=cfg.loss.options(),
            impl=cfg.loss.impl,
            reference_mode=reference_mode,
            reference=reference,
            autocast_dtype=autocast,
        )
        # As in transformers, max_steps overrides epochs: the data cycles through further reshuffled
        # epochs (or stops mid-epoch) as needed.
        self.total_steps = training_steps(cfg, self.plan.steps_per_epoch)
        warmup = (
            cfg.optim.warmup_steps
            if cfg.optim.warmup_steps is not None
            else math.ceil(cfg.optim.warmup_ratio * self.total_steps)
        )
        self.warmup_steps = min(warmup, self.total_steps)
        # The LR schedule's parameters, saved in checkpoints (a resumed run whose length changed
        # continues the decay from where it was; see _restore_lr_schedule).
        self.lr_schedule = {
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "schedule": cfg.optim.schedule,
            "decay_start": None,
        }
        params = [p for p in policy.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("model: no trainable parameters (everything is frozen)")
        self.optimizer = torch.optim.AdamW(
            self._param_groups(policy),
            lr=cfg.optim.lr,
            betas=tuple(cfg.optim.betas),
            eps=cfg.optim.eps,
        )
        self.scheduler = linear_warmup_schedule(self.optimizer, **self.lr_schedule)
        self.engine = None
        if self.use_deepspeed:
            import deepspeed

            if _zero_stage(self.ds_config) == 3:
                for param in self.objective.external_parameters():
                    deepspeed.zero.register_external_parameter(self.objective, param)
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=self.objective,
                optimizer=self.optimizer,
                lr_scheduler=self.scheduler,
                config=self.ds_config,
            )
            self.engine.checkpoint_engine = ckpt.make_safe_checkpoint_engine(self.engine._config)
        else:
            self.objective.to(device)
        self.trainable_params = [p for p in self.objective.policy.parameters() if p.requires_grad]
        if self.dist.is_main:
            logger.info(
                "model %s: %s trainable of %s parameters%s; loss %s (%s)%s; %d pairs, "
                "%d steps/epoch, %d steps (%d warmup); world size %d%s",
                loaded.source,
                f"{trainable:,}",
                f"{total:,}",
                " (LoRA)" if cfg.lora.enabled else "",
                cfg.loss.name,
                cfg.loss.impl,
                f", reference: {reference_mode}" if reference_mode else "",
                len(self.dataset),
                self.plan.steps_per_epoch,
                self.total_steps,
                self.warmup_steps,
                self.dist.world_size,
                f", DeepSpeed ZeRO-{_zero_stage(self.ds_config)}" if self.use_deepspeed else "",
            )
            logger.info(
                "will run %s", describe_training_length(cfg, self.plan.steps_per_epoch, self.total_steps)
            )
        self._is_setup = True
        return self

    def _param_groups(self, policy) -> list[dict]:
        """Weight decay on matrices only (not biases or norm weights), as transformers' Trainer."""
        decay, no_decay = [], []
        for param in policy.parameters():
            if not param.requires_grad:
                continue
            (decay if param.dim() >= 2 else no_decay).append(param)
        groups = [{"params": decay, "weight_decay": self.config.optim.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def _read_pairs(self, path: Path):
        data = self.config.data
        return read_preference_jsonl(
            path,
            default_prompt=data.default_prompt,
            min_score_gap=data.min_score_gap,
            on_error=data.on_error,
            media_dir=data.media_dir,
        )

    def _make_encoder(self) -> PairEncoder:
        data = self.config.data
        return PairEncoder(
            self.tokenizer,
            self.processor,
            max_length=data.max_length,
            max_prompt_length=data.max_prompt_length,
            template=data.template,
            system_prompt=data.system_prompt,
            fps=data.fps,
            min_frames=data.min_frames,
            max_frames=data.max_frames,
        )

    def _setup_data(self) -> None:
        cfg = self.config
        data = cfg.data
        path = Path(data.train_file) if data.train_file else SAMPLE_PAIRS_PATH
        examples, report = self._read_pairs(path)
        if not examples:
            raise DataError(f"{path}: no usable preference pairs ({report.summary()})")
        self.read_report = report
        # Evaluation pairs: held out of the training pairs (data.eval_split), or read from their own file.
        eval_examples, eval_where = None, ""
        if data.eval_split is not None:
            examples, eval_examples = split_eval_examples(examples, data.eval_split, cfg.train.seed)
            eval_where = f"{len(eval_examples)} pairs held out of {path} (data.eval_split {data.eval_split})"
        elif data.eval_file is not None:
            eval_path = Path(data.eval_file)
            eval_examples, eval_report = self._read_pairs(eval_path)
            if not eval_examples:
                raise DataError(f"data.eval_file: {eval_path}: no usable pairs ({eval_report.summary()})")
            eval_where = eval_report.summary()
        encoder = self._make_encoder()
        if data.pack and self.processor is not None:
            raise ConfigError("data.pack: not supported for vision-language models")
        self.dataset = PreferenceDataset(examples, encoder, on_error=data.on_error)
        if len(self.dataset) == 0:
            raise DataError(f"{path}: every pair was dropped by tokenization ({encoder.stats.summary()})")
        self.eval_dataset = None
        if eval_examples is not None:
            # Its own encoder: the training tokenization counts (summary) stay the training data's.
            self.eval_dataset = PreferenceDataset(eval_examples, self._make_encoder(), on_error=data.on_error)
            if len(self.eval_dataset) == 0:
                raise DataError(
                    f"evaluation data ({eval_where}): every pair was dropped by tokenization "
                    f"({self.eval_dataset.encoder.stats.summary()})"
                )
        self.collator = PreferenceCollator(self.tokenizer.pad_token_id, pack=data.pack)
        self.plan = PairBatchPlan(
            len(self.dataset),
            micro_batch_size=cfg.train.micro_batch_size,
            gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
            world_size=self.dist.world_size,
            rank=self.dist.rank,
            seed=cfg.train.seed,
            shuffle=data.shuffle,
        )
        if self.dist.is_main:
            logger.info("data %s", report.summary())
            if not self.dataset.lazy:
                logger.info("tokenization: %s", encoder.stats.summary())
            if self.eval_dataset is not None:
                logger.info("eval data %s: %d pairs", eval_where, len(self.eval_dataset))
            if self.dataset.media_skipped:
                logger.warning("%d pairs skipped: unreadable video/image files", self.dataset.media_skipped)
            if self.plan.unused_pairs_per_epoch:
                logger.info(
                    "%d pairs per epoch do not fill an optimizer step of %d pairs and are not used",
                    self.plan.unused_pairs_per_epoch,
                    self.plan.pairs_per_step,
                )

    # -- batches -------------------------------------------------------------------------------------

    def _to_device(self, batch: dict) -> dict:
        device = self.dist.device
        out = {}
        for key, value in batch.items():
            if key in _HOST_KEYS or not isinstance(value, torch.Tensor):
                out[key] = value
            else:
                out[key] = value.to(device, non_blocking=True)
        if self.engine is not None and self.ds_config and self.ds_config.get("bf16", {}).get("enabled"):
            # DeepSpeed's bf16 module takes bf16 pixel inputs.
            for key, value in out.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and key.startswith("pixel"):
                    out[key] = value.to(torch.bfloat16)
        return out

    def _micro_batch_iter(self, epoch: int, start_step: int):
        """Collated micro-batches of this rank for ``epoch`` from optimizer step ``start_step``."""
        index_lists = list(self.plan.micro_batches(epoch, start_step))
        workers = self.config.data.num_workers
        if workers == 0:
            for indices in index_lists:
                yield self.collator([self.dataset[i] for i in indices])
            return
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=index_lists,
            collate_fn=self.collator,
            num_workers=workers,
            # A private generator: the loader must not draw from the global RNG (exact resume).
            generator=torch.Generator().manual_seed(self.config.train.seed + epoch),
            pin_memory=self.dist.device.type == "cuda",
        )
        yield from loader

    # -- reference log-probs cache ---------------------------------------------------------------

    def _reference_cache(self) -> torch.Tensor | None:
        """(N, 2) summed reference log-probs [chosen, rejected] per pair, computed once and cached."""
        cfg = self.config
        if not (cfg.loss.needs_reference and cfg.loss.reference.precompute):
            return None
        from safetensors.torch import load_file, save_file

        path = Path(cfg.loss.reference.cache_file or self.output_dir / "reference_logps.safetensors")
        key = json.dumps(
            {
                "data": self.dataset.fingerprint(),
                "model": self.model_source,
                "seed": cfg.train.seed if cfg.model.name_or_path is None else None,
                "ref_logps": "sum",  # per-row summed log-probs (a cache of per-token means is recomputed)
                "impl": cfg.loss.impl,
                "max_length": cfg.data.max_length,
                "reference": cfg.loss.reference.name_or_path,
            },
            sort_keys=True,
        )
        if path.is_file():
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                stored_key = (handle.metadata() or {}).get("key")
            if stored_key == key:
                values = load_file(str(path))["ref_logps"]
                if values.shape == (len(self.dataset), 2):
                    if self.dist.is_main:
                        logger.info("reference log-probs: loaded cache %s", path)
                    return values
            if self.dist.is_main:
                logger.info("reference log-probs: cache %s is for other data/model; recomputing", path)
        n = len(self.dataset)
        m = cfg.train.micro_batch_size
        chunks = [list(range(s, min(s + m, n))) for s in range(0, n, m)]
        world, rank = self.dist.world_size, self.dist.rank
        mine = chunks[rank::world]
        # Every rank runs the same number of forwards (ZeRO-3 gathers are collective).
        rounds = math.ceil(len(chunks) / world)
        values = torch.zeros(n, 2, dtype=torch.float64, device=self.dist.device)
        module = self.engine if self.engine is not None else self.objective
        with torch.no_grad():
            for r in range(rounds):
                real = r < len(mine)
                indices = mine[r] if real else chunks[0]
                batch = self.collator([self.dataset[i] for i in indices])
                if batch.get("empty"):
                    continue
                batch = self._to_device(batch)
                logps = module(mode="reference", **batch).double()
                if real:
                    half = logps.shape[0] // 2
                    idx = batch["example_index"]
                    values[idx, 0] = logps[:half]
                    values[idx, 1] = logps[half:]
        self.dist.all_reduce_sum(values)
        values = values.float().cpu()
        if self.dist.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            save_file({"ref_logps": values}, str(tmp), metadata={"key": key})
            os.replace(tmp, path)
            logger.info("reference log-probs: computed for %d pairs, cached at %s", n, path)
        self.dist.barrier()
        return values

    # -- checkpoints -------------------------------------------------------------------------------

    def _state_payload(self, step: int, counters: dict) -> dict:
        spe = self.plan.steps_per_epoch
        return {
            "step": step,
            "epoch": step // spe,
            "step_in_epoch": step % spe,
            "total_steps": self.total_steps,
            "world_size": self.dist.world_size,
            "pairs_per_step": self.plan.pairs_per_step,
            "num_pairs": len(self.dataset),
            "data_fingerprint": self.dataset.fingerprint(),
            "deepspeed": self.use_deepspeed,
            "counters": counters,
            "lr_schedule": dict(self.lr_schedule),
            "eval": json.loads(json.dumps(self._eval_state)),
            "config": config_to_dict(self.config),
        }

    def save_checkpoint(self, step: int, counters: dict, *, best: bool = False) -> Path:
        """Write an atomic checkpoint of the current state (collective under DeepSpeed); ``best``:
        into ``<output_dir>/best/`` (replacing the previous best; ``latest`` and pruning untouched).

        When writing fails (a full disk, an unwritable directory; or a second Ctrl-C, which raises
        KeyboardInterrupt) the partial temp directory is removed and the previous checkpoint stays the
        latest; an ``OSError`` becomes a ``CheckpointError`` that says so."""
        if best:
            tmp = self.output_dir / ".tmp-best"
        else:
            tmp = ckpt.checkpoint_root(self.output_dir) / f".tmp-{ckpt.step_dir_name(step)}"
        try:
            return self._write_checkpoint(tmp, step, counters, best=best)
        except BaseException as exc:
            if self.dist.is_main:
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                raise ckpt.CheckpointError(self._save_failure_message(step, exc, best=best)) from exc
            raise

    def _save_failure_message(self, step: int, exc: OSError, *, best: bool = False) -> str:
        where = f" ({exc.filename})" if exc.filename else ""
        if best:
            return (
                f"cannot save the best checkpoint (step {step}) in "
                f"{ckpt.best_checkpoint_dir(self.output_dir)}: {exc.strerror or exc}{where}; "
                "the previous best checkpoint, if any, is intact"
            )
        try:
            previous = ckpt.find_checkpoint("auto", self.output_dir)
        except (ckpt.CheckpointError, OSError):
            previous = None
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        return (
            f"cannot save the step-{step} checkpoint in {ckpt.checkpoint_root(self.output_dir)}: "
            f"{exc.strerror or exc}{where}; {kept}"
        )

    def _write_checkpoint(self, tmp: Path, step: int, counters: dict, *, best: bool = False) -> Path:
        from safetensors.torch import save_file

        if self.dist.is_main:
            if best:
                import shutil

                if tmp.exists():
                    shutil.rmtree(tmp)  # left by a killed run
                tmp.mkdir(parents=True)
            else:
                tmp = ckpt.temp_checkpoint_dir(self.output_dir, step)
        self.dist.barrier()
        if self.engine is not None:
            self.engine.save_checkpoint(
                str(tmp / "deepspeed"),
                tag="state",
                client_state={"step": step},
                save_latest=False,
                exclude_frozen_parameters=True,
            )
        else:
            weights = {
                name: param.detach().to("cpu").contiguous()
                for name, param in self.objective.policy.named_parameters()
                if param.requires_grad
            }
            save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt", "step": str(step)})
            ckpt.save_torch_state(self.optimizer.state_dict(), tmp / "optimizer.pt")
            ckpt.save_torch_state(self.scheduler.state_dict(), tmp / "scheduler.pt")
        ckpt.save_rng_state(tmp, self.dist.rank)
        self.dist.barrier()
        if best:
            final = ckpt.best_checkpoint_dir(self.output_dir)
        else:
            final = ckpt.checkpoint_root(self.output_dir) / ckpt.step_dir_name(step)
        if self.dist.is_main:
            ckpt.write_json_atomic(tmp / ckpt.STATE_FILE, self._state_payload(step, counters))
            if best:
                final = ckpt.publish_checkpoint_at(tmp, final)
            else:
                final = ckpt.publish_checkpoint(tmp, self.output_dir, step)
                ckpt.prune_checkpoints(self.output_dir, self.config.checkpoint.keep_last)
        self.dist.barrier()
        return final

    def _load_checkpoint(self, path: Path) -> dict:
        """Restore weights, optimizer and scheduler from ``path``; returns its trainer state (RNG is
        restored separately, right before the loop continues)."""
        from safetensors.torch import load_file

        state = ckpt.read_trainer_state(path)
        mismatches = []
        if state["world_size"] != self.dist.world_size:
            mismatches.append(f"world size {state['world_size']} -> {self.dist.world_size}")
        if state["pairs_per_step"] != self.plan.pairs_per_step:
            mismatches.append(
                f"pairs per optimizer step {state['pairs_per_step']} -> {self.plan.pairs_per_step}"
            )
        if state["deepspeed"] != self.use_deepspeed:
            mismatches.append("DeepSpeed on/off changed")
        if mismatches:
            raise ckpt.CheckpointError(f"{path}: cannot resume exactly: " + "; ".join(mismatches))
        changes = self._check_resume_config(path, state)
        if state["data_fingerprint"] != self.dataset.fingerprint():
            what = "the training data or its tokenization changed"
            if not any(key.startswith(("data.", "model.")) for key, _, _ in changes):
                raise ckpt.CheckpointError(f"{path}: cannot resume exactly: {what}")
            if self.dist.is_main:
                logger.warning("%s: %s (data/model config changes allowed)", path, what)
        if self.engine is not None:
            load_path, _ = self.engine.load_checkpoint(
                str(path / "deepspeed"),
                tag="state",
                load_module_strict=False,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
            if load_path is None:
                raise ckpt.CheckpointError(f"{path}: DeepSpeed found no checkpoint under deepspeed/")
        else:
            weights = load_file(str(path / "model.safetensors"))
            params = dict(self.objective.policy.named_parameters())
            expected = {name for name, p in params.items() if p.requires_grad}
            if set(weights) != expected:
                missing = sorted(expected - set(weights))[:3]
                extra = sorted(set(weights) - expected)[:3]
                raise ckpt.CheckpointError(
                    f"{path}: trainable weights do not match the model "
                    f"(missing {missing}, unexpected {extra})"
                )
            with torch.no_grad():
                for name, tensor in weights.items():
                    params[name].copy_(tensor)
            self.optimizer.load_state_dict(ckpt.load_torch_state(path / "optimizer.pt", self.dist.device))
            self.scheduler.load_state_dict(ckpt.load_torch_state(path / "scheduler.pt"))
        self._restore_lr_schedule(state, changes)
        self._restore_eval_state(state)
        return state

    def _check_resume_config(self, path: Path, state: dict) -> list[tuple[str, Any, Any]]:
        """Compare the config with the one saved in the checkpoint: changes other than free ones
        (output/logging/saving cadence), an extension of the run, or the keys named in
        ``checkpoint.resume_allow_changes`` are refused with the diff. Returns every change."""
        old = state.get("config")
        if not isinstance(old, dict):
            return []
        new = json.loads(json.dumps(config_to_dict(self.config)))
        allowed = self.config.checkpoint.resume_allow_changes
        extends = self.total_steps >= state["total_steps"]
        refused = unexpected_resume_changes(old, new, allowed, extends_run=extends)
        if refused:
            raise ckpt.CheckpointError(
                f"{path}: the config differs from the checkpoint's: "
                + "; ".join(format_change(c) for c in refused)
                + ". To resume with these changes, pass --resume-allow-changes "
                + ",".join(c[0] for c in refused)
                + " (checkpoint.resume_allow_changes); to extend the run, raise only train.max_steps "
                "or train.epochs"
            )
        accepted = unexpected_resume_changes(old, new, [], extends_run=False)
        if accepted and self.dist.is_main:
            logger.warning("resuming with config changes: %s", "; ".join(format_change(c) for c in accepted))
        return config_changes(old, new)

    def _restore_lr_schedule(self, state: dict, changes: list[tuple[str, Any, Any]]) -> None:
        """Re-create the checkpoint's LR schedule (its parameters are in the trainer state) for the
        run's possibly new length, and apply the configured LR and AdamW settings (the optimizer and
        scheduler states just loaded carry the checkpoint's)."""
        changed = {key for key, _, _ in changes}
        old = state.get("lr_schedule") or dict(self.lr_schedule, total_steps=state["total_steps"])
        if changed & {"optim.warmup_steps", "optim.warmup_ratio", "optim.schedule"}:
            params = dict(self.lr_schedule)  # a different schedule, asked for explicitly: as configured
        else:
            params = dict(
                old, total_steps=self.total_steps, warmup_steps=min(old["warmup_steps"], self.total_steps)
            )
            if self.total_steps != old["total_steps"] and old["schedule"] == "linear":
                params["decay_start"] = continued_decay_start(old, state["step"])
        self.lr_schedule = params
        factor = lr_factor(**params)
        scheduler = self.scheduler
        cfg = self.config.optim
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
                if index == 0:  # the decayed group (see _param_groups)
                    group["weight_decay"] = cfg.weight_decay
        scheduler._last_lr = lrs

    def _cpu_state_dict(self, policy) -> dict[str, torch.Tensor]:
        """The policy's state dict on CPU (rank 0; empty elsewhere). Under ZeRO-3 each partitioned
        parameter is gathered on its own, so only one full parameter is materialized at a time."""
        if self.engine is None or _zero_stage(self.ds_config) != 3:
            if not self.dist.is_main:
                return {}
            return {k: v.detach().to("cpu").clone() for k, v in policy.state_dict().items()}
        import deepspeed

        gathered: dict[int, torch.Tensor] = {}
        for param in policy.parameters():
            if not hasattr(param, "ds_id"):
                continue
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if self.dist.is_main:
                    gathered[id(param)] = param.detach().to("cpu").clone()
        if not self.dist.is_main:
            return {}
        state = {}
        for key, value in policy.state_dict(keep_vars=True).items():
            state[key] = gathered[id(value)] if id(value) in gathered else value.detach().to("cpu").clone()
        return state

    def export_model(self, directory: Path) -> Path:
        """Save the trained policy (LoRA adapter or full model, safetensors) and tokenizer/processor,
        atomically (temp directory + rename; on a failed write the temp directory is removed)."""
        import shutil

        policy = self.objective.policy
        state = self._cpu_state_dict(policy)
        if self.dist.is_main:
            tmp = directory.with_name(f".{directory.name}.tmp")
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)
                policy.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
                (self.processor or self.tokenizer).save_pretrained(str(tmp))
                if directory.exists():
                    shutil.rmtree(directory)
                os.replace(tmp, directory)
            except BaseException as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                if isinstance(exc, OSError):
                    raise ckpt.CheckpointError(
                        f"cannot export the final model to {directory}: {exc.strerror or exc}; "
                        "the last checkpoint is intact"
                    ) from exc
                raise
        self.dist.barrier()
        return directory

    # -- output directory lock ---------------------------------------------------------------------

    def acquire_run_lock(self) -> None:
        """Create the output directory and take its run lock (``<output_dir>/.lock``, rank 0 only;
        every rank learns the outcome, so a refused run stops on all ranks at once)."""
        error = None
        if self.dist.is_main:
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                if self._run_lock is None:
                    self._run_lock = RunDirLock(self.output_dir)
                self._run_lock.acquire()
            except RunLockError as exc:
                error = ("lock", str(exc))
            except OSError as exc:
                reason = exc.strerror or str(exc)
                error = (
                    "config",
                    f"checkpoint.output_dir: cannot create or write {self.output_dir}: {reason}",
                )
        error = self.dist.broadcast_object(error)
        if error is not None:
            kind, message = error
            raise RunLockError(message) if kind == "lock" else ConfigError(message)

    def release_run_lock(self) -> None:
        if self._run_lock is not None:
            self._run_lock.release()

    # -- signals -----------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the loop to save a checkpoint and stop after the current optimizer step."""
        self._stop_requested = True

    @contextlib.contextmanager
    def _stop_signal_handlers(self):
        """SIGTERM and SIGINT (Ctrl-C): finish the current optimizer step, save a checkpoint, stop. A
        second Ctrl-C raises KeyboardInterrupt at once, even while saving: the save is abandoned (its
        temp directory removed) and the previous checkpoint stays the latest."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if signum == signal.SIGINT and self._stop_requested:
                raise KeyboardInterrupt
            if not self._stop_requested and self.dist.is_main:
                again = " (Ctrl-C again aborts without saving)" if signum == signal.SIGINT else ""
                _write_stderr(
                    f"\n{name}: stopping after this optimizer step, then saving a checkpoint{again}\n"
                )
            self._stop_requested = True
            self._stop_signal = self._stop_signal or name

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    # -- evaluation --------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float] | None:
        """Evaluate the current model on the evaluation pairs (None without ``data.eval_file`` or
        ``data.eval_split``): ``eval_loss`` (mean over pairs), ``eval_reward_accuracy`` (fraction of
        pairs with reward margin > 0), ``eval_reward_margin``, ``eval_chosen_logps``,
        ``eval_rejected_logps`` (mean per-token log-probs), ``eval_chosen_mean_prob`` (the training
        metrics' definitions), ``eval_pairs`` and ``eval_seconds``; the same values on every rank
        (collective under DeepSpeed: the pairs are split across ranks and the sums all-reduced).

        Runs under ``no_grad`` with the model in eval mode (no dropout; train mode restored after), and
        saves and restores the RNG states, so training continues exactly as without evaluation."""
        self.setup()
        dataset = self.eval_dataset
        if dataset is None:
            return None
        started = time.perf_counter()
        dist = self.dist
        module = self.engine if self.engine is not None else self.objective
        n, m = len(dataset), self.config.train.micro_batch_size
        chunks = [list(range(s, min(s + m, n))) for s in range(0, n, m)]
        mine = chunks[dist.rank :: dist.world_size]
        # Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively).
        rounds = math.ceil(len(chunks) / dist.world_size)
        k = len(METRIC_NAMES)
        sums = torch.zeros(k + 2, dtype=torch.float64)  # METRIC_NAMES, loss x pairs, skipped micro-batches
        rng = ckpt.capture_rng_state()
        was_training = module.training
        module.eval()
        fallback = None
        try:
            with torch.no_grad():
                for r in range(rounds):
                    real = r < len(mine)
                    raw = self.collator([dataset[i] for i in (mine[r] if real else chunks[0])])
                    if raw.get("empty"):
                        sums[k + 1] += float(real)
                        if self.engine is None or fallback is None:
                            continue
                        batch, real = fallback, False  # keep the ranks' forwards in step
                    else:
                        batch = fallback = self._to_device(raw)
                    loss, metrics = module(**batch)
                    if not real:
                        continue
                    if bool(torch.isfinite(loss)):
                        metrics = metrics.cpu()
                        sums[:k] += metrics
                        sums[k] += float(loss) * float(metrics[0])
                    else:
                        sums[k + 1] += 1
        finally:
            module.train(was_training)
            ckpt.restore_rng_state(rng)
        if dist.distributed:
            sums = dist.all_reduce_sum(sums.to(dist.device)).cpu()
        pairs = float(sums[0])
        mean = (lambda total: float(total) / pairs) if pairs else (lambda total: float("nan"))
        result = {"eval_loss": mean(sums[k])}
        for i, name in enumerate(METRIC_NAMES[1:], start=1):
            result[f"eval_{name}"] = mean(sums[i])
        result["eval_pairs"] = int(pairs)
        if sums[k + 1]:
            result["eval_skipped_batches"] = int(sums[k + 1])
            if dist.is_main:
                logger.warning("evaluation: %d micro-batches skipped (non-finite loss)", int(sums[k + 1]))
        result["eval_seconds"] = time.perf_counter() - started
        return result

    def _eval_due(self, step: int) -> bool:
        """Evaluate after optimizer step ``step``: every ``logging.eval_every`` steps and at the end."""
        if self.eval_dataset is None or step <= 0:
            return False
        every = self.config.logging.eval_every
        return step == self.total_steps or bool(every and step % every == 0)

    def _restore_eval_state(self, state: dict) -> None:
        """The checkpoint's evaluation schedule and best-so-far (a different keep_best metric or mode
        starts a new best)."""
        saved = state.get("eval") or {}
        self._eval_state = {"last_step": int(saved.get("last_step", 0)), "best": saved.get("best")}
        best, wanted = self._eval_state["best"], best_metric(self.config.checkpoint)
        if best is not None and (wanted is None or (best["metric"], best["mode"]) != wanted):
            if wanted is not None and self.dist.is_main:
                logger.warning(
                    "checkpoint.keep_best changed (%s, %s -> %s, %s): the best checkpoint restarts",
                    best["metric"],
                    best["mode"],
                    *wanted,
                )
            self._eval_state["best"] = None

    def _run_eval(self, step: int, counters: dict, log_row) -> dict:
        """Evaluate after ``step``, log the row, and save ``best/`` when it improves (collective)."""
        metrics = self.evaluate()
        row = {"step": step, "split": "eval", **metrics}
        self._eval_state["last_step"] = step
        wanted = best_metric(self.config.checkpoint)
        better = False
        if wanted is not None:
            name, mode = wanted
            value, best = row[name], self._eval_state["best"]
            better = math.isfinite(value) and (
                best is None or (value < best["value"] if mode == "min" else value > best["value"])
            )
            if better:
                self._eval_state["best"] = {"metric": name, "mode": mode, "value": value, "step": step}
        log_row(row, "; best so far, saving best/" if better else "")
        if better:
            self.save_checkpoint(step, dict(counters), best=True)
        return row

    # -- training ----------------------------------------------------------------------------------

    def _forward(self, batch: dict, ref_cache: torch.Tensor | None):
        if ref_cache is not None:
            idx = batch["example_index"].cpu()
            batch["ref_logps"] = torch.cat([ref_cache[idx, 0], ref_cache[idx, 1]]).to(self.dist.device)
        module = self.engine if self.engine is not None else self.objective
        return module(**batch)

    def _null_backward(self, batch: dict) -> None:
        """DeepSpeed: every rank must run backward each micro-batch (gradient reduction hooks). A
        skipped micro-batch contributes exact zeros: the loss times zero through the same graph."""
        zero = self.engine(mode="null", **batch)
        self.engine.backward(zero)

    def train(self) -> TrainResult:
        """Train (setting up first if needed) while holding the output directory's run lock."""
        self.setup()
        self.acquire_run_lock()  # a no-op after setup; again after an earlier train() released it
        try:
            return self._train()
        finally:
            self.release_run_lock()

    def _find_resume_checkpoint(self) -> Path | None:
        """The checkpoint to resume from (rank 0 verifies the manifests and tells the other ranks)."""
        resume = self.config.checkpoint.resume
        if not resume:
            return None
        found = error = None
        if self.dist.is_main:
            try:
                found = ckpt.find_resume_checkpoint(resume, self.output_dir)
            except ckpt.CheckpointError as exc:
                error = str(exc)
        found, error = self.dist.broadcast_object((found, error))
        if error is not None:
            raise ckpt.CheckpointError(error)
        return found

    def _train(self) -> TrainResult:
        cfg = self.config
        dist = self.dist
        metrics_path = self.output_dir / cfg.logging.metrics_file
        start_step = 0
        counters = {
            "skipped_nonfinite": 0,
            "skipped_empty": 0,
            "skipped_steps": 0,
            "pairs_dropped": 0,
            "tokens_seen": 0,
            # What truncation cut from the batches trained on (repeats every epoch); the dataset-level
            # counts are logged at start-up (text) and in the summary.
            "truncated_rows_seen": 0,
            "tokens_cut_seen": 0,
        }
        resume_from = self._find_resume_checkpoint()
        if resume_from is not None:
            state = self._load_checkpoint(resume_from)
            start_step = state["step"]
            counters.update(state.get("counters", {}))
            if dist.is_main:
                logger.info("resumed from %s at step %d", resume_from, start_step)
                _truncate_metrics(metrics_path, start_step)
        else:
            self._prepare_fresh_output(metrics_path)
            self._eval_state = {"last_step": 0, "best": None}
        ref_cache = self._reference_cache()
        if resume_from is not None:
            ckpt.load_rng_state(resume_from, dist.rank)
        else:
            # Ranks draw different dropout masks; model init above used the same seed everywhere.
            _set_seed(cfg.train.seed + dist.rank)
        dist.barrier()

        history: list[dict] = []
        eval_history: list[dict] = []
        self._last_good_batch = None
        last_checkpoint = resume_from
        interrupted = False
        progress = None
        if dist.is_main and cfg.logging.progress_bar:
            from tqdm.auto import tqdm

            progress = tqdm(
                total=self.total_steps,
                initial=start_step,
                desc="synpo train",
                unit="step",
                dynamic_ncols=True,
            )
        spe = self.plan.steps_per_epoch
        step = start_step
        with contextlib.ExitStack() as stack:
            stack.enter_context(self._stop_signal_handlers())
            if progress is not None:
                stack.callback(progress.close)
            metrics_handle = (
                stack.enter_context(open(metrics_path, "a", encoding="utf-8")) if dist.is_main else None
            )
            reporter = None
            if dist.is_main and self.report_to:
                reporter = build_reporter(
                    self.report_to,
                    self.output_dir,
                    config_to_dict(cfg),
                    resume_step=start_step if resume_from is not None else None,
                )
                stack.callback(reporter.close)

            def log_row(row: dict, note: str = "") -> None:
                """A metrics row to the JSONL log and the reporters (rank 0); eval rows also printed."""
                if row.get("split") == "eval":
                    eval_history.append(row)
                if metrics_handle is None:
                    return
                metrics_handle.write(json.dumps(row) + "\n")
                metrics_handle.flush()
                if reporter is not None:
                    reporter.log(row["step"], row)
                if row.get("split") == "eval":
                    line = _format_eval_row(row) + note
                    if progress is not None:
                        progress.write(line)
                    else:
                        logger.info("%s", line)

            if self._eval_due(start_step) and self._eval_state["last_step"] < start_step:
                # Resumed at a step whose evaluation did not run (the run was stopped right after it).
                self._run_eval(start_step, counters, log_row)
            micro_iter = None
            while step < self.total_steps:
                epoch = step // spe
                if micro_iter is None or step % spe == 0:
                    micro_iter = self._micro_batch_iter(epoch, step % spe)
                step_start = time.perf_counter()
                lr = self.scheduler.get_last_lr()[0]
                sums = self._accumulate(micro_iter, ref_cache, counters, step)
                grad_norm = self._optimizer_step(counters)
                step += 1
                # One all-reduce per optimizer step: the metric sums and the stop flag.
                reduced = torch.cat([sums, torch.tensor([float(self._stop_requested)], dtype=torch.float64)])
                if dist.distributed:
                    reduced = dist.all_reduce_sum(reduced.to(dist.device)).cpu()
                sums, stop = reduced[:-1], bool(reduced[-1] > 0)
                counters["tokens_seen"] += int(sums[_TOKENS])
                row = self._metrics_row(
                    step, epoch, sums, grad_norm, lr, time.perf_counter() - step_start, counters
                )
                history.append(row)
                if step % cfg.logging.log_every == 0 or step == self.total_steps or stop:
                    log_row(row)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
                if not stop and self._eval_due(step):
                    # Before this step's checkpoint, so that it holds the evaluation and the best-so-far.
                    self._run_eval(step, counters, log_row)
                if stop:
                    last_checkpoint = self.save_checkpoint(step, dict(counters))
                    interrupted = True
                    if dist.is_main:
                        logger.warning(
                            "%s: saved %s at step %d; stopping",
                            self._stop_signal or "stop requested",
                            last_checkpoint,
                            step,
                        )
                    break
                save_every = cfg.checkpoint.save_every
                if save_every and step % save_every == 0 and step < self.total_steps:
                    last_checkpoint = self.save_checkpoint(step, dict(counters))
            if not interrupted and cfg.checkpoint.save_at_end and step > start_step:
                last_checkpoint = self.save_checkpoint(step, dict(counters))

        final_dir = None
        if not interrupted and cfg.checkpoint.save_at_end:
            final_dir = self.export_model(self.output_dir / "final")
        summary = {
            **counters,
            "read": {
                "lines": self.read_report.lines,
                "kept": self.read_report.kept,
                "filtered_score_gap": self.read_report.filtered_score_gap,
                "malformed_skipped": self.read_report.malformed_skipped,
            },
            "tokenization": vars(self.dataset.encoder.stats).copy(),
        }
        best = self._eval_state.get("best")
        if best is not None:
            summary["best"] = {**best, "path": str(ckpt.best_checkpoint_dir(self.output_dir))}
        if eval_history:
            summary["eval"] = eval_history[-1]
        if dist.is_main:
            logger.info("done at step %d/%d: %s", step, self.total_steps, json.dumps(counters))
        return TrainResult(
            output_dir=self.output_dir,
            metrics_file=metrics_path,
            global_step=step,
            total_steps=self.total_steps,
            last_checkpoint=last_checkpoint,
            final_model_dir=final_dir,
            interrupted=interrupted,
            history=history,
            summary=summary,
            stop_signal=self._stop_signal if interrupted else None,
            eval_history=eval_history,
        )

    def _prepare_fresh_output(self, metrics_path: Path) -> None:
        """A fresh run must not mix its checkpoints with an earlier run's (pruning keeps the highest
        steps, which would be the old ones): refuse, or delete them with checkpoint.overwrite."""
        existing = ckpt.list_checkpoints(self.output_dir)
        best = ckpt.best_checkpoint_dir(self.output_dir)
        has_best = best.is_dir()
        self.dist.barrier()  # every rank looked before rank 0 deletes anything
        if (existing or has_best) and not self.config.checkpoint.overwrite:
            latest = existing[-1].name if existing else best.name
            raise ConfigError(
                f"checkpoint.output_dir: {self.output_dir} holds checkpoints of an earlier run "
                f"(latest {latest}); resume with --resume, choose another output_dir, "
                "or set checkpoint.overwrite: true to delete them"
            )
        if self.dist.is_main:
            if has_best:
                import shutil

                shutil.rmtree(best)
            if existing:
                import shutil

                shutil.rmtree(ckpt.checkpoint_root(self.output_dir))
                logger.warning(
                    "checkpoint.overwrite: deleted the earlier run's checkpoints in %s", self.output_dir
                )
            if metrics_path.exists():
                metrics_path.unlink()  # a fresh run starts a fresh log
        self.dist.barrier()

    def _accumulate(self, micro_iter, ref_cache, counters: dict, step: int) -> torch.Tensor:
        """Forward/backward over one optimizer step's micro-batches; returns this rank's metric sums
        (layout: METRIC_NAMES, then loss sum, finite micro-batches, tokens, skipped micro-batches)."""
        accumulation = self.config.train.gradient_accumulation_steps
        sums = torch.zeros(_SUMS_SIZE, dtype=torch.float64)
        for _ in range(accumulation):
            raw = next(micro_iter)
            counters["pairs_dropped"] += raw.get("dropped_pairs", 0)
            counters["truncated_rows_seen"] += raw.get("truncated_rows", 0)
            counters["tokens_cut_seen"] += raw.get("tokens_cut", 0)
            if raw.get("empty"):
                # Every pair of the micro-batch was dropped (a media prompt longer than max_length).
                counters["skipped_empty"] += 1
                sums[_SKIPPED] += 1
                if self.engine is not None:
                    if self._last_good_batch is None:
                        raise DataError("a whole micro-batch was dropped before any usable one was seen")
                    self._null_backward(self._last_good_batch)
                    self.engine.step()
                continue
            batch = self._to_device(raw)
            loss, metrics = self._forward(batch, ref_cache)
            if bool(torch.isfinite(loss)):
                if self.engine is not None:
                    self.engine.backward(loss)
                else:
                    (loss / accumulation).backward()
                sums[: len(METRIC_NAMES)] += metrics.cpu()
                sums[_LOSS] += float(loss.detach())
                sums[_FINITE] += 1
                self._last_good_batch = batch
            else:
                counters["skipped_nonfinite"] += 1
                sums[_SKIPPED] += 1
                logger.warning(
                    "rank %d step %d: non-finite loss (%s); micro-batch skipped",
                    self.dist.rank,
                    step + 1,
                    float(loss.detach()),
                )
                if self.engine is not None:
                    self._null_backward(batch)
            del loss
            sums[_TOKENS] += raw["num_tokens"]
            if self.engine is not None:
                self.engine.step()
        return sums

    def _optimizer_step(self, counters: dict) -> float | None:
        """Clip, step and schedule (plain path; DeepSpeed stepped at its boundary). Returns the grad norm."""
        if self.engine is not None:
            norm = self.engine.get_global_grad_norm()
            if isinstance(norm, torch.Tensor):
                norm = float(norm)
            return None if norm is None else float(norm)
        max_norm = self.config.optim.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(self.trainable_params, max_norm if max_norm else float("inf"))
        norm_value = float(norm)
        if math.isfinite(norm_value):
            self.optimizer.step()
        else:
            # Non-finite gradients despite finite losses: drop this update, keep the optimizer intact.
            counters["skipped_steps"] += 1
            logger.warning("non-finite gradient norm (%s); optimizer step skipped", norm_value)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm_value

    def _metrics_row(self, step, epoch, sums, grad_norm, lr, seconds, counters) -> dict:
        pairs = float(sums[0])
        finite_micro = float(sums[_FINITE])
        tokens = float(sums[_TOKENS])
        row = {
            "step": step,
            "epoch": epoch,
            "loss": float(sums[_LOSS]) / finite_micro if finite_micro else float("nan"),
        }
        for i, name in enumerate(METRIC_NAMES[1:], start=1):
            row[name] = float(sums[i]) / pairs if pairs else float("nan")
        row.update(
            {
                "grad_norm": grad_norm,
                "lr": lr,
                "pairs": int(pairs),
                "tokens": int(tokens),
                "tokens_per_s": tokens / seconds if seconds > 0 else None,
                "step_time_s": seconds,
                "peak_memory_mb": _peak_memory_mb(self.dist.device),
                "skipped_batches": counters["skipped_nonfinite"] + counters["skipped_empty"],
                "skipped_in_step": int(sums[_SKIPPED]),
            }
        )
        return row


def _format_eval_row(row: dict) -> str:
    """``eval step 10: loss -0.5123, reward_accuracy 0.625, ... (16 pairs, 0.41 s)``."""
    shown = ("loss", "reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps")
    values = ", ".join(f"{name} {row[f'eval_{name}']:.4g}" for name in shown)
    return f"eval step {row['step']}: {values} ({row['eval_pairs']} pairs, {row['eval_seconds']:.2f} s)"


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop log rows past ``last_step`` (written after the checkpoint a resumed run restarts from)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
