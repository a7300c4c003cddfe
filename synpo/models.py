"""Model loading for training: any ``AutoModelForCausalLM`` or vision-language model, the embedded tiny
models, LoRA through peft, frozen vision tower/projector, gradient checkpointing, attention choice,
and the DPO reference model.
"""

from __future__ import annotations

import copy
import importlib.util
import re
from dataclasses import dataclass
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
    "resolve_attn_implementation",
    "resolve_reference_mode",
    "trainable_parameter_count",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def load_model(model_cfg: ModelConfig, *, device: torch.device, seed: int = 0) -> LoadedModel:
    """Build the embedded tiny model (``name_or_path`` null) or load a pretrained one.

    Pretrained: ``AutoModelForImageTextToText`` + ``AutoProcessor`` when the config has a vision
    config, else ``AutoModelForCausalLM`` + ``AutoTokenizer``. Weights in ``model.dtype``; attention
    per :func:`resolve_attn_implementation`. The model is returned on CPU in train mode.
    """
    dtype = DTYPES[model_cfg.dtype]
    attn = resolve_attn_implementation(model_cfg.attn_implementation, device)
    if model_cfg.name_or_path is None:
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

        common = {"revision": model_cfg.revision, "trust_remote_code": model_cfg.trust_remote_code}
        config = AutoConfig.from_pretrained(model_cfg.name_or_path, **common)
        is_vision = _is_vision_config(config)
        if is_vision:
            from transformers import AutoModelForImageTextToText

            model = AutoModelForImageTextToText.from_pretrained(
                model_cfg.name_or_path, dtype=dtype, attn_implementation=attn, **common
            )
            processor = AutoProcessor.from_pretrained(model_cfg.name_or_path, **common)
            tokenizer = processor.tokenizer
        else:
            model = AutoModelForCausalLM.from_pretrained(
                model_cfg.name_or_path, dtype=dtype, attn_implementation=attn, **common
            )
            processor = None
            tokenizer = AutoTokenizer.from_pretrained(model_cfg.name_or_path, **common)
        source = model_cfg.name_or_path
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


def freeze_vision(model: nn.Module) -> int:
    """Freeze the vision tower and projector (as upstream); returns the number of frozen elements."""
    from synpo.tiny import freeze_vision_modules

    return freeze_vision_modules(model)


def _vision_prefixes(model: nn.Module) -> tuple[str, ...]:
    from synpo.tiny import vision_parameter_prefixes

    try:
        return vision_parameter_prefixes(model)
    except ValueError:
        return ()


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
        ref_cfg.name_or_path = ref_path
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
