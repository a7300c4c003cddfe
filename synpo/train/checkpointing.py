"""The trainer's checkpoints: saving its state atomically (steps and ``best/``), resuming from one
(verified, refusing an inexact resume or an unexpected config change), exporting the final model,
the output directory's run lock and a fresh run's clean-up. The low-level atomic I/O, manifests and
RNG states are :mod:`synpo.checkpoint`'s.

Functions that save or restore the whole training state take the :class:`~synpo.train.loop.Trainer`
(they read its model, optimizer, scheduler, data plan and evaluation state)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from synpo import checkpoint as ckpt
from synpo.config import (
    ConfigError,
    TrainerConfig,
    best_metric,
    config_changes,
    config_to_dict,
    format_change,
    unexpected_resume_changes,
)
from synpo.run_lock import RunDirLock, RunLockError
from synpo.train.engine import Dist, zero_stage
from synpo.train.evaluation import restore_eval_state
from synpo.train.schedule import restore_lr_schedule

if TYPE_CHECKING:
    from synpo.train.loop import Trainer

__all__ = [
    "RUN_STATUS_FILE",
    "EarlierRun",
    "UnfinishedRunError",
    "acquire_run_lock",
    "check_resume_config",
    "cpu_state_dict",
    "earlier_run",
    "export_model",
    "find_resume_checkpoint",
    "load_checkpoint",
    "prepare_fresh_output",
    "save_checkpoint",
    "state_payload",
    "truncate_metrics",
    "write_run_status",
]

logger = logging.getLogger("synpo.train")


# -- saving --------------------------------------------------------------------------------------


def state_payload(trainer: Trainer, step: int, counters: dict) -> dict:
    """The checkpoint's ``trainer_state.json``: position, run shape, counters, schedule, evaluation
    state and the resolved config."""
    spe = trainer.plan.steps_per_epoch
    return {
        "step": step,
        "epoch": step // spe,
        "step_in_epoch": step % spe,
        "total_steps": trainer.total_steps,
        "world_size": trainer.dist.world_size,
        "pairs_per_step": trainer.plan.pairs_per_step,
        "num_pairs": len(trainer.dataset),
        "data_fingerprint": trainer.dataset.fingerprint(),
        "deepspeed": trainer.use_deepspeed,
        "counters": counters,
        "lr_schedule": dict(trainer.lr_schedule),
        "eval": json.loads(json.dumps(trainer._eval_state)),
        "config": config_to_dict(trainer.config),
    }


def save_checkpoint(trainer: Trainer, step: int, counters: dict, *, best: bool = False) -> Path:
    """See :meth:`synpo.train.loop.Trainer.save_checkpoint`."""
    output_dir = trainer.output_dir
    if best:
        tmp = output_dir / ".tmp-best"
    else:
        tmp = ckpt.checkpoint_root(output_dir) / f".tmp-{ckpt.step_dir_name(step)}"
    try:
        return _write_checkpoint(trainer, tmp, step, counters, best=best)
    except BaseException as exc:
        if trainer.dist.is_main:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise ckpt.CheckpointError(_save_failure_message(output_dir, step, exc, best=best)) from exc
        raise


def _save_failure_message(output_dir: Path, step: int, exc: OSError, *, best: bool = False) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    if best:
        return (
            f"cannot save the best checkpoint (step {step}) in "
            f"{ckpt.best_checkpoint_dir(output_dir)}: {exc.strerror or exc}{where}; "
            "the previous best checkpoint, if any, is intact"
        )
    try:
        previous = ckpt.find_checkpoint("auto", output_dir)
    except (ckpt.CheckpointError, OSError):
        previous = None
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    return (
        f"cannot save the step-{step} checkpoint in {ckpt.checkpoint_root(output_dir)}: "
        f"{exc.strerror or exc}{where}; {kept}"
    )


def _write_checkpoint(trainer: Trainer, tmp: Path, step: int, counters: dict, *, best: bool = False) -> Path:
    from safetensors.torch import save_file

    output_dir, dist = trainer.output_dir, trainer.dist
    if dist.is_main:
        if best:
            import shutil

            if tmp.exists():
                shutil.rmtree(tmp)  # left by a killed run
            tmp.mkdir(parents=True)
        else:
            tmp = ckpt.temp_checkpoint_dir(output_dir, step)
    dist.barrier()
    if trainer.engine is not None:
        trainer.engine.save_checkpoint(
            str(tmp / "deepspeed"),
            tag="state",
            client_state={"step": step},
            save_latest=False,
            exclude_frozen_parameters=True,
        )
    else:
        weights = {
            name: param.detach().to("cpu").contiguous()
            for name, param in trainer.objective.policy.named_parameters()
            if param.requires_grad
        }
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt", "step": str(step)})
        ckpt.save_torch_state(trainer.optimizer.state_dict(), tmp / "optimizer.pt")
        ckpt.save_torch_state(trainer.scheduler.state_dict(), tmp / "scheduler.pt")
    ckpt.save_rng_state(tmp, dist.rank)
    dist.barrier()
    if best:
        final = ckpt.best_checkpoint_dir(output_dir)
    else:
        final = ckpt.checkpoint_root(output_dir) / ckpt.step_dir_name(step)
    if dist.is_main:
        ckpt.write_json_atomic(tmp / ckpt.STATE_FILE, state_payload(trainer, step, counters))
        if best:
            final = ckpt.publish_checkpoint_at(tmp, final)
        else:
            final = ckpt.publish_checkpoint(tmp, output_dir, step)
            ckpt.prune_checkpoints(output_dir, trainer.config.checkpoint.keep_last)
    dist.barrier()
    return final


# -- resuming ------------------------------------------------------------------------------------


def find_resume_checkpoint(resume: str | None, output_dir: Path, dist: Dist) -> Path | None:
    """The checkpoint to resume from (rank 0 verifies the manifests and tells the other ranks)."""
    if not resume:
        return None
    found = error = None
    if dist.is_main:
        try:
            found = ckpt.find_resume_checkpoint(resume, output_dir)
        except ckpt.CheckpointError as exc:
            error = str(exc)
    found, error = dist.broadcast_object((found, error))
    if error is not None:
        raise ckpt.CheckpointError(error)
    return found


def load_checkpoint(trainer: Trainer, path: Path) -> dict:
    """Restore weights, optimizer and scheduler from ``path`` (and the trainer's LR schedule and
    evaluation state); returns its trainer state (RNG is restored separately, right before the loop
    continues)."""
    from safetensors.torch import load_file

    dist = trainer.dist
    state = ckpt.read_trainer_state(path)
    mismatches = []
    if state["world_size"] != dist.world_size:
        mismatches.append(f"world size {state['world_size']} -> {dist.world_size}")
    if state["pairs_per_step"] != trainer.plan.pairs_per_step:
        mismatches.append(
            f"pairs per optimizer step {state['pairs_per_step']} -> {trainer.plan.pairs_per_step}"
        )
    if state["deepspeed"] != trainer.use_deepspeed:
        mismatches.append("DeepSpeed on/off changed")
    if mismatches:
        raise ckpt.CheckpointError(f"{path}: cannot resume exactly: " + "; ".join(mismatches))
    changes = check_resume_config(trainer.config, trainer.total_steps, dist, path, state)
    if state["data_fingerprint"] != trainer.dataset.fingerprint():
        what = "the training data or its tokenization changed"
        if not any(key.startswith(("data.", "model.")) for key, _, _ in changes):
            raise ckpt.CheckpointError(f"{path}: cannot resume exactly: {what}")
        if dist.is_main:
            logger.warning("%s: %s (data/model config changes allowed)", path, what)
    if trainer.engine is not None:
        load_path, _ = trainer.engine.load_checkpoint(
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
        params = dict(trainer.objective.policy.named_parameters())
        expected = {name for name, p in params.items() if p.requires_grad}
        if set(weights) != expected:
            missing = sorted(expected - set(weights))[:3]
            extra = sorted(set(weights) - expected)[:3]
            raise ckpt.CheckpointError(
                f"{path}: trainable weights do not match the model (missing {missing}, unexpected {extra})"
            )
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)
        trainer.optimizer.load_state_dict(ckpt.load_torch_state(path / "optimizer.pt", dist.device))
        trainer.scheduler.load_state_dict(ckpt.load_torch_state(path / "scheduler.pt"))
    trainer.lr_schedule = restore_lr_schedule(
        trainer.scheduler, trainer.lr_schedule, trainer.total_steps, trainer.config.optim, state, changes
    )
    trainer._eval_state = restore_eval_state(state, best_metric(trainer.config.checkpoint), dist)
    return state


def check_resume_config(
    config: TrainerConfig, total_steps: int, dist: Dist, path: Path, state: dict
) -> list[tuple[str, Any, Any]]:
    """Compare the config with the one saved in the checkpoint: changes other than free ones
    (output/logging/saving cadence), an extension of the run, or the keys named in
    ``checkpoint.resume_allow_changes`` are refused with the diff. Returns every change."""
    old = state.get("config")
    if not isinstance(old, dict):
        return []
    new = json.loads(json.dumps(config_to_dict(config)))
    allowed = config.checkpoint.resume_allow_changes
    extends = total_steps >= state["total_steps"]
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
    if accepted and dist.is_main:
        logger.warning("resuming with config changes: %s", "; ".join(format_change(c) for c in accepted))
    return config_changes(old, new)


def truncate_metrics(path: Path, last_step: int) -> None:
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


# -- the output directory ------------------------------------------------------------------------


# ``<output_dir>/run_status.json``: whether the run that last trained here finished. Written
# "running" when training starts, "interrupted" when a signal stopped it (after its checkpoint),
# "finished" at the end; a run killed (SIGKILL, OOM) or crashed leaves "running". Only a finished
# run may be replaced by a fresh one (checkpoint.overwrite); an unfinished one is resumed or kept.
RUN_STATUS_FILE = "run_status.json"


class UnfinishedRunError(ConfigError):
    """A fresh run was asked for in an output directory whose earlier run did not finish."""

    def __init__(self, message: str, output_dir: Path):
        super().__init__(message)
        self.output_dir = output_dir


@dataclass
class EarlierRun:
    """The run whose checkpoints an output directory holds."""

    finished: bool
    how: str  # "finished", "stopped by SIGINT", "did not finish (killed or crashed)"
    latest: str | None  # the newest checkpoint's directory name (None: only best/)
    step: int | None  # its step and the run's length, when readable
    total_steps: int | None

    def describe(self) -> str:
        """``stopped by SIGINT; latest checkpoint step-00000004, step 4 of 8``."""
        where = f"latest checkpoint {self.latest}" if self.latest else "only best/"
        if self.step is not None and self.total_steps is not None:
            where += f", step {self.step} of {self.total_steps}"
        return f"{self.how}; {where}"


def write_run_status(output_dir: Path, status: str, *, step: int, total_steps: int, stop_signal=None) -> None:
    """Record ``status`` ("running", "interrupted", "finished") in ``<output_dir>/run_status.json``."""
    payload = {"status": status, "step": step, "total_steps": total_steps, "stop_signal": stop_signal}
    ckpt.write_json_atomic(output_dir / RUN_STATUS_FILE, payload)


def _read_earlier_run(output_dir: Path) -> EarlierRun | None:
    existing = ckpt.list_checkpoints(output_dir)
    if not existing and not ckpt.best_checkpoint_dir(output_dir).is_dir():
        return None
    latest = ckpt.find_checkpoint("auto", output_dir) if existing else None
    step = total = None
    if latest is not None:
        try:
            state = ckpt.read_trainer_state(latest)
            step, total = int(state["step"]), int(state["total_steps"])
        except (ckpt.CheckpointError, KeyError, TypeError, ValueError):
            pass  # a damaged newest checkpoint: resuming will skip it with a warning
    try:
        status = json.loads((output_dir / RUN_STATUS_FILE).read_text())
    except FileNotFoundError:
        # Written before run_status.json existed: finished when the newest checkpoint is the last step.
        status = {"status": "finished" if step is not None and step >= total else "running"}
    except (OSError, ValueError):
        status = {"status": "running"}  # unreadable: assume the worst (never delete it)
    name = status.get("status") if isinstance(status, dict) else None
    if name == "finished":
        how = "finished"
    elif name == "interrupted":
        how = f"stopped by {status.get('stop_signal') or 'request'}"
    else:
        how = "did not finish (killed or crashed)"
    return EarlierRun(name == "finished", how, latest.name if latest else None, step, total)


def earlier_run(output_dir: Path, dist: Dist) -> EarlierRun | None:
    """The earlier run in ``output_dir`` (None when it holds no checkpoints); rank 0 reads it and
    tells the other ranks."""
    return dist.broadcast_object(_read_earlier_run(output_dir) if dist.is_main else None)


def prepare_fresh_output(
    output_dir: Path, metrics_path: Path, *, overwrite: bool, dist: Dist, earlier: EarlierRun | None
) -> None:
    """A fresh run must not mix its checkpoints with an earlier run's (pruning keeps the highest
    steps, which would be the old ones): refuse, or with checkpoint.overwrite delete them when that
    run finished. An unfinished run (stopped, killed, crashed) is never deleted: it can be resumed."""
    dist.barrier()  # every rank looked before rank 0 deletes anything
    if earlier is not None and not earlier.finished:
        raise UnfinishedRunError(
            f"checkpoint.output_dir: {output_dir} holds an unfinished run ({earlier.describe()}); "
            "resume it with --resume (checkpoint.resume: auto) or choose another output_dir; "
            f"checkpoint.overwrite replaces only a finished run (delete {output_dir} to discard this one)",
            output_dir,
        )
    if earlier is not None and not overwrite:
        raise ConfigError(
            f"checkpoint.output_dir: {output_dir} holds checkpoints of an earlier run "
            f"({earlier.describe()}); resume with --resume, choose another output_dir, "
            "or set checkpoint.overwrite: true to delete them"
        )
    if dist.is_main:
        import shutil

        best = ckpt.best_checkpoint_dir(output_dir)
        if best.is_dir():
            shutil.rmtree(best)
        if ckpt.checkpoint_root(output_dir).is_dir():
            shutil.rmtree(ckpt.checkpoint_root(output_dir))
        if earlier is not None:
            logger.warning(
                "checkpoint.overwrite: deleted the finished earlier run's checkpoints in %s", output_dir
            )
        if metrics_path.exists():
            metrics_path.unlink()  # a fresh run starts a fresh log
    dist.barrier()


def acquire_run_lock(trainer: Trainer) -> None:
    """See :meth:`synpo.train.loop.Trainer.acquire_run_lock` (keeps the lock in ``trainer._run_lock``)."""
    error = None
    output_dir = trainer.output_dir
    if trainer.dist.is_main:
        try:
            created = not output_dir.exists()
            output_dir.mkdir(parents=True, exist_ok=True)
            if trainer._run_lock is None:
                trainer._run_lock = RunDirLock(output_dir, remove_if_unused=created)
            trainer._run_lock.acquire()
        except RunLockError as exc:
            error = ("lock", str(exc))
        except OSError as exc:
            reason = exc.strerror or str(exc)
            error = ("config", f"checkpoint.output_dir: cannot create or write {output_dir}: {reason}")
    error = trainer.dist.broadcast_object(error)
    if error is not None:
        kind, message = error
        raise RunLockError(message) if kind == "lock" else ConfigError(message)


# -- export --------------------------------------------------------------------------------------


def cpu_state_dict(policy, *, engine, ds_config: dict | None, dist: Dist) -> dict[str, torch.Tensor]:
    """The policy's state dict on CPU (rank 0; empty elsewhere). Under ZeRO-3 each partitioned
    parameter is gathered on its own, so only one full parameter is materialized at a time."""
    if engine is None or zero_stage(ds_config) != 3:
        if not dist.is_main:
            return {}
        # One copy per parameter: a tied lm_head and embedding stay one tensor (save_pretrained then
        # writes it once, as the checkpoints and the ZeRO-3 path below do).
        clones: dict[int, torch.Tensor] = {}
        state = {}
        for key, value in policy.state_dict(keep_vars=True).items():
            if id(value) not in clones:
                clones[id(value)] = value.detach().to("cpu").clone()
            state[key] = clones[id(value)]
        return state
    import deepspeed

    gathered: dict[int, torch.Tensor] = {}
    for param in policy.parameters():
        if not hasattr(param, "ds_id"):
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if dist.is_main:
                gathered[id(param)] = param.detach().to("cpu").clone()
    if not dist.is_main:
        return {}
    state = {}
    for key, value in policy.state_dict(keep_vars=True).items():
        state[key] = gathered[id(value)] if id(value) in gathered else value.detach().to("cpu").clone()
    return state


def export_model(trainer: Trainer, directory: Path) -> Path:
    """See :meth:`synpo.train.loop.Trainer.export_model`."""
    import shutil

    dist = trainer.dist
    policy = trainer.objective.policy
    state = cpu_state_dict(policy, engine=trainer.engine, ds_config=trainer.ds_config, dist=dist)
    options = {}
    lora = trainer.config.lora
    if lora.enabled and not set(lora.target_modules) & {"embed_tokens", "lm_head"}:
        # The vocabulary is never resized here: no embeddings to save. peft's "auto" would read the
        # base model's config.json to compare vocabulary sizes, and warn "Could not find a config
        # file" for a base read from a GGUF file (which has none).
        options["save_embedding_layers"] = False
    if dist.is_main:
        tmp = directory.with_name(f".{directory.name}.tmp")
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            policy.save_pretrained(str(tmp), state_dict=state, safe_serialization=True, **options)
            (trainer.processor or trainer.tokenizer).save_pretrained(str(tmp))
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
    dist.barrier()
    return directory
