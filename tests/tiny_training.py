"""Pieces shared by the tests that train the tiny model: its config, pair files cut from the bundled
sample, comparisons of two runs, and hooks that act at a precise point of a run (also in child processes,
which import this module through ``CHILD_ENV``)."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from synpo.data import SAMPLE_PAIRS_PATH

TESTS_DIR = Path(__file__).resolve().parent
# Child processes: offline, one thread as in-process tests (conftest.py's one_torch_thread), this module
# importable.
CHILD_ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH")) if p),
}


def free_port() -> int:
    """A free TCP port for a launcher's rendezvous (``--master_port``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


TIMING_KEYS = frozenset({"tokens_per_s", "step_time_s", "peak_memory_mb", "eval_seconds"})
TINY_MODEL = {"hidden_size": 32, "layers": 2, "heads": 2}
# 8 steps of 4 pairs, checkpoints every 2, LoRA with dropout: a resumed run must restore the RNG to draw
# the same dropout masks as the uninterrupted one.
RESUMABLE_RUN = {
    "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
    "optim": {"lr": 1e-2, "warmup_steps": 2},
    "train": {
        "epochs": 1,
        "max_steps": 8,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "seed": 5,
    },
    "checkpoint": {"save_every": 2, "keep_last": 3},
}


def tiny_training_config(output_dir, *overlays: dict, **sections) -> dict:
    """The config of a quick run of the 32-wide tiny Llama into ``output_dir``, then each overlay (a
    mapping of sections) and ``sections`` in turn: a dict updates its section, any other value
    replaces it."""
    config = {
        "model": {"tiny": dict(TINY_MODEL)},
        "data": {"max_length": 256},
        "checkpoint": {"output_dir": str(output_dir)},
        "logging": {"progress_bar": False},
    }
    for overlay in (*overlays, sections):
        for section, values in overlay.items():
            if isinstance(values, dict):
                config.setdefault(section, {}).update(values)
            else:
                config[section] = values
    return config


def generic_sample_lines() -> list[str]:
    """The bundled sample's records in the generic format (the upstream ones have ``pos_pre``)."""
    return [line for line in SAMPLE_PAIRS_PATH.read_text().splitlines() if "pos_pre" not in line]


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def without_timing(rows: list[dict]) -> list[dict]:
    """Metrics rows without their wall-clock entries: what two runs must agree on exactly."""
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def assert_same_weights(ours: Path, theirs: Path) -> None:
    """The ``model.safetensors`` of two checkpoint directories are bit-identical."""
    a = load_file(str(ours / "model.safetensors"))
    b = load_file(str(theirs / "model.safetensors"))
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


def call_after_optimizer_step(target, step: int, action) -> None:
    """Make ``target`` (a Trainer, or the Trainer class) call ``action()`` right after its ``step``-th
    optimizer step from now on."""
    real_step = target._optimizer_step
    done = [0]

    def step_then_act(*args):
        norm = real_step(*args)
        done[0] += 1
        if done[0] == step:
            action()
        return norm

    target._optimizer_step = step_then_act


def call_while_saving(step: int, action) -> None:
    """Call ``action()`` while the step-``step`` checkpoint is half written: its ``optimizer.pt`` is in
    the temporary directory, the checkpoint is not published yet."""
    from synpo import checkpoint as ckpt

    real_save = ckpt.save_torch_state

    def save_then_act(obj, path):
        real_save(obj, path)
        if path.name == "optimizer.pt" and path.parent.name == f".tmp-step-{step:08d}":
            action()

    ckpt.save_torch_state = save_then_act


def tiny_softcapped_lm(vocab_size: int, softcap: float = 0.25, seed: int = 0):
    """A tiny Gemma-2 (tied embeddings) whose logits are ``softcap * tanh(hidden @ W.T / softcap)``,
    not the ``hidden @ lm_head.weight.T`` the fused loss computes. The cap is small enough to change
    this random model's logits (about +-0.3) a lot."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        final_logit_softcapping=softcap,
        attn_logit_softcapping=None,
        max_position_embeddings=512,
        sliding_window=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return Gemma2ForCausalLM(config).train()


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    """``examples/<name>.py`` as a module (the examples import their ``_tiny`` helpers by name)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_sliding_window_qwen2(vocab_size: int, special_token_ids: tuple[int, int, int] = (1, 2, 0)):
    """A tiny Qwen2 whose every layer uses sliding-window attention (``max_window_layers=0``): a model
    prefix sharing refuses (the segment layout cannot express the window). ``special_token_ids``:
    (bos, eos, pad)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    bos, eos, pad = special_token_ids
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=16,
        max_window_layers=0,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()


# transformers.TrainingArguments of the TRL trainer tests: tiny, CPU, deterministic, no output.
TRL_TEST_ARGS = dict(
    per_device_train_batch_size=2,
    per_device_eval_batch_size=2,
    learning_rate=5e-3,
    lr_scheduler_type="constant",
    logging_steps=1,
    save_strategy="no",
    report_to=[],
    use_cpu=True,
    disable_tqdm=True,
    seed=0,
)
