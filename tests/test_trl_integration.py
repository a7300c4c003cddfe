"""``synpo.integrations.trl``: a TRL-style SynPO trainer on public APIs, on a tiny offline Llama.

Reference-free training (one forward per step, no second model), TRL's metric names, evaluation,
LoRA, the exact loss wiring (a float64 SynPO computed from per-row logits), and equality with TRL's
own DPOTrainer / CPOTrainer / ORPOTrainer losses on the same batch for the other losses.
"""

from __future__ import annotations

import gc
import math
import sys
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip(
    "trl", reason="TRL is an optional peer (from the clone: pip install --no-build-isolation '.[trl]')"
)

from synpo.integrations.trl import SynPOConfig, SynPOTrainer, row_rewards  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

from _tiny import tiny_llama  # noqa: E402
from tiny_training import TRL_TEST_ARGS, tiny_softcapped_lm  # noqa: E402

import synpo_kernels as sk  # noqa: E402

COMMON = TRL_TEST_ARGS
TRL_METRICS = {
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
}


def word_tokenizer():
    from trl_dpo_trainer import tiny_tokenizer

    return tiny_tokenizer()


def plain_pairs(n, seed=0):
    from trl_dpo_trainer import caption_pairs

    return caption_pairs(n, seed=seed)


def chat_pairs(n, seed=0):
    """Conversational rows (the tiny BPE tokenizer's Vicuna template)."""
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    words = [
        "a",
        "man",
        "walks",
        "the",
        "dog",
        "in",
        "the",
        "park",
        "while",
        "the",
        "camera",
        "pans",
        "left",
        "and",
        "a",
        "red",
        "car",
    ]
    say = lambda k: " ".join(rng.choice(words) for _ in range(k))
    rows = [
        {
            "prompt": [{"role": "user", "content": "Describe the video. " + say(3)}],
            "chosen": [{"role": "assistant", "content": say(rng.randint(3, 6))}],
            "rejected": [{"role": "assistant", "content": say(rng.randint(2, 6))}],
        }
        for _ in range(n)
    ]
    return Dataset.from_list(rows)


def chat_model(tie=False):
    from synpo.tiny import build_tiny_causal_lm, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(512)
    model, tokenizer = build_tiny_causal_lm(tokenizer, hidden_size=32, tie_word_embeddings=tie)
    return model.train(), tokenizer


def lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])


def first_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return {k: v.to(trainer.args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def perturb_lora(*models, seed=0):
    """Identical non-zero LoRA B matrices in each model, so the policy differs from the reference."""
    for model in models:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def llamas():
    # type(), not isinstance(): isinstance asks a weakref.proxy for its referent's class, which raises
    # ReferenceError once that is gone (one left by an earlier test module in the same process).
    return [
        m
        for m in gc.get_objects()
        if issubclass(type(m), torch.nn.Module) and type(m).__name__.endswith("ForCausalLM")
    ]


# ---------------------------------------------------------------------------------------------
# SynPO: training, metrics, evaluation, LoRA
# ---------------------------------------------------------------------------------------------


def test_synpo_trains_reference_free_with_trl_metrics(tmp_path):
    tokenizer = word_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer))
    before = len(llamas())
    calls = []
    model.model.register_forward_pre_hook(lambda *_: calls.append(1))  # the backbone
    trainer = SynPOTrainer(
        model=model,
        args=SynPOConfig(output_dir=str(tmp_path), max_steps=5, alpha=30.0, beta=0.2, **COMMON),
        train_dataset=plain_pairs(8),
        processing_class=tokenizer,
        peft_config=None,
    )
    assert len(llamas()) == before  # no reference (or any other) model was created or loaded
    assert getattr(trainer, "ref_model", None) is None
    assert trainer.loss_options == {"alpha": 30.0, "beta": 0.2}
    trainer.train()
    assert len(calls) == 5  # one backbone forward per step: no reference pass
    rows = [h for h in trainer.state.log_history if "loss" in h]
    assert len(rows) == 5
    losses = [h["loss"] for h in rows]
    assert all(-1.2 <= x <= 0 for x in losses)
    assert len(set(losses)) > 1
    for h in rows:
        assert set(h) >= TRL_METRICS
        # The SynPO reward is G = exp(m): margins = G_w - G_l, consistent with PreferenceStats.reward_margin.
        assert h["rewards/margins"] == pytest.approx(h["rewards/chosen"] - h["rewards/rejected"], abs=1e-6)
        assert h["rewards/chosen"] == pytest.approx(math.exp(h["logps/chosen_per_token"]), rel=0.2)
        assert 0 <= h["rewards/accuracies"] <= 1 and h["logps/chosen"] < 0


def test_conversational_eval_dataset_and_tokenization_match_trl(tmp_path):
    model, tokenizer = chat_model()
    train, evalset = chat_pairs(6), chat_pairs(4, seed=1)
    trainer = SynPOTrainer(
        model=model,
        args=SynPOConfig(
            output_dir=str(tmp_path), max_steps=2, eval_strategy="steps", eval_steps=2, **COMMON
        ),
        train_dataset=train,
        eval_dataset=evalset,
        processing_class=tokenizer,
    )
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 1
    keys = {f"eval_{k}" for k in TRL_METRICS - {"loss"}} | {"eval_loss"}
    assert keys <= set(evals[0])
    assert -1.2 <= evals[0]["eval_loss"] <= 0
    direct = trainer.evaluate(chat_pairs(2, seed=2))  # a raw dataset given to evaluate() is tokenized
    assert "eval_rewards/margins" in direct

    # Same tokenization as TRL's DPOTrainer (so both trainers see the same batches).
    other, tokenizer2 = chat_model()
    theirs = trl.DPOTrainer(
        model=other,
        args=trl.DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=1, **COMMON),
        train_dataset=train,
        processing_class=tokenizer2,
        peft_config=lora(),
    )
    for col in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert trainer.train_dataset[col] == theirs.train_dataset[col]


def _row_logps64(model, ids, start):
    """float64 log-probs of ``ids[start:]`` given the prefix, from the model's logits (one row)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return logp[start - 1 :]


def _synpo64(model, dataset, alpha=30.0, beta=0.2) -> torch.Tensor:
    """Independent float64 SynPO from the model's own logits, unpadded rows, completion tokens only."""
    terms = []
    for ex in dataset:
        p = len(ex["prompt_ids"])
        lw = _row_logps64(model, ex["prompt_ids"] + ex["chosen_ids"], p)
        ll = _row_logps64(model, ex["prompt_ids"] + ex["rejected_ids"], p)
        assert len(lw) == len(ex["chosen_ids"]) and len(ll) == len(ex["rejected_ids"])
        g = lw.mean().exp() - ll.mean().exp()
        terms.append(-torch.sigmoid(alpha * g) - beta * lw.exp().mean())
    return torch.stack(terms).mean()


def test_fused_loss_equals_float64_synpo_on_logits_tied_embeddings(tmp_path):
    """Exact loss wiring: labels, shift, prompt masking; tied lm_head/embeddings get the gradient."""
    model, tokenizer = chat_model(tie=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    trainer = SynPOTrainer(
        model=model,
        args=SynPOConfig(output_dir=str(tmp_path), max_steps=1, alpha=30.0, beta=0.2, **COMMON),
        train_dataset=chat_pairs(4),
        processing_class=tokenizer,
    )
    trainer.model.eval()
    assert trainer.policy is model and trainer.model.policy is model  # trainer.model: the objective
    loader = torch.utils.data.DataLoader(
        trainer.train_dataset, batch_size=4, collate_fn=trainer.data_collator
    )
    batch = next(iter(loader))
    ours = trainer.compute_loss(trainer.model, batch)
    expected = _synpo64(model, trainer.train_dataset)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    ours.backward()
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0


def test_softcapped_logits_are_trained_as_the_model_computes_them(tmp_path, caplog):
    """Gemma-2's final_logit_softcapping: the fused loss (hidden @ W.T) would train on logits the model
    never produces. The trainer takes the unfused loss on the real logits instead, says so once, and its
    loss is the float64 SynPO of those logits (the objective ``synpo train`` uses: same guard)."""
    import logging

    tokenizer = word_tokenizer()
    model = tiny_softcapped_lm(len(tokenizer))
    with caplog.at_level(logging.WARNING, logger="synpo.objective"):
        trainer = SynPOTrainer(
            model=model,
            args=SynPOConfig(output_dir=str(tmp_path), max_steps=2, alpha=30.0, beta=0.2, **COMMON),
            train_dataset=plain_pairs(4),
            processing_class=tokenizer,
        )
    said = [r.getMessage() for r in caplog.records if "post-processes its logits" in r.getMessage()]
    assert len(said) == 1 and "final_logit_softcapping=0.25" in said[0] and "unfused" in said[0]
    assert trainer.objective.impl == "naive"
    trainer.model.eval()
    loader = torch.utils.data.DataLoader(
        trainer.train_dataset, batch_size=4, collate_fn=trainer.data_collator
    )
    batch = next(iter(loader))
    ours = trainer.compute_loss(trainer.model, batch)
    assert ours.item() == pytest.approx(_synpo64(model, trainer.train_dataset).item(), rel=1e-5, abs=1e-6)
    # What the fused loss would have trained on: clearly another loss.
    with torch.no_grad():
        hidden = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        uncapped = sk.fused_linear_synpo_loss(hidden.hidden_states[-1], model.lm_head.weight, labels)
    assert abs(uncapped.item() - ours.item()) > 1e-3
    trainer.model.train()
    trainer.train()
    assert len([h for h in trainer.state.log_history if "loss" in h]) == 2


def test_lora_trains_only_the_adapter(tmp_path):
    tokenizer = word_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    model.model.register_forward_pre_hook(lambda *_: calls.append(1))
    trainer = SynPOTrainer(
        model=model,
        args=SynPOConfig(output_dir=str(tmp_path), max_steps=3, **COMMON),
        train_dataset=plain_pairs(6),
        processing_class=tokenizer,
        peft_config=lora(),
    )
    trainer.train()
    assert len(calls) == 3
    rows = [h for h in trainer.state.log_history if "loss" in h]
    assert all(-1.2 <= h["loss"] <= 0 for h in rows) and set(rows[0]) >= TRL_METRICS
    changed = [n for n, p in trainer.policy.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
    assert changed
    merged = {
        k.replace("base_model.model.", "").replace("base_layer.", ""): v
        for k, v in model.state_dict().items()
    }
    assert all(torch.equal(v, merged[k]) for k, v in base.items())  # the base weights are frozen


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_checkpoints_hold_the_policy_and_resume_exactly(tmp_path, peft):
    """``trainer.model`` is the objective around the policy; checkpoints and save_model hold the policy
    as save_pretrained writes it (the adapter alone with LoRA), and resuming continues the run."""
    from transformers import AutoModelForCausalLM

    tokenizer = word_tokenizer()

    def run(out, **kwargs):
        args = SynPOConfig(output_dir=str(out), max_steps=4, **{**COMMON, "save_strategy": "steps"})
        args.save_steps = 2
        trainer = SynPOTrainer(
            model=tiny_llama(vocab_size=len(tokenizer)),
            args=args,
            train_dataset=plain_pairs(6),
            processing_class=tokenizer,
            peft_config=lora() if peft else None,
        )
        trainer.train(**kwargs)
        return trainer, {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}

    trainer, losses = run(tmp_path / "a")
    step2 = tmp_path / "a" / "checkpoint-2"
    weights = "adapter_model.safetensors" if peft else "model.safetensors"
    assert (step2 / weights).is_file() and (step2 / "trainer_state.json").is_file()
    trainer.save_model(str(tmp_path / "final"))
    if peft:
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(tiny_llama(vocab_size=len(tokenizer)), str(tmp_path / "final"))
    else:
        loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    trained = trainer.policy.state_dict()
    assert loaded.state_dict().keys() == trained.keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, trained[name]), name

    resumed, resumed_losses = run(tmp_path / "b", resume_from_checkpoint=str(step2))
    assert sorted(losses) == sorted(resumed_losses) == [1, 2, 3, 4]  # steps; 1-2 from the checkpoint
    assert [resumed_losses[k] for k in (3, 4)] == pytest.approx([losses[k] for k in (3, 4)], rel=1e-6)
    for name, tensor in resumed.policy.state_dict().items():
        torch.testing.assert_close(tensor, trained[name], rtol=1e-5, atol=1e-7)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown preference loss"):
        SynPOConfig(output_dir="x", loss_type="sinpo")
    with pytest.raises(ValueError, match="alpha: not an option"):
        SynPOConfig(output_dir="x", loss_type="dpo", alpha=1.0)
    with pytest.raises(TypeError, match="unknown option"):
        SynPOConfig(output_dir="x", loss_options={"gamma": 1.0})
    # TRL's beta is IPO's tau and ORPO's lam.
    assert SynPOConfig(output_dir="x", loss_type="ipo", beta=0.3).resolved_loss_options()["tau"] == 0.3
    assert SynPOConfig(output_dir="x", loss_type="orpo", beta=0.2).resolved_loss_options()["lam"] == 0.2
    # Dict fields from the command line: JSON objects.
    from transformers import HfArgumentParser

    flags = ["--output_dir", "x", "--loss_type", "simpo", "--loss_options", '{"gamma": 1.5}']
    (parsed,) = HfArgumentParser(SynPOConfig).parse_args_into_dataclasses(flags)
    assert parsed.loss_options == {"gamma": 1.5} and parsed.resolved_loss_options()["gamma"] == 1.5
    with pytest.raises(ValueError, match="loss_options: expected a JSON object"):
        SynPOConfig(output_dir="x", loss_options="[1]")
    with pytest.raises(ValueError, match="model_init_kwargs: not a JSON object"):
        SynPOConfig(output_dir="x", model_init_kwargs="{dtype: bf16}")


def test_lora_on_the_lm_head_is_refused(tmp_path):
    """The fused loss reads lm_head.weight: an adapter there would be skipped (the objective's check)."""
    from peft import LoraConfig

    tokenizer = word_tokenizer()
    with pytest.raises(ValueError, match="LoRA wraps the lm_head"):
        SynPOTrainer(
            model=tiny_llama(vocab_size=len(tokenizer)),
            args=SynPOConfig(output_dir=str(tmp_path), **COMMON),
            train_dataset=plain_pairs(4),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4, target_modules=["q_proj", "lm_head"]),
        )


def test_dpo_without_a_reference_is_refused(tmp_path):
    tokenizer = word_tokenizer()
    with pytest.raises(ValueError, match="never creates a reference model"):
        SynPOTrainer(
            model=tiny_llama(vocab_size=len(tokenizer)),
            args=SynPOConfig(output_dir=str(tmp_path), loss_type="dpo", **COMMON),
            train_dataset=plain_pairs(4),
            processing_class=tokenizer,
        )


def test_row_rewards_are_consistent_with_the_registry_margin():
    gen = torch.Generator().manual_seed(0)
    m = -torch.rand(8, generator=gen, dtype=torch.float64) * 3 - 0.05
    n = torch.randint(1, 9, (8,), generator=gen).double()
    ref = m * n + torch.randn(8, generator=gen, dtype=torch.float64)
    stats = sk.RowStats(m * n, (m.exp()) * n, n)
    for name, d in sk.LOSSES.items():
        opts = d.resolve({})
        r = ref if d.needs_reference else None
        margin = d.reward_margin(stats, opts, r)
        w = row_rewards(name, opts, m[:4], n[:4], None if r is None else r[:4])
        lo = row_rewards(name, opts, m[4:], n[4:], None if r is None else r[4:])
        torch.testing.assert_close(w - lo, margin.double())


# ---------------------------------------------------------------------------------------------
# The other losses: equal to TRL's own trainers on the same batch
# ---------------------------------------------------------------------------------------------


def our_trainer(output_dir, loss_type, tokenizer, data, peft_config=None):
    """SynPOTrainer on the tiny Llama with ``beta=0.1`` (TRL's default for dpo/ipo/simpo/cpo/orpo)."""
    return SynPOTrainer(
        model=tiny_llama(vocab_size=len(tokenizer)),
        args=SynPOConfig(output_dir=str(output_dir), loss_type=loss_type, beta=0.1, **COMMON),
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


@pytest.mark.parametrize(("loss_type", "trl_loss"), [("dpo", "sigmoid"), ("ipo", "ipo")])
def test_dpo_ipo_with_adapter_disabled_reference_match_trl(tmp_path, loss_type, trl_loss):
    tokenizer = word_tokenizer()
    data = plain_pairs(4)
    ours = our_trainer(tmp_path / "a", loss_type, tokenizer, data, peft_config=lora())
    theirs = trl.DPOTrainer(
        model=tiny_llama(vocab_size=len(tokenizer)),
        args=trl.DPOConfig(output_dir=str(tmp_path / "b"), loss_type=[trl_loss], beta=0.1, **COMMON),
        train_dataset=data,
        processing_class=word_tokenizer(),
        peft_config=lora(),
    )
    theirs.model.load_state_dict(ours.policy.state_dict())
    perturb_lora(ours.policy, theirs.model)
    batch, their_batch = first_batch(ours), first_batch(theirs)
    assert all(
        torch.equal(batch[k], their_batch[k]) for k in ("input_ids", "attention_mask", "completion_mask")
    )
    a = ours.compute_loss(ours.model, batch)
    b = theirs.compute_loss(theirs.model, batch)
    assert abs(a.item() - b.item()) <= 1e-5 * abs(b.item()) + 1e-6, (a.item(), b.item())
    if loss_type == "dpo":
        assert abs(a.item() - math.log(2)) > 1e-3  # a non-trivial margin
        for key in ("rewards/chosen", "rewards/margins", "logps/chosen"):
            assert ours._metrics["train"][key][-1] == pytest.approx(
                theirs._metrics["train"][key][-1], rel=1e-4
            )


@pytest.mark.parametrize(
    ("loss_type", "options", "trl_losses", "trl_weights"),
    [
        ("hinge", {"f_divergence_type": "js_divergence"}, ["hinge"], None),
        ("apo_down", {}, ["apo_down"], None),
        ("exo_pair", {"label_smoothing": 0.01}, ["exo_pair"], None),
        ("aot_unpaired", {}, ["aot_unpaired"], None),
        # TRL's MPO recipe: loss_type=[sigmoid, bco_pair, sft], loss_weights=[0.8, 0.2, 1.0].
        (
            "dpo+bco_pair+sft",
            {"dpo_weight": 0.8, "bco_pair_weight": 0.2},
            ["sigmoid", "bco_pair", "sft"],
            [0.8, 0.2, 1.0],
        ),
    ],
)
def test_trl_dpo_loss_types_and_weighted_sums_match_trl(
    tmp_path, loss_type, options, trl_losses, trl_weights
):
    """SynPOTrainer with TRL's other DPO loss types and a weighted sum (adapter-disabled reference)."""
    tokenizer = word_tokenizer()
    data = plain_pairs(4)
    ours = SynPOTrainer(
        model=tiny_llama(vocab_size=len(tokenizer)),
        args=SynPOConfig(
            output_dir=str(tmp_path / "a"), loss_type=loss_type, beta=0.1, loss_options=options, **COMMON
        ),
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=lora(),
    )
    trl_options = {k: v for k, v in options.items() if not k.endswith("_weight")}
    theirs = trl.DPOTrainer(
        model=tiny_llama(vocab_size=len(tokenizer)),
        args=trl.DPOConfig(
            output_dir=str(tmp_path / "b"),
            loss_type=trl_losses,
            loss_weights=trl_weights,
            beta=0.1,
            **trl_options,
            **COMMON,
        ),
        train_dataset=data,
        processing_class=word_tokenizer(),
        peft_config=lora(),
    )
    theirs.model.load_state_dict(ours.policy.state_dict())
    perturb_lora(ours.policy, theirs.model)
    batch = first_batch(ours)
    a = ours.compute_loss(ours.model, batch)
    b = theirs.compute_loss(theirs.model, batch)
    assert abs(a.item() - b.item()) <= 1e-5 * abs(b.item()) + 1e-6, (a.item(), b.item())
    for key in ("rewards/chosen", "rewards/margins"):
        assert ours._metrics["train"][key][-1] == pytest.approx(theirs._metrics["train"][key][-1], rel=1e-4)


def test_loss_weights_are_trls(tmp_path):
    """``loss_weights`` (TRL's list) sets the ``<name>_weight`` options of a sum, or is a clear error."""
    common = dict(output_dir=str(tmp_path), report_to=[])
    args = SynPOConfig(loss_type="dpo+bco_pair+sft", loss_weights=[0.8, 0.2, 1.5], beta=0.3, **common)
    options = args.resolved_loss_options()
    assert (options["dpo_weight"], options["bco_pair_weight"], options["sft_weight"], options["beta"]) == (
        0.8, 0.2, 1.5, 0.3,
    )  # fmt: skip
    for kwargs, message in [
        ({"loss_type": "dpo+sft", "loss_weights": [1.0]}, "loss_weights: 1 weight"),
        ({"loss_type": "dpo", "loss_weights": [1.0]}, "one per loss of a sum of two or more"),
        ({"loss_type": "dpo+sft", "loss_weights": [1.0, -1.0]}, "sft_weight: must be >= 0"),
        (
            {"loss_type": "dpo+sft", "loss_weights": [0.5, 1.0], "loss_options": {"dpo_weight": 0.7}},
            r"loss_weights: 'dpo' given both as 0.5 and loss_options\['dpo_weight'\]=0.7",
        ),
        ({"loss_type": "dpo+ipo"}, "option 'average' of 'dpo'"),
    ]:
        with pytest.raises(ValueError, match=message):
            SynPOConfig(**kwargs, **common)


def test_trl_loss_type_spellings_are_accepted(tmp_path):
    """TRL's own loss_type names and list form become the registry entries they are
    (test_loss_conventions checks dpo / dpo average=True against TRL's sigmoid / sigmoid_norm)."""
    common = dict(output_dir=str(tmp_path), report_to=[])
    for loss_type, name, average in [
        ("sigmoid", "dpo", False),
        ("sigmoid_norm", "dpo", True),
        (["sigmoid", "sft"], "dpo+sft", False),
        ("sigmoid_norm+bco_pair", "dpo+bco_pair", True),
    ]:
        args = SynPOConfig(loss_type=loss_type, **common)
        assert args.loss_type == name and args.resolved_loss_options()["average"] is average
    args = SynPOConfig(loss_type=["sigmoid", "sft"], loss_weights=[0.8, 1.0], **common)
    assert args.resolved_loss_options()["dpo_weight"] == 0.8
    with pytest.raises(ValueError, match=r"loss_options\['average'\]=False: the TRL loss_type implies True"):
        SynPOConfig(loss_type="sigmoid_norm", loss_options={"average": False}, **common)
    with pytest.raises(ValueError, match="loss_type: expected a loss name"):
        SynPOConfig(loss_type=[], **common)
    with pytest.raises(ValueError, match="unknown preference loss 'sigmoidd'"):
        SynPOConfig(loss_type="sigmoidd", **common)


def test_dpo_precomputed_reference_matches_trl(tmp_path):
    tokenizer = word_tokenizer()
    data = plain_pairs(4)
    ours = SynPOTrainer(
        model=tiny_llama(vocab_size=len(tokenizer)),
        args=SynPOConfig(
            output_dir=str(tmp_path / "a"), loss_type="dpo", precompute_ref_log_probs=True, **COMMON
        ),
        train_dataset=data,
        processing_class=tokenizer,
    )
    theirs = trl.DPOTrainer(  # an explicit copy of the initial policy: TRL 1.0 would load one by name
        model=tiny_llama(vocab_size=len(tokenizer)),
        ref_model=tiny_llama(vocab_size=len(tokenizer)),
        args=trl.DPOConfig(output_dir=str(tmp_path / "b"), precompute_ref_log_probs=True, **COMMON),
        train_dataset=data,
        processing_class=word_tokenizer(),
    )
    exact = tiny_llama(vocab_size=len(tokenizer)).double().eval()
    for side in ("chosen", "rejected"):
        col = f"ref_{side}_logps"
        mine, trls = torch.tensor(ours.train_dataset[col]), torch.tensor(theirs.train_dataset[col])
        f64 = torch.tensor(
            [
                _row_logps64(exact, ex["prompt_ids"] + ex[f"{side}_ids"], len(ex["prompt_ids"])).sum().item()
                for ex in ours.train_dataset
            ],
            dtype=torch.float64,
        )
        torch.testing.assert_close(mine.double(), f64, rtol=1e-6, atol=1e-5)  # fp32 rounding of a float64 sum
        torch.testing.assert_close(mine, trls, rtol=2e-4, atol=1e-5)  # TRL's own fused LM head: ~1e-4
    batch = first_batch(ours)
    assert "ref_chosen_logps" in batch
    a, b = ours.compute_loss(ours.model, batch), theirs.compute_loss(theirs.model, batch)
    assert a.item() == pytest.approx(math.log(2), abs=1e-5) and a.item() == pytest.approx(b.item(), abs=1e-5)


def _cpo_batch_as_ours(batch, pad_id):
    """TRL CPO/ORPO's chosen_*/rejected_* batch as our [chosen; rejected] input_ids/completion_mask."""
    from torch.nn.utils.rnn import pad_sequence

    rows, masks, labels = [], [], []
    for side in ("chosen", "rejected"):
        for i in range(batch[f"{side}_input_ids"].shape[0]):
            n = int(batch[f"{side}_attention_mask"][i].sum())
            rows.append(batch[f"{side}_input_ids"][i, :n])
            masks.append(batch[f"{side}_attention_mask"][i, :n])
            labels.append(batch[f"{side}_labels"][i, :n])
    ids = pad_sequence(rows, batch_first=True, padding_value=pad_id)
    attn = pad_sequence(masks, batch_first=True, padding_value=0)
    lab = pad_sequence(labels, batch_first=True, padding_value=-100)
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": (lab != -100).long()}


@pytest.mark.parametrize(
    ("loss_type", "trainer", "kwargs"),
    [
        ("simpo", "cpo", {"loss_type": "simpo", "cpo_alpha": 0.0}),
        ("cpo", "cpo", {"loss_type": "sigmoid"}),
        ("orpo", "orpo", {}),
    ],
)
def test_reference_free_family_matches_trl_cpo_orpo(tmp_path, loss_type, trainer, kwargs):
    import warnings

    if trainer == "cpo":
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer
    else:
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
    tokenizer = word_tokenizer()
    data = plain_pairs(4)
    ours = our_trainer(tmp_path / "a", loss_type, tokenizer, data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = Trainer(
            model=tiny_llama(vocab_size=len(tokenizer)),
            args=Config(output_dir=str(tmp_path / "b"), beta=0.1, **kwargs, **COMMON),
            train_dataset=data,
            processing_class=word_tokenizer(),
        )
    their_batch = first_batch(theirs)
    batch = _cpo_batch_as_ours(their_batch, tokenizer.pad_token_id)
    b = theirs.compute_loss(theirs.model, their_batch).item()
    a = ours.compute_loss(ours.model, batch).item()
    if loss_type == "orpo":
        # TRL's ORPOTrainer takes its NLL term over prompt + response ("orpo chosen nll loss is computed
        # over the full prompt and response"); ours, like CPO's, over the chosen response: compare the
        # odds-ratio terms (loss minus each side's NLL) and the log odds ratio itself.
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        with torch.no_grad():
            hidden = ours.policy(
                **{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True
            )
            sums = sk.fused_linear_sequence_logprobs(
                hidden.hidden_states[-1], ours.policy.lm_head.weight, labels, average=False
            )
        half = sums.shape[0] // 2
        our_nll = (-sums[:half].sum() / (labels[:half, 1:] != -100).sum()).item()
        stored = theirs._stored_metrics["train"]
        a, b = a - our_nll, b - float(stored["nll_loss"][-1])
        margin = ours._metrics["train"]["rewards/margins"][-1]
        assert margin == pytest.approx(float(stored["log_odds_chosen"][-1]), rel=1e-4, abs=1e-6)
    assert abs(a - b) <= 1e-5 * abs(b) + 1e-6, (a, b)
