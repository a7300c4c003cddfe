"""Prefix sharing: a pair's prompt (and video) computed once, its two responses continuing from it.

A preference pair's chosen and rejected responses share their prompt, which for video captioning is
most of the sequence (1-2k frame and prompt tokens against 100-300 caption tokens). Instead of the two
rows ``[prompt, chosen]`` and ``[prompt, rejected]``, the collator builds one segment
``[prompt, chosen, rejected]`` per pair whose rejected positions restart after the prompt
(``position_ids``), and the attention below computes exactly what the two rows would:

- prompt and chosen positions: plain causal attention over ``[prompt, chosen]``;
- rejected positions: attention over the prompt's keys and, causally, the rejected ones; never chosen's.

So every hidden state equals the unshared one (exact in float64); the prompt and the vision tower run
once per pair instead of twice, and the attention cost stays that of the two causal rows, without the
chosen x rejected block a dense mask would compute and throw away.

Mechanism: transformers' ``AttentionInterface``. :func:`enable_prefix_sharing` registers, for the
model's attention implementation ``X``, the function ``synpo_prefix_sharing_X`` and selects it on the
language model (not on a vision tower). It runs the segment attention when the forward was given
``prefix_sharing_segments`` (a keyword argument transformers hands down to every attention call, as it
does flash-attention's ``cu_seq_lens``; gradient checkpointing replays it) and is ``X`` itself otherwise,
so ``generate``, evaluation and unshared batches are unchanged.

``prefix_sharing_segments`` is a ``(segments, 5)`` int64 tensor, one line per pair:
``(row, start, prompt_len, chosen_len, rejected_len)``: the segment occupies positions
``[start, start + prompt_len + chosen_len + rejected_len)`` of batch row ``row``. A pair whose responses
do not continue one prompt token for token is a segment with ``prompt_len = 0`` (its two full sequences,
no saving, still exact). Positions outside every segment (padding) get zero attention output.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AUTO_MIN_BOUND",
    "SEGMENTS_KEY",
    "PrefixSharingUnsupported",
    "decide_prefix_sharing",
    "enable_prefix_sharing",
    "is_prefix_sharing_enabled",
    "prefix_sharing_problem",
    "shared_prefix_attention",
    "token_bound",
]

SEGMENTS_KEY = "prefix_sharing_segments"  # the batch key and model keyword argument
ATTENTION_PREFIX = "synpo_prefix_sharing_"
# Model types whose positions are not one index per token (multimodal rotary sections) or whose
# attention reads more than query/key/value (sinks): the segment layout cannot express them.
UNSUPPORTED_MODEL_TYPES = frozenset(
    {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "gpt_oss", "gemma3n"}
)

logger = logging.getLogger(__name__)


class PrefixSharingUnsupported(ValueError):
    """The model's attention cannot be computed segment by segment (the message says why)."""


# -- the attention -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SegmentPlan:
    """Index tensors of one batch's segment layout: the same for every layer, so built once per
    forward (the maxima below are host values: one device sync per forward, not four per layer)."""

    flat_index: torch.Tensor  # (n, width): row * S + position of each segment slot
    inside: torch.Tensor  # (n, width): the slot is a position of the segment
    first_max: int  # longest [prompt, chosen]
    rejected_local: torch.Tensor  # (n, rejected_max): segment slots of the rejected queries
    key_local: torch.Tensor  # (n, prompt_max + rejected_max): their keys (prompt, then rejected)
    mask: torch.Tensor  # (n, 1, rejected_max, prompt_max + rejected_max)
    from_rejected: torch.Tensor  # (n, width): where slot j reads the rejected output
    is_rejected: torch.Tensor  # (n, 1, width, 1)
    target: torch.Tensor  # (n * width,): flat output position of each slot (B * S: dropped)


def _plan(segments: torch.Tensor, batch: int, seq_len: int) -> _SegmentPlan:
    # Cached on the segments tensor, which every layer (and a checkpointed layer's recompute) receives.
    plans = segments.__dict__.setdefault("_synpo_plans", {})
    key = (batch, seq_len)
    if key in plans:
        return plans[key]
    device = segments.device
    row, start, prompt, chosen, rejected = segments.unbind(1)
    length = prompt + chosen + rejected
    first = prompt + chosen
    maxima = torch.stack([length.max(), first.max(), prompt.max(), rejected.max()]).tolist()
    width, first_max, prompt_max, rejected_max = maxima
    if rejected_max == 0:  # no rejected tokens anywhere: the segments are [prompt, chosen] rows
        rejected_max, rejected = 1, rejected.clamp(min=1)
    offsets = torch.arange(width, device=device)
    inside = offsets[None, :] < length[:, None]
    flat_index = (
        row[:, None] * seq_len + start[:, None] + torch.minimum(offsets[None, :], length[:, None] - 1)
    )
    steps = torch.arange(rejected_max, device=device)
    rejected_local = torch.minimum(first[:, None] + steps[None, :], first[:, None] + rejected[:, None] - 1)
    rejected_local = rejected_local.clamp(min=0, max=width - 1)
    n = segments.shape[0]
    prompt_local = torch.arange(prompt_max, device=device).expand(n, prompt_max)
    sees_prompt = (prompt_local < prompt[:, None])[:, None, :].expand(n, rejected_max, prompt_max)
    causal = (steps[:, None] >= steps[None, :]).expand(n, rejected_max, rejected_max)
    # Query slots beyond a segment's rejected length are discarded; let them see everything so that
    # no softmax row is empty (NaN on some backends).
    mask = torch.cat([sees_prompt, causal], dim=2) | (steps[None, :, None] >= rejected[:, None, None])
    plan = _SegmentPlan(
        flat_index=flat_index,
        inside=inside,
        first_max=first_max,
        rejected_local=rejected_local,
        key_local=torch.cat([prompt_local, rejected_local], dim=1),
        mask=mask[:, None],
        from_rejected=(offsets[None, :] - first[:, None]).clamp(min=0, max=rejected_max - 1),
        is_rejected=(offsets[None, :] >= first[:, None])[:, None, :, None],
        target=torch.where(inside, flat_index, batch * seq_len).reshape(-1),
    )
    plans[key] = plan
    return plan


def shared_prefix_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segments: torch.Tensor,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention of ``[prompt, chosen, rejected]`` segments as if chosen and rejected were two rows.

    ``query`` ``(B, H, S, d)``, ``key``/``value`` ``(B, Hkv, S, d)`` (grouped-query heads allowed),
    ``segments`` as in the module docstring. Returns ``(B, S, H, d)`` (transformers' attention output
    layout); positions outside every segment are zero. Differentiable; pure PyTorch
    (``scaled_dot_product_attention``: its flash / memory-efficient kernels on CUDA), so it runs
    wherever the model does.
    """
    batch, heads, seq_len, dim = query.shape
    gqa = {"enable_gqa": True} if key.shape[1] != heads else {}
    plan = _plan(segments, batch, seq_len)
    n, width = plan.flat_index.shape

    def gather(t: torch.Tensor) -> torch.Tensor:
        # (B, h, S, d) -> (n, h, width, d): each segment's positions as one row
        flat = t.transpose(1, 2).reshape(batch * seq_len, t.shape[1], dim)
        return flat[plan.flat_index.reshape(-1)].reshape(n, width, t.shape[1], dim).transpose(1, 2)

    def local(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return t.gather(2, index[:, None, :, None].expand(n, t.shape[1], index.shape[1], dim))

    q, k, v = gather(query), gather(key), gather(value)
    first = plan.first_max
    # [prompt, chosen]: causal, as the chosen row alone.
    out_first = F.scaled_dot_product_attention(
        q[:, :, :first],
        k[:, :, :first],
        v[:, :, :first],
        is_causal=True,
        scale=scale,
        dropout_p=dropout_p,
        **gqa,
    )
    # Rejected queries: keys of the prompt, then (causally) of the rejected positions.
    out_rejected = F.scaled_dot_product_attention(
        local(q, plan.rejected_local),
        local(k, plan.key_local),
        local(v, plan.key_local),
        attn_mask=plan.mask,
        scale=scale,
        dropout_p=dropout_p,
        **gqa,
    )
    # Back to segment order, then scatter the segments into (B*S) positions (padding slots go to a
    # dropped extra row).
    out_first = F.pad(out_first, (0, 0, 0, width - first))
    out = torch.where(plan.is_rejected, local(out_rejected, plan.from_rejected), out_first).transpose(1, 2)
    result = out.new_zeros(batch * seq_len + 1, heads, dim)
    result = result.index_copy(0, plan.target, out.reshape(n * width, heads, dim))
    return result[:-1].reshape(batch, seq_len, heads, dim)


def _base_attention(base_name: str, module: nn.Module):
    """The attention function ``base_name`` names for ``module``: a registered one, or ``eager``,
    which transformers defines in each model's own module."""
    from transformers import AttentionInterface

    if base_name != "eager":
        return AttentionInterface._global_mapping[base_name]
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise RuntimeError(
            f"{type(module).__name__}: no eager_attention_forward in {type(module).__module__}"
        )
    return eager


def _attention_function(base_name: str):
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        segments = kwargs.pop(SEGMENTS_KEY, None)
        if segments is None:
            base = _base_attention(base_name, module)
            return base(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        out = shared_prefix_attention(query, key, value, segments, scale=scaling, dropout_p=dropout)
        return out, None

    attention.__name__ = f"{ATTENTION_PREFIX}{base_name}"
    return attention


def _register(base_name: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    name = f"{ATTENTION_PREFIX}{base_name}"
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _attention_function(base_name))
        # Unshared forwards build the base implementation's mask; shared ones ignore the mask.
        AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping[base_name])
    return name


# -- the model ---------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _text_config(model: nn.Module):
    config = _unwrap(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _text_config_key(config, text_config) -> str | None:
    """The sub-config name under which ``config`` holds ``text_config`` (None: it is ``config``)."""
    if text_config is config:
        return None
    for key in getattr(config, "sub_configs", {}) or {}:
        if getattr(config, key, None) is text_config:
            return key
    return None


def prefix_sharing_problem(model: nn.Module) -> str | None:
    """Why ``model``'s language model cannot run shared-prefix segments, or None when it can."""
    hf_model = _unwrap(model)
    text_config = _text_config(model)
    model_type = getattr(text_config, "model_type", "")
    top_type = getattr(hf_model.config, "model_type", "")
    for kind in (model_type, top_type):
        if kind in UNSUPPORTED_MODEL_TYPES:
            return f"{kind} models are not supported (multimodal rotary positions or attention sinks)"
    rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
    if isinstance(rope, dict) and "mrope_section" in rope:
        return f"{model_type}: multimodal rotary positions (mrope) are not one index per token"
    layer_types = set(getattr(text_config, "layer_types", None) or ())
    if layer_types - {"full_attention"}:
        return (
            f"{model_type}: layers of type {sorted(layer_types - {'full_attention'})} (only full attention)"
        )
    window = getattr(text_config, "sliding_window", None)
    if window and getattr(text_config, "use_sliding_window", True) and not layer_types:
        return f"{model_type}: sliding-window attention (window {window})"
    if getattr(text_config, "attn_logit_softcapping", None):
        return f"{model_type}: attention logit soft-capping"
    can_set = getattr(hf_model, "_can_set_attn_implementation", None)
    if callable(can_set) and not can_set():
        return (
            f"{type(hf_model).__name__} does not dispatch attention through transformers' AttentionInterface"
        )
    base = str(getattr(text_config, "_attn_implementation", None) or "eager")
    if not base.startswith(ATTENTION_PREFIX):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        known = base == "eager" or base in AttentionInterface._global_mapping
        if not known or base not in AttentionMaskInterface._global_mapping:
            return f"attention implementation {base!r} is not one of transformers' registered ones"
    return None


def is_prefix_sharing_enabled(model: nn.Module) -> bool:
    """Whether ``model``'s language model runs the shared-prefix attention for segment batches."""
    implementation = getattr(_text_config(model), "_attn_implementation", None) or ""
    return str(implementation).startswith(ATTENTION_PREFIX)


def enable_prefix_sharing(model: nn.Module) -> nn.Module:
    """Select the shared-prefix attention on ``model``'s language model (in place; returns ``model``).

    Idempotent. Raises :class:`PrefixSharingUnsupported` naming the reason for a model it cannot
    serve (see :func:`prefix_sharing_problem`). Batches without ``prefix_sharing_segments`` run the
    model's own attention as before.
    """
    if is_prefix_sharing_enabled(model):
        return model
    problem = prefix_sharing_problem(model)
    if problem is not None:
        raise PrefixSharingUnsupported(problem)
    hf_model = _unwrap(model)
    text_config = _text_config(model)
    name = _register(str(getattr(text_config, "_attn_implementation", None) or "eager"))
    key = _text_config_key(hf_model.config, text_config)
    hf_model.set_attn_implementation(name if key is None else {key: name})
    if not is_prefix_sharing_enabled(model):
        raise PrefixSharingUnsupported(
            f"{type(hf_model).__name__}: transformers did not select the attention implementation {name!r}"
        )
    return model


def token_bound(prompt_tokens: float, response_tokens: float) -> float:
    """The speed-up bound by token count: ``2(P+R) / (P+2R)`` for prompt ``P`` and responses ``R``."""
    return 2.0 * (prompt_tokens + response_tokens) / max(prompt_tokens + 2.0 * response_tokens, 1e-9)


# Below this token-count bound ``auto`` leaves sharing off: the segment attention's gathers and second
# attention call cost more than the few prompt tokens saved (``synpo bench trainer --preset
# prefix-sweep`` measures where the line is; docs/training.md gives the table).
AUTO_MIN_BOUND = 1.1


def decide_prefix_sharing(
    requested: bool | str,
    model: nn.Module,
    *,
    prompt_tokens: float | None,
    response_tokens: float | None,
) -> tuple[bool, str]:
    """``(on, why)`` for ``data.prefix_sharing`` / ``SynPOConfig.prefix_sharing``.

    ``requested``: ``True`` (on, or :class:`PrefixSharingUnsupported` naming why it cannot be),
    ``False``, or ``"auto"``: on when the model supports it and the data's mean prompt and response
    lengths (``None``: not known before training, as for video pairs, whose frames make the prompt
    long) bound the saving at :data:`AUTO_MIN_BOUND` or more.
    """
    if not (requested == "auto" or isinstance(requested, bool)):  # 1 == True: check the type
        raise ValueError(f"prefix_sharing: must be 'auto', True or False, got {requested!r}")
    if requested is False:
        return False, "off (prefix_sharing: false)"
    problem = prefix_sharing_problem(model)
    if problem is not None:
        if requested is True:
            raise PrefixSharingUnsupported(f"prefix_sharing: true, but {problem}")
        return False, f"off: {problem}"
    if requested is True:
        return True, "on (prefix_sharing: true)"
    if prompt_tokens is None or response_tokens is None:
        return True, "on: pairs with video/images, whose frames make the shared prompt long"
    bound = token_bound(prompt_tokens, response_tokens)
    lengths = f"mean prompt {prompt_tokens:.0f} tokens, responses {response_tokens:.0f}"
    if bound < AUTO_MIN_BOUND:
        return False, f"off: {lengths}; at most {bound:.2f}x fewer tokens, below {AUTO_MIN_BOUND}x"
    return True, f"on: {lengths}; the prompt once per pair: {bound:.2f}x fewer tokens"
