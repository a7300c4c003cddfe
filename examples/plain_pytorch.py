"""The fused SynPO loss in a plain PyTorch training loop.

The pattern (any causal LM with an ``lm_head``):

1. run the model with ``output_hidden_states=True`` and ``logits_to_keep=1`` (Hugging Face models:
   the lm_head then runs on one position per row instead of all of them), take the last hidden state
   (the input of ``lm_head``);
2. ``loss = fused_linear_synpo_loss(hidden, model.lm_head.weight, labels)`` on the
   ``[chosen; rejected]`` batch, Hugging Face labels (``-100`` on prompt/video/padding);
3. ``loss.backward()``: gradients reach the backbone through ``hidden`` and the lm_head weight
   (if it is trainable), without the ``N x V`` logits ever existing.

``--loss dpo`` shows the reference log-probs: computed once with
``fused_linear_sequence_logprobs(..., average=False)`` under ``torch.no_grad()`` before training (the
reference is the initial policy; this toy loop reuses one batch).

Run: ``python examples/plain_pytorch.py --steps 20``
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _tiny import random_preference_batch, tiny_llama

import synpo_kernels as sk


def lm_head_inputs(model, input_ids, attention_mask):
    """Last hidden state (the lm_head input) without computing full logits."""
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1
    )
    return out.hidden_states[-1]


def train(steps: int = 20, loss: str = "synpo", pairs: int = 4, lr: float = 3e-3, seed: int = 0, log=print):
    model = tiny_llama(seed=seed)
    input_ids, attention_mask, labels = random_preference_batch(pairs, model.config.vocab_size, seed=seed)
    options = {}
    if sk.LOSSES[loss].needs_reference:
        with torch.no_grad():
            hidden = lm_head_inputs(model, input_ids, attention_mask)
            # Summed reference log-probs for every loss (a loss that normalizes divides itself).
            ref = sk.fused_linear_sequence_logprobs(hidden, model.lm_head.weight, labels, average=False)
        options["ref_logps"] = ref
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    history = []
    for step in range(steps):
        hidden = lm_head_inputs(model, input_ids, attention_mask)
        value, stats = sk.fused_linear_preference_loss(
            hidden, model.lm_head.weight, labels, loss=loss, return_stats=True, **options
        )
        value.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"step": step, "loss": float(value), "grad_norm": float(grad_norm), **stats.as_dict()}
        history.append(record)
        log(
            f"step {step:3d} loss {record['loss']:+.4f} chosen_logps {record['chosen_logps']:+.3f} "
            f"rejected_logps {record['rejected_logps']:+.3f} margin {record['reward_margin']:+.4f}"
        )
    return history


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--loss", default="synpo", choices=sorted(sk.LOSSES))
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)
    return train(args.steps, args.loss, args.pairs, args.lr)


if __name__ == "__main__":
    main()
