"""Evaluation in ``synpo train`` (data.eval_file / data.eval_split, logging.eval_every), the best
checkpoint (checkpoint.keep_best), reporters (logging.report_to: TensorBoard), and resuming."""

from __future__ import annotations

import json
import math

import pytest
from tiny_training import (
    assert_same_weights,
    call_after_optimizer_step,
    generic_sample_lines,
    tiny_training_config,
    without_timing,
    write_lines,
)

from synpo import checkpoint as ckpt
from synpo.cli import main
from synpo.config import ConfigError
from synpo.data import SAMPLE_PAIRS_PATH, read_preference_jsonl, split_eval_examples
from synpo.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EVAL_KEYS = {
    "step", "split", "eval_loss", "eval_reward_accuracy", "eval_reward_margin", "eval_chosen_logps",
    "eval_rejected_logps", "eval_chosen_mean_prob", "eval_pairs", "eval_seconds",
}  # fmt: skip

# LoRA dropout: evaluation must neither draw from the training RNG nor leave dropout off.
EVALUATED_RUN = {
    "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
    "optim": {"lr": 1e-2, "warmup_steps": 1},
    "train": {"max_steps": 5, "micro_batch_size": 2, "gradient_accumulation_steps": 2, "seed": 3},
    "checkpoint": {"save_every": 1, "keep_last": 10},
}


def make_config(output_dir, **sections) -> dict:
    return tiny_training_config(output_dir, EVALUATED_RUN, sections)


def eval_pairs_file(tmp_path, n: int = 5) -> str:
    """``n`` generic pairs of the bundled sample, all above the default min_score_gap."""
    # The last n + 1 records: one of them is below the gap.
    path = write_lines(tmp_path / "eval_pairs.jsonl", generic_sample_lines()[-n - 1 :])
    assert len(read_preference_jsonl(path)[0]) == n
    return path


def read_rows(result) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    return [r for r in rows if r.get("split") != "eval"], [r for r in rows if r.get("split") == "eval"]


def test_eval_file_schedule_no_effect_on_training_best_checkpoint_and_tensorboard(tmp_path):
    plain = Trainer(make_config(tmp_path / "plain")).train()
    result = Trainer(
        make_config(
            tmp_path / "eval",
            data={"eval_file": eval_pairs_file(tmp_path)},
            logging={"eval_every": 2, "report_to": ["tensorboard"]},
            # The worst eval loss: typically an early step, so best/ must not follow later checkpoints.
            checkpoint={"keep_best": "eval_loss", "keep_best_mode": "max"},
        )
    ).train()
    train_rows, eval_rows = read_rows(result)

    # Every 2 steps and at the end; 5 pairs (micro-batches of 2, 2, 1), finite values.
    assert [r["step"] for r in eval_rows] == [2, 4, 5]
    for row in eval_rows:
        assert set(row) == EVAL_KEYS and row["split"] == "eval" and row["eval_pairs"] == 5
        assert all(math.isfinite(v) for k, v in row.items() if k.startswith("eval_")), row
        assert 0.0 <= row["eval_reward_accuracy"] <= 1.0
        assert row["eval_rejected_logps"] < 0 and row["eval_chosen_logps"] < 0
    assert result.eval_history == eval_rows
    assert eval_rows[0]["eval_loss"] != eval_rows[-1]["eval_loss"]  # the model changed in between

    # Evaluation changes nothing in training: the same rows and weights, bit for bit.
    plain_rows, _ = read_rows(plain)
    assert without_timing(train_rows) == without_timing(plain_rows)
    assert all("reward_accuracy" in row for row in train_rows)
    assert_same_weights(result.last_checkpoint, plain.last_checkpoint)

    # best/: the step with the highest eval loss, the same weights as that step's checkpoint, intact.
    best_row = max(eval_rows, key=lambda r: r["eval_loss"])
    best_dir = tmp_path / "eval" / "best"
    assert result.summary["best"] == {
        "metric": "eval_loss",
        "mode": "max",
        "value": best_row["eval_loss"],
        "step": best_row["step"],
        "path": str(best_dir),
    }
    assert ckpt.verify_checkpoint(best_dir) is None
    assert json.loads((best_dir / "trainer_state.json").read_text())["step"] == best_row["step"]
    step_dir = ckpt.checkpoint_root(tmp_path / "eval") / ckpt.step_dir_name(best_row["step"])
    assert_same_weights(best_dir, step_dir)

    # TensorBoard: the JSONL values under train/<key> and eval/<key without eval_>.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "eval" / "runs"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/reward_accuracy", "eval/loss", "eval/pairs"} <= tags
    for tag, rows, key in (
        ("train/loss", train_rows, "loss"),
        ("train/chosen_logps", train_rows, "chosen_logps"),
        ("train/grad_norm", train_rows, "grad_norm"),
        ("eval/loss", eval_rows, "eval_loss"),
        ("eval/reward_accuracy", eval_rows, "eval_reward_accuracy"),
        ("eval/rejected_logps", eval_rows, "eval_rejected_logps"),
    ):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [r["step"] for r in rows], tag
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in rows], rel=1e-6), tag


def test_eval_split_holds_out_pairs_and_evaluates_at_the_end(tmp_path):
    examples, _ = read_preference_jsonl(SAMPLE_PAIRS_PATH)
    train, held_out = split_eval_examples(examples, 0.25, seed=3)
    assert len(held_out) == round(0.25 * len(examples)) and len(train) + len(held_out) == len(examples)
    assert {id(e) for e in train}.isdisjoint(id(e) for e in held_out)
    assert split_eval_examples(examples, 0.25, seed=3) == (train, held_out)  # deterministic
    assert split_eval_examples(examples, 0.25, seed=4)[1] != held_out

    config = make_config(tmp_path / "run", data={"eval_split": 0.25}, train={"max_steps": 3})
    trainer = Trainer(config)
    result = trainer.train()
    assert len(trainer.dataset) == len(train) and len(trainer.eval_dataset) == len(held_out)
    train_rows, eval_rows = read_rows(result)
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert [r["step"] for r in eval_rows] == [3]  # eval_every 0: only at the end
    assert set(eval_rows[0]) == EVAL_KEYS and eval_rows[0]["eval_pairs"] == len(held_out)
    assert all(math.isfinite(eval_rows[0][k]) for k in EVAL_KEYS - {"step", "split"})


def test_resume_continues_the_eval_schedule_and_the_best(tmp_path):
    sections = {
        "data": {"eval_file": eval_pairs_file(tmp_path)},
        "train": {"max_steps": 6},
        "logging": {"eval_every": 2},
        "checkpoint": {"save_every": 3, "keep_last": 1, "keep_best": "eval_loss", "keep_best_mode": "max"},
    }
    reference = Trainer(make_config(tmp_path / "reference", **sections)).train()

    # Stop right after step 4, an evaluation step: the stop skips its evaluation, the resume runs it.
    run_dir = tmp_path / "run"
    first = Trainer(make_config(run_dir, **sections))
    call_after_optimizer_step(first, 4, first.request_stop)
    stopped = first.train()
    assert stopped.interrupted and stopped.global_step == 4
    assert [r["step"] for r in stopped.eval_history] == [2]

    resumed = Trainer(make_config(run_dir, **sections), overrides={"checkpoint.resume": "auto"}).train()
    assert [r["step"] for r in resumed.eval_history] == [4, 6]
    train_rows, eval_rows = read_rows(resumed)
    ref_train, ref_eval = read_rows(reference)
    assert without_timing(eval_rows) == without_timing(ref_eval) and [r["step"] for r in eval_rows] == [
        2,
        4,
        6,
    ]
    assert without_timing(train_rows) == without_timing(ref_train)
    # The best-so-far came through the checkpoint: same best as the uninterrupted run; best/ kept
    # although keep_last is 1.
    assert resumed.summary["best"]["step"] == reference.summary["best"]["step"]
    assert resumed.summary["best"]["value"] == reference.summary["best"]["value"]
    assert ckpt.verify_checkpoint(run_dir / "best") is None
    assert_same_weights(run_dir / "best", tmp_path / "reference" / "best")
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step-00000006"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"data.eval_split": 1.0}, "data.eval_split: must be in \\(0, 1\\)"),
        ({"data.eval_split": 0.1, "data.eval_file": "x.jsonl"}, "set one of them, not both"),
        ({"checkpoint.keep_best": "eval_loss"}, "needs evaluation"),
        ({"data.eval_split": 0.1, "checkpoint.keep_best": "eval_los"}, "did you mean 'eval_loss'"),
        ({"checkpoint.keep_best_mode": "min"}, "checkpoint.keep_best is not"),
        ({"logging.report_to": ["tensorbord"]}, "did you mean 'tensorboard'"),
        ({"logging.report_to": ["all", "wandb"]}, "stand alone"),
        ({"logging.eval_every": -1}, "logging.eval_every: must be >= 0"),
    ],
)
def test_config_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        Trainer(make_config(tmp_path / "run"), overrides=overrides)


def test_report_to_a_missing_package_is_a_config_error(tmp_path, monkeypatch):
    import synpo.reporting as reporting

    monkeypatch.setattr(reporting, "_installed", lambda package: package != "wandb")
    assert reporting.resolve_report_to("all") == ["tensorboard"]
    assert reporting.resolve_report_to("none") == [] and reporting.resolve_report_to([]) == []
    with pytest.raises(ConfigError, match="'wandb' needs the wandb package, which is not installed"):
        Trainer(make_config(tmp_path / "run", logging={"report_to": "wandb"})).setup()


def test_train_help_lists_deepspeed_and_the_launcher_flag_is_accepted(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--deepspeed DS_CONFIG" in capsys.readouterr().out
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2}}')
    # The deepspeed launcher runs `python -m synpo --local_rank=N train ...`.
    assert main(["--local_rank=0", "train", "--deepspeed", str(ds), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["deepspeed"] == str(ds)


def test_a_checkpoint_from_before_the_eval_keys_resumes_unchanged():
    from synpo.config import TrainerConfig, config_to_dict, unexpected_resume_changes

    new = json.loads(json.dumps(config_to_dict(TrainerConfig())))
    old = json.loads(json.dumps(new))
    for section, key in (("data", "eval_file"), ("data", "eval_split"), ("checkpoint", "keep_best")):
        del old[section][key]
    assert unexpected_resume_changes(old, new, [], extends_run=False) == []
    new["data"]["eval_split"] = 0.1  # a new key set to something else is a change like any other
    assert [c[0] for c in unexpected_resume_changes(old, new, [], extends_run=False)] == ["data.eval_split"]
