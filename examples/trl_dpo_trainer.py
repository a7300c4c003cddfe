"""The fused preference losses inside TRL's ``DPOTrainer`` (TRL >= 1.0).

TRL's ``DPOTrainer`` computes its loss in ``_compute_loss(model, inputs, return_outputs)``; the
batch arrives as ``input_ids``/``attention_mask``/``completion_mask`` of ``[chosen; rejected]`` rows
(its ``DataCollatorForPreference``). ``FusedPreferenceTrainer`` overrides that one method:

- policy: the model runs through its wrapper with ``output_hidden_states=True, logits_to_keep=1``,
  and ``synpo_kernels.fused_linear_preference_loss`` takes the last hidden state and the lm_head
  weight, labels = ``input_ids`` with ``-100`` outside the completion (6 n D V FLOPs, no logits);
- reference (``dpo``/``ipo`` only): precomputed ``ref_chosen_logps``/``ref_rejected_logps`` when the
  dataset has them (``precompute_ref_log_probs=True``), otherwise one no-grad pass of
  ``fused_linear_sequence_logprobs`` through the reference: the LoRA adapter disabled (as upstream
  SynPO's DPO baseline) or ``ref_model``. SynPO, SimPO, CPO and ORPO need no reference at all: with a
  PEFT model (or ``precompute_ref_log_probs``) TRL does not build one either.
- logging: the fused op's statistics go into TRL's own metrics (``logps/chosen``,
  ``logps/rejected``, ``rewards/margins``...), averaged and logged by ``DPOTrainer.log``.

The rest of ``DPOTrainer`` (dataset tokenization, collation, PEFT, accelerate/DeepSpeed, schedules,
checkpoints) is unchanged. The example builds a tiny word-level tokenizer and a tiny Llama with a
LoRA adapter, offline.

Run: ``python examples/trl_dpo_trainer.py --loss synpo --steps 6``
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _tiny import tiny_llama

import synpo_kernels as sk

WORDS = [
    "a",
    "man",
    "woman",
    "dog",
    "cat",
    "car",
    "walks",
    "runs",
    "sits",
    "jumps",
    "on",
    "the",
    "street",
    "park",
    "table",
    "red",
    "blue",
    "small",
    "large",
    "slowly",
    "quickly",
    "camera",
    "pans",
    "left",
    "right",
    "while",
    "holding",
    "cup",
    "ball",
    "near",
    "tree",
    "and",
    "then",
    "turns",
]


def tiny_tokenizer():
    """A word-level fast tokenizer over ``WORDS`` (ids 0-3 are special), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def caption_pairs(n: int, seed: int = 0):
    """A ``datasets.Dataset`` of ``prompt``/``chosen``/``rejected`` texts (random words)."""
    from datasets import Dataset

    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))
    rows = [
        {
            "prompt": words(rng.randint(4, 8)) + " ",
            "chosen": words(rng.randint(3, 7)),
            "rejected": words(rng.randint(3, 7)),
        }
        for _ in range(n)
    ]
    return Dataset.from_list(rows)


def _trainer_class():
    from trl import DPOTrainer

    class FusedPreferenceTrainer(DPOTrainer):
        """``DPOTrainer`` with its loss replaced by a fused synpo-kernels preference loss."""

        def __init__(self, *args, preference_loss: str = "synpo", loss_options: dict | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.preference_loss = preference_loss
            self.loss_options = dict(loss_options or {})
            if preference_loss == "dpo":
                self.loss_options.setdefault("beta", self.beta)

        @staticmethod
        def _lm_head_input(model, inputs):
            out = model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                output_hidden_states=True,
                logits_to_keep=1,
                use_cache=False,
            )
            return out.hidden_states[-1]

        def _reference_logps(self, model, inputs, labels):
            if "ref_chosen_logps" in inputs:
                return torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).float()
            ref_model = self.ref_model if self.ref_model is not None else model
            unwrapped = self.accelerator.unwrap_model(ref_model)
            disable = getattr(unwrapped, "disable_adapter", None)
            ctx = disable() if self.ref_model is None and disable is not None else contextlib.nullcontext()
            with torch.no_grad(), ctx:
                hidden = self._lm_head_input(ref_model, inputs)
                weight = unwrapped.get_output_embeddings().weight
                # Summed, as TRL precomputes them, whatever the loss (IPO normalizes by itself).
                return sk.fused_linear_sequence_logprobs(hidden, weight, labels, average=False)

        def _compute_loss(self, model, inputs, return_outputs):
            mode = "train" if self.model.training else "eval"
            labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
            options = dict(self.loss_options)
            if sk.LOSSES[self.preference_loss].needs_reference:
                options["ref_logps"] = self._reference_logps(model, inputs, labels)
            hidden = self._lm_head_input(model, inputs)
            weight = self.accelerator.unwrap_model(model).get_output_embeddings().weight
            loss, stats = sk.fused_linear_preference_loss(
                hidden, weight, labels, loss=self.preference_loss, return_stats=True, **options
            )
            gather = lambda t: self.accelerator.gather_for_metrics(t.float()).mean().item()
            self._metrics[mode]["logps/chosen"].append(gather(stats.chosen_logps))
            self._metrics[mode]["logps/rejected"].append(gather(stats.rejected_logps))
            self._metrics[mode]["probs/chosen_mean"].append(gather(stats.chosen_mean_prob))
            self._metrics[mode]["rewards/margins"].append(gather(stats.reward_margin))
            self._metrics[mode]["rewards/accuracies"].append(gather((stats.reward_margin > 0).float()))
            if return_outputs:
                return loss, {"loss": loss.detach()}
            return loss

    return FusedPreferenceTrainer


def build_trainer(
    output_dir, loss: str = "synpo", steps: int = 6, pairs: int = 8, lr: float = 5e-3, seed: int = 0
):
    """A ``FusedPreferenceTrainer`` on the tiny model (LoRA adapter) and random caption pairs."""
    from peft import LoraConfig
    from trl import DPOConfig

    tokenizer = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer), seed=seed)
    args = DPOConfig(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
        disable_tqdm=True,
        dataset_num_proc=None,
    )
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])
    return _trainer_class()(
        model=model,
        args=args,
        train_dataset=caption_pairs(pairs, seed=seed),
        processing_class=tokenizer,
        peft_config=lora,
        preference_loss=loss,
    )


def train(loss: str = "synpo", steps: int = 6, pairs: int = 8, lr: float = 5e-3, seed: int = 0):
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(tmp, loss, steps, pairs, lr, seed)
        trainer.train()
        return [h for h in trainer.state.log_history if "loss" in h]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--loss", default="synpo", choices=sorted(sk.LOSSES))
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args(argv)
    history = train(args.loss, args.steps)
    for h in history:
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in h.items()})
    return history


if __name__ == "__main__":
    main()
