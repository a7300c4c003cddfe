"""Prefix sharing in ``synpo.integrations.trl.SynPOTrainer``: TRL's ``[chosen; rejected]`` rows run as one
``[prompt, chosen, rejected]`` segment per pair and train exactly as the rows do (per-step losses, eval
losses, reference log-probs, final weights), with LoRA, gradient checkpointing and both DPO references; pairs
whose two prompts differ (``truncation_mode="keep_end"``) are detected, counted and still exact; ``"auto"``
decides from the data and says why; ``True`` on a model that cannot share is refused at construction."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "trl", reason="TRL is an optional peer (from the clone: pip install --no-build-isolation '.[trl]')"
)

from synpo.integrations.trl import (
    UNSHARED_METRIC,
    SynPOConfig,
    SynPOTrainer,
    _labels,
    _shared_layout,
)
from synpo.prefix_sharing import SEGMENTS_KEY, PrefixSharingUnsupported

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

from _tiny import tiny_llama  # noqa: E402
from tiny_training import TRL_TEST_ARGS, tiny_sliding_window_qwen2  # noqa: E402
from trl_dpo_trainer import caption_pairs, tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMMON = TRL_TEST_ARGS
LOGGER = "synpo.integrations.trl"


def lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])


def tokenized_pairs(n: int, vocab: int, *, seed: int = 0, differing: int = 0):
    """Pre-tokenized ``prompt_ids``/``chosen_ids``/``rejected_ids`` rows (TRL's tokenized columns).

    The first ``differing`` rows have a 12-token prompt and responses of 3 and 6 tokens: with
    ``max_length=12, truncation_mode="keep_end"`` TRL's collator cuts 3 and 6 prompt tokens off their
    two rows, so chosen and rejected no longer start with the same prompt. The other rows fit.
    """
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)

    def ids(k):
        return torch.randint(3, vocab, (k,), generator=g).tolist()

    rows = []
    for i in range(n):
        if i < differing:
            lengths = (12, 3, 6)
        else:
            lengths = tuple(
                int(torch.randint(lo, hi + 1, (1,), generator=g)) for lo, hi in ((2, 5), (1, 4), (1, 4))
            )
        rows.append(dict(zip(("prompt_ids", "chosen_ids", "rejected_ids"), (ids(k) for k in lengths))))
    return Dataset.from_list(rows)


def build(tmp_path, sharing, *, loss_type="synpo", peft=False, data=None, model=None, **config):
    tokenizer = tiny_tokenizer()
    settings = {**COMMON, "max_steps": 3, **config}
    return SynPOTrainer(
        model=model if model is not None else tiny_llama(vocab_size=len(tokenizer)),
        args=SynPOConfig(
            output_dir=str(tmp_path / str(sharing)), loss_type=loss_type, prefix_sharing=sharing, **settings
        ),
        train_dataset=data if data is not None else caption_pairs(6),
        eval_dataset=caption_pairs(4, seed=1),
        processing_class=tokenizer,
        peft_config=lora() if peft else None,
    )


def perturb_lora(model, seed=0):
    """Non-zero LoRA B matrices: the policy then differs from its adapter-disabled reference at step 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def train_logged(trainer):
    """Train; the per-step training rows, the eval rows, and whether each backbone forward got segments."""
    segments = []
    backbone = trainer.policy.get_base_model().model if hasattr(trainer.policy, "get_base_model") else None
    backbone = backbone or trainer.policy.model
    hook = backbone.register_forward_pre_hook(
        lambda _m, _a, kwargs: segments.append(SEGMENTS_KEY in kwargs), with_kwargs=True
    )
    try:
        trainer.train()
    finally:
        hook.remove()
    rows = [h for h in trainer.state.log_history if "loss" in h]
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    return rows, evals, segments


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, rtol: float, name: str = ""):
    err, scale = float((got.double() - want.double()).norm()), float(want.double().norm())
    assert err <= rtol * scale + 1e-12, (name, err, scale)


def assert_trained_the_same(shared, plain):
    (rows_s, evals_s, _), (rows_p, evals_p, _) = shared, plain
    assert [r["step"] for r in rows_s] == [r["step"] for r in rows_p] and rows_p
    for row_s, row_p in zip(rows_s, rows_p):
        for key in ("loss", "logps/chosen", "logps/rejected"):
            assert row_s[key] == pytest.approx(row_p[key], rel=1e-5, abs=1e-7), (row_s["step"], key)
        # A margin is a difference of nearly equal sums: its error is relative to the sums.
        scale = abs(row_p["logps/chosen"]) + abs(row_p["logps/rejected"])
        assert row_s["rewards/margins"] == pytest.approx(row_p["rewards/margins"], abs=1e-6 * scale)
    assert len(evals_s) == len(evals_p)
    for row_s, row_p in zip(evals_s, evals_p):
        assert row_s["eval_loss"] == pytest.approx(row_p["eval_loss"], rel=1e-5, abs=1e-7)


def assert_same_weights(shared_trainer, plain_trainer):
    plain = dict(plain_trainer.policy.named_parameters())
    trained = 0
    for name, p in shared_trainer.policy.named_parameters():
        assert_close_rel(p.detach(), plain[name].detach(), 1e-4, name)
        trained += p.requires_grad
    assert trained


# -- training: shared equals unshared ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss_type", "peft", "config"),
    [
        ("synpo", False, {}),
        ("synpo", True, {"gradient_checkpointing": True}),
        ("dpo", True, {}),  # the reference: the policy with its adapter disabled, shared too
        ("dpo", False, {"precompute_ref_log_probs": True}),  # the reference pass goes through the forward
    ],
    ids=["synpo-full", "synpo-lora-checkpointing", "dpo-adapter-reference", "dpo-precomputed-reference"],
)
def test_sharing_trains_exactly_as_the_rows(tmp_path, loss_type, peft, config):
    config = {"eval_strategy": "steps", "eval_steps": 3, **config}
    runs = {}
    for sharing in (True, False):
        trainer = build(tmp_path, sharing, loss_type=loss_type, peft=peft, **config)
        if peft:
            perturb_lora(trainer.policy)
        runs[sharing] = (trainer, train_logged(trainer))
    (shared, shared_run), (plain, plain_run) = runs[True], runs[False]
    assert shared.objective.prefix_sharing and not plain.objective.prefix_sharing
    assert shared_run[2] and all(shared_run[2])  # every backbone forward (train, reference, eval) shared
    assert plain_run[2] and not any(plain_run[2])
    assert shared_run[1]  # an evaluation ran
    assert_trained_the_same(shared_run, plain_run)
    assert_same_weights(shared, plain)
    assert shared.unshared_pairs == {"train": 0, "eval": 0}
    assert all(r[UNSHARED_METRIC] == 0 for r in shared_run[0])
    assert UNSHARED_METRIC not in plain_run[0][0]
    if config.get("precompute_ref_log_probs"):
        for column in ("ref_chosen_logps", "ref_rejected_logps"):
            assert_close_rel(
                torch.tensor(shared.train_dataset[column]), torch.tensor(plain.train_dataset[column]), 1e-5
            )


def test_gradients_of_one_batch_equal_the_rows(tmp_path):
    trainer = build(tmp_path, True, loss_type="dpo", peft=True)
    perturb_lora(trainer.policy)
    batch = next(iter(trainer.get_train_dataloader()))
    objective = trainer.objective
    grads = {}
    for sharing in (True, False):
        objective.prefix_sharing = sharing  # the attention stays enabled: row batches run the model's own
        objective.zero_grad(set_to_none=True)
        loss, _ = objective(**batch)
        loss.backward()
        grads[sharing] = (
            loss.detach(),
            {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None},
        )
    (loss_s, g_s), (loss_p, g_p) = grads[True], grads[False]
    assert loss_s.item() == pytest.approx(loss_p.item(), rel=1e-5)
    assert g_s.keys() == g_p.keys() and g_p
    for name in g_p:
        assert_close_rel(g_s[name], g_p[name], 1e-4, name)


# -- pairs whose two prompts differ -----------------------------------------------------------------------


def test_prompts_cut_apart_by_keep_end_are_counted_and_train_the_same(tmp_path, caplog):
    tokenizer = tiny_tokenizer()
    data = tokenized_pairs(6, len(tokenizer), seed=2, differing=1)
    runs = {}
    for sharing in (True, False):
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            trainer = build(
                tmp_path, sharing, data=data, max_length=12, truncation_mode="keep_end", max_steps=3
            )
            runs[sharing] = (trainer, train_logged(trainer))
    (shared, shared_run), (plain, plain_run) = runs[True], runs[False]
    # 6 pairs, 2 per step, 3 steps: one epoch, so the one pair cut apart ran exactly once.
    assert shared.unshared_pairs["train"] == 1
    assert sum(r[UNSHARED_METRIC] for r in shared_run[0]) == 1
    said = [r.getMessage() for r in caplog.records if "differ token for token" in r.getMessage()]
    assert len(said) == 1 and "keep_end" in said[0] and UNSHARED_METRIC in said[0]
    assert_trained_the_same(shared_run, plain_run)
    assert_same_weights(shared, plain)


def trl_rows(sequences, completion_starts, *, pad=0, width=None):
    """``input_ids``/``attention_mask``/``completion_mask`` of right-padded rows, as TRL's collator."""
    width = width or max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    for r, (seq, start) in enumerate(zip(sequences, completion_starts)):
        input_ids[r, : len(seq)] = torch.tensor(seq)
        attention_mask[r, : len(seq)] = 1
        completion_mask[r, start : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def test_the_layout_shares_equal_prompts_only_and_refuses_what_is_not_trls():
    # Pair 0 shares [5, 6, 7]; pair 1's prompts differ in their last token (a tokenizer merge).
    chosen = [[5, 6, 7, 10, 11], [8, 9, 12, 13]]
    rejected = [[5, 6, 7, 14], [8, 4, 15, 16, 17]]
    rows = trl_rows(chosen + rejected, [3, 2, 3, 2])
    batch, unshared, layout_ok = _shared_layout(**rows, pad_token_id=0)
    assert (unshared, layout_ok) == (1, True)
    assert batch[SEGMENTS_KEY].tolist() == [[0, 0, 3, 2, 1], [1, 0, 0, 4, 5]]
    assert batch["input_ids"][0, :6].tolist() == [5, 6, 7, 10, 11, 14]
    # The windows score the rows' completion tokens, each after the token that precedes it in its row.
    flat = batch["input_ids"].reshape(-1)
    row_labels = _labels(rows)
    for r, (window, labels) in enumerate(zip(batch["response_index"], batch["response_labels"])):
        scored = row_labels[r] != -100
        assert labels[1:][labels[1:] != -100].tolist() == row_labels[r][scored].tolist()
        first = int(scored.nonzero()[0])
        assert int(flat[window[0]]) == int(rows["input_ids"][r, first - 1])

    # No pair shares its prompt: the rows run as they are (counted).
    batch, unshared, layout_ok = _shared_layout(**trl_rows([[1, 2, 3], [4, 2, 3]], [2, 2]), pad_token_id=0)
    assert batch is None and (unshared, layout_ok) == (1, True)
    # Not TRL's layout: left padding, a completion with a hole, a row without completion tokens.
    left = trl_rows([[5, 6, 7], [5, 6, 8]], [2, 2], width=4)
    for key in left:
        left[key] = left[key].roll(1, dims=1)
    hole = trl_rows([[5, 6, 7, 9, 4], [5, 6, 8]], [2, 2])
    hole["completion_mask"][0, 3] = 0
    empty = trl_rows([[5, 6, 7], [5, 6, 8]], [3, 2])
    for rows in (left, hole, empty):
        assert _shared_layout(**rows, pad_token_id=0) == (None, 0, False)
    odd = trl_rows([[5, 6, 7], [5, 6, 8], [5, 9]], [2, 2, 1])
    assert _shared_layout(**odd, pad_token_id=0) == (None, 0, False)


def test_a_batch_outside_trls_layout_runs_as_rows_with_one_warning(tmp_path, caplog):
    """A custom collator that pads on the left: the rows run as they are (exact), said once, counted."""
    trainer = build(tmp_path, True)
    collate = trainer.data_collator

    def left_padded(examples):
        batch = collate(examples)
        shift = batch["attention_mask"].shape[1] - batch["attention_mask"].sum(1)
        for key in ("input_ids", "attention_mask", "completion_mask"):
            batch[key] = torch.stack([row.roll(int(s)) for row, s in zip(batch[key], shift)])
        return batch

    examples = [trainer.train_dataset[i] for i in range(2)]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(2):
            loss = trainer.compute_loss(trainer.model, left_padded(examples))
    said = [r.getMessage() for r in caplog.records if "not the [chosen; rejected] layout" in r.getMessage()]
    assert len(said) == 1 and "2 pairs" in said[0]
    assert trainer.unshared_pairs["train"] == 4 and torch.isfinite(loss)
    assert trainer.objective.last_sharing == (2, 2, False)


# -- the decision ------------------------------------------------------------------------------------------


def test_auto_decides_from_the_data_and_says_why(tmp_path, caplog):
    tokenizer = tiny_tokenizer()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        on = build(tmp_path / "a", "auto")  # caption prompts ~7 tokens, completions ~6: worth it
        off = build(
            tmp_path / "b",
            "auto",
            data=tokenized_pairs(4, len(tokenizer)).map(
                lambda ex: {"prompt_ids": ex["prompt_ids"][:1], "chosen_ids": ex["chosen_ids"] * 8}
            ),
        )  # 1-token prompts, long completions: below the bound
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prefix sharing")]
    assert len(said) == 2
    assert on.prefix_sharing and on.objective.prefix_sharing and said[0].startswith("prefix sharing on: mean")
    assert not off.prefix_sharing and not off.objective.prefix_sharing
    assert said[1].startswith("prefix sharing off: mean prompt 1 tokens") and "below" in said[1]
    assert on.prefix_sharing_why in said[0] and off.prefix_sharing_why in said[1]
    assert SynPOConfig(output_dir="x").prefix_sharing == "auto"


def test_true_on_a_model_that_cannot_share_is_refused_and_auto_turns_it_off(tmp_path, caplog):
    tokenizer = tiny_tokenizer()
    with pytest.raises(ValueError, match=r"prefix_sharing: true, but .*sliding_attention") as raised:
        build(tmp_path, True, model=tiny_sliding_window_qwen2(len(tokenizer)))
    assert isinstance(raised.value, PrefixSharingUnsupported)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        trainer = build(tmp_path, "auto", model=tiny_sliding_window_qwen2(len(tokenizer)), max_steps=1)
    assert not trainer.objective.prefix_sharing
    assert any(
        "prefix sharing off: qwen2: layers of type ['sliding_attention']" in r.getMessage()
        for r in caplog.records
    )
    trainer.train()


def test_config_checks_prefix_sharing():
    from transformers import HfArgumentParser

    with pytest.raises(ValueError, match="prefix_sharing: must be 'auto', True or False, got 'yes'"):
        SynPOConfig(output_dir="x", prefix_sharing="yes")
    with pytest.raises(ValueError, match="prefix_sharing"):
        SynPOConfig(output_dir="x", prefix_sharing=1)
    assert SynPOConfig(output_dir="x", prefix_sharing="False").prefix_sharing is False
    for flag, value in (("True", True), ("False", False), ("auto", "auto")):
        (parsed,) = HfArgumentParser(SynPOConfig).parse_args_into_dataclasses(
            ["--output_dir", "x", "--prefix_sharing", flag]
        )
        assert parsed.prefix_sharing == value and type(parsed.prefix_sharing) is type(value)
