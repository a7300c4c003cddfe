"""Config: YAML + dotted overrides, strict keys with suggestions, types, cross-field rules, CLI."""

from __future__ import annotations

import json

import pytest

from synpo.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    TrainerConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_override_args,
)


def test_dataclass_defaults_are_the_upstream_recipe():
    cfg = config_from_dict({})
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (128, 64, 0.05)
    assert cfg.lora.target_modules == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    assert cfg.optim.lr == 5e-6 and cfg.optim.warmup_ratio == 0.1 and cfg.optim.schedule == "linear"
    assert (cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps, cfg.train.epochs) == (1, 32, 5)
    assert cfg.data.max_length == 2560 and cfg.data.min_score_gap == 4.0
    assert (cfg.data.fps, cfg.data.min_frames, cfg.data.max_frames) == (0.5, 8, 16)
    assert cfg.loss.name == "synpo" and cfg.loss.options() == {}


def test_bundled_default_yaml_is_the_tiny_demo():
    cfg = load_config()
    assert cfg.model.name_or_path is None and cfg.data.train_file is None
    assert cfg.loss.name == "synpo" and cfg.loss.impl == "fused"
    # Round trip through a plain dict.
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_overrides_are_typed_by_the_field():
    overrides = parse_override_args(
        [
            "--optim.lr", "1e-4",
            "--train.max_steps=7",
            "--lora.enabled", "true",
            "--optim.betas", "[0.9, 0.95]",
            "--checkpoint.output_dir", "2024",
            "--data.max_prompt_length", "null",
            "--model.name_or_path", "org/model",
        ]
    )  # fmt: skip
    cfg = load_config(None, overrides)
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.train.max_steps == 7
    assert cfg.lora.enabled is True
    assert cfg.optim.betas == [0.9, 0.95]
    assert cfg.checkpoint.output_dir == "2024"  # a string field keeps the text
    assert cfg.data.max_prompt_length is None
    assert cfg.model.name_or_path == "org/model"


def test_yaml_float_without_dot_is_accepted(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("optim:\n  lr: 1e-4\n")  # PyYAML reads this as a string
    assert load_config(path).optim.lr == pytest.approx(1e-4)


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"optim": {"lrr": 1e-3}}, "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
        ({"traning": {}}, "unknown config key 'traning'; did you mean 'train'?"),
        ({"model": {"tiny": {"hiden_size": 8}}}, "did you mean 'model.tiny.hidden_size'?"),
        ({"train": {"seed": 1.5}}, "train.seed: expected an integer"),
        ({"lora": {"enabled": "yes"}}, "lora.enabled: expected true or false"),
        ({"loss": {"name": "dpoo"}}, "loss.name: unknown preference loss 'dpoo'"),
        ({"loss": {"name": "dpoo"}}, "did you mean 'dpo'?"),
        ({"loss": {"name": "simpo", "beta": 0}}, "loss.beta: must be > 0, got 0"),
        ({"loss": {"name": "cpo", "nll_reduction": "mean"}}, "loss.nll_reduction: must be one of"),
        ({"loss": {"name": "cpo", "average": 1}}, "loss.average: expected true or false"),
        ({"loss": {"name": "dpo", "label_smoothing": 0.1}}, "is cdpo_smoothing="),
        ({"loss": {"tau": 0.1}}, "loss.tau: does not apply to loss 'synpo'"),
        ({"loss": {"name": "simpo", "reference": {"precompute": True}}}, "is reference-free"),
        ({"loss": {"name": "dpo", "reference": {"mode": "adapter_disabled"}}}, "needs lora.enabled"),
        ({"optim": {"betas": [0.9]}}, "optim.betas"),
        ({"data": {"max_frames": 4, "min_frames": 8}}, "data.max_frames"),
        ({"train": {"micro_batch_size": 0}}, "train.micro_batch_size: must be > 0"),
        ({"optim": {"lr": float("nan")}}, "optim.lr: must be finite"),
    ],
)
def test_invalid_configs_name_the_key(mapping, message):
    with pytest.raises(ConfigError, match=None) as info:
        config_from_dict(mapping)
    assert message in str(info.value)


def test_override_of_a_section_or_unknown_nested_key():
    with pytest.raises(ConfigError, match="has no sub-keys"):
        load_config(None, {"optim.lr.x": 1})
    with pytest.raises(ConfigError, match=r"did you mean 'loss\.alpha'"):
        load_config(None, ["--loss.alpah", "3"])
    with pytest.raises(ConfigError, match="missing a value"):
        parse_override_args(["--train.seed"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_override_args(["train.seed", "1"])


def test_loss_options_are_passed_only_when_set():
    cfg = config_from_dict({"loss": {"name": "dpo", "beta": 0.5}})
    assert cfg.loss.options() == {"beta": 0.5}
    assert cfg.loss.needs_reference
    flat = {"loss": {"name": "cpo", "nll_reduction": "per_row", "label_smoothing": 0.1, "beta": None}}
    cfg = config_from_dict(flat)
    assert cfg.loss.options() == {"nll_reduction": "per_row", "label_smoothing": 0.1}
    assert not cfg.loss.needs_reference
    assert config_from_dict(config_to_dict(cfg)) == cfg  # hyper-parameters round-trip, written flat
    assert config_to_dict(cfg)["loss"]["nll_reduction"] == "per_row"
    cfg = load_config(None, ["--loss.name", "simpo", "--loss.gamma", "1", "--loss.nll_reduction", "pooled"])
    assert cfg.loss.options() == {"gamma": 1.0, "nll_reduction": "pooled"}


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(listing)


def test_deepspeed_json_resolves_next_to_the_yaml(tmp_path):
    (tmp_path / "ds.json").write_text("{}")
    (tmp_path / "cfg.yaml").write_text("deepspeed: ds.json\n")
    assert load_config(tmp_path / "cfg.yaml").deepspeed == str(tmp_path / "ds.json")
    inline = load_config(None, ["--deepspeed", '{"zero_optimization": {"stage": 3}}'])
    assert inline.deepspeed == {"zero_optimization": {"stage": 3}}


def test_shipped_example_configs_validate():
    for name in ("default.yaml", "upstream_lora.yaml"):
        cfg = load_config(DEFAULT_CONFIG_PATH.parent / name)
        assert isinstance(cfg, TrainerConfig)
    for name in ("zero2.json", "zero3.json", "zero3_offload.json"):
        data = json.loads((DEFAULT_CONFIG_PATH.parent / name).read_text())
        assert data["zero_optimization"]["stage"] in (2, 3)


def test_cli_print_config_and_errors(capsys):
    from synpo.cli import main

    assert main(["train", "--print-config", "--train.max_steps", "3", "--loss.name", "dpo"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["train"]["max_steps"] == 3 and printed["loss"]["name"] == "dpo"

    assert main(["train", "--train.max_step", "3"]) == 2
    assert "did you mean 'train.max_steps'" in capsys.readouterr().err
    assert main(["train", "--loss.beta", "abc"]) == 2
    assert "loss.beta: expected a number" in capsys.readouterr().err


def test_cli_accepts_resume_flag_forms(capsys):
    from synpo.cli import main

    assert main(["train", "--resume", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"]["resume"] == "auto"
    assert main(["train", "--print-config", "--resume", "runs/x", "--local_rank=0"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"]["resume"] == "runs/x"


def test_resume_config_diff_names_changed_keys_and_honours_allowed_ones():
    from synpo.config import config_changes, format_change, unexpected_resume_changes

    def as_saved(config):  # as a checkpoint stores it (JSON)
        return json.loads(json.dumps(config_to_dict(config)))

    old = as_saved(load_config())
    new = as_saved(
        load_config(
            None,
            {"optim.lr": 2e-5, "train.max_steps": 99, "logging.log_every": 5, "checkpoint.save_every": 3},
        )
    )
    shown = [format_change(c) for c in config_changes(old, new)]
    assert shown == [
        "checkpoint.save_every: 10 -> 3",
        "logging.log_every: 1 -> 5",
        "optim.lr: 0.002 -> 2e-05",
        "train.max_steps: null -> 99",
    ]
    refused = unexpected_resume_changes(old, new, [], extends_run=True)  # saving/logging are free
    assert [format_change(c) for c in refused] == ["optim.lr: 0.002 -> 2e-05"]
    refused = unexpected_resume_changes(old, new, ["optim"], extends_run=False)  # a section allows its keys
    assert [format_change(c) for c in refused] == ["train.max_steps: null -> 99"]  # a shorter run is refused
    with pytest.raises(ConfigError, match=r"'optim\.lrr' is not a config key; did you mean 'optim\.lr'"):
        unexpected_resume_changes(old, new, ["optim.lrr"], extends_run=True)


def test_cli_resume_allow_changes_flag(capsys):
    from synpo.cli import main

    assert main(["train", "--print-config", "--resume-allow-changes", "optim.lr, train.seed"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["checkpoint"]["resume_allow_changes"] == ["optim.lr", "train.seed"]


def test_bundled_deepspeed_configs_by_name_from_any_directory(tmp_path, monkeypatch, capsys):
    """``--deepspeed zero3`` names the installed package's file, as ``--config smollm2`` does, from
    any working directory; ``--help`` lists the names (issue 23, item 8)."""
    from synpo.cli import main
    from synpo.train.engine import build_deepspeed_config

    monkeypatch.chdir(tmp_path)  # not a clone's root: synpo/configs/zero3.json is no path here
    bundled = DEFAULT_CONFIG_PATH.parent
    for name in ("zero2", "zero3", "zero3_offload", "zero3.json"):
        assert main(["train", "--print-config", "--deepspeed", name]) == 0
        path = json.loads(capsys.readouterr().out)["deepspeed"]
        assert path == str(bundled / (name if name.endswith(".json") else f"{name}.json"))
    stage = build_deepspeed_config(config_from_dict({"deepspeed": "zero3"}), world_size=2)
    assert stage["zero_optimization"]["stage"] == 3 and stage["train_batch_size"] == 2 * 32

    (tmp_path / "zero3.json").write_text('{"zero_optimization": {"stage": 1}}')  # an existing file wins
    assert load_config(None, ["--deepspeed", "zero3.json"]).deepspeed == "zero3.json"

    assert main(["train", "--print-config", "--deepspeed", "zero4"]) == 2
    assert capsys.readouterr().err.strip() == (
        "synpo train: config error: deepspeed: file not found: zero4, and no bundled DeepSpeed config "
        "has that name (bundled: zero2, zero3, zero3_offload)"
    )
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "the name of a bundled one (zero2, zero3, zero3_offload;" in help_text
    assert "bundled config (default, smollm2, upstream_lora;" in help_text
