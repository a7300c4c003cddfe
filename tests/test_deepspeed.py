"""DeepSpeed on CPU: 2 ranks over gloo, launched with torchrun through the ``synpo train`` CLI.

ZeRO-2 and ZeRO-3 (where ``lm_head.weight`` is partitioned and the fused loss reads it inside
``PreferenceObjective.forward``) must give the losses of the single-process run with the same
global batch; DPO with a LoRA-disabled reference under ZeRO-3 as well, and a resumed ZeRO-3 run
must continue exactly (DeepSpeed's checkpoint loaded with ``weights_only=True``).

Prefix sharing (``data.prefix_sharing``; ``auto`` turns it on for the bundled sample): the ZeRO-2/3
ranks share each pair's prompt and the single process does not, and the other way round for tied
embeddings, so that both ways run under ZeRO-3; the other tests run ``auto`` (on), checked in the log.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny_training import (
    CHILD_ENV,
    TINY_MODEL,
    free_port,
    generic_sample_lines,
    tiny_training_config,
    write_lines,
)

from synpo.trainer import Trainer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

COMPARED = ("loss", "chosen_logps", "rejected_logps", "reward_margin", "chosen_mean_prob", "grad_norm", "lr")


def config(output_dir, *, accumulation: int, **sections) -> dict:
    return tiny_training_config(
        output_dir,
        {
            "optim": {"lr": 5e-3, "warmup_ratio": 0.0},
            "train": {
                "epochs": 1,
                "max_steps": 3,
                "micro_batch_size": 1,
                "gradient_accumulation_steps": accumulation,
            },
            "checkpoint": {"save_every": 2},
        },
        sections,
    )


def launch(tmp_path, cfg: dict, ds_config: dict, *extra: str, script: str | None = None) -> list[dict]:
    """Run ``synpo train`` (or ``script``) on 2 ranks with torchrun; returns rank 0's metrics rows.
    The launch's output (rank 0's log) is left in ``tmp_path / "launch.log"``."""
    (tmp_path / "ds.json").write_text(json.dumps(ds_config))
    cfg = {**cfg, "deepspeed": str(tmp_path / "ds.json")}
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(json.dumps(cfg))  # JSON is YAML
    env = {**CHILD_ENV, "DS_ACCELERATOR": "cpu"}
    target = [script] if script else ["-m", "synpo", "train"]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), *target, "--config", str(cfg_path), *extra,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    (tmp_path / "launch.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    metrics = os.path.join(cfg["checkpoint"]["output_dir"], "metrics.jsonl")
    return [json.loads(line) for line in open(metrics).read().splitlines()]


def prefix_sharing_said(tmp_path) -> list[str]:
    """The launch's "prefix sharing on/off: why" log lines (rank 0's)."""
    log = (tmp_path / "launch.log").read_text().splitlines()
    return [line.split("synpo.train: ", 1)[1] for line in log if "synpo.train: prefix sharing" in line]


def assert_same_training(rows, reference_rows, rel=2e-5):
    assert [r["step"] for r in rows] == [r["step"] for r in reference_rows]
    for row, ref in zip(rows, reference_rows):
        assert row["pairs"] == ref["pairs"]
        for key in COMPARED:
            assert row[key] == pytest.approx(ref[key], rel=rel, abs=1e-7), (row["step"], key)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stage_matches_single_process(tmp_path, stage):
    # 2 ranks x accumulation 2 == 1 process x accumulation 4: the same pairs in every optimizer step.
    # Evaluation on 5 pairs (3 on rank 0, 2 on rank 1, which runs an extra forward to keep in step).
    # The ranks share each pair's prompt (training, evaluation), the single process does not.
    write_lines(tmp_path / "eval.jsonl", generic_sample_lines()[-6:])  # 5 pass min_score_gap

    def sections(prefix_sharing: bool) -> dict:
        data = {"eval_file": str(tmp_path / "eval.jsonl"), "prefix_sharing": prefix_sharing}
        return {"data": data, "logging": {"eval_every": 2}}

    trainer = Trainer(config(tmp_path / "single", accumulation=4, **sections(False)))
    single = trainer.train()
    assert not trainer.prefix_sharing
    rows = launch(
        tmp_path,
        config(tmp_path / f"zero{stage}", accumulation=2, **sections(True)),
        {"zero_optimization": {"stage": stage}},
    )
    assert prefix_sharing_said(tmp_path) == ["prefix sharing on (prefix_sharing: true)"]
    eval_rows = [row for row in rows if row.get("split") == "eval"]
    rows = [row for row in rows if row.get("split") != "eval"]
    assert_same_training(rows, single.history)
    # Evaluation metrics reduced across the ranks: the single-process values.
    assert [r["step"] for r in eval_rows] == [r["step"] for r in single.eval_history] == [2, 3]
    for row, ref in zip(eval_rows, single.eval_history):
        assert row["eval_pairs"] == ref["eval_pairs"] == 5
        for key in ("eval_loss", "eval_reward_accuracy", "eval_reward_margin", "eval_chosen_logps"):
            assert row[key] == pytest.approx(ref[key], rel=2e-5, abs=1e-7), (row["step"], key)
    # The exported model (gathered from the partitions under ZeRO-3) is the single-process one.
    exported = load_file(str(tmp_path / f"zero{stage}" / "final" / "model.safetensors"))
    expected = load_file(str(single.final_model_dir / "model.safetensors"))
    assert exported.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-4, atol=1e-6)


def test_zero3_dpo_with_lora_reference_and_exact_resume(tmp_path):
    sections = {
        "loss": {"name": "dpo"},
        "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "optim": {"lr": 2e-2, "warmup_ratio": 0.0},
    }
    single = Trainer(config(tmp_path / "single", accumulation=4, **sections)).train()
    zero3 = {"zero_optimization": {"stage": 3}}
    run_dir = tmp_path / "zero3"
    rows = launch(tmp_path, config(run_dir, accumulation=2, **sections), zero3)
    assert prefix_sharing_said(tmp_path)[0].startswith("prefix sharing on: ")  # auto, the sample's prompts
    assert_same_training(rows, single.history)
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-4)  # policy == reference at the start

    # Resume from the step-2 checkpoint in a copy of the run: step 3 must come out the same.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed_dir)
    step2 = resumed_dir / "checkpoints" / "step-00000002"
    assert (step2 / "deepspeed" / "state").is_dir() and (step2 / "rng" / "rank-00001.pt").is_file()
    resumed = launch(tmp_path, config(resumed_dir, accumulation=2, **sections), zero3, "--resume", str(step2))
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert resumed[2] == pytest.approx(rows[2], rel=1e-6) or all(
        resumed[2][key] == pytest.approx(rows[2][key], rel=1e-6, abs=1e-9) for key in COMPARED
    )


# Rank 1's second micro-batch gets a NaN loss: that rank must skip it (an exactly-zero backward keeps
# ZeRO's gradient reduction in step) while rank 0 trains normally.
NAN_ON_RANK_1 = """
import os, sys
import synpo.objective as objective
from synpo.cli import main

real_ops = objective._fused_ops
calls = [0]

def ops_with_a_nan():
    fused_loss, sequence_logprobs = real_ops()
    def loss_fn(*args, **kwargs):
        calls[0] += 1
        loss, stats = fused_loss(*args, **kwargs)
        if os.environ["RANK"] == "1" and calls[0] == 3:
            return loss * float("nan"), stats
        return loss, stats
    return loss_fn, sequence_logprobs

objective._fused_ops = ops_with_a_nan
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_zero3_nan_loss_on_one_rank_is_skipped(tmp_path):
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1)
    clean = Trainer(config(tmp_path / "clean", accumulation=4)).train().history  # same pairs, no NaN
    rows = launch(
        tmp_path,
        config(tmp_path / "nan", accumulation=2),
        {"zero_optimization": {"stage": 3}},
        script=str(script),
    )
    assert [r["skipped_in_step"] for r in rows] == [0, 1, 0]
    assert [r["pairs"] for r in rows] == [4, 3, 4]
    assert all(r["loss"] == r["loss"] and r["grad_norm"] == r["grad_norm"] for r in rows)  # no NaN
    assert rows[0]["loss"] == pytest.approx(clean[0]["loss"], rel=1e-6)
    # Step 2 lost a quarter of its gradient (its micro-batch contributed zeros, not NaN).
    assert rows[1]["grad_norm"] != pytest.approx(clean[1]["grad_norm"], rel=1e-3)


def test_zero3_tied_embeddings(tmp_path):
    # Tied input/output embeddings (SmolLM2, Gemma, Qwen2-0.5B): the lm_head weight that the fused loss
    # reads is the embedding matrix, a ZeRO-3 external parameter of the objective that the embedding
    # layer uses too; fully fine-tuned here, its partitions get the gradients of both uses.
    # Here the single process shares each pair's prompt and the ZeRO-3 ranks do not.
    tied = {"tiny": {**TINY_MODEL, "tie_word_embeddings": True}}
    single = Trainer(
        config(tmp_path / "single", accumulation=4, model=tied, data={"prefix_sharing": True})
    ).train()
    rows = launch(
        tmp_path,
        config(tmp_path / "zero3", accumulation=2, model=tied, data={"prefix_sharing": False}),
        {"zero_optimization": {"stage": 3}},
    )
    assert prefix_sharing_said(tmp_path) == ["prefix sharing off (prefix_sharing: false)"]
    assert_same_training(rows, single.history)
    exported = load_file(str(tmp_path / "zero3" / "final" / "model.safetensors"))
    expected = load_file(str(single.final_model_dir / "model.safetensors"))
    embedding = expected["model.embed_tokens.weight"]
    # One matrix: an export may write lm_head.weight or leave it to the tie. Its two gradients add up
    # in another order under ZeRO-3, which Adam's normalization shows in near-zero-gradient elements
    # (1.4e-6 measured after 3 steps of lr 5e-3): atol 1e-5, well below one step's lr.
    assert set(exported) ^ set(expected) <= {"lm_head.weight"}
    for name in set(exported) | set(expected):
        torch.testing.assert_close(
            exported.get(name, embedding), expected.get(name, embedding), rtol=1e-4, atol=1e-5
        )
