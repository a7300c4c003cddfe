"""Demo scaffolding shared by the examples: a tiny random Llama and random preference pairs.

Nothing here is needed to *use* synpo-kernels; it only makes the examples runnable in seconds on a
CPU, offline (no downloads). Real training uses a pretrained model and tokenized caption pairs.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def tiny_llama(vocab_size: int = 96, hidden_size: int = 32, layers: int = 2, seed: int = 0):
    """A randomly initialised ``LlamaForCausalLM`` (untied lm_head; pad 0, bos 1, eos 2)."""
    from synpo.tiny import build_random_causal_lm

    model = build_random_causal_lm(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        layers=layers,
        heads=4,
        kv_heads=2,
        max_position_embeddings=256,
        seed=seed,
    )
    return model.train()


def random_preference_batch(pairs: int, vocab_size: int, *, prompt=(6, 12), response=(3, 9), seed: int = 0):
    """``input_ids``, ``attention_mask``, ``labels`` of a ``[chosen; rejected]`` batch, right-padded.

    Each pair shares a prompt (standing in for prompt + video tokens: label ``-100``) and has two
    responses of random lengths ending in EOS (id 2); padding (id 0) is ignored too.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(pairs):
        p_len = int(torch.randint(prompt[0], prompt[1] + 1, (1,), generator=gen))
        prompt_ids = torch.randint(3, vocab_size, (p_len,), generator=gen)
        pair = []
        for _ in range(2):
            r_len = int(torch.randint(response[0], response[1] + 1, (1,), generator=gen))
            resp = torch.cat([torch.randint(3, vocab_size, (r_len - 1,), generator=gen), torch.tensor([2])])
            pair.append((prompt_ids, resp))
        rows.append(pair)
    ordered = [r[0] for r in rows] + [r[1] for r in rows]  # chosen rows first, then rejected
    seq = max(len(p) + len(r) for p, r in ordered)
    input_ids = torch.zeros(len(ordered), seq, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for i, (p, r) in enumerate(ordered):
        n = len(p) + len(r)
        input_ids[i, :n] = torch.cat([p, r])
        attention_mask[i, :n] = 1
        labels[i, len(p) : n] = r
    return input_ids, attention_mask, labels


def training_arguments(cls, settings: dict, cli_args=()):
    """``cls`` (``TrainingArguments`` or a subclass) from the example's ``settings``, overridden by
    ``cli_args``: any of its flags as on a command line (``--deepspeed ds.json``, ``--fsdp ...``)."""
    from transformers import HfArgumentParser

    # argparse keeps the last value of a repeated flag: the command line wins over the settings.
    flags = [item for key, value in settings.items() for item in (f"--{key}", str(value))]
    (args,) = HfArgumentParser(cls).parse_args_into_dataclasses([*flags, *cli_args])
    return args


def distribution(trainer) -> dict:
    """How a Trainer's run was spread: processes, accelerate's distributed type, ZeRO stage, FSDP version,
    and the class that wrapped the model (``DistributedDataParallel``, ``DeepSpeedEngine``,
    ``FullyShardedDataParallel``; FSDP2 prefixes the model's class with ``FSDP``)."""
    state = trainer.accelerator.state
    return {
        "processes": state.num_processes,
        "type": str(state.distributed_type).rsplit(".", 1)[-1],
        "wrapper": type(trainer.model_wrapped).__name__,
        "zero_stage": state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None,
        "fsdp_version": state.fsdp_plugin.fsdp_version if trainer.is_fsdp_enabled else None,
    }


def write_history(trainer, history, path) -> None:
    """Print the logged rows and write them with :func:`distribution` to ``path`` (JSON), on rank 0."""
    import json

    if not trainer.accelerator.is_main_process:
        return
    for h in history:
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in h.items()})
    if path:
        with open(path, "w") as f:
            json.dump({"distribution": distribution(trainer), "rows": history}, f)
