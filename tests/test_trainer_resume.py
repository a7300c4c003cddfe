"""Faults: SIGTERM saves and exits cleanly; SIGKILL (even in the middle of writing a checkpoint) and
``--resume`` reach bit-for-bit the state of an uninterrupted run (fp32, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_training import (
    CHILD_ENV,
    RESUMABLE_RUN,
    assert_same_weights,
    tiny_training_config,
    without_timing,
)

from synpo import checkpoint as ckpt
from synpo.trainer import Trainer

# Runs the trainer in a child process and interrupts it from inside at a precise point:
#   sigterm: SIGTERM to itself right after optimizer step 3 (the trainer must finish that step, save, exit 0);
#   sigkill: SIGKILL to itself while writing the step-6 checkpoint (optimizer.pt written, not published).
CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    from synpo.trainer import Trainer
    from tiny_training import call_after_optimizer_step, call_while_saving

    config, mode = json.loads(sys.argv[1]), sys.argv[2]
    trainer = Trainer(config)
    if mode == "sigterm":
        call_after_optimizer_step(trainer, 3, lambda: os.kill(os.getpid(), signal.SIGTERM))
    elif mode == "sigkill":
        call_while_saving(6, lambda: os.kill(os.getpid(), signal.SIGKILL))
    result = trainer.train()
    print("RESULT " + json.dumps({"step": result.global_step, "interrupted": result.interrupted}))
    """
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_config(output_dir) -> dict:
    return tiny_training_config(output_dir, RESUMABLE_RUN)


def run_child(tmp_path, config, mode, *, resume=None):
    if resume:
        config = {**config, "checkpoint": {**config["checkpoint"], "resume": resume}}
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return subprocess.run(
        [sys.executable, str(script), json.dumps(config), mode],
        capture_output=True, text=True, timeout=300, env=CHILD_ENV,
    )  # fmt: skip


@pytest.mark.slow
def test_sigterm_then_sigkill_then_resume_equals_uninterrupted(tmp_path):
    reference = Trainer(make_config(tmp_path / "reference")).train()
    assert reference.global_step == 8

    interrupted_dir = tmp_path / "interrupted"
    config = make_config(interrupted_dir)
    # 1. SIGTERM after step 3: the child saves a checkpoint at step 3 and exits cleanly.
    first = run_child(tmp_path, config, "sigterm")
    assert first.returncode == 0, first.stderr[-3000:]
    assert 'RESULT {"step": 3, "interrupted": true}' in first.stdout
    assert "SIGTERM: saved" in first.stderr
    assert ckpt.find_checkpoint("auto", interrupted_dir).name == "step-00000003"
    assert not (interrupted_dir / "final").exists()

    # 2. Resume; SIGKILL while writing the step-6 checkpoint (steps 5-6 are lost, step 6 is partial).
    second = run_child(tmp_path, config, "sigkill", resume="auto")
    assert second.returncode == -9, second.stderr[-3000:]
    root = ckpt.checkpoint_root(interrupted_dir)
    assert (root / ".tmp-step-00000006" / "optimizer.pt").is_file()
    assert ckpt.find_checkpoint("auto", interrupted_dir).name == "step-00000004"

    # 3. Resume in this process from the last complete checkpoint and finish.
    resumed = Trainer(make_config(interrupted_dir), overrides={"checkpoint.resume": "auto"}).train()
    assert resumed.global_step == 8 and resumed.history[0]["step"] == 5

    assert_same_weights(resumed.last_checkpoint, reference.last_checkpoint)
    ours_opt = ckpt.load_torch_state(resumed.last_checkpoint / "optimizer.pt")
    theirs_opt = ckpt.load_torch_state(reference.last_checkpoint / "optimizer.pt")
    for index, state in theirs_opt["state"].items():
        for key, value in state.items():
            assert torch.equal(ours_opt["state"][index][key], value), (index, key)
    assert ckpt.load_torch_state(resumed.last_checkpoint / "scheduler.pt") == ckpt.load_torch_state(
        reference.last_checkpoint / "scheduler.pt"
    )
    # The metrics log of the interrupted run, rows past each restart point dropped, equals the
    # uninterrupted one exactly (losses, log-probs, grad norms, lr; not timings).
    logged = [json.loads(line) for line in resumed.metrics_file.read_text().splitlines()]
    assert [row["step"] for row in logged] == list(range(1, 9))
    assert without_timing(logged) == without_timing(reference.history)


def test_resume_refuses_a_different_batch_layout(tmp_path):
    config = make_config(tmp_path / "run")
    config["train"]["max_steps"] = 2
    Trainer(config).train()
    config["train"]["gradient_accumulation_steps"] = 1
    with pytest.raises(ckpt.CheckpointError, match="pairs per optimizer step 4 -> 2"):
        Trainer(config, overrides={"checkpoint.resume": "auto"}).train()
