"""Atomic, resumable checkpoints.

Layout of ``<output_dir>/checkpoints/``::

    step-00000010/
        trainer_state.json      step, epoch, data position, LR schedule, counters, resolved config
        model.safetensors       trainable weights (LoRA adapters or the full model), plain runs
        optimizer.pt            optimizer state (torch.save; loaded with weights_only=True)
        scheduler.pt            LR scheduler state
        rng/rank-00000.pt       Python, NumPy and torch (CPU + CUDA) RNG states, one file per rank
        deepspeed/              engine.save_checkpoint output under DeepSpeed (ZeRO partitions)
        manifest.json           size and sha256 of every other file (written last)
    latest                      name of the newest complete checkpoint

and ``<output_dir>/best/`` (``checkpoint.keep_best``): the checkpoint of the best evaluation so far,
in the same layout, published the same way, outside ``checkpoints/`` so that pruning never sees it.

A checkpoint is written into ``.tmp-step-...`` and renamed into place with ``os.replace`` only when
complete, then ``latest`` is replaced atomically, so a run killed at any moment leaves either the
previous checkpoint or the new one, never a partial one. Every load uses a safe format: safetensors
for weights and ``torch.load(weights_only=True)`` for optimizer/scheduler/RNG state (DeepSpeed's own
loader is switched to ``weights_only=True`` as well).

The manifest catches what the atomic publish cannot: a file damaged after it was written (a disk
error, a partial copy, a truncated sync). :func:`find_resume_checkpoint` verifies it and falls back
to the newest intact checkpoint, warning about each damaged one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "best_checkpoint_dir",
    "capture_rng_state",
    "checkpoint_root",
    "find_checkpoint",
    "find_resume_checkpoint",
    "list_checkpoints",
    "load_rng_state",
    "load_torch_state",
    "make_safe_checkpoint_engine",
    "prune_checkpoints",
    "publish_checkpoint",
    "publish_checkpoint_at",
    "restore_rng_state",
    "save_rng_state",
    "save_torch_state",
    "temp_checkpoint_dir",
    "verify_checkpoint",
    "write_json_atomic",
    "write_manifest",
]

logger = logging.getLogger("synpo.checkpoint")

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    pass


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on directories
    finally:
        os.close(fd)


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. a full disk: leave no stray temp file
        raise
    _fsync_dir(path.parent)


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    _write_bytes_atomic(Path(path), (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def save_torch_state(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` followed by fsync (the directory rename publishes it)."""
    path = Path(path)
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def load_torch_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load optimizer/scheduler/RNG state safely (``weights_only=True``: no arbitrary pickles)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def temp_checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """A fresh ``.tmp-step-...`` directory (removing any left by a killed run)."""
    tmp = checkpoint_root(output_dir) / f".tmp-{step_dir_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish_checkpoint(tmp_dir: Path, output_dir: str | os.PathLike, step: int) -> Path:
    """Write the manifest of a complete temp checkpoint (its last file), rename the directory into
    ``step-...`` and point ``latest`` at it."""
    root = checkpoint_root(output_dir)
    final = publish_checkpoint_at(tmp_dir, root / step_dir_name(step))
    _write_bytes_atomic(root / LATEST_FILE, (final.name + "\n").encode())
    return final


def best_checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    """Where ``checkpoint.keep_best`` keeps the best checkpoint (outside ``checkpoints/``: never pruned)."""
    return Path(output_dir) / "best"


def publish_checkpoint_at(tmp_dir: Path, final: Path) -> Path:
    """Write the manifest of a complete temp checkpoint and rename it to ``final`` (replacing an
    earlier checkpoint there); ``latest`` is not touched (used for ``best/``)."""
    if not (tmp_dir / STATE_FILE).is_file():
        raise CheckpointError(f"{tmp_dir}: incomplete checkpoint (no {STATE_FILE})")
    write_manifest(tmp_dir)
    _fsync_dir(tmp_dir)
    if final.exists():
        # Re-saving a step (e.g. after resuming from it), or a new best: swap, then drop the old copy.
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp_dir, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final)
    _fsync_dir(final.parent)
    return final


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (with a state file), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and (entry / STATE_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def find_checkpoint(resume: str, output_dir: str | os.PathLike) -> Path | None:
    """Resolve ``checkpoint.resume``: ``auto`` (latest in output_dir, None if there is none), a
    checkpoint directory, or an output directory (its latest checkpoint)."""
    if resume == "auto":
        return _latest(output_dir)
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    if path.is_dir():
        latest = _latest(path)
        if latest is not None:
            return latest
    raise CheckpointError(f"checkpoint.resume: no checkpoint at {path}")


def _latest(output_dir: str | os.PathLike) -> Path | None:
    root = checkpoint_root(output_dir)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / STATE_FILE).is_file():
            return candidate
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def prune_checkpoints(output_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints; returns the deleted paths."""
    found = list_checkpoints(output_dir)
    doomed = found[:-keep_last] if keep_last > 0 else found
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def read_trainer_state(checkpoint: Path) -> dict:
    try:
        return json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{checkpoint}: cannot read {STATE_FILE} ({exc})") from exc


# ---------------------------------------------------------------------------------------------
# Manifest: size and sha256 of every file, verified before resuming.
# ---------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checkpoint_files(checkpoint: Path) -> list[Path]:
    return sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def write_manifest(checkpoint: Path) -> Path:
    """List every file of ``checkpoint`` (relative path, size, sha256) in ``manifest.json``; call it
    after everything else is written (it is the checkpoint's last file)."""
    files = {}
    for path in _checkpoint_files(checkpoint):
        files[path.relative_to(checkpoint).as_posix()] = {
            "size": path.stat().st_size,
            "sha256": _sha256(path),
        }
    path = checkpoint / MANIFEST_FILE
    write_json_atomic(path, {"version": 1, "files": files})
    return path


def verify_checkpoint(checkpoint: Path) -> str | None:
    """None when every file listed in the manifest is present with its size and checksum; otherwise
    what is wrong (``optimizer.pt: size 812 bytes, expected 1630``, ``missing manifest.json`` ...)."""
    try:
        manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"missing {MANIFEST_FILE} (an unfinished copy, or written before checkpoints had one)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST_FILE} unreadable ({type(exc).__name__}: {exc})"
    if STATE_FILE not in files:
        return f"{MANIFEST_FILE} does not list {STATE_FILE}"
    problems = []
    for name, expected in sorted(files.items()):
        path = checkpoint / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        if size != expected["size"]:
            problems.append(f"{name}: size {size} bytes, manifest says {expected['size']} (truncated?)")
        elif _sha256(path) != expected["sha256"]:
            problems.append(f"{name}: sha256 checksum mismatch (corrupted)")
    return "; ".join(problems) or None


def _resume_candidates(output_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints of ``output_dir``, the one ``latest`` names first, then newest to oldest."""
    found = list(reversed(list_checkpoints(output_dir)))
    root = checkpoint_root(output_dir)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if candidate in found:
            found.remove(candidate)
            found.insert(0, candidate)
    return found


def find_resume_checkpoint(resume: str, output_dir: str | os.PathLike) -> Path | None:
    """:func:`find_checkpoint`, verified: a checkpoint given by path must be intact; for ``auto`` or an
    output directory the newest intact checkpoint is chosen, with a warning naming each damaged one
    skipped. ``CheckpointError`` when none is intact (``auto`` with no checkpoint at all: None)."""
    path = Path(resume)
    if resume != "auto" and (path / STATE_FILE).is_file():
        problem = verify_checkpoint(path)
        if problem:
            raise CheckpointError(f"checkpoint.resume: {path} is damaged: {problem}")
        return path
    directory = output_dir if resume == "auto" else path
    candidates = _resume_candidates(directory)
    if not candidates:
        if resume == "auto":
            return None
        raise CheckpointError(f"checkpoint.resume: no checkpoint at {path}")
    damaged = []
    for candidate in candidates:
        problem = verify_checkpoint(candidate)
        if problem is None:
            return candidate
        logger.warning("checkpoint %s is damaged, skipping it: %s", candidate, problem)
        damaged.append(f"{candidate.name} ({problem})")
    raise CheckpointError(
        f"no intact checkpoint to resume from in {checkpoint_root(directory)}: " + "; ".join(damaged)
    )


# ---------------------------------------------------------------------------------------------
# RNG state (per rank).
# ---------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors/ints/lists (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["name"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / "rng" / f"rank-{rank:05d}.pt"


def save_rng_state(checkpoint: Path, rank: int) -> None:
    path = rng_file(checkpoint, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_torch_state(capture_rng_state(), path)


def load_rng_state(checkpoint: Path, rank: int) -> None:
    path = rng_file(checkpoint, rank)
    if not path.is_file():
        raise CheckpointError(
            f"{checkpoint}: no RNG state for rank {rank} (saved with a different world size?)"
        )
    restore_rng_state(load_torch_state(path))


# ---------------------------------------------------------------------------------------------
# DeepSpeed: its checkpoint engine, but loading with weights_only=True.
# ---------------------------------------------------------------------------------------------


def _deepspeed_safe_globals() -> list:
    """The few non-tensor classes DeepSpeed puts in its checkpoints, allowed for weights_only loads."""
    allowed: list = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        allowed += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed.append(fragment_address)
    except ImportError:
        pass
    return allowed


def make_safe_checkpoint_engine(config_params=None):
    """DeepSpeed's torch checkpoint engine with ``torch.load(weights_only=True)``."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return SafeTorchCheckpointEngine(config_params)
