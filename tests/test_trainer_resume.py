"""Faults: SIGTERM saves and exits cleanly; SIGKILL (even in the middle of writing a checkpoint) and
``--resume`` reach bit-for-bit the state of an uninterrupted run (fp32, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from synpo import checkpoint as ckpt
from synpo.trainer import Trainer

# Runs the trainer in a child process and interrupts it from inside at a precise point:
#   sigterm: SIGTERM to itself right after optimizer step 3 (the trainer must finish that step, save, exit 0);
#   sigkill: SIGKILL to itself while writing the step-6 checkpoint (optimizer.pt written, not published).
CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    from synpo import checkpoint as ckpt
    from synpo.trainer import Trainer

    config, mode = json.loads(sys.argv[1]), sys.argv[2]
    trainer = Trainer(config)
    if mode == "sigterm":
        real_step = trainer._optimizer_step
        done = [0]
        def step_then_sigterm(counters):
            norm = real_step(counters)
            done[0] += 1
            if done[0] == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return norm
        trainer._optimizer_step = step_then_sigterm
    elif mode == "sigkill":
        real_save = ckpt.save_torch_state
        def save_then_sigkill(obj, path):
            real_save(obj, path)
            if path.name == "optimizer.pt" and path.parent.name == ".tmp-step-00000006":
                os.kill(os.getpid(), signal.SIGKILL)
        ckpt.save_torch_state = save_then_sigkill
    result = trainer.train()
    print("RESULT " + json.dumps({"step": result.global_step, "interrupted": result.interrupted}))
    """
)

TIMING_KEYS = {"tokens_per_s", "step_time_s", "peak_memory_mb"}


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    # Tiny models run fastest on one thread, and on a busy CI machine multi-threaded tiny ops
    # oversubscribe the cores (4x slower measured); the subprocesses below get OMP_NUM_THREADS=1.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_config(output_dir) -> dict:
    return {
        "model": {"tiny": {"hidden_size": 32, "layers": 2, "heads": 2}},
        # LoRA with dropout: the resumed run must restore the RNG to draw the same dropout masks.
        "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
        "data": {"max_length": 256},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "train": {
            "epochs": 1,
            "max_steps": 8,
            "micro_batch_size": 2,
            "gradient_accumulation_steps": 2,
            "seed": 5,
        },
        "checkpoint": {"output_dir": str(output_dir), "save_every": 2, "keep_last": 3},
        "logging": {"progress_bar": False},
    }


def run_child(tmp_path, config, mode, *, resume=None):
    if resume:
        config = {**config, "checkpoint": {**config["checkpoint"], "resume": resume}}
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(script), json.dumps(config), mode],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def comparable(rows):
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


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

    ours = load_file(str(resumed.last_checkpoint / "model.safetensors"))
    theirs = load_file(str(reference.last_checkpoint / "model.safetensors"))
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
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
    assert comparable(logged) == comparable(reference.history)


def test_resume_refuses_a_different_batch_layout(tmp_path):
    config = make_config(tmp_path / "run")
    config["train"]["max_steps"] = 2
    Trainer(config).train()
    config["train"]["gradient_accumulation_steps"] = 1
    with pytest.raises(ckpt.CheckpointError, match="pairs per optimizer step 4 -> 2"):
        Trainer(config, overrides={"checkpoint.resume": "auto"}).train()
