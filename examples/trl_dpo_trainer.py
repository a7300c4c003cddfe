"""The fused preference losses in a TRL-style trainer: ``synpo.integrations.trl.SynPOTrainer``.

``SynPOTrainer`` takes what TRL's ``DPOTrainer`` takes (``model``, ``args``, ``train_dataset``,
``eval_dataset``, ``processing_class``, ``peft_config``) and trains with
``synpo_kernels.fused_linear_preference_loss`` on the last hidden state and the lm_head weight (no
logits), built on public APIs only (``transformers.Trainer.compute_loss``/``log``, TRL's
``DataCollatorForPreference`` and ``trl.data_utils``), so it does not depend on ``DPOTrainer``'s
private methods:

- ``--loss synpo`` (default), ``simpo``, ``cpo``, ``orpo``: reference-free, one forward per step;
- ``--loss dpo`` / ``ipo``: the reference is the model with its LoRA adapter disabled (as upstream
  SynPO's DPO baseline); ``precompute_ref_log_probs=True`` is the other option (no PEFT needed).
- logging: TRL's metric names (``rewards/chosen``, ``rewards/margins``, ``logps/chosen`` ...).

The example builds a tiny word-level tokenizer and a tiny Llama with a LoRA adapter, offline.

Run: ``python examples/trl_dpo_trainer.py --loss synpo --steps 6``
"""

from __future__ import annotations

import argparse
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


def build_trainer(
    output_dir, loss: str = "synpo", steps: int = 6, pairs: int = 8, lr: float = 5e-3, seed: int = 0
):
    """A ``SynPOTrainer`` on the tiny model (LoRA adapter) and random caption pairs."""
    from peft import LoraConfig

    from synpo.integrations.trl import SynPOConfig, SynPOTrainer

    tokenizer = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer), seed=seed)
    args = SynPOConfig(
        output_dir=output_dir,
        loss_type=loss,
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
    )
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])
    return SynPOTrainer(
        model=model,
        args=args,
        train_dataset=caption_pairs(pairs, seed=seed),
        processing_class=tokenizer,
        peft_config=lora,
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
