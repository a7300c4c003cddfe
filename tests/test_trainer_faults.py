"""Faults users meet: Ctrl-C, damaged checkpoints, two runs in one directory, a changed config on
resume, disk full / unusable paths / missing CUDA, max_steps beyond the epochs, and the final summary.

Runs that must behave like the real command go through ``python -m synpo train`` in a subprocess;
resumed runs are compared bit-for-bit with uninterrupted ones (fp32, CPU), as in test_trainer_resume.
"""

from __future__ import annotations

import copy
import errno
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from tiny_training import CHILD_ENV, RESUMABLE_RUN, assert_same_weights, tiny_training_config, without_timing

from synpo import checkpoint as ckpt
from synpo.config import ConfigError
from synpo.run_lock import RunDirLock, RunLockError
from synpo.trainer import Trainer, linear_warmup_schedule

# One torch thread, as the subprocesses get with OMP_NUM_THREADS=1 (conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]


def config_for(output_dir, **train) -> dict:
    """test_trainer_resume's run (8 steps, LoRA dropout, checkpoints every 2), ``train`` changed."""
    return tiny_training_config(output_dir, RESUMABLE_RUN, train=train)


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def synpo_train(*args: str) -> list[str]:
    return [sys.executable, "-m", "synpo", "train", *map(str, args)]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        synpo_train(*args), capture_output=True, text=True, timeout=timeout, env=CHILD_ENV, cwd=REPO
    )


def wait_for(predicate, timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def metric_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def error_lines(stderr: str) -> list[str]:
    """stderr without the log lines (``HH:MM:SS LEVEL name: ...``)."""
    return [
        line
        for line in stderr.splitlines()
        if line.strip() and not (len(line) > 8 and line[2] == ":" and line[5] == ":" and line[8] == " ")
    ]


# ---------------------------------------------------------------------------------------------
# 1. Ctrl-C saves like SIGTERM, exits 130; a second Ctrl-C while saving aborts cleanly.
# ---------------------------------------------------------------------------------------------


def test_ctrl_c_saves_exits_130_and_resume_equals_uninterrupted(tmp_path):
    total = 24  # 2.4 epochs of 10 steps: the interrupted run also resumes across an epoch boundary
    run_dir = tmp_path / "interrupted"
    config = config_for(run_dir, max_steps=total)
    config["checkpoint"]["save_every"] = 0  # the only checkpoint before the end is Ctrl-C's
    path = write_config(tmp_path / "cfg.yaml", config)

    child = subprocess.Popen(
        synpo_train("--config", path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
    )
    try:
        wait_for(lambda: len(metric_rows(run_dir / "metrics.jsonl")) >= 3, what="3 logged steps")
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 130, err[-3000:]
    assert "SIGINT: saved" in err and "Traceback" not in err, err[-3000:]
    saved = ckpt.find_checkpoint("auto", run_dir)
    step = int(saved.name.split("-")[1])
    assert 3 <= step < total and ckpt.verify_checkpoint(saved) is None
    assert f"stopped by SIGINT at step {step}/{total}" in out
    assert not (run_dir / "final").exists()

    resumed = run_cli("--config", path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"finished at step {total}/{total}" in resumed.stdout
    # 7. The summary says how to read the loss.
    assert "loss (SynPO): lower is better; bounded in [-1-beta, 0] = [-1.2, 0] (beta 0.2)" in resumed.stdout

    reference = Trainer(config_for(tmp_path / "reference", max_steps=total)).train()
    final = ckpt.checkpoint_root(run_dir) / ckpt.step_dir_name(total)
    assert_same_weights(final, reference.last_checkpoint)
    logged = metric_rows(run_dir / "metrics.jsonl")
    assert [row["step"] for row in logged] == list(range(1, total + 1))
    assert without_timing(logged) == without_timing(reference.history)


# Ctrl-C after optimizer step 3, and again while the step-3 checkpoint is being written.
DOUBLE_CTRL_C = textwrap.dedent(
    """
    import os, signal, sys
    from synpo.cli import main
    from synpo.trainer import Trainer
    from tiny_training import call_after_optimizer_step, call_while_saving

    call_after_optimizer_step(Trainer, 3, lambda: os.kill(os.getpid(), signal.SIGINT))
    call_while_saving(3, lambda: os.kill(os.getpid(), signal.SIGINT))
    sys.exit(main(["train", "--config", sys.argv[1]]))
    """
)


def test_second_ctrl_c_while_saving_keeps_the_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    path = write_config(tmp_path / "cfg.yaml", config_for(run_dir))  # saves every 2 steps
    script = tmp_path / "child.py"
    script.write_text(DOUBLE_CTRL_C)
    child = subprocess.run(
        [sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=300, env=CHILD_ENV
    )
    assert child.returncode == 130, child.stderr[-3000:]
    assert error_lines(child.stderr)[-2:] == [
        "synpo train: interrupted without saving; the last complete checkpoint, if any, is intact",
        f"  resume: synpo train --config {path} --resume",
    ], child.stderr[-3000:]
    root = ckpt.checkpoint_root(run_dir)
    assert not list(root.glob(".tmp-*"))
    latest = ckpt.find_resume_checkpoint("auto", run_dir)
    assert latest.name == "step-00000002" and ckpt.verify_checkpoint(latest) is None


# ---------------------------------------------------------------------------------------------
# 2. A damaged newest checkpoint: resume falls back to the newest intact one.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, one_torch_thread):
    """An uninterrupted 8-step run (checkpoints 4, 6, 8) and a copy of its output directory as it
    was after step 6 (checkpoints 4 and 6, ``latest`` -> 6)."""
    base = tmp_path_factory.mktemp("faults")
    reference = Trainer(config_for(base / "reference")).train()
    at_six = base / "at-step-6"
    shutil.copytree(base / "reference", at_six)
    shutil.rmtree(ckpt.checkpoint_root(at_six) / "step-00000008")
    shutil.rmtree(at_six / "final")
    (ckpt.checkpoint_root(at_six) / "latest").write_text("step-00000006\n")
    return reference, at_six


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # flip the bits of one byte in the middle (sizes stay the same)
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])


@pytest.mark.parametrize(
    "name, how",
    [
        (name, how)
        for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng/rank-00000.pt")
        for how in ("truncate", "flip")
    ]
    + [("manifest.json", "delete")],
)
def test_resume_falls_back_from_a_damaged_checkpoint(tmp_path, uninterrupted, caplog, name, how):
    reference, at_six = uninterrupted
    run_dir = tmp_path / "run"
    shutil.copytree(at_six, run_dir)
    newest = ckpt.checkpoint_root(run_dir) / "step-00000006"
    if how == "delete":
        (newest / name).unlink()
    else:
        damage(newest / name, how)
    problem = ckpt.verify_checkpoint(newest)
    expected = {"truncate": "size", "flip": "sha256 checksum mismatch", "delete": "missing manifest.json"}[
        how
    ]
    assert problem is not None and expected in problem
    if how != "delete":
        assert problem.startswith(f"{name}: ")

    resumed = Trainer(config_for(run_dir), overrides={"checkpoint.resume": "auto"}).train()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("step-00000006 is damaged" in w and expected in w for w in warnings), warnings
    assert resumed.history[0]["step"] == 5 and resumed.global_step == 8  # resumed from step 4
    assert_same_weights(resumed.last_checkpoint, reference.last_checkpoint)
    logged = metric_rows(resumed.metrics_file)
    assert without_timing(logged) == without_timing(reference.history)
    assert ckpt.verify_checkpoint(newest) is None  # step 6 was written again, intact


def test_resume_with_no_intact_checkpoint_is_one_error_line(tmp_path, uninterrupted, capsys):
    from synpo.cli import main

    _, at_six = uninterrupted
    run_dir = tmp_path / "run"
    shutil.copytree(at_six, run_dir)
    for checkpoint in ckpt.list_checkpoints(run_dir):
        damage(checkpoint / "optimizer.pt", "truncate")
    path = write_config(tmp_path / "cfg.yaml", config_for(run_dir))
    assert main(["train", "--config", str(path), "--resume"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("synpo train: no intact checkpoint to resume from")
    assert "step-00000006 (optimizer.pt: size" in lines[0] and "step-00000004 (optimizer.pt" in lines[0]


def test_manifest_lists_every_file_and_an_explicit_damaged_checkpoint_is_refused(tmp_path):
    tmp = ckpt.temp_checkpoint_dir(tmp_path, 2)
    ckpt.save_torch_state({"w": torch.ones(3)}, tmp / "optimizer.pt")
    ckpt.save_rng_state(tmp, 0)
    ckpt.write_json_atomic(tmp / ckpt.STATE_FILE, {"step": 2})
    final = ckpt.publish_checkpoint(tmp, tmp_path, 2)
    manifest = json.loads((final / ckpt.MANIFEST_FILE).read_text())
    assert sorted(manifest["files"]) == ["optimizer.pt", "rng/rank-00000.pt", ckpt.STATE_FILE]
    assert ckpt.find_resume_checkpoint(str(final), tmp_path) == final
    (final / "rng" / "rank-00000.pt").unlink()
    assert ckpt.verify_checkpoint(final) == "rng/rank-00000.pt: missing"
    with pytest.raises(ckpt.CheckpointError, match=r"is damaged: rng/rank-00000.pt: missing"):
        ckpt.find_resume_checkpoint(str(final), tmp_path)


# ---------------------------------------------------------------------------------------------
# 3. One run per output directory.
# ---------------------------------------------------------------------------------------------


def test_run_dir_lock_refuses_a_second_holder_and_is_free_once_released(tmp_path):
    (tmp_path / ".lock").write_text('{"pid": 999999999, "host": "gone", "started": "long ago"}\n')
    first = RunDirLock(tmp_path).acquire()  # a stale lock file of a dead process is simply taken over
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    with pytest.raises(RunLockError, match=rf"in use by another run \(pid {os.getpid()} on host "):
        RunDirLock(tmp_path).acquire()
    first.release()
    with RunDirLock(tmp_path) as again:
        assert again.held


def test_second_run_into_a_busy_output_dir_is_refused_until_the_first_dies(tmp_path):
    run_dir = tmp_path / "run"
    long_run = config_for(run_dir, max_steps=100000)
    long_run["checkpoint"]["save_every"] = 0
    path = write_config(tmp_path / "long.yaml", long_run)
    first = subprocess.Popen(
        synpo_train("--config", path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=CHILD_ENV
    )
    try:
        wait_for(lambda: len(metric_rows(run_dir / "metrics.jsonl")) >= 1, what="the first run to train")
        second = run_cli("--config", path)
        assert second.returncode == 2, second.stderr[-3000:]
        lines = error_lines(second.stderr)
        assert len(lines) == 1 and f"is in use by another run (pid {first.pid} on host" in lines[0], lines
        assert "model tiny" not in second.stderr  # refused before loading the model
    finally:
        first.kill()  # SIGKILL: the lock goes with the process
        first.wait(timeout=60)
        first.stderr.close()
    third = run_cli("--config", path, "--train.max_steps", "2", "--checkpoint.overwrite", "true")
    assert third.returncode == 0, third.stderr[-3000:]
    assert "finished at step 2/2" in third.stdout


# ---------------------------------------------------------------------------------------------
# 4. A changed config on resume: refused with a diff unless allowed; extending the run is fine.
# ---------------------------------------------------------------------------------------------


def test_resume_refuses_config_changes_unless_allowed(tmp_path, capsys):
    from synpo.cli import main

    config = config_for(tmp_path / "run", max_steps=4)
    Trainer(config).train()
    changed = {"checkpoint.resume": "auto", "optim.lr": 2e-2, "train.seed": 6}
    with pytest.raises(ckpt.CheckpointError) as info:
        Trainer(config, overrides=changed).train()
    message = str(info.value)
    assert "optim.lr: 0.01 -> 0.02; train.seed: 5 -> 6" in message
    assert "--resume-allow-changes optim.lr,train.seed" in message
    with pytest.raises(ckpt.CheckpointError, match=r"train\.max_steps: 4 -> 3"):  # shortening needs the flag
        Trainer(config, overrides={"checkpoint.resume": "auto", "train.max_steps": 3}).train()
    with pytest.raises(ConfigError, match=r"'optim\.lrr' is not a config key; did you mean 'optim\.lr'"):
        Trainer(config, overrides={**changed, "checkpoint.resume_allow_changes": ["optim.lrr"]}).train()

    path = write_config(tmp_path / "cfg.yaml", config)
    assert main(["train", "--config", str(path), "--resume", "--optim.lr", "0.02"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "the config differs from the checkpoint's: optim.lr: 0.01 -> 0.02." in lines[0]

    # Allowed: the new lr is used (not the checkpoint's), and the run is extended to 6 steps.
    args = ["--resume", "--optim.lr", "0.02", "--resume-allow-changes", "optim.lr", "--train.max_steps", "6"]
    assert main(["train", "--config", str(path), *args]) == 0
    rows = metric_rows(tmp_path / "run" / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, 7))
    # The old schedule (4 steps, warmup 2) ended at lr 0.01 * 0.5 on step 4; from the finished run the
    # decay continues from that factor: 0.5 and 0.25 of the new lr.
    assert rows[3]["lr"] == pytest.approx(0.005)
    assert [rows[4]["lr"], rows[5]["lr"]] == pytest.approx([0.01, 0.005])


def test_extending_max_steps_on_resume_keeps_the_lr_continuous(tmp_path, caplog):
    original = config_for(tmp_path / "a", max_steps=8)
    original["checkpoint"]["keep_last"] = 10
    first = Trainer(original).train()
    lr = {row["step"]: row["lr"] for row in first.history}

    extended = config_for(tmp_path / "b", max_steps=16)
    extended["checkpoint"].update(keep_last=10, resume=str(tmp_path / "a" / "checkpoints" / "step-00000004"))
    second = Trainer(extended).train()
    assert "resuming with config changes: train.max_steps: 8 -> 16" in caplog.text
    new_lr = {row["step"]: row["lr"] for row in second.history}
    assert sorted(new_lr) == list(range(5, 17))
    # No jump: step 5 runs at the LR the 8-step schedule gave it, then a linear decay that would reach
    # 0 after step 16.
    assert new_lr[5] == lr[5] and new_lr[5] < lr[4]
    for step in range(5, 17):
        assert new_lr[step] == pytest.approx(lr[5] * (17 - step) / 12, rel=1e-12)
    assert all(new_lr[s + 1] < new_lr[s] for s in range(5, 16)) and new_lr[16] > 0

    # The re-anchored schedule is saved: resuming the extended run again continues it exactly.
    again = copy.deepcopy(extended)
    again["checkpoint"].update(
        output_dir=str(tmp_path / "c"), resume=str(tmp_path / "b" / "checkpoints" / "step-00000010")
    )
    third = Trainer(again).train()
    assert without_timing(third.history) == without_timing(second.history[6:])
    assert_same_weights(third.last_checkpoint, second.last_checkpoint)


def test_extended_schedule_from_a_finished_run_continues_from_its_last_lr():
    from synpo.trainer import continued_decay_start, lr_factor

    old = {"total_steps": 8, "warmup_steps": 2, "schedule": "linear", "decay_start": None}
    before = lr_factor(**old)
    # In warmup: only the end point moves.
    assert continued_decay_start(old, 1) is None
    # Mid-decay: the factor of the step about to be taken is kept.
    start = continued_decay_start(old, 5)
    assert start == [5, before(5)] and lr_factor(**{**old, "total_steps": 20, "decay_start": start})(
        5
    ) == before(5)
    # At the old end (factor 0): continue from the last step's factor.
    start = continued_decay_start(old, 8)
    after = lr_factor(**{**old, "total_steps": 12, "decay_start": start})
    assert after(8) == before(7) > 0 and after(11) > 0 and after(12) == 0


# ---------------------------------------------------------------------------------------------
# 5. Disk full, unusable output dir, bad model path, CUDA missing: one line, exit 2.
# ---------------------------------------------------------------------------------------------


def test_disk_full_while_saving_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    from synpo.cli import main

    run_dir = tmp_path / "run"
    path = write_config(tmp_path / "cfg.yaml", config_for(run_dir))
    real_save = ckpt.save_torch_state

    def save_or_fail(obj, target):
        if target.parent.name == ".tmp-step-00000004" and target.name == "optimizer.pt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
        real_save(obj, target)

    monkeypatch.setattr(ckpt, "save_torch_state", save_or_fail)
    assert main(["train", "--config", str(path)]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert lines[0].startswith("synpo train: cannot save the step-4 checkpoint in ")
    assert "No space left on device" in lines[0] and "step-00000002 is intact" in lines[0]
    root = ckpt.checkpoint_root(run_dir)
    assert not list(root.glob(".tmp-*")) and not list(root.glob(".*.tmp-*"))
    previous = ckpt.find_resume_checkpoint("auto", run_dir)
    assert previous.name == "step-00000002" and ckpt.verify_checkpoint(previous) is None
    RunDirLock(run_dir).acquire().release()  # the failed run released its lock

    monkeypatch.setattr(ckpt, "save_torch_state", real_save)  # space again: the run resumes
    assert Trainer(config_for(run_dir), overrides={"checkpoint.resume": "auto"}).train().global_step == 8


CUDA_MISSING = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
UNDER_A_FILE = "checkpoint.output_dir: cannot create or write {tmp}/file/sub: Not a directory"
NO_MODEL = "model.name_or_path: {tmp}/no-such-model: no such directory"
NO_CUDA = "train.device: 'cuda' asked for, but CUDA is not available"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint.output_dir", "{tmp}/file/sub"], UNDER_A_FILE),
        (["--model.name_or_path", "{tmp}/no-such-model"], NO_MODEL),
        pytest.param(["--train.device", "cuda"], NO_CUDA, marks=CUDA_MISSING),
    ],
    ids=["output-dir-under-a-file", "missing-model", "cuda-without-cuda"],
)  # fmt: skip
def test_unusable_paths_and_devices_are_one_line_exit_2(tmp_path, args, message):
    (tmp_path / "file").write_text("a regular file, not a directory\n")
    path = write_config(tmp_path / "cfg.yaml", config_for(tmp_path / "run"))
    result = run_cli("--config", path, *[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 2, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[0].startswith("synpo train: " + message.format(tmp=tmp_path)), lines


# ---------------------------------------------------------------------------------------------
# 6. max_steps overrides epochs; warmup starts above 0.
# ---------------------------------------------------------------------------------------------


def test_max_steps_overrides_epochs_and_warmup_starts_above_zero(tmp_path, caplog):
    config = config_for(tmp_path / "run", epochs=1, max_steps=25)  # 10 steps per epoch
    config["optim"] = {"lr": 1e-2, "warmup_steps": 3}
    config["checkpoint"]["save_every"] = 0
    with caplog.at_level("INFO", logger="synpo.train"):
        result = Trainer(config).train()
    assert (
        "will run 25 optimizer steps (train.max_steps; it overrides train.epochs 1): 2.5 epochs"
        in caplog.text
    )
    assert result.global_step == result.total_steps == 25
    rows = metric_rows(result.metrics_file)
    assert [row["step"] for row in rows] == list(range(1, 26))
    assert [row["epoch"] for row in rows] == [0] * 10 + [1] * 10 + [2] * 5
    lrs = [row["lr"] for row in rows]
    assert 0 < lrs[0] < lrs[1] < lrs[2] == 1e-2 == max(lrs)  # warmup: above 0, rising to the peak
    assert lrs[0] == pytest.approx(1e-2 / 3)
    assert all(b < a for a, b in itertools.pairwise(lrs[3:])) and lrs[-1] > 0


def test_warmup_schedule_first_step_is_not_zero():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = linear_warmup_schedule(optimizer, total_steps=6, warmup_steps=4)
    seen = []
    for _ in range(6):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 0.5])


# ---------------------------------------------------------------------------------------------
# 7. What the loss means, in the final summary.
# ---------------------------------------------------------------------------------------------


def test_loss_meaning_line():
    from synpo.train_cli import loss_meaning

    assert loss_meaning("synpo", {"beta": 0.3}) == (
        "loss (SynPO): lower is better; bounded in [-1-beta, 0] = [-1.3, 0] (beta 0.3)"
    )
    assert "[-1.2, 0]" in loss_meaning("synpo", {})
    assert loss_meaning("dpo", {}).startswith("loss (DPO): lower is better; >= 0")
    for name in ("ipo", "simpo", "cpo", "orpo"):
        assert "lower is better" in loss_meaning(name, {})
