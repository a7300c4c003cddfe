"""The TRL trainer at scale: 2 CPU ranks over gloo equal one process with the same global batch.

Each case launches an example with a command of docs/training.md ("Launching at scale"): torchrun
(one node, or two nodes of one process), the deepspeed launcher or ``accelerate launch``, through
``tests/cpu_launch.py`` (which only makes CPU runs take the paths GPU runs take). It compares rank 0's
logged rows step by step with a single process whose per-device batch is the global one: the loss
(rel <= 1e-4), the gradient norm and TRL's preference metrics, and the saved model where the engine
writes one; and it checks that the engine really wrapped the model.

- ``synpo.integrations.trl.SynPOTrainer`` (``examples/trl_dpo_trainer.py --full``): DDP, DeepSpeed
  ZeRO-2, ZeRO-3 (``--deepspeed``, where the fused loss reads the partitioned ``lm_head.weight``
  inside the objective's forward, and an accelerate config file), FSDP2 (transformers' default
  ``--fsdp``). FSDP1 is not run: torch refuses it on CPU ("FSDP needs a non-CPU accelerator device").
- ``examples/hf_trainer.py`` (the fused loss in a plain ``transformers.Trainer``) under ZeRO-3.

The TRL runs share each pair's prompt (``prefix_sharing="auto"`` turns it on for the example's pairs:
every rank logs ``prefix_sharing/unshared_pairs`` = 0); ``ddp-rows`` turns it off on the two ranks, so the
unshared rows under DDP are checked against the shared single process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_training import CHILD_ENV, free_port, load_example

pytest.importorskip(
    "trl", reason="TRL is an optional peer (from the clone: pip install --no-build-isolation '.[trl]')"
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3  # 8 pairs, 4 per optimizer step: the third step starts the reshuffled second epoch
# Compared per step: the loss, the gradient norm and TRL's metrics (gathered over the ranks; the
# hf_trainer example logs its rank's own statistics, which cover half the pairs).
TRL_KEYS = ("loss", "grad_norm", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/margins")
UNSHARED = "prefix_sharing/unshared_pairs"  # logged by SynPOTrainer while prefix sharing is on
HF_KEYS = ("loss", "grad_norm")

# The launchers of docs/training.md, for 2 processes on this machine; "torchrun-2-nodes" is the
# multi-node command, two nodes of one process each (both on localhost).
LAUNCHERS = {
    "torchrun": "torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1",
    "torchrun-2-nodes": "torch.distributed.run --nnodes 2 --nproc_per_node 1 --master_addr 127.0.0.1",
    "deepspeed": "deepspeed.launcher.runner --num_accelerators 2",
    "accelerate": "accelerate.commands.launch --config_file examples/accelerate_zero3.yaml --num_processes 2",
}
ZERO2 = ["--deepspeed", "synpo/configs/zero2.json"]
ZERO3 = ["--deepspeed", "synpo/configs/zero3.json"]
ZERO = "DeepSpeedEngine"

# name: (example, launcher, extra flags, expected distribution, saves a save_pretrained directory)
CASES = {
    "ddp": ("trl", "torchrun", [], {"type": "MULTI_CPU", "wrapper": "DistributedDataParallel"}, True),
    "ddp-rows": (
        "trl",
        "torchrun",
        ["--prefix_sharing", "False"],
        {"type": "MULTI_CPU", "wrapper": "DistributedDataParallel"},
        True,
    ),
    "zero2": ("trl", "deepspeed", ZERO2, {"wrapper": ZERO, "zero_stage": 2}, True),
    # zero3.json leaves the weights partitioned at save (stage3_gather_16bit_weights_on_model_save).
    "zero3": ("trl", "torchrun-2-nodes", ZERO3, {"wrapper": ZERO, "zero_stage": 3}, False),
    "zero3-accelerate": ("trl", "accelerate", [], {"wrapper": ZERO, "zero_stage": 3}, True),
    "fsdp2": (
        "trl",
        "torchrun",
        ["--fsdp", "full_shard auto_wrap"],
        {"wrapper": "FSDPTrainerObjective", "fsdp_version": 2},  # fully_shard's class for the objective
        True,
    ),
    "hf-zero3": ("hf", "torchrun", ZERO3, {"wrapper": ZERO, "zero_stage": 3}, False),
}


def script_args(example: str, out: Path, save: bool) -> list[str]:
    """The example's command line (both runs); ``--per_device_train_batch_size`` is added for one process.

    A vocabulary of 4096 makes the lm_head (131k elements) a partitioned parameter under ZeRO-3: below
    ``stage3_param_persistence_threshold`` (1e5 elements) DeepSpeed keeps a parameter whole, and the
    fused loss would read it without the gathering under test.
    """
    common = ["--steps", str(STEPS), "--vocab-size", "4096"]
    if example == "trl":
        args = ["examples/trl_dpo_trainer.py", "--full", *common]
        return args + (["--save", str(out / "model")] if save else [])
    return ["examples/hf_trainer.py", *common]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The one-process run of each example with the global batch (4 pairs), in this process; cached."""
    runs = {}

    def run(example: str) -> dict:
        if example not in runs:
            out = tmp_path_factory.mktemp(f"single-{example}")
            module = load_example("trl_dpo_trainer" if example == "trl" else "hf_trainer")
            history = out / "history.json"
            args = script_args(example, out, save=True)[1:]
            module.main([*args, "--history", str(history), "--per_device_train_batch_size", "4"])
            runs[example] = {"history": json.loads(history.read_text()), "dir": out}
        return runs[example]

    return run


def launch(launcher: str, args: list[str], out: Path) -> dict:
    """Run ``args`` (an example's command line) on 2 processes; rank 0's ``--history``."""
    port = ["--main_process_port" if launcher == "accelerate" else "--master_port", str(free_port())]
    command = [sys.executable, "-m", *LAUNCHERS[launcher].split(), *port]
    nodes = [["--node_rank", "0"], ["--node_rank", "1"]] if launcher == "torchrun-2-nodes" else [[]]
    script = ["tests/cpu_launch.py", *args, "--history", str(out / "history.json")]
    env = {**CHILD_ENV, "DS_ACCELERATOR": "cpu"}
    running = [
        subprocess.Popen(
            [*command, *node, *script], cwd=ROOT, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        for node in nodes
    ]  # fmt: skip
    try:
        for process in running:
            output, _ = process.communicate(timeout=600)
            assert process.returncode == 0, output[-6000:]
    finally:
        for process in running:  # a node left waiting for a failed peer
            process.kill()
    return json.loads((out / "history.json").read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_process(tmp_path, single_process, case):
    example, launcher, flags, expected, saves = CASES[case]
    if "zero" in case:
        pytest.importorskip("deepspeed")
    reference = single_process(example)
    ran = launch(launcher, script_args(example, tmp_path, saves) + flags, tmp_path)

    assert ran["distribution"]["processes"] == 2
    assert ran["distribution"].items() >= expected.items(), ran["distribution"]
    rows, ref_rows = ran["rows"], reference["history"]["rows"]
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == list(range(1, STEPS + 1))
    keys = TRL_KEYS if example == "trl" else HF_KEYS
    for row, ref in zip(rows, ref_rows):
        for key in keys:
            assert row[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (row["step"], key)
    assert len({r["loss"] for r in rows}) == STEPS  # the model trained: a different loss each step
    if example == "trl":  # prefix sharing on (auto) in both runs, but for the case that turns it off
        assert all(r[UNSHARED] == 0 for r in ref_rows)
        sharing = "--prefix_sharing" not in flags
        assert all((r[UNSHARED] == 0) if sharing else (UNSHARED not in r) for r in rows)

    if saves:  # the trained policy as save_pretrained writes it (gathered from the shards)
        theirs = load_file(str(tmp_path / "model" / "model.safetensors"))
        ours = load_file(str(reference["dir"] / "model" / "model.safetensors"))
        assert theirs.keys() == ours.keys()
        for name, tensor in ours.items():
            torch.testing.assert_close(theirs[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
