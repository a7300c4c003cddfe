"""Loss adapter: a model and a ``[chosen; rejected]`` batch -> preference loss and logging statistics.

:class:`PreferenceObjective` is the ``nn.Module`` the trainer optimizes (and DeepSpeed wraps). Its
``forward`` runs the policy's backbone and applies the loss:

- ``impl="fused"``: the backbone's final hidden states (the input of ``lm_head``) at the response
  positions only, and ``lm_head.weight``, go to ``synpo_kernels.fused_linear_preference_loss``. No
  logits tensor exists, and prompt/video positions never reach the lm_head GEMM. Under ZeRO-3 the
  trainer registers ``lm_head.weight`` as an external parameter of this module, so DeepSpeed gathers
  it for this forward and for its backward.
- ``impl="naive"``: the model's full logits for every position and ``synpo_kernels.row_stats`` on
  them, as the upstream code does; the benchmark baseline, and what a ``fused`` objective falls back
  to (with one log line) for a model that post-processes its logits (Gemma-2's soft-capping, a logit
  scale): the fused loss computes ``hidden @ lm_head.weight.T`` only.

The trainers share this module: ``synpo train`` (:mod:`synpo.train.loop`) and the TRL adapter
(:mod:`synpo.integrations.trl`) hand it to DeepSpeed / DDP / FSDP as the model, so every check, dtype
cast and autocast rule below holds for both.

Losses with ``needs_reference`` (DPO/IPO) need reference log-probs, per-row *sums* whatever the loss
(TRL's convention; a loss that normalizes divides by the token count itself): from a frozen reference
model, from the policy with its LoRA adapters disabled (upstream), or from a precomputed cache passed in
the batch as ``ref_logps``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn

from synpo.data import IGNORE_INDEX
from synpo.prefix_sharing import SEGMENTS_KEY, enable_prefix_sharing

__all__ = [
    "METRIC_NAMES",
    "NON_MODEL_KEYS",
    "PreferenceObjective",
    "backbone_hidden_states",
    "logit_postprocessing",
    "loss_default",
    "model_inputs",
    "output_embedding",
]

# Batch entries that are bookkeeping or loss inputs, not model inputs.
NON_MODEL_KEYS = frozenset(
    {
        "labels",
        "response_index",
        "response_labels",
        "example_index",
        "num_tokens",
        "num_response_tokens",
        "truncated_rows",
        "tokens_cut",
        "padded_width",
        "dropped_pairs",
        "ref_logps",
        "empty",
    }
)

# Layout of the per-micro-batch metrics vector returned by PreferenceObjective.forward: sums over
# the micro-batch's pairs (divide by "pairs" for means), so micro-batches and ranks add up.
# reward_accuracy counts the pairs whose reward margin is > 0 (its mean: the fraction of such pairs).
METRIC_NAMES = (
    "pairs",
    "chosen_logps",
    "rejected_logps",
    "reward_margin",
    "chosen_mean_prob",
    "reward_accuracy",
)

REFERENCE_MODES = ("adapter_disabled", "copy")
MODES = ("train", "reference", "policy", "null")
# Config attributes of transformers models whose logits are not hidden @ lm_head.weight.T (+ bias).
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")

logger = logging.getLogger(__name__)


def loss_default(loss: str, option: str):
    """The default of a loss option (e.g. dpo's ``average``), from the loss's registry entry."""
    from synpo_kernels.loss_registry import get_loss

    return get_loss(loss).param(option).default


def model_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a collated batch that the model's forward takes."""
    return {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS and isinstance(v, torch.Tensor)}


def unwrap_hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (LoRA layers stay injected in it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def output_embedding(model: nn.Module) -> nn.Module:
    """The ``lm_head`` module of a (possibly peft-wrapped) causal LM."""
    head = unwrap_hf_model(model).get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"model: {type(model).__name__} has no output embedding (lm_head) to fuse")
    return head


def logit_postprocessing(model: nn.Module) -> str | None:
    """``"name=value"`` of the config setting by which ``model``'s logits differ from
    ``hidden @ lm_head.weight.T (+ bias)`` (soft-capping, a logit scale), or None."""
    config = getattr(unwrap_hf_model(model), "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in LOGIT_POSTPROCESSING:
        value = getattr(text_config, name, None)
        if value not in (None, 1, 1.0):
            return f"{name}={value}"
    return None


def check_fusable(model: nn.Module) -> None:
    """Raise for a model whose lm_head the fused loss would misread (a LoRA adapter on it)."""
    if hasattr(output_embedding(model), "base_layer"):
        # A peft adapter on the lm_head: the fused loss reads lm_head.weight only (with tied
        # embeddings the lm_head weight is the embedding matrix, which must then stay frozen).
        from synpo.config import ConfigError

        raise ConfigError(
            "lora.target_modules: LoRA wraps the lm_head, whose adapter the fused loss would not "
            "apply; remove lm_head from the LoRA target modules (or, in synpo train, use loss.impl: naive)"
        )


def backbone_hidden_states(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final hidden states ``(rows, T, D)`` (the input of ``lm_head``), without computing logits.

    Calls the model's base module (``model.model`` for Llama/Qwen/LLaVA...: embeddings, layers,
    final norm, vision tower for VLMs); models without one run their full forward with
    ``output_hidden_states=True`` and ``logits_to_keep=1`` (one position's logits).
    """
    hf_model = unwrap_hf_model(model)
    base = getattr(hf_model, getattr(hf_model, "base_model_prefix", "") or "", None)
    if isinstance(base, nn.Module) and base is not hf_model:
        out = base(**inputs, use_cache=False, return_dict=True)
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is not None:
            return hidden
    out = hf_model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1, return_dict=True)
    return out.hidden_states[-1]


def _gather_windows(flat: torch.Tensor, response_index: torch.Tensor) -> torch.Tensor:
    """``flat`` ``(N, ...)`` rows at ``response_index`` ``(rows, L)`` -> ``(rows, L, ...)``."""
    return flat.index_select(0, response_index.reshape(-1)).reshape(*response_index.shape, *flat.shape[1:])


def _autocast_off(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def _fused_ops():
    try:
        from synpo_kernels import fused_linear_preference_loss, fused_linear_sequence_logprobs
    except ImportError as exc:  # the fused linear ops are not part of this install
        raise RuntimeError(
            "loss.impl: 'fused' needs synpo_kernels.fused_linear_preference_loss, which this install "
            f"lacks ({exc}); use loss.impl: naive"
        ) from exc
    return fused_linear_preference_loss, fused_linear_sequence_logprobs


class PreferenceObjective(nn.Module):
    """Policy (+ reference) and a preference loss; ``forward(**batch) -> (loss, metrics)``.

    Args:
        policy: a transformers causal LM / VLM, optionally peft-wrapped.
        loss: a loss of ``synpo_kernels.LOSSES``: ``synpo``, ``dpo``, ``ipo``, ``simpo``, ``cpo``, ``orpo``.
        loss_options: that loss's hyper-parameters (``alpha``, ``beta`` ...; defaults otherwise).
        impl: ``fused`` (hidden states + lm_head weight, no logits) or ``naive`` (full logits).
        reference_mode: for losses that need one (dpo/ipo), ``adapter_disabled`` (the policy without
            its LoRA adapters) or ``copy`` (``reference`` holds a frozen model); ``None`` when
            log-probs come cached in the batch (``ref_logps``) or the loss needs none.
        reference: the frozen reference model for ``copy``.
        autocast_dtype: run the model under ``torch.autocast`` with this dtype (bf16 mixed precision).
        fused_options: execution options of the fused ops (``backend``, ``chunk_bytes``...; None
            values are left to the op's defaults).
        prefix_sharing: select the shared-prefix attention (:mod:`synpo.prefix_sharing`) on the policy
            and a ``copy`` reference, so that batches with ``prefix_sharing_segments`` (a
            ``PreferenceCollator(prefix_sharing=True)``) run each pair's prompt once. Raises
            :class:`synpo.prefix_sharing.PrefixSharingUnsupported` for a model it cannot serve.

    ``forward`` returns the scalar loss (fp32) and a detached float64 vector of per-micro-batch sums,
    laid out as :data:`METRIC_NAMES`; with ``return_stats=True`` also the per-pair
    :class:`synpo_kernels.PreferenceStats` and the ``(2B,)`` summed reference log-probs the loss used
    (None without a reference). ``forward(..., mode="reference")`` returns the reference summed
    log-probs ``(2B,)`` instead (used to precompute the cache), ``mode="policy"`` the policy's (a
    reference precomputed from the initial policy); both run under no_grad in eval mode.
    """

    def __init__(
        self,
        policy: nn.Module,
        *,
        loss: str = "synpo",
        loss_options: dict[str, Any] | None = None,
        impl: str = "fused",
        reference_mode: str | None = None,
        reference: nn.Module | None = None,
        autocast_dtype: torch.dtype | None = None,
        fused_options: dict[str, Any] | None = None,
        prefix_sharing: bool = False,
    ):
        super().__init__()
        from synpo_kernels.loss_registry import get_loss
        from synpo_kernels.losses import loss_spec

        definition = get_loss(loss)
        if impl not in ("fused", "naive"):
            raise ValueError(f"impl: must be 'fused' or 'naive', got {impl!r}")
        if reference_mode not in (None, *REFERENCE_MODES):
            raise ValueError(
                f"reference_mode: must be None or one of {REFERENCE_MODES}, got {reference_mode!r}"
            )
        if reference_mode == "copy" and reference is None:
            raise ValueError("reference: required when reference_mode is 'copy'")
        if reference_mode == "adapter_disabled" and not hasattr(policy, "disable_adapter"):
            raise ValueError("reference_mode: 'adapter_disabled' needs a peft (LoRA) policy")
        options = dict(loss_options or {})
        self.needs_reference = definition.needs_reference
        # Validate the options once, here (loss_spec raises TypeError/ValueError naming them).
        loss_spec(loss, **options)
        self.policy = policy
        self.reference = reference
        if reference is not None:
            reference.requires_grad_(False)
            reference.eval()
        self.loss_name = loss
        self.loss_options = options
        self.impl = impl
        self.reference_mode = reference_mode if self.needs_reference else None
        self.autocast_dtype = autocast_dtype
        self.fused_options = {k: v for k, v in (fused_options or {}).items() if v is not None}
        if impl == "fused":
            postprocessing = logit_postprocessing(policy)
            if postprocessing is not None:
                logger.warning(
                    "model: %s post-processes its logits (%s), which the fused loss (logits = hidden @ "
                    "lm_head.weight.T) cannot apply: using the unfused loss (impl='naive', full logits)",
                    type(unwrap_hf_model(policy)).__name__,
                    postprocessing,
                )
                self.impl = "naive"
            else:
                check_fusable(policy)
        self.prefix_sharing = bool(prefix_sharing)
        if self.prefix_sharing:
            for model in (policy, reference):
                if model is not None:
                    enable_prefix_sharing(model)

    # -- pieces ------------------------------------------------------------------------------------

    def external_parameters(self) -> list[nn.Parameter]:
        """Parameters this module's forward reads outside their owners' forward (ZeRO-3 must gather)."""
        params = []
        if self.impl == "fused":
            models = [self.policy] + ([self.reference] if self.reference is not None else [])
            for model in models:
                head = output_embedding(model)
                params.append(head.weight)
                if getattr(head, "bias", None) is not None:
                    params.append(head.bias)
        return params

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def _row_statistics_naive(self, model, inputs, labels, response_index, response_labels):
        from synpo_kernels import row_stats

        logits = unwrap_hf_model(model)(**inputs, use_cache=False, return_dict=True).logits
        if SEGMENTS_KEY in inputs or ("position_ids" in inputs and "attention_mask" not in inputs):
            # Packed row or shared-prefix segments: take each sequence's window out of the logits.
            logits = _gather_windows(logits.reshape(-1, logits.shape[-1]), response_index)
            labels = response_labels
        return row_stats(logits, labels, ignore_index=IGNORE_INDEX, shift=True)

    def _windows(self, model, inputs, response_index):
        hidden = backbone_hidden_states(model, inputs)
        return _gather_windows(hidden.reshape(-1, hidden.shape[-1]), response_index)

    def _head_params(self, model, dtype: torch.dtype):
        """lm_head weight and bias in the hidden states' dtype (bf16 under autocast)."""
        head = output_embedding(model)
        weight, bias = head.weight, getattr(head, "bias", None)
        if weight.dtype != dtype:
            weight = weight.to(dtype)
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        return weight, bias

    def reference_logps(self, inputs, labels, response_index, response_labels) -> torch.Tensor:
        """Reference-model summed sequence log-probs ``(2B,)`` (for every loss), no grad."""
        if self.reference_mode is None:
            raise ValueError("ref_logps: this objective has no reference model; pass ref_logps in the batch")
        model = self.reference if self.reference_mode == "copy" else self.policy
        adapters_off = (
            self.policy.disable_adapter()
            if self.reference_mode == "adapter_disabled"
            else contextlib.nullcontext()
        )
        with adapters_off:
            return self.summed_logps(model, inputs, labels, response_index, response_labels)

    def summed_logps(self, model, inputs, labels, response_index, response_labels) -> torch.Tensor:
        """Summed response log-probs ``(2B,)`` of ``model`` (the policy or the reference), no grad."""
        was_training = model.training
        model.eval()  # no dropout in a reference pass
        try:
            with torch.no_grad(), self._autocast(response_index.device):
                if self.impl == "fused":
                    _, sequence_logprobs = _fused_ops()
                    windows = self._windows(model, inputs, response_index)
                    weight, bias = self._head_params(model, windows.dtype)
                    with _autocast_off(windows.device):
                        out = sequence_logprobs(
                            windows,
                            weight,
                            response_labels,
                            bias=bias,
                            ignore_index=IGNORE_INDEX,
                            shift=True,
                            average=False,
                            **self.fused_options,
                        )
                else:
                    stats = self._row_statistics_naive(model, inputs, labels, response_index, response_labels)
                    out = stats.sum_logp
        finally:
            model.train(was_training)
        return out.float()

    # -- forward -----------------------------------------------------------------------------------

    def forward(
        self,
        mode: str = "train",
        ref_logps: torch.Tensor | None = None,
        return_stats: bool = False,
        **batch,
    ):
        if mode not in MODES:
            raise ValueError(f"mode: must be one of {list(MODES)}, got {mode!r}")
        labels = batch.get("labels")
        response_index = batch["response_index"]
        response_labels = batch["response_labels"]
        inputs = model_inputs(batch)
        if SEGMENTS_KEY in inputs and not self.prefix_sharing:
            raise ValueError(
                f"{SEGMENTS_KEY}: a shared-prefix batch needs PreferenceObjective(prefix_sharing=True), "
                "whose attention reads the segments (the model's own attention would ignore them)"
            )
        if mode == "reference":
            return self.reference_logps(inputs, labels, response_index, response_labels)
        if mode == "policy":
            return self.summed_logps(self.policy, inputs, labels, response_index, response_labels)
        if mode == "null":
            return self._null_loss(inputs)

        extra: dict[str, Any] = {}
        if self.needs_reference:
            if ref_logps is None:
                ref_logps = self.reference_logps(inputs, labels, response_index, response_labels)
            extra["ref_logps"] = ref_logps.to(device=response_index.device, dtype=torch.float32)
        options = {**self.loss_options, **extra}

        device = response_index.device
        if self.impl == "fused":
            fused_loss, _ = _fused_ops()
            with self._autocast(device):
                windows = self._windows(self.policy, inputs, response_index)
            weight, bias = self._head_params(self.policy, windows.dtype)
            # The fused op accumulates in fp32 itself; autocast must not touch its internals.
            with _autocast_off(device):
                loss, stats = fused_loss(
                    windows,
                    weight,
                    response_labels,
                    loss=self.loss_name,
                    bias=bias,
                    ignore_index=IGNORE_INDEX,
                    shift=True,
                    return_stats=True,
                    **options,
                    **self.fused_options,
                )
        else:
            with self._autocast(device):
                loss, stats = self._naive_loss(inputs, labels, response_index, response_labels, options)
        metrics = torch.stack(
            [
                torch.tensor(float(stats.chosen_logps.shape[0]), dtype=torch.float64, device=loss.device),
                stats.chosen_logps.double().sum(),
                stats.rejected_logps.double().sum(),
                stats.reward_margin.double().sum(),
                stats.chosen_mean_prob.double().sum(),
                (stats.reward_margin > 0).double().sum(),
            ]
        ).detach()
        if return_stats:
            return loss.float(), metrics, stats, extra.get("ref_logps")
        return loss.float(), metrics

    def _null_loss(self, inputs) -> torch.Tensor:
        """A zero loss through the same parameters as a real one (its gradients are exact zeros):
        what a rank backpropagates for a skipped micro-batch under DeepSpeed, whose gradient
        reduction needs every rank to run backward."""
        with self._autocast(next(iter(inputs.values())).device):
            if self.impl == "fused":
                hidden = backbone_hidden_states(self.policy, inputs)
                weight, bias = self._head_params(self.policy, hidden.dtype)
                zero = hidden.float().sum() * 0.0 + weight.float().sum() * 0.0
                if bias is not None:
                    zero = zero + bias.float().sum() * 0.0
            else:
                logits = unwrap_hf_model(self.policy)(**inputs, use_cache=False, return_dict=True).logits
                zero = logits.float().sum() * 0.0
        return zero

    def _naive_loss(self, inputs, labels, response_index, response_labels, options):
        from synpo_kernels._validation import check_nonempty_rows
        from synpo_kernels.losses import make_loss_spec, pair_losses, preference_stats

        row = self._row_statistics_naive(self.policy, inputs, labels, response_index, response_labels)
        check_nonempty_rows("labels", row.count)
        spec, tensors = make_loss_spec(self.loss_name, **options)
        losses = pair_losses(row, spec, tensors)
        return losses.mean(), preference_stats(row, spec, tensors, losses)
