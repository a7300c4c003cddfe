"""``synpo.Trainer``: SynPO (and DPO/IPO/SimPO/CPO/ORPO) training on one CPU, one GPU or many GPUs.

One loop serves two back ends:

- plain PyTorch (single process): AdamW, linear warmup/decay, gradient accumulation, clipping,
  optional bf16 autocast;
- DeepSpeed (ZeRO 1/2/3, offload; launched with ``deepspeed`` or ``torchrun``): the same client
  AdamW and schedule handed to ``deepspeed.initialize``; under ZeRO-3 ``lm_head.weight`` is
  registered as an external parameter of :class:`~synpo.objective.PreferenceObjective`, so the fused
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
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from synpo import checkpoint as ckpt
from synpo.config import (
    ConfigError,
    TrainerConfig,
    best_metric,
    config_from_dict,
    config_to_dict,
    load_config,
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
from synpo.models import (
    apply_lora,
    build_reference,
    load_model,
    resolve_reference_mode,
    trainable_parameter_count,
)
from synpo.objective import PreferenceObjective
from synpo.prefix_sharing import PrefixSharingUnsupported, decide_prefix_sharing
from synpo.reporting import build_reporter, resolve_report_to
from synpo.run_lock import RunDirLock
from synpo.train import checkpointing, evaluation
from synpo.train import metrics as m
from synpo.train.engine import (
    Dist,
    build_deepspeed_config,
    declare_cpu_to_deepspeed,
    init_deepspeed_distributed,
    select_device,
    set_seed,
    zero_stage,
)
from synpo.train.reference_cache import reference_logps
from synpo.train.schedule import (
    batch_size_problem,
    describe_training_length,
    linear_warmup_schedule,
    training_steps,
)

__all__ = ["TrainResult", "Trainer"]

logger = logging.getLogger("synpo.train")


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
        device = select_device(cfg.train.device, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if device.type == "cpu":
            declare_cpu_to_deepspeed()
        if device.type == "cpu" and cfg.train.cpu_threads:
            torch.set_num_threads(cfg.train.cpu_threads)
        if self.use_deepspeed:
            init_deepspeed_distributed(device, cfg.train.cpu_threads)
            import torch.distributed as dist

            self.dist = Dist(
                dist.get_rank(), local_rank, dist.get_world_size(), device, dist.get_world_size() > 1
            )
        else:
            self.dist = Dist(0, 0, 1, device, False)
        if cfg.train.precision == "fp16" and not self.use_deepspeed:
            raise ConfigError("train.precision: fp16 needs DeepSpeed (loss scaling); use bf16 or fp32")
        self.ds_config = build_deepspeed_config(cfg, self.dist.world_size) if self.use_deepspeed else None
        self.report_to = resolve_report_to(cfg.logging.report_to)
        self.acquire_run_lock()  # before the slow part: a second run into this directory stops here

        # Model (same seed on every rank: identical initial weights and LoRA init).
        set_seed(cfg.train.seed)
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
            prefix_sharing=self.prefix_sharing,
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
        # continues the decay from where it was; see schedule.restore_lr_schedule).
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

            if zero_stage(self.ds_config) == 3:
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
                f", DeepSpeed ZeRO-{zero_stage(self.ds_config)}" if self.use_deepspeed else "",
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
            hint = ""
            if report.lines == 0:
                hint = "; the file holds no record (synpo pairs select says why when it writes none)"
            elif report.filtered_score_gap == report.lines:
                hint = f"; every score gap is below data.min_score_gap {data.min_score_gap:g}: lower it"
            raise DataError(f"{path}: no usable preference pairs ({report.summary()}){hint}")
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
        self.prefix_sharing, self.prefix_sharing_why = self._decide_prefix_sharing()
        self.collator = PreferenceCollator(
            self.tokenizer.pad_token_id, pack=data.pack, prefix_sharing=self.prefix_sharing
        )
        batch_problem = batch_size_problem(cfg, len(self.dataset), self.dist.world_size)
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
                cut = encoder.stats.truncation_advice(data.max_length)
                if cut is not None:
                    logger.warning("%s", cut)
            if batch_problem is not None:
                logger.warning("%s", batch_problem)
            if self.eval_dataset is not None:
                logger.info("eval data %s: %d pairs", eval_where, len(self.eval_dataset))
            logger.info("prefix sharing %s", self.prefix_sharing_why)
            if self.dataset.media_skipped:
                logger.warning("%d pairs skipped: unreadable video/image files", self.dataset.media_skipped)
            if self.plan.unused_pairs_per_epoch and batch_problem is None:  # else the warning says it
                logger.info(
                    "%d pairs per epoch do not fill an optimizer step of %d pairs and are not used",
                    self.plan.unused_pairs_per_epoch,
                    self.plan.pairs_per_step,
                )

    def _decide_prefix_sharing(self) -> tuple[bool, str]:
        """``data.prefix_sharing`` resolved against the model and the data's prompt/response lengths."""
        prompt = response = None
        if self.dataset.encoded is not None:
            pairs = self.dataset.encoded
            prompt = sum(len(p.prompt_ids) for p in pairs) / len(pairs)
            response = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs) / (2 * len(pairs))
        try:
            return decide_prefix_sharing(
                self.config.data.prefix_sharing, self.policy, prompt_tokens=prompt, response_tokens=response
            )
        except PrefixSharingUnsupported as exc:
            raise ConfigError(f"data.{exc}") from None

    # -- batches -------------------------------------------------------------------------------------

    def _to_device(self, batch: dict) -> dict:
        device = self.dist.device
        out = {}
        for key, value in batch.items():
            if not isinstance(value, torch.Tensor):
                out[key] = value  # the collator's counts (ints) and flags stay on the host
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
        return reference_logps(
            self.config,
            dataset=self.dataset,
            collator=self.collator,
            module=self.engine if self.engine is not None else self.objective,
            dist=self.dist,
            to_device=self._to_device,
            model_source=self.model_source,
            output_dir=self.output_dir,
        )

    # -- checkpoints -------------------------------------------------------------------------------

    def save_checkpoint(self, step: int, counters: dict, *, best: bool = False) -> Path:
        """Write an atomic checkpoint of the current state (collective under DeepSpeed); ``best``:
        into ``<output_dir>/best/`` (replacing the previous best; ``latest`` and pruning untouched).

        When writing fails (a full disk, an unwritable directory; or a second Ctrl-C, which raises
        KeyboardInterrupt) the partial temp directory is removed and the previous checkpoint stays the
        latest; an ``OSError`` becomes a ``CheckpointError`` that says so."""
        return checkpointing.save_checkpoint(self, step, counters, best=best)

    def export_model(self, directory: Path) -> Path:
        """Save the trained policy (LoRA adapter or full model, safetensors) and tokenizer/processor,
        atomically (temp directory + rename; on a failed write the temp directory is removed)."""
        return checkpointing.export_model(self, directory)

    # -- output directory lock ---------------------------------------------------------------------

    def acquire_run_lock(self) -> None:
        """Create the output directory and take its run lock (``<output_dir>/.lock``, rank 0 only;
        every rank learns the outcome, so a refused run stops on all ranks at once)."""
        checkpointing.acquire_run_lock(self)

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
        if self.eval_dataset is None:
            return None
        return evaluation.evaluate(
            self.eval_dataset,
            module=self.engine if self.engine is not None else self.objective,
            collator=self.collator,
            dist=self.dist,
            micro_batch_size=self.config.train.micro_batch_size,
            to_device=self._to_device,
            lockstep=self.engine is not None,
        )

    def _eval_due(self, step: int) -> bool:
        """Evaluate after optimizer step ``step``: every ``logging.eval_every`` steps and at the end."""
        return evaluation.eval_due(
            step,
            has_eval_data=self.eval_dataset is not None,
            eval_every=self.config.logging.eval_every,
            total_steps=self.total_steps,
        )

    def _run_eval(self, step: int, counters: dict, log_row) -> dict:
        """Evaluate after ``step``, log the row, and save ``best/`` when it improves (collective)."""
        metrics = self.evaluate()
        row = {"step": step, "split": "eval", **metrics}
        better = evaluation.record_eval(self._eval_state, row, best_metric(self.config.checkpoint))
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
        resume = cfg.checkpoint.resume
        earlier = checkpointing.earlier_run(self.output_dir, dist)
        if resume == "auto" and cfg.checkpoint.overwrite and earlier is not None and earlier.finished:
            resume = None  # checkpoint.overwrite: a finished run is replaced, not continued
        resume_from = checkpointing.find_resume_checkpoint(resume, self.output_dir, dist)
        if resume_from is not None:
            state = checkpointing.load_checkpoint(self, resume_from)
            start_step = state["step"]
            counters.update(state.get("counters", {}))
            if dist.is_main:
                logger.info("resumed from %s at step %d", resume_from, start_step)
                checkpointing.truncate_metrics(metrics_path, start_step)
        else:
            checkpointing.prepare_fresh_output(
                self.output_dir, metrics_path, overwrite=cfg.checkpoint.overwrite, dist=dist, earlier=earlier
            )
            self._eval_state = {"last_step": 0, "best": None}
        if dist.is_main:
            checkpointing.write_run_status(
                self.output_dir, "running", step=start_step, total_steps=self.total_steps
            )
        ref_cache = self._reference_cache()
        if resume_from is not None:
            ckpt.load_rng_state(resume_from, dist.rank)
        else:
            # Ranks draw different dropout masks; model init above used the same seed everywhere.
            set_seed(cfg.train.seed + dist.rank)
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
                    line = evaluation.format_eval_row(row) + note
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
                counters["tokens_seen"] += int(sums[m.TOKENS])
                seconds = time.perf_counter() - step_start
                row = m.step_row(step, epoch, sums, grad_norm, lr, seconds, counters, dist.device)
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
        if dist.is_main:
            checkpointing.write_run_status(
                self.output_dir,
                "interrupted" if interrupted else "finished",
                step=step,
                total_steps=self.total_steps,
                stop_signal=self._stop_signal if interrupted else None,
            )
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

    def _accumulate(self, micro_iter, ref_cache, counters: dict, step: int) -> torch.Tensor:
        """Forward/backward over one optimizer step's micro-batches; returns this rank's metric sums
        (laid out as :data:`synpo.train.metrics.STEP_SUMS`)."""
        accumulation = self.config.train.gradient_accumulation_steps
        sums = m.zeros(m.STEP_SUMS)
        for _ in range(accumulation):
            raw = next(micro_iter)
            counters["pairs_dropped"] += raw.get("dropped_pairs", 0)
            counters["truncated_rows_seen"] += raw.get("truncated_rows", 0)
            counters["tokens_cut_seen"] += raw.get("tokens_cut", 0)
            if raw.get("empty"):
                # Every pair of the micro-batch was dropped (a media prompt longer than max_length).
                counters["skipped_empty"] += 1
                sums[m.SKIPPED] += 1
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
                sums[m.OBJECTIVE] += metrics.cpu()
                sums[m.LOSS] += float(loss.detach())
                sums[m.FINITE] += 1
                self._last_good_batch = batch
            else:
                counters["skipped_nonfinite"] += 1
                sums[m.SKIPPED] += 1
                logger.warning(
                    "rank %d step %d: non-finite loss (%s); micro-batch skipped",
                    self.dist.rank,
                    step + 1,
                    float(loss.detach()),
                )
                if self.engine is not None:
                    self._null_backward(batch)
            del loss
            sums[m.TOKENS] += raw["num_tokens"]
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
