"""Single-process training: loss goes down, fused == naive, packing, DPO with a reference model
(frozen copy, LoRA disabled, cached log-probs), NaN skip, bf16, and argument errors."""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch
from safetensors.torch import load_file
from tiny_training import (
    TINY_MODEL,
    generic_sample_lines,
    tiny_softcapped_lm,
    tiny_training_config,
    without_timing,
    write_lines,
)

from synpo.config import ConfigError
from synpo.trainer import Trainer, linear_warmup_schedule

METRIC_KEYS = {
    "step", "epoch", "loss", "chosen_logps", "rejected_logps", "reward_margin", "chosen_mean_prob",
    "grad_norm", "lr", "tokens_per_s", "peak_memory_mb", "skipped_batches", "skipped_in_step", "pairs",
    "tokens",
}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUICK_RUN = {
    "optim": {"lr": 5e-3, "warmup_ratio": 0.0},
    "train": {"epochs": 1, "micro_batch_size": 2, "gradient_accumulation_steps": 2, "seed": 0},
    "checkpoint": {"save_every": 0},
}


def base_config(output_dir, **sections) -> dict:
    return tiny_training_config(output_dir, QUICK_RUN, sections)


def small_pairs(tmp_path, n: int) -> str:
    return write_lines(tmp_path / "pairs.jsonl", generic_sample_lines()[:n])


def losses(result) -> list[float]:
    return [row["loss"] for row in result.history]


def test_synpo_loss_decreases_and_every_step_is_logged(tmp_path):
    config = base_config(
        tmp_path / "run",
        data={"train_file": small_pairs(tmp_path, 8), "min_score_gap": None},
        optim={"lr": 1e-2},
        train={"epochs": 12, "micro_batch_size": 4, "gradient_accumulation_steps": 1},
        checkpoint={"save_every": 10},
    )
    result = Trainer(config).train()
    values = losses(result)
    assert result.global_step == result.total_steps == 24 and not result.interrupted
    assert sum(values[-4:]) / 4 < sum(values[:4]) / 4 - 0.02, values
    assert result.history[-1]["chosen_logps"] > result.history[0]["chosen_logps"]
    rows = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert set(rows[0]) >= METRIC_KEYS
    assert all(
        math.isfinite(r["grad_norm"]) and r["tokens_per_s"] > 0 and r["skipped_batches"] == 0 for r in rows
    )
    assert rows[0]["pairs"] == 4 and rows[0]["peak_memory_mb"] > 0
    # Checkpoints at 10 and 20 (kept: keep_last=2) and the end; the exported model.
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["latest", "step-00000020", "step-00000024"]
    assert (result.final_model_dir / "model.safetensors").is_file()
    assert (result.final_model_dir / "tokenizer.json").is_file()


def test_fused_and_naive_give_the_same_training(tmp_path):
    runs = {}
    for impl in ("fused", "naive"):
        config = base_config(
            tmp_path / impl, loss={"impl": impl}, train={"seed": 3}, checkpoint={"save_every": 0}
        )
        config["train"]["max_steps"] = 3
        runs[impl] = Trainer(config).train()
    for fused_row, naive_row in zip(runs["fused"].history, runs["naive"].history):
        for key in (
            "loss",
            "chosen_logps",
            "rejected_logps",
            "reward_margin",
            "chosen_mean_prob",
            "grad_norm",
        ):
            assert fused_row[key] == pytest.approx(naive_row[key], rel=1e-4, abs=1e-6), key
    fused_w = load_file(str(runs["fused"].last_checkpoint / "model.safetensors"))
    naive_w = load_file(str(runs["naive"].last_checkpoint / "model.safetensors"))
    for name, tensor in fused_w.items():
        torch.testing.assert_close(tensor, naive_w[name], rtol=1e-4, atol=1e-5)


def test_softcapped_logits_fall_back_to_the_naive_loss(tmp_path, caplog):
    """A model that post-processes its logits (Gemma-2's final_logit_softcapping): the fused loss would
    train on hidden @ W.T, logits the model never produces. The objective takes the naive loss on the
    real logits instead (one log line, as in the TRL trainer): the training of ``loss.impl: naive``."""
    from synpo.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(512)
    tiny_softcapped_lm(len(tokenizer)).save_pretrained(tmp_path / "gemma2")
    tokenizer.save_pretrained(tmp_path / "gemma2")
    runs, said = {}, {}
    for impl in ("fused", "naive"):
        model = {"name_or_path": str(tmp_path / "gemma2"), "attn_implementation": "eager"}
        config = base_config(tmp_path / impl, model=model, loss={"impl": impl})
        config["train"]["max_steps"] = 2
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="synpo.objective"):
            trainer = Trainer(config)
            runs[impl] = trainer.train()
        said[impl] = [r.getMessage() for r in caplog.records if "post-processes its logits" in r.getMessage()]
        assert trainer.objective.impl == "naive"
    assert not said["naive"] and len(said["fused"]) == 1
    assert "final_logit_softcapping=0.25" in said["fused"][0]
    assert without_timing(runs["fused"].history) == without_timing(runs["naive"].history)
    assert losses(runs["fused"])[0] != losses(runs["fused"])[1]


def test_packed_batches_train_like_padded_ones(tmp_path):
    results = []
    for pack in (False, True):
        config = base_config(tmp_path / str(pack), data={"pack": pack})
        config["train"]["max_steps"] = 2
        results.append(Trainer(config).train())
    for padded, packed in zip(*[r.history for r in results]):
        assert packed["loss"] == pytest.approx(padded["loss"], rel=1e-4)
        assert packed["grad_norm"] == pytest.approx(padded["grad_norm"], rel=1e-3)


def test_dpo_with_a_frozen_copy_and_cached_reference(tmp_path):
    on_the_fly = base_config(tmp_path / "copy", loss={"name": "dpo"})
    on_the_fly["train"]["max_steps"] = 3
    first = Trainer(on_the_fly).train()
    # The policy starts equal to its reference: margin 0 (up to fp32 noise on summed log-probs), loss log(2).
    assert first.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first.history[0]["reward_margin"] == pytest.approx(0.0, abs=1e-3)
    assert first.history[-1]["reward_margin"] != 0.0

    cached_cfg = copy.deepcopy(on_the_fly)
    cached_cfg["checkpoint"]["output_dir"] = str(tmp_path / "cached")
    cached_cfg["loss"]["reference"] = {"precompute": True, "cache_file": str(tmp_path / "ref.safetensors")}
    cached = Trainer(cached_cfg).train()
    for a, b in zip(first.history, cached.history):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    values = load_file(str(tmp_path / "ref.safetensors"))["ref_logps"]
    assert values.shape[1] == 2 and torch.isfinite(values).all() and (values < 0).all()
    # A second run reuses the cache (same data/model key) and trains identically.
    mtime = (tmp_path / "ref.safetensors").stat().st_mtime_ns
    with pytest.raises(ConfigError, match="holds checkpoints of an earlier run"):
        Trainer(cached_cfg).train()
    again = Trainer(cached_cfg, overrides={"checkpoint.overwrite": True}).train()
    assert (tmp_path / "ref.safetensors").stat().st_mtime_ns == mtime
    assert losses(again) == losses(cached)


def test_ipo_cached_reference_holds_sums(tmp_path):
    """Reference log-probs are per-row sums for every loss (TRL's convention); IPO divides by the
    token counts itself: policy == reference gives h = 0 and the loss (0 - 1/(2 tau))^2 = 25."""
    config = base_config(tmp_path / "ipo", loss={"name": "ipo"})
    config["loss"]["reference"] = {"precompute": True, "cache_file": str(tmp_path / "ref.safetensors")}
    config["train"]["max_steps"] = 1
    result = Trainer(config).train()
    assert result.history[0]["loss"] == pytest.approx(25.0, abs=1e-3)
    assert result.history[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    values = load_file(str(tmp_path / "ref.safetensors"))["ref_logps"]
    # Sums over several response tokens, not per-token means (those are > -log(vocab) here).
    assert values.max() < 2 * result.history[0]["chosen_logps"]


def test_dpo_with_lora_disabled_reference_fused_and_naive(tmp_path):
    results = {}
    for impl in ("fused", "naive"):
        config = base_config(
            tmp_path / impl,
            loss={"name": "dpo", "impl": impl},
            lora={"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0},
            optim={"lr": 2e-2},
        )
        config["train"]["max_steps"] = 3
        trainer = Trainer(config)
        results[impl] = trainer.train()
        assert trainer.objective.reference_mode == "adapter_disabled" and trainer.objective.reference is None
        trainable = [n for n, p in trainer.objective.policy.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
    assert results["fused"].history[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    for a, b in zip(results["fused"].history, results["naive"].history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert results["fused"].history[-1]["loss"] < math.log(2)
    # Only the adapter is saved for a LoRA run.
    saved = load_file(str(results["fused"].last_checkpoint / "model.safetensors"))
    assert saved and all("lora_" in name for name in saved)
    assert (results["fused"].final_model_dir / "adapter_model.safetensors").is_file()


def test_nan_loss_skips_the_micro_batch_and_keeps_the_optimizer_clean(tmp_path, monkeypatch):
    import synpo.objective as objective_module

    real_ops = objective_module._fused_ops
    calls = {"n": 0}

    def ops_with_a_nan():
        fused_loss, sequence_logprobs = real_ops()

        def loss_fn(*args, **kwargs):
            calls["n"] += 1
            loss, stats = fused_loss(*args, **kwargs)
            return (loss * float("nan"), stats) if calls["n"] == 3 else (loss, stats)

        return loss_fn, sequence_logprobs

    monkeypatch.setattr(objective_module, "_fused_ops", ops_with_a_nan)
    config = base_config(tmp_path / "nan")
    config["train"]["max_steps"] = 3
    trainer = Trainer(config)
    result = trainer.train()
    rows = result.history
    assert [r["skipped_in_step"] for r in rows] == [0, 1, 0]
    assert [r["skipped_batches"] for r in rows] == [0, 1, 1]
    assert result.summary["skipped_nonfinite"] == 1
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert rows[1]["pairs"] == 2  # the other micro-batch of that step still counted
    state = trainer.optimizer.state_dict()["state"]
    assert state and all(
        torch.isfinite(v).all() for s in state.values() for v in s.values() if isinstance(v, torch.Tensor)
    )
    assert all(torch.isfinite(p).all() for p in trainer.objective.policy.parameters())
    assert all(float(s["step"]) == 3 for s in state.values())  # the optimizer still stepped every time
    logged = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    assert logged[1]["skipped_in_step"] == 1


def test_bf16_autocast_tracks_fp32(tmp_path):
    results = {}
    for precision in ("fp32", "bf16"):
        config = base_config(tmp_path / precision, train={"precision": precision})
        config["train"]["max_steps"] = 2
        results[precision] = Trainer(config).train()
    for a, b in zip(results["fp32"].history, results["bf16"].history):
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-2)
        assert b["chosen_logps"] == pytest.approx(a["chosen_logps"], rel=2e-2)


def test_configuration_errors(tmp_path, monkeypatch):
    with pytest.raises(TypeError, match="config: expected"):
        Trainer(42)
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.epoch'"):
        Trainer(base_config(tmp_path), overrides={"train.epoch": 2})
    with pytest.raises(ConfigError, match="fp16 needs DeepSpeed"):
        Trainer(base_config(tmp_path, train={"precision": "fp16"})).setup()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="needs a DeepSpeed config"):
        Trainer(base_config(tmp_path)).setup()


def test_linear_warmup_schedule_matches_transformers():
    # transformers after warmup; during warmup (step + 1) / warmup_steps, so the first step trains
    # (transformers gives it lr 0).
    from transformers import get_linear_schedule_with_warmup

    for warmup in (0, 3):
        ours_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        ours = linear_warmup_schedule(ours_opt, total_steps=10, warmup_steps=warmup)
        ref = get_linear_schedule_with_warmup(ref_opt, num_warmup_steps=warmup, num_training_steps=10)
        for step in range(10):
            if step < warmup:
                assert ours.get_last_lr() == pytest.approx([(step + 1) / warmup])
            else:
                assert ours.get_last_lr() == pytest.approx(ref.get_last_lr())
            ours_opt.step()
            ref_opt.step()
            ours.step()
            ref.step()
    with pytest.raises(ValueError, match="warmup_steps"):
        linear_warmup_schedule(ours_opt, total_steps=5, warmup_steps=6)


def test_tied_embeddings_are_exported_once_and_reload_tied(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    config = base_config(
        tmp_path / "run",
        model={"tiny": {**TINY_MODEL, "tie_word_embeddings": True}},
        data={"train_file": small_pairs(tmp_path, 4), "min_score_gap": None},
        train={"max_steps": 1},
    )
    result = Trainer(config).train()
    with safe_open(str(result.final_model_dir / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # one copy
    model = AutoModelForCausalLM.from_pretrained(result.final_model_dir)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
