"""The fused SynPO loss in a Hugging Face ``Trainer``, under DDP, DeepSpeed (ZeRO-3 included) and FSDP.

The loss runs inside a module's forward: ``FusedPreferenceModel`` holds the causal LM, runs it with
``output_hidden_states=True, logits_to_keep=1`` (the lm_head runs on one position per row; the last
hidden state is the lm_head input) and gives that hidden state and the lm_head weight to the fused
loss. It is the Trainer's model, so what DDP / DeepSpeed / FSDP do around a model's forward and
backward covers the loss as well. The per-pair statistics (chosen/rejected mean log-prob, chosen mean
probability, reward margin) come back from the same pass and are averaged into the Trainer's logs.

ZeRO-3: outside the lm_head's own forward its weight is an empty partition. Registered as an external
parameter of ``FusedPreferenceModel`` (``deepspeed.zero.register_external_parameter``), DeepSpeed
gathers it for this module's forward and its backward. FSDP keeps it unsharded during the root
module's forward, which is this one.

Run: ``python examples/hf_trainer.py --steps 10``; any ``TrainingArguments`` flag passes through::

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/hf_trainer.py --deepspeed synpo/configs/zero3.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _tiny import IGNORE_INDEX, random_preference_batch, tiny_llama, training_arguments, write_history
from transformers import Trainer, TrainingArguments

import synpo_kernels as sk


class PairDataset(torch.utils.data.Dataset):
    """One item = one pair: ``input_ids``/``attention_mask``/``labels`` of shape ``(2, T)``."""

    def __init__(self, pairs: int, vocab_size: int, seed: int = 0):
        ids, mask, labels = random_preference_batch(pairs, vocab_size, seed=seed)
        self.items = [
            {
                "input_ids": torch.stack([ids[i], ids[pairs + i]]),
                "attention_mask": torch.stack([mask[i], mask[pairs + i]]),
                "labels": torch.stack([labels[i], labels[pairs + i]]),
            }
            for i in range(pairs)
        ]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate_pairs(items):
    """Stack B pairs as ``[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]``, right-padded."""
    seq = max(it["input_ids"].shape[1] for it in items)

    def pad(x, value):
        return torch.nn.functional.pad(x, (0, seq - x.shape[1]), value=value)

    out = {}
    for key, value in (("input_ids", 0), ("attention_mask", 0), ("labels", IGNORE_INDEX)):
        padded = [pad(it[key], value) for it in items]
        out[key] = torch.cat([torch.stack([p[0] for p in padded]), torch.stack([p[1] for p in padded])])
    return out


class FusedPreferenceModel(torch.nn.Module):
    """A causal LM and a fused preference loss: ``forward(**batch) -> (loss, stats)``."""

    def __init__(self, model, loss: str = "synpo", **loss_options):
        super().__init__()
        self.model = model
        self.loss = loss
        self.loss_options = loss_options

    def forward(self, input_ids, attention_mask, labels):
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
            logits_to_keep=1,
            use_cache=False,
        )
        return sk.fused_linear_preference_loss(
            outputs.hidden_states[-1],
            self.model.get_output_embeddings().weight,
            labels,
            loss=self.loss,
            return_stats=True,
            **self.loss_options,
        )


class SynPOTrainer(Trainer):
    """``Trainer`` whose model is a :class:`FusedPreferenceModel`; logs the loss's statistics too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._stats = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, stats = model(**inputs)
        for key, value in stats.as_dict().items():
            self._stats[key].append(value)
        return (loss, {"loss": loss.detach()}) if return_outputs else loss

    def log(self, logs, start_time=None):
        logs = dict(logs)
        logs.update({key: sum(v) / len(v) for key, v in self._stats.items() if v})
        self._stats.clear()
        super().log(logs, start_time)


def build_trainer(output_dir, steps=10, pairs=8, batch_pairs=2, lr=3e-3, seed=0, vocab_size=96, cli_args=()):
    """The trainer on the tiny model and random pairs; ``cli_args``: ``TrainingArguments`` flags."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    settings = {
        "output_dir": output_dir,
        "max_steps": steps,
        "per_device_train_batch_size": batch_pairs,
        "learning_rate": lr,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "remove_unused_columns": False,
        "use_cpu": not torch.cuda.is_available(),
        "seed": seed,
        "disable_tqdm": True,
    }
    # The model before the arguments: under a ZeRO-3 config transformers would build it partitioned
    # (deepspeed.zero.Init, another initialisation than the single-process run's).
    model = tiny_llama(vocab_size=vocab_size, seed=seed)
    args = training_arguments(TrainingArguments, settings, cli_args)
    wrapped = FusedPreferenceModel(model)
    if is_deepspeed_zero3_enabled():
        import deepspeed

        deepspeed.zero.register_external_parameter(wrapped, model.get_output_embeddings().weight)
    dataset = PairDataset(pairs, model.config.vocab_size, seed=seed)
    return SynPOTrainer(model=wrapped, args=args, train_dataset=dataset, data_collator=collate_pairs)


def train(
    steps: int = 10,
    pairs: int = 8,
    batch_pairs: int = 2,
    lr: float = 3e-3,
    output_dir=None,
    seed=0,
    vocab_size=96,
    cli_args=(),
    return_trainer=False,
):
    """Train; the logged rows (and the trainer with ``return_trainer``)."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(output_dir or tmp, steps, pairs, batch_pairs, lr, seed, vocab_size, cli_args)
        trainer.train()
        history = [h for h in trainer.state.log_history if "loss" in h]
        return (history, trainer) if return_trainer else history


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--vocab-size", type=int, default=96)
    parser.add_argument("--history", help="write the logged rows and how the run was distributed (JSON)")
    args, cli_args = parser.parse_known_args(argv)
    history, trainer = train(
        args.steps, lr=args.lr, vocab_size=args.vocab_size, cli_args=cli_args, return_trainer=True
    )
    write_history(trainer, history, args.history)
    return history


if __name__ == "__main__":
    main()
