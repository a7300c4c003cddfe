"""The fused SynPO loss in a Hugging Face ``Trainer`` subclass.

``SynPOTrainer.compute_loss`` runs the model through its wrapper (so DDP/DeepSpeed/FSDP hooks fire)
with ``output_hidden_states=True, logits_to_keep=1``: the lm_head runs on one position per row, the
last hidden state is the lm_head input, and the fused loss takes it with the lm_head weight. The
per-pair statistics (chosen/rejected mean log-prob, chosen mean probability, reward margin) come
back from the same pass and are averaged into the Trainer's logs.

ZeRO-3 note: outside the module's forward, ``lm_head.weight`` is an empty partition; gather it with
``deepspeed.zero.GatheredParameters([weight])`` around the loss *and* the backward, or call the loss
inside a wrapper module's forward (see the README). The fused op raises a clear error otherwise.

Run: ``python examples/hf_trainer.py --steps 10``
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

from _tiny import IGNORE_INDEX, random_preference_batch, tiny_llama
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


class SynPOTrainer(Trainer):
    """``Trainer`` whose loss is a fused preference loss on the lm_head input (SynPO by default)."""

    def __init__(self, *args, preference_loss: str = "synpo", loss_options: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.preference_loss = preference_loss
        self.loss_options = loss_options or {}
        self._stats = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            output_hidden_states=True,
            logits_to_keep=1,
        )
        hidden = outputs.hidden_states[-1]
        weight = self.accelerator.unwrap_model(model).get_output_embeddings().weight
        loss, stats = sk.fused_linear_preference_loss(
            hidden,
            weight,
            inputs["labels"],
            loss=self.preference_loss,
            return_stats=True,
            **self.loss_options,
        )
        for key, value in stats.as_dict().items():
            self._stats[key].append(value)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, start_time=None):
        logs = dict(logs)
        logs.update({key: sum(v) / len(v) for key, v in self._stats.items() if v})
        self._stats.clear()
        super().log(logs, start_time)


def train(steps: int = 10, pairs: int = 8, batch_pairs: int = 2, lr: float = 3e-3, output_dir=None, seed=0):
    model = tiny_llama(seed=seed)
    dataset = PairDataset(pairs, model.config.vocab_size, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=output_dir or tmp,
            max_steps=steps,
            per_device_train_batch_size=batch_pairs,
            learning_rate=lr,
            lr_scheduler_type="constant",
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            remove_unused_columns=False,
            use_cpu=not torch.cuda.is_available(),
            seed=seed,
            disable_tqdm=True,
        )
        trainer = SynPOTrainer(model=model, args=args, train_dataset=dataset, data_collator=collate_pairs)
        trainer.train()
        return [h for h in trainer.state.log_history if "loss" in h]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)
    history = train(args.steps, lr=args.lr)
    for h in history:
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in h.items()})
    return history


if __name__ == "__main__":
    main()
