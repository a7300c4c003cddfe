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

Run: ``python examples/trl_dpo_trainer.py --loss synpo --steps 6``; ``--full`` trains all weights
instead of a LoRA adapter, and any ``SynPOConfig`` / ``TrainingArguments`` flag passes through, so the
same script runs at scale (docs/training.md, "Launching at scale")::

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/trl_dpo_trainer.py --full \
        --deepspeed synpo/configs/zero3.json
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

from _tiny import tiny_llama, training_arguments, write_history

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
    output_dir,
    loss: str = "synpo",
    steps: int = 6,
    pairs: int = 8,
    lr: float = 5e-3,
    seed: int = 0,
    *,
    lora: bool = True,
    vocab_size: int | None = None,
    config_args: list[str] = (),
):
    """A ``SynPOTrainer`` on the tiny model (a LoRA adapter, or full fine-tuning) and random caption pairs.

    ``config_args``: ``SynPOConfig`` / ``TrainingArguments`` flags as on a command line (``--deepspeed
    ds.json``, ``--fsdp "full_shard auto_wrap"``, ``--per_device_train_batch_size 4`` ...); they override
    the example's settings. ``vocab_size``: the model's, padded beyond the tokenizer's (the lm_head of a
    real model is its largest matrix; DeepSpeed ZeRO-3 keeps parameters below 1e5 elements whole).
    """
    from peft import LoraConfig

    from synpo.integrations.trl import SynPOConfig, SynPOTrainer

    tokenizer = tiny_tokenizer()
    model = tiny_llama(vocab_size=max(vocab_size or 0, len(tokenizer)), seed=seed)
    settings = {
        "output_dir": output_dir,
        "loss_type": loss,
        "max_steps": steps,
        "per_device_train_batch_size": 2,
        "learning_rate": lr,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": not torch.cuda.is_available(),
        "seed": seed,
        "disable_tqdm": True,
    }
    args = training_arguments(SynPOConfig, settings, config_args)
    lora_config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"]
    )
    return SynPOTrainer(
        model=model,
        args=args,
        train_dataset=caption_pairs(pairs, seed=seed),
        processing_class=tokenizer,
        peft_config=lora_config if lora else None,
    )


def train(
    loss: str = "synpo",
    steps: int = 6,
    pairs: int = 8,
    lr: float = 5e-3,
    seed: int = 0,
    *,
    save_to: str | None = None,
    return_trainer: bool = False,
    **kwargs,
):
    """Train and return the logged rows (and the trainer with ``return_trainer``); ``save_to``: a directory
    for the trained model (``save_pretrained`` format); ``kwargs``: ``lora=``, ``config_args=`` of
    :func:`build_trainer`."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(tmp, loss, steps, pairs, lr, seed, **kwargs)
        trainer.train()
        if save_to:
            trainer.save_model(save_to)
        history = [h for h in trainer.state.log_history if "loss" in h]
        return (history, trainer) if return_trainer else history


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--loss", default="synpo", choices=sorted(sk.LOSSES))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of a LoRA adapter")
    parser.add_argument("--vocab-size", type=int, help="pad the model's vocabulary to this size")
    parser.add_argument("--save", help="save the trained model to this directory")
    parser.add_argument("--history", help="write the logged rows and how the run was distributed (JSON)")
    args, config_args = parser.parse_known_args(argv)
    history, trainer = train(
        args.loss,
        args.steps,
        args.pairs,
        lora=not args.full,
        vocab_size=args.vocab_size,
        config_args=config_args,
        save_to=args.save,
        return_trainer=True,
    )
    write_history(trainer, history, args.history)
    return history


if __name__ == "__main__":
    main()
