"""Prefix sharing in ``synpo train`` (``data.prefix_sharing``): a shared run trains as the unshared one
(per-step metrics and final weights) with gradient checkpointing, LoRA, packing, micro-batches of
prompts of different lengths and the three DPO references; ``auto`` says which way it went and why;
``true`` on a model that cannot share is a config error; the config key takes auto/true/false only."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from tiny_training import generic_sample_lines, tiny_sliding_window_qwen2, tiny_training_config, write_lines

from synpo.config import ConfigError, load_config
from synpo.prefix_sharing import SEGMENTS_KEY
from synpo.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMPARED = ("loss", "chosen_logps", "rejected_logps", "reward_margin", "grad_norm")
LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
# 2 optimizer steps of 2 micro-batches of 2 pairs.
QUICK_RUN = {
    "optim": {"lr": 5e-3, "warmup_ratio": 0.0},
    "train": {
        "epochs": 1,
        "max_steps": 2,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "seed": 0,
    },
    "checkpoint": {"save_every": 0},
}


def run(output_dir, prefix_sharing, *overlays: dict) -> tuple[Trainer, object, dict[str, torch.Tensor]]:
    """Train; returns the trainer, its result and the trainable parameters it started from."""
    config = tiny_training_config(output_dir, QUICK_RUN, *overlays, data={"prefix_sharing": prefix_sharing})
    trainer = Trainer(config).setup()
    policy = trainer.objective.policy
    initial = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    return trainer, trainer.train(), initial


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12))


def assert_trains_alike(
    tmp_path, *overlays: dict, shared_only: dict | None = None, unshared_only: dict | None = None
) -> tuple[Trainer, Trainer]:
    """Train with ``data.prefix_sharing`` true and false (``*_only``: an overlay for one of the runs);
    the same metrics every step and the same final weights. Returns the trainers (shared, unshared)."""
    shared_trainer, shared, _ = run(tmp_path / "shared", True, *overlays, shared_only or {})
    unshared_trainer, unshared, initial = run(tmp_path / "unshared", False, *overlays, unshared_only or {})
    assert shared_trainer.prefix_sharing and not unshared_trainer.prefix_sharing
    assert [r["step"] for r in shared.history] == [r["step"] for r in unshared.history] == [1, 2]
    for row, ref in zip(shared.history, unshared.history):
        assert row["pairs"] == ref["pairs"]
        # The shared run computed each prompt once: fewer tokens through the model.
        assert row["tokens"] < ref["tokens"], row["step"]
        for key in COMPARED:
            # abs: DPO's first-step margin is 0 up to fp32 noise on summed log-probs.
            assert row[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), (row["step"], key)
    # Both runs moved the weights alike, and moved them (else equal weights would prove little).
    trained = {n: p.detach() for n, p in unshared_trainer.objective.policy.named_parameters() if n in initial}
    assert max(relative_difference(trained[n], initial[n]) for n in initial) > 1e-3
    name = "adapter_model.safetensors" if shared_trainer.config.lora.enabled else "model.safetensors"
    ours = load_file(str(shared.final_model_dir / name))
    theirs = load_file(str(unshared.final_model_dir / name))
    assert ours.keys() == theirs.keys() and ours
    for key, tensor in theirs.items():
        assert relative_difference(ours[key], tensor) <= 1e-4, key
    return shared_trainer, unshared_trainer


def test_shared_run_trains_as_the_unshared_one(tmp_path):
    assert_trains_alike(tmp_path)


def test_with_gradient_checkpointing(tmp_path):
    shared, _ = assert_trains_alike(tmp_path, {"model": {"gradient_checkpointing": True}})
    # Recomputed in backward: the replayed layers must get the segments again.
    assert any(getattr(m, "gradient_checkpointing", False) for m in shared.objective.policy.modules())


def test_with_lora(tmp_path):
    assert_trains_alike(tmp_path, {"lora": LORA, "optim": {"lr": 2e-2}})


def test_with_packing(tmp_path):
    shared, _ = assert_trains_alike(tmp_path, {"data": {"pack": True}})
    batch = shared.collator([shared.dataset[0], shared.dataset[1]])
    assert batch["input_ids"].shape[0] == 1 and batch[SEGMENTS_KEY].shape[0] == 2  # one row, 2 segments


def test_micro_batches_of_prompts_of_different_lengths(tmp_path):
    # Unshuffled, lines ordered so that each micro-batch of 3 holds prompts of 3 different lengths.
    by_length: dict[int, list[str]] = {}
    for line in generic_sample_lines():
        by_length.setdefault(len(json.loads(line)["prompt"]), []).append(line)
    groups = list(by_length.values())
    assert len(groups) >= 3
    lines = [line for triple in zip(*groups[:3]) for line in triple]
    pairs = write_lines(tmp_path / "pairs.jsonl", lines)
    overlay = {
        "data": {"train_file": pairs, "shuffle": False, "min_score_gap": None},
        "train": {"micro_batch_size": 3, "gradient_accumulation_steps": 1},
    }
    shared, _ = assert_trains_alike(tmp_path, overlay)
    segments = shared.collator([shared.dataset[i] for i in range(3)])[SEGMENTS_KEY]
    assert len(set(segments[:, 2].tolist())) == 3  # three prompt lengths in one micro-batch


def test_dpo_with_a_frozen_copy_reference(tmp_path):
    shared, _ = assert_trains_alike(tmp_path, {"loss": {"name": "dpo"}})
    assert shared.objective.reference_mode == "copy" and shared.objective.reference is not None


def test_dpo_with_the_adapter_disabled_reference(tmp_path):
    overlay = {"loss": {"name": "dpo"}, "lora": LORA, "optim": {"lr": 2e-2}}
    shared, _ = assert_trains_alike(tmp_path, overlay)
    assert shared.objective.reference_mode == "adapter_disabled"


def test_dpo_with_precomputed_reference_log_probs(tmp_path):
    def cache(name):  # one each: the shared run computes its own reference log-probs, in shared batches
        return {
            "loss": {"reference": {"precompute": True, "cache_file": str(tmp_path / f"{name}.safetensors")}}
        }

    shared, _ = assert_trains_alike(
        tmp_path, {"loss": {"name": "dpo"}}, shared_only=cache("shared"), unshared_only=cache("unshared")
    )
    ours = load_file(str(tmp_path / "shared.safetensors"))["ref_logps"]
    theirs = load_file(str(tmp_path / "unshared.safetensors"))["ref_logps"]
    assert ours.shape == theirs.shape == (len(shared.dataset), 2)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)


# -- auto, unsupported models, config values --------------------------------------------------------


@pytest.fixture(scope="module")
def sliding_window_model(tmp_path_factory):
    """A tiny Qwen2 whose layers use sliding-window attention: the segment layout cannot express it."""
    from synpo.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    model = tiny_sliding_window_qwen2(len(tokenizer), ids)
    path = tmp_path_factory.mktemp("qwen2_sliding")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def prefix_sharing_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("prefix sharing")]


def test_auto_says_which_way_it_went_and_why(tmp_path, caplog, sliding_window_model):
    # The bundled sample (prompts of ~116 tokens, responses ~86): on, with the numbers.
    with caplog.at_level(logging.INFO, logger="synpo.train"):
        trainer, _, _ = run(tmp_path / "sample", "auto")
    (line,) = prefix_sharing_lines(caplog)
    assert trainer.prefix_sharing
    assert line.startswith("prefix sharing on: mean prompt ") and "x fewer tokens" in line

    # A short prompt (with the template's ~100 tokens) and responses of ~800 tokens: off.
    record = {"prompt": "Hi", "chosen": "a long answer " * 110, "rejected": "another long one " * 90}
    data = {"train_file": write_lines(tmp_path / "short.jsonl", [json.dumps(record)] * 4), "max_length": 2048}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="synpo.train"):
        trainer = Trainer(tiny_training_config(tmp_path / "short", QUICK_RUN, data=data)).setup()
    (line,) = prefix_sharing_lines(caplog)
    assert not trainer.prefix_sharing and not trainer.collator.prefix_sharing
    assert line.startswith("prefix sharing off: mean prompt ") and "below 1.1x" in line

    # A model that cannot share: off, naming why; it trains unshared.
    caplog.clear()
    model = {"model": {"name_or_path": sliding_window_model}}
    with caplog.at_level(logging.INFO, logger="synpo.train"):
        trainer, result, _ = run(tmp_path / "sliding", "auto", model)
    (line,) = prefix_sharing_lines(caplog)
    assert not trainer.prefix_sharing and not trainer.objective.prefix_sharing
    assert line == "prefix sharing off: qwen2: layers of type ['sliding_attention'] (only full attention)"
    assert len(result.history) == 2


def test_true_on_a_model_that_cannot_share_is_a_config_error(tmp_path, sliding_window_model, monkeypatch):
    model = {"model": {"name_or_path": sliding_window_model}}
    config = tiny_training_config(tmp_path / "sliding", QUICK_RUN, model, data={"prefix_sharing": True})
    with pytest.raises(ConfigError, match=r"^data\.prefix_sharing: true, but qwen2: .*sliding_attention"):
        Trainer(config).train()

    # Whatever the reason prefix_sharing_problem gives (here a monkeypatched one, on the tiny Llama).
    import synpo.prefix_sharing

    monkeypatch.setattr(synpo.prefix_sharing, "prefix_sharing_problem", lambda model: "no reason at all")
    config = tiny_training_config(tmp_path / "patched", QUICK_RUN, data={"prefix_sharing": True})
    with pytest.raises(ConfigError, match=r"^data\.prefix_sharing: true, but no reason at all$"):
        Trainer(config).train()
    config["data"]["prefix_sharing"] = "auto"
    trainer = Trainer(config).setup()
    assert not trainer.prefix_sharing and trainer.prefix_sharing_why == "off: no reason at all"


def test_config_takes_auto_true_false_from_yaml_and_the_command_line(tmp_path, capsys):
    from synpo.cli import main

    for written, expected in (("auto", "auto"), ("true", True), ("false", False)):
        path = tmp_path / f"{written}.yaml"
        path.write_text(f"data:\n  prefix_sharing: {written}\n")
        assert load_config(path).data.prefix_sharing == expected
        for override, value in (("false", False), ("true", True), ("auto", "auto")):
            assert load_config(path, ["--data.prefix_sharing", override]).data.prefix_sharing == value
    assert load_config().data.prefix_sharing == "auto"  # the default
    assert main(["train", "--config", str(tmp_path / "true.yaml"), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["prefix_sharing"] is True
    assert main(["train", "--print-config", "--data.prefix_sharing", "false"]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["prefix_sharing"] is False


@pytest.mark.parametrize(
    ("written", "says"),
    [
        ("maybe", "got 'maybe'"),
        ("Auto", "did you mean 'auto'"),
        ("'true'", "got 'true'; write true without quotes"),  # a string, not the boolean
        ("1", "got 1"),  # 1 == True in Python, but not a value of this key
        ("0", "got 0"),
        ("null", "got None"),
    ],
)
def test_config_rejects_other_values(tmp_path, capsys, written, says):
    from synpo.cli import main

    message = r"data\.prefix_sharing: must be one of \['auto', true, false\], got "
    path = tmp_path / "bad.yaml"
    path.write_text(f"data:\n  prefix_sharing: {written}\n")
    with pytest.raises(ConfigError, match=message) as raised:
        load_config(path)
    assert says in str(raised.value)
    if written != "'true'":  # on the command line the quotes are the shell's
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["--data.prefix_sharing", written])
        assert main(["train", "--print-config", "--data.prefix_sharing", written]) == 2
        assert "data.prefix_sharing: must be one of" in capsys.readouterr().err


def test_a_resumed_run_may_turn_prefix_sharing_off(tmp_path):
    # The same training either way: a run resumed with another data.prefix_sharing continues it (not a
    # refused config change) and its next step is the uninterrupted run's.
    constant = {"optim": {"schedule": "constant"}, "train": {"max_steps": 3}}
    _, uninterrupted, _ = run(tmp_path / "uninterrupted", True, constant)
    first, _, _ = run(tmp_path / "resumed", True, constant, {"train": {"max_steps": 2}})
    assert first.prefix_sharing
    config = tiny_training_config(tmp_path / "resumed", QUICK_RUN, constant, data={"prefix_sharing": False})
    trainer = Trainer(config, overrides={"checkpoint.resume": "auto"})
    resumed = trainer.train()
    assert not trainer.prefix_sharing
    assert [r["step"] for r in resumed.history] == [3]
    for key in COMPARED:
        assert resumed.history[0][key] == pytest.approx(uninterrupted.history[2][key], rel=1e-5), key
