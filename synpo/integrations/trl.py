"""SynPO (and the rest of the preference-loss family) as a TRL-style trainer, on public APIs only.

``SynPOTrainer`` is used exactly like TRL's preference trainers::

    from synpo.integrations.trl import SynPOConfig, SynPOTrainer

    trainer = SynPOTrainer(
        model=model,  # a causal LM (or a model id), optionally with peft_config
        args=SynPOConfig(output_dir="out", alpha=30.0, beta=0.2),
        train_dataset=dataset,  # "prompt"/"chosen"/"rejected": plain text or conversational
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=None,
    )
    trainer.train()

How it is built (so that it does not break when TRL's trainers change inside):

- it subclasses :class:`transformers.Trainer` and overrides its public ``compute_loss``, ``log``,
  ``prediction_step`` and ``evaluate`` (plus ``_save`` / ``_load_from_checkpoint`` /
  ``_load_best_model``, so that checkpoints hold the policy as ``save_pretrained`` writes it); it uses
  TRL's public data utilities
  (``trl.data_utils.maybe_extract_prompt``, ``is_conversational``) and TRL's public
  ``DataCollatorForPreference`` (``input_ids``/``attention_mask``/``completion_mask`` of ``[chosen;
  rejected]`` rows, as TRL's ``DPOTrainer`` sees them). Tokenization follows TRL's ``DPOTrainer``
  (EOS appended to plain-text completions, the chat template for conversational rows, the completion
  starting where prompt and prompt+completion tokens diverge), so both trainers see the same batches.
- the model the Trainer optimizes (``trainer.model``, what DDP / DeepSpeed / FSDP wrap) is
  :class:`synpo.objective.PreferenceObjective` around the causal LM (``trainer.policy``), the module
  ``synpo train`` optimizes: its forward runs the backbone and the fused loss
  (:func:`synpo_kernels.fused_linear_preference_loss` on the final hidden states at the completion
  positions and the lm_head weight, tied embeddings included; no ``N x V`` logits), with its checks,
  dtype cast and autocast rules. Under ZeRO-3 ``lm_head.weight`` is registered as an external
  parameter of that module, so DeepSpeed gathers it for the loss and its backward; under FSDP the
  root unit holds it unsharded during the forward. A model that post-processes its logits
  (soft-capping, a logit scale) gets the unfused loss on its real logits (one log line), as in
  ``synpo train``. Labels are ``input_ids`` with ``-100`` outside the completion, shifted by the op.
- prefix sharing (``SynPOConfig.prefix_sharing``: ``"auto"`` by default, ``True``, ``False``): each
  pair's prompt runs once, both completions continuing from it (:mod:`synpo.prefix_sharing`; exact). The
  trainer decides once at construction with :func:`synpo.prefix_sharing.decide_prefix_sharing` from the
  model and the tokenized train dataset's mean prompt and completion lengths, and says which way and why
  in one INFO line of this module's logger; ``True`` on a model that cannot share raises ``ValueError``.
  TRL's collator still builds the rows; ``trainer.model``'s forward turns each batch into one
  ``[prompt, chosen, rejected]`` segment per pair (:func:`synpo.data.batching.shared_prefix_batch`; a
  row's prompt is its tokens before the first completion token), for training, evaluation and the
  reference passes alike. A pair whose two prompts differ token for token (TRL's collator gives both
  rows one ``prompt_ids``, but ``truncation_mode="keep_end"`` cuts a long pair's two rows at different
  places), and every pair of a batch that is not TRL's right-padded layout (a custom collator), runs
  unshared (exact, no saving): one warning the first time, and the logged
  ``prefix_sharing/unshared_pairs`` counts them per logging step, summed over ranks (its totals:
  ``trainer.unshared_pairs``).
- reference-free: for ``synpo`` (default), ``simpo``, ``cpo`` and ``orpo`` no reference model is
  created or loaded and the model runs once per step. ``dpo`` / ``ipo`` need reference log-probs,
  taken, in this order, from ``ref_chosen_logps`` / ``ref_rejected_logps`` dataset columns (TRL's
  names; ``precompute_ref_log_probs=True`` fills them before training from the initial policy), or
  from the same model with its PEFT adapter disabled (no second model in memory). Otherwise
  construction fails with a message; for a separate reference model use ``trl.DPOTrainer``.

Logged metrics (TRL's names; batch means; ``eval_`` prefixed in evaluation), with ``s`` the summed and
``m = s / n`` the per-token mean response log-prob of a row, ``r`` its summed reference log-prob:

- ``loss``; ``logps/chosen``, ``logps/rejected``: ``s`` (TRL's DPO meaning);
  ``logps/chosen_per_token``, ``logps/rejected_per_token``: ``m``; ``probs/chosen``: ``P(y_w)``, the
  chosen row's mean token probability (SynPO's ``beta`` term).
- ``rewards/chosen`` / ``rewards/rejected``: the per-row *reward* the loss compares (the ``reward`` of
  its registry entry, :meth:`synpo_kernels.loss_registry.LossDef.rewards`), defined so that
  ``rewards/margins = rewards/chosen - rewards/rejected`` is the registry's reward margin
  (:attr:`synpo_kernels.PreferenceStats.reward_margin`, docs/losses.md):

  ========= ============================================================================
  synpo     ``G = exp(m)``, the geometric-mean token probability (unscaled by ``alpha``;
            margin ``G_w - G_l``, the quantity inside ``sigmoid(alpha * .)``)
  dpo       ``beta * (s - r)`` (``/ n`` with ``average``), as TRL's DPOTrainer
  ipo       ``(s - r) / n`` (``s - r`` with ``average=False``)
  simpo     ``beta * m``, as TRL's CPOTrainer with ``loss_type="simpo"``
  cpo       ``beta * s`` (``beta * m`` with ``average``), as TRL's CPOTrainer
  orpo      ``log(p / (1 - p))`` with ``log p = m`` (TRL's ORPOTrainer logs ``beta * m``
            instead; the odds-ratio margin is what ORPO pushes up)
  ========= ============================================================================

- ``rewards/accuracies``: the fraction of pairs with ``rewards/chosen > rewards/rejected``.
- ``prefix_sharing/unshared_pairs`` (while prefix sharing is on): the pairs since the last log that ran
  without a shared prompt, summed over micro-batches and ranks (a count, not a mean).

TRL >= 1.0, < 2 (the ``trl`` extra): the public ``DataCollatorForPreference`` with ``max_length`` /
``truncation_mode`` and the ``trl.data_utils`` helpers used here exist unchanged over that range.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from transformers import PreTrainedTokenizerBase, ProcessorMixin, Trainer, TrainingArguments, set_seed

import synpo_kernels as sk
from synpo.data import response_windows
from synpo.data.batching import SharedPair, shared_prefix_batch
from synpo.models import drop_gguf_quantization_marks
from synpo.objective import PreferenceObjective, unwrap_hf_model
from synpo.prefix_sharing import SEGMENTS_KEY, decide_prefix_sharing
from synpo_kernels.loss_registry import COMBINE, Peer, from_trl_loss_type, get_loss, weight_option

__all__ = ["SynPOConfig", "SynPOTrainer", "row_rewards"]

_TOKENIZED = ("prompt_ids", "chosen_ids", "rejected_ids")
_REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
UNSHARED_METRIC = "prefix_sharing/unshared_pairs"

logger = logging.getLogger(__name__)


def _import_trl():
    try:
        import trl.data_utils as data_utils
        from trl.trainer.dpo_trainer import DataCollatorForPreference
    except ImportError as e:  # pragma: no cover - exercised only without TRL
        raise ImportError(
            "synpo.integrations.trl needs TRL >= 1.0: in the clone, pip install --no-build-isolation '.[trl]'"
        ) from e
    return data_utils, DataCollatorForPreference


@dataclass
class SynPOConfig(TrainingArguments):
    """:class:`transformers.TrainingArguments` plus the preference-loss settings (TRL's names).

    Loss:
        loss_type: a loss of :data:`synpo_kernels.LOSSES`: ``"synpo"`` (default), ``"dpo"``, ``"ipo"``,
            ``"simpo"``, ``"cpo"``, ``"orpo"``, TRL's other DPO loss types (``"hinge"``, ``"bco_pair"``,
            ``"sft"`` ...), or a weighted sum of them (``"dpo+bco_pair+sft"``, the weights
            ``<name>_weight`` in ``loss_options``, or ``loss_weights``; docs/losses.md). TRL's own
            spellings are accepted and rewritten into the registry's: ``"sigmoid"`` (``"dpo"``),
            ``"sigmoid_norm"`` (``"dpo"`` with ``average=True``) and the list form
            (``["sigmoid", "sft"]`` is ``"dpo+sft"``).
        loss_weights: TRL's ``loss_weights``, one per loss of a sum, in order (``loss_type="dpo+sft",
            loss_weights=[0.8, 1.0]`` sets ``dpo_weight`` and ``sft_weight``).
        alpha: SynPO's scale of the geometric-mean probability gap (default 30.0; synpo only).
        beta: the loss's ``beta`` (SynPO: weight of ``P(y_w)``, default 0.2; DPO/SimPO/CPO: inverse
            temperature, default 0.1); as in TRL, ``beta`` is IPO's ``tau`` and ORPO's ``lam``.
            ``None``: the loss's default.
        loss_options: the loss's other options (``gamma``, ``average``, ``nll_weight``,
            ``label_smoothing``, ``cdpo_smoothing``, ``nll_reduction``, ``f_divergence_type``,
            ``discopop_tau`` ...; docs/losses.md).
        precompute_ref_log_probs: losses with a reference (dpo, ipo, ...): compute the reference
            log-probs of the datasets once, before training, with the initial policy (adapter disabled
            for a PEFT model).
        precompute_ref_batch_size: batch size of that pass (default: the per-device batch sizes).
        fused_backend / fused_chunk_bytes: execution options of the fused op (``backend`` / ``chunk_bytes``).

    Speed:
        prefix_sharing: ``"auto"`` (default), ``True`` or ``False``: compute each pair's prompt once,
            both completions continuing from it (exact; see the module docstring). ``"auto"`` turns it on
            where the model supports it and the train dataset's mean prompt and completion lengths make it
            pay (:func:`synpo.prefix_sharing.decide_prefix_sharing`); ``True`` on a model that cannot
            (sliding-window attention, multimodal rotary positions...) fails at construction.

    Data (as TRL's ``DPOConfig``): ``max_length`` (1024; ``None``: no truncation), ``truncation_mode``
    (``"keep_start"`` / ``"keep_end"``), ``pad_to_multiple_of``, ``pad_token``, ``dataset_num_proc``.
    Model: ``model_init_kwargs`` (when ``model`` is a string), ``disable_dropout`` (True).

    ``remove_unused_columns`` defaults to False: the trainer keeps only the columns it needs itself.
    ``loss_options`` and ``model_init_kwargs`` also take a JSON object string (the command line:
    ``--loss_options '{"gamma": 1.0}'``).
    """

    _VALID_DICT_FIELDS: ClassVar[list[str]] = [
        *TrainingArguments._VALID_DICT_FIELDS,
        "loss_options",
        "model_init_kwargs",
    ]

    loss_type: str = field(default="synpo", metadata={"help": "Preference loss (synpo_kernels.LOSSES)."})
    alpha: float | None = field(default=None, metadata={"help": "SynPO alpha (default 30.0)."})
    beta: float | None = field(default=None, metadata={"help": "The loss's beta (None: its default)."})
    loss_options: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Other loss options (a JSON object on the command line)."}
    )
    loss_weights: list[float] | None = field(
        default=None, metadata={"help": "TRL's loss_weights: one per loss of a sum loss_type='a+b+...'."}
    )
    precompute_ref_log_probs: bool = field(default=False, metadata={"help": "dpo/ipo: precompute refs."})
    precompute_ref_batch_size: int | None = field(default=None, metadata={"help": "Precompute batch."})
    fused_backend: str | None = field(default=None, metadata={"help": "backend= of the fused op."})
    fused_chunk_bytes: int | None = field(default=None, metadata={"help": "chunk_bytes= of the fused op."})
    prefix_sharing: Literal["auto", True, False] = field(
        default="auto",
        metadata={
            "help": "Compute each pair's prompt once, both completions continuing from it (exact): "
            "'auto' (on where the model supports it and the prompts are long enough to pay), True or False."
        },
    )
    max_length: int | None = field(default=1024, metadata={"help": "Max tokens of prompt+completion."})
    truncation_mode: str = field(default="keep_start", metadata={"help": "keep_start or keep_end."})
    pad_to_multiple_of: int | None = field(default=None, metadata={"help": "Pad to a multiple of this."})
    pad_token: str | None = field(default=None, metadata={"help": "Padding token (default: tokenizer's)."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "from_pretrained keywords (a JSON object on the command line)."}
    )
    disable_dropout: bool = field(default=True, metadata={"help": "Disable dropout in the model."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False (see docstring)."})

    def __post_init__(self):
        for key in ("loss_options", "model_init_kwargs"):
            value = getattr(self, key)
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{key}: not a JSON object: {value!r} ({e})") from None
                if not isinstance(value, dict):
                    raise ValueError(f"{key}: expected a JSON object, got {value!r}")
                setattr(self, key, value)
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"truncation_mode: 'keep_start' or 'keep_end', got {self.truncation_mode!r}")
        sharing = self.prefix_sharing
        if isinstance(sharing, str) and sharing.lower() in ("true", "false"):  # a JSON/YAML config's string
            sharing = self.prefix_sharing = sharing.lower() == "true"
        if sharing != "auto" and not isinstance(sharing, bool):
            raise ValueError(f"prefix_sharing: must be 'auto', True or False, got {sharing!r}")
        # TRL's names (sigmoid, sigmoid_norm) and list form, in the registry's spelling.
        self.loss_type, implied = from_trl_loss_type(self.loss_type)
        if implied:
            options = dict(self.loss_options or {})
            for key, value in implied.items():
                if options.setdefault(key, value) != value:
                    raise ValueError(
                        f"loss_options[{key!r}]={options[key]!r}: the TRL loss_type implies {value!r}"
                    )
            self.loss_options = options
        self.resolved_loss_options()  # fail at construction on a bad loss or option
        super().__post_init__()

    def resolved_loss_options(self) -> dict[str, Any]:
        """The loss's options, checked, defaults filled in (``alpha``/``beta`` mapped as documented)."""
        loss = get_loss(self.loss_type, "loss_type")
        options = dict(self.loss_options or {})
        for key, value in (("alpha", self.alpha), ("beta", self.beta)):
            if value is None:
                continue
            name = key if key in loss.param_names else _trl_alias(loss, key)
            if name is None:
                raise ValueError(
                    f"{key}: not an option of loss_type={self.loss_type!r}; "
                    f"its options: {list(loss.param_names)}"
                )
            if name in options and options[name] != value:
                raise ValueError(
                    f"{key}: given both as {key}={value} and loss_options[{name!r}]={options[name]}"
                )
            options[name] = value
        if self.loss_weights is not None:
            parts = self.loss_type.split(COMBINE)
            if len(parts) < 2 or len(self.loss_weights) != len(parts):
                raise ValueError(
                    f"loss_weights: {len(self.loss_weights)} weight(s) for loss_type={self.loss_type!r}; "
                    f"one per loss of a sum of two or more ('{COMBINE}'-separated)"
                )
            for part, value in zip(parts, self.loss_weights):
                name = weight_option(part)
                if name in options and options[name] != value:
                    raise ValueError(
                        f"loss_weights: {part!r} given both as {value} and "
                        f"loss_options[{name!r}]={options[name]}"
                    )
                options[name] = value
        return loss.resolve(options)


def _trl_alias(loss, key: str) -> str | None:
    """The option of ``loss`` that TRL calls ``key`` (IPO's ``tau`` and ORPO's ``lam`` are TRL's ``beta``)."""
    for p in loss.params:
        if isinstance(p.trl, Peer) and p.trl.name == key:
            return p.name
    return None


def row_rewards(loss_type: str, options: dict[str, Any], mean_logp, count, ref_logps=None):
    """Per-row rewards (float64) of one side of the pairs, as logged in ``rewards/chosen|rejected``.

    ``mean_logp``/``count``: the rows' per-token mean response log-prob and token count; ``ref_logps``:
    their summed reference log-probs (dpo/ipo). The formula is the loss's registry ``reward``
    (:meth:`synpo_kernels.loss_registry.LossDef.rewards`); ``None`` for a loss that defines none: then
    only ``rewards/margins`` and ``rewards/accuracies`` are logged.
    """
    m, n = mean_logp.double(), count.double()
    # No reward reads the probability sums, which the fused op's statistics hold for chosen rows only.
    rows = sk.RowStats(m * n, torch.full_like(m, float("nan")), n)
    return get_loss(loss_type).rewards(rows, options, None if ref_logps is None else ref_logps.double())


class TrainerObjective(PreferenceObjective):
    """:class:`~synpo.objective.PreferenceObjective` as the model of a :class:`transformers.Trainer`:
    forward takes TRL's batch (``input_ids``, ``attention_mask``, ``completion_mask``, optional
    ``ref_chosen_logps`` / ``ref_rejected_logps``), and what the Trainer asks of its model
    (activation checkpointing, FSDP's layer classes to wrap) reaches the policy.

    With ``prefix_sharing=True`` forward runs each batch in the shared layout (:func:`_shared_layout`)
    and leaves what it did in :attr:`last_sharing`: ``(pairs, unshared_pairs, layout_ok)``.
    ``pad_token_id``: the token of the shared layout's padding (masked, never attended).
    """

    def __init__(self, policy: torch.nn.Module, *, pad_token_id: int = 0, **kwargs):
        super().__init__(policy, **kwargs)
        self.pad_token_id = int(pad_token_id)
        self.last_sharing = (0, 0, True)

    def forward(self, mode: str = "train", return_stats: bool = False, **inputs):
        ref_logps = None
        if all(c in inputs for c in _REF_COLUMNS):
            ref_logps = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).float()
        batch = None
        if self.prefix_sharing:
            batch, unshared, layout_ok = _shared_layout(
                inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"], self.pad_token_id
            )
            pairs = inputs["input_ids"].shape[0] // 2
            self.last_sharing = (pairs, unshared if layout_ok else pairs, layout_ok)
        if batch is None:  # sharing off, or nothing to share in this batch: the rows as TRL built them
            labels = _labels(inputs)
            response_index, response_labels = response_windows(labels)
            batch = {
                "input_ids": inputs["input_ids"],
                "attention_mask": inputs["attention_mask"],
                "labels": labels,
                "response_index": response_index,
                "response_labels": response_labels,
            }
        return super().forward(mode, ref_logps=ref_logps, return_stats=return_stats, **batch)

    @property
    def _no_split_modules(self):
        return getattr(unwrap_hf_model(self.policy), "_no_split_modules", None)

    def activation_checkpointing_enable(self, *args, **kwargs):
        model = unwrap_hf_model(self.policy)
        enable = (
            getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        )
        return enable(*args, **kwargs)

    def gradient_checkpointing_enable(self, *args, **kwargs):
        return unwrap_hf_model(self.policy).gradient_checkpointing_enable(*args, **kwargs)


def _disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


class SynPOTrainer(Trainer):
    """A reference-free preference trainer (SynPO by default) with TRL's constructor and metrics.

    Args:
        model: a causal LM, a ``peft.PeftModel``, or a model id / path (loaded with
            ``AutoModelForCausalLM.from_pretrained(model, **args.model_init_kwargs)``).
        args: a :class:`SynPOConfig` (default: ``SynPOConfig("<model name>-SynPO")``).
        data_collator: default TRL's ``DataCollatorForPreference`` (right padding, ``completion_mask``).
        train_dataset / eval_dataset: ``datasets.Dataset`` (or a dict of them for evaluation) with
            ``prompt``/``chosen``/``rejected`` (plain text or conversational; an implicit prompt is
            extracted), or already tokenized ``prompt_ids``/``chosen_ids``/``rejected_ids``; optional
            ``ref_chosen_logps``/``ref_rejected_logps`` (summed) for dpo/ipo.
        processing_class: the tokenizer (a processor's tokenizer is used for text-only data).
        callbacks, optimizers: as :class:`transformers.Trainer`.
        peft_config: a ``peft.PeftConfig`` to wrap ``model`` with (the lm_head must not be a target).

    See the module docstring for the loss wiring, the reference handling of dpo/ipo and the metrics.
    """

    # compute_loss returns a per-micro-batch mean: Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model,
        args: SynPOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
    ):
        data_utils, collator_cls = _import_trl()
        self._data_utils = data_utils
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = SynPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-SynPO")
        elif not isinstance(args, SynPOConfig):
            raise TypeError(f"args: expected a SynPOConfig, got {type(args).__name__}")
        if train_dataset is None:
            raise ValueError("train_dataset is required")
        if args.remove_unused_columns:
            warnings.warn(
                "SynPOConfig.remove_unused_columns=True is ignored: the trainer keeps only the tokenized "
                "columns it needs itself.",
                stacklevel=2,
            )
            args.remove_unused_columns = False
        self.loss_type = args.loss_type
        self.loss_options = args.resolved_loss_options()
        self._loss_def = get_loss(self.loss_type)

        set_seed(args.seed)  # PEFT initializes adapters randomly
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model, **(args.model_init_kwargs or {}))
        drop_gguf_quantization_marks(model)  # GGUF weights are dequantized: trainable
        if processing_class is None:
            from transformers import AutoTokenizer

            processing_class = AutoTokenizer.from_pretrained(model.config._name_or_path)
        tokenizer = (
            processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class
        )
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError("processing_class: expected a tokenizer or a processor with a tokenizer")
        self._tokenizer = tokenizer
        pad_token = args.pad_token or tokenizer.pad_token or tokenizer.eos_token
        if pad_token is None or pad_token not in tokenizer.get_vocab():
            raise ValueError(f"pad_token: {pad_token!r} is not in the tokenizer's vocabulary")
        tokenizer.pad_token = pad_token

        if peft_config is not None:
            from peft import get_peft_model

            if _is_peft_model(model):
                raise ValueError("peft_config: the model is already a PeftModel; pass the base model")
            model = get_peft_model(model, peft_config)
            if args.gradient_checkpointing:
                model.enable_input_require_grads()
        if args.disable_dropout:
            _disable_dropout(model)

        if self._loss_def.needs_reference:
            has_columns = all(c in next(iter(train_dataset)) for c in _REF_COLUMNS)
            if not (has_columns or args.precompute_ref_log_probs or _is_peft_model(model)):
                raise ValueError(
                    f"loss_type={self.loss_type!r} needs reference log-probs, and SynPOTrainer never "
                    "creates a reference model: set precompute_ref_log_probs=True (the initial policy, "
                    "computed once before training), train a PEFT adapter (peft_config=...; the reference "
                    "is the model with the adapter disabled), or add ref_chosen_logps/ref_rejected_logps "
                    "columns (summed); for a separate reference model use trl.DPOTrainer"
                )
        elif args.precompute_ref_log_probs:
            warnings.warn(
                f"precompute_ref_log_probs=True is ignored: loss_type={self.loss_type!r} uses no reference",
                stacklevel=2,
            )

        if data_collator is None:
            data_collator = collator_cls(
                pad_token_id=tokenizer.pad_token_id,
                max_length=args.max_length,
                truncation_mode=args.truncation_mode,
                pad_to_multiple_of=args.pad_to_multiple_of,
            )
        self._prep_args = args
        train_dataset = self._prepare_dataset(train_dataset, "train")
        eval_dataset = self._prepare_dataset(eval_dataset, "eval")

        # Decided once, from the model and the tokenized train data (True on an unsupported model raises
        # PrefixSharingUnsupported, a ValueError naming why).
        prompt_tokens, response_tokens = _mean_token_counts(train_dataset)
        self.prefix_sharing, self.prefix_sharing_why = decide_prefix_sharing(
            args.prefix_sharing, model, prompt_tokens=prompt_tokens, response_tokens=response_tokens
        )
        if args.should_log:
            logger.info("prefix sharing %s", self.prefix_sharing_why)

        # The module the Trainer optimizes (and DDP / DeepSpeed / FSDP wrap): the loss runs in its forward.
        adapter_reference = self._loss_def.needs_reference and _is_peft_model(model)
        reference_mode = "adapter_disabled" if adapter_reference else None
        objective = TrainerObjective(
            model,
            pad_token_id=tokenizer.pad_token_id,
            loss=self.loss_type,
            loss_options=self.loss_options,
            impl="fused",
            reference_mode=reference_mode,
            fused_options={"backend": args.fused_backend, "chunk_bytes": args.fused_chunk_bytes},
            prefix_sharing=self.prefix_sharing,
        )
        deepspeed_plugin = getattr(args, "deepspeed_plugin", None)
        if deepspeed_plugin is not None and deepspeed_plugin.zero_stage == 3:
            import deepspeed

            # Outside its module's forward lm_head.weight is an empty partition: DeepSpeed gathers it
            # for the objective's forward (the fused loss) and backward once registered here.
            for param in objective.external_parameters():
                deepspeed.zero.register_external_parameter(objective, param)
        if args.ddp_find_unused_parameters is None:
            # What Trainer picks for a transformers model (it cannot see one inside the objective):
            # searching for unused parameters breaks reentrant activation checkpointing.
            args.ddp_find_unused_parameters = not args.gradient_checkpointing

        super().__init__(
            model=objective,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self.model_accepts_loss_kwargs = False  # transformers < 5.19 reads this instead of the class flag
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        # Pairs that ran without a shared prompt, all ranks: since the last log, and in total.
        self._unshared = {"train": 0, "eval": 0}
        self.unshared_pairs = {"train": 0, "eval": 0}
        self._warned: set[str] = set()

        if self._loss_def.needs_reference and args.precompute_ref_log_probs:
            self.train_dataset = self._with_reference(self.train_dataset, args.per_device_train_batch_size)
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {
                    k: self._with_reference(v, args.per_device_eval_batch_size)
                    for k, v in self.eval_dataset.items()
                }
            elif self.eval_dataset is not None:
                self.eval_dataset = self._with_reference(self.eval_dataset, args.per_device_eval_batch_size)

    # ------------------------------------------------------------------------------------------
    # Data
    # ------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, name: str):
        """Tokenize a preference dataset as TRL's DPOTrainer does (idempotent; dicts per split)."""
        if dataset is None:
            return None
        if isinstance(dataset, dict):
            return {k: self._prepare_dataset(v, k) for k, v in dataset.items()}
        args = self._prep_args
        first = next(iter(dataset))
        if all(k in first for k in _TOKENIZED):
            return dataset
        if "image" in first or "images" in first:
            raise ValueError("image preference data is not supported by SynPOTrainer; use synpo.Trainer")
        from datasets import Dataset

        map_kwargs = {"num_proc": args.dataset_num_proc} if isinstance(dataset, Dataset) else {}
        dataset = dataset.map(self._data_utils.maybe_extract_prompt, **map_kwargs)
        keep = set(_TOKENIZED) | set(_REF_COLUMNS)
        columns = dataset.column_names or list(first)
        dataset = dataset.map(
            self._tokenize_row, remove_columns=[c for c in columns if c not in keep], **map_kwargs
        )
        if args.max_length is not None and args.truncation_mode == "keep_start":
            # The collator would cut every completion token of these: no learning signal (as TRL).
            dataset = dataset.filter(lambda ex: len(ex["prompt_ids"]) < args.max_length, **map_kwargs)
        return dataset

    def _tokenize_row(self, example: dict[str, Any]) -> dict[str, list[int]]:
        tok = self._tokenizer
        if self._data_utils.is_conversational(example):
            tools = example.get("tools")
            tools = json.loads(tools) if isinstance(tools, str) else tools
            kwargs = {"tools": tools, **(example.get("chat_template_kwargs") or {})}

            def encode(messages, **extra):
                out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs, **extra)
                return list(out["input_ids"])

            prompt = encode(example["prompt"], add_generation_prompt=True)
            chosen = encode(example["prompt"] + example["chosen"])
            rejected = encode(example["prompt"] + example["rejected"])
        else:
            eos = tok.eos_token or ""
            c, r = example["chosen"], example["rejected"]
            c, r = (c if c.endswith(eos) else c + eos), (r if r.endswith(eos) else r + eos)
            prompt = tok(text=example["prompt"])["input_ids"]
            chosen = tok(text=example["prompt"] + c)["input_ids"]
            rejected = tok(text=example["prompt"] + r)["input_ids"]
        # The completion starts where prompt and prompt+completion tokens diverge (merges, templates).
        n = min(_common_prefix(prompt, chosen), _common_prefix(prompt, rejected))
        return {"prompt_ids": prompt[:n], "chosen_ids": chosen[n:], "rejected_ids": rejected[n:]}

    @torch.no_grad()
    def _with_reference(self, dataset, batch_size: int):
        """``dataset`` plus ``ref_chosen_logps``/``ref_rejected_logps`` from the current (initial) model,
        with its adapter disabled for a PEFT model (the objective's ``reference`` / ``policy`` modes).

        Every process computes the whole dataset (the same forwards on every rank, as ZeRO-3 needs).
        """
        if dataset is None or all(c in dataset.column_names for c in _REF_COLUMNS):
            return dataset
        from torch.utils.data import DataLoader

        size = self.args.precompute_ref_batch_size or batch_size
        loader = DataLoader(dataset, batch_size=size, collate_fn=self.data_collator, shuffle=False)
        mode = "reference" if self.objective.reference_mode else "policy"
        chosen, rejected = [], []
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in loader:
                batch = {k: v.to(self.args.device) for k, v in batch.items()}
                ref = self.model_wrapped(mode=mode, **batch)
                w, lo = ref.chunk(2)
                chosen += w.tolist()
                rejected += lo.tolist()
        finally:
            self.model.train(was_training)
        return dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)

    # ------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------

    @property
    def objective(self) -> TrainerObjective:
        """The module the Trainer optimizes (``trainer.model``, unwrapped from DDP / DeepSpeed / FSDP)."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    @property
    def policy(self) -> torch.nn.Module:
        """The causal LM being trained (a ``peft.PeftModel`` with LoRA): what ``save_model`` writes."""
        return self.objective.policy

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The fused preference loss of a ``[chosen; rejected]`` batch; metrics are kept for ``log``.

        ``model``: ``trainer.model`` (the objective) or its DDP / DeepSpeed / FSDP wrapper.
        """
        mode = "train" if self.model.training else "eval"
        loss, _, stats, ref = model(**inputs, return_stats=True)
        self._record(mode, stats, ref)
        return (loss, {"loss": loss.detach()}) if return_outputs else loss

    def _record_sharing(self, mode: str, unshared: int, outside_layout: int) -> None:
        """Count the pairs (all ranks) of the last forward that ran without a shared prompt; say why once."""
        self._unshared[mode] += unshared
        self.unshared_pairs[mode] += unshared
        if not self.accelerator.is_main_process:
            return
        if outside_layout and "layout" not in self._warned:
            self._warned.add("layout")
            logger.warning(
                "prefix sharing: a batch is not the [chosen; rejected] layout of TRL's "
                "DataCollatorForPreference (right padded, one completion span per row): its %d pairs ran "
                "unshared (exact, no saving); later ones are counted in %s",
                outside_layout,
                UNSHARED_METRIC,
            )
        if unshared > outside_layout and "prompts" not in self._warned:
            self._warned.add("prompts")
            logger.warning(
                "prefix sharing: %d pairs of a batch have chosen and rejected prompts that differ token for "
                "token (truncation_mode='keep_end' cuts them differently; a custom collator may tokenize "
                "them apart): they ran unshared (exact, no saving); later ones are counted in %s",
                unshared - outside_layout,
                UNSHARED_METRIC,
            )

    def _record(self, mode: str, stats, ref) -> None:
        gather = self.accelerator.gather
        half = stats.chosen_count.shape[0]
        ref_w, ref_l = (ref[:half], ref[half:]) if ref is not None else (None, None)
        r_w = row_rewards(self.loss_type, self.loss_options, stats.chosen_logps, stats.chosen_count, ref_w)
        r_l = row_rewards(
            self.loss_type, self.loss_options, stats.rejected_logps, stats.rejected_count, ref_l
        )
        values = {
            "logps/chosen": stats.chosen_logps.double() * stats.chosen_count,
            "logps/rejected": stats.rejected_logps.double() * stats.rejected_count,
            "logps/chosen_per_token": stats.chosen_logps,
            "logps/rejected_per_token": stats.rejected_logps,
            "probs/chosen": stats.chosen_mean_prob,
            "rewards/margins": stats.reward_margin,
        }
        if r_w is not None:
            values["rewards/chosen"] = r_w
            values["rewards/rejected"] = r_l
            values["rewards/accuracies"] = (r_w > r_l).double()
        else:
            values["rewards/accuracies"] = (stats.reward_margin > 0).double()
        # One collective and one host copy per micro-batch for all metrics (and the sharing counts),
        # not one of each per metric: every .item() stalls the host until the GPU drains.
        columns = torch.stack([value.detach().double() for value in values.values()], dim=1)
        flat = [columns.reshape(-1)]
        if self.prefix_sharing:
            pairs, unshared, layout_ok = self.objective.last_sharing
            flat.append(columns.new_tensor([unshared, pairs * (not layout_ok)]))
        per_rank = gather(torch.cat(flat)).reshape(self.accelerator.num_processes, -1).cpu()
        means = per_rank[:, : columns.numel()].reshape(-1, len(values)).mean(0).tolist()
        for key, mean in zip(values, means):
            self._metrics[mode][key].append(mean)
        if self.prefix_sharing:
            unshared, outside_layout = (int(x) for x in per_rank[:, columns.numel() :].sum(0))
            self._record_sharing(mode, unshared, outside_layout)

    # ------------------------------------------------------------------------------------------
    # Logging and evaluation (public Trainer hooks)
    # ------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the averaged preference metrics since the last log (``eval_`` prefixed in evaluation)."""
        mode = "train" if self.model.training else "eval"
        metrics = {k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v}
        if self.prefix_sharing and metrics:
            metrics[UNSHARED_METRIC] = float(self._unshared[mode])  # a count: summed, not averaged
            self._unshared[mode] = 0
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The loss only (the fused op builds no logits to return)."""
        inputs = {k: v.to(self.args.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """As :meth:`transformers.Trainer.evaluate`; a raw dataset passed here is tokenized first."""
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            eval_dataset = self._prepare_dataset(eval_dataset, "eval")
            if self._loss_def.needs_reference and self.args.precompute_ref_log_probs:
                if self.state.global_step > 0 and not _is_peft_model(self.policy):
                    raise ValueError(
                        "evaluate(eval_dataset=...): the reference log-probs of a new dataset cannot be "
                        "precomputed after training started (the initial policy is gone); pass it as "
                        "eval_dataset at construction or add ref_chosen_logps/ref_rejected_logps columns"
                    )
                if isinstance(eval_dataset, dict):
                    eval_dataset = {
                        k: self._with_reference(v, self.args.per_device_eval_batch_size)
                        for k, v in eval_dataset.items()
                    }
                else:
                    eval_dataset = self._with_reference(eval_dataset, self.args.per_device_eval_batch_size)
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    # ------------------------------------------------------------------------------------------
    # Saving and loading: the policy, as save_pretrained writes it (not the objective around it)
    # ------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _policy_as_model(self):
        """``self.model`` is the policy inside: Trainer's save/load code then treats it as it treats
        a transformers or PEFT model (``save_pretrained``, adapter-only checkpoints, ``load_adapter``)."""
        model = self.model
        self.model = self.policy
        try:
            yield
        finally:
            self.model = model

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if state_dict is not None:  # gathered from DeepSpeed / FSDP: the objective's names
            prefix = "policy."
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        with self._policy_as_model():
            super()._save(output_dir, state_dict=state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if model is not None:  # DeepSpeed / FSDP: their own checkpoints of the wrapped objective
            return super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        with self._policy_as_model():
            return super()._load_from_checkpoint(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_best_model()
        with self._policy_as_model():
            return super()._load_best_model()


def _labels(inputs) -> torch.Tensor:
    return inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, sk.IGNORE_INDEX)


# The keys of a shared_prefix_batch that the objective's forward reads.
_SHARED_KEYS = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "labels",
    SEGMENTS_KEY,
    "response_index",
    "response_labels",
)


def _shared_layout(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor, pad_token_id: int
) -> tuple[dict[str, torch.Tensor] | None, int, bool]:
    """TRL's ``[chosen; rejected]`` rows as ``[prompt, chosen, rejected]`` segments (exact, on the
    batch's device): ``(batch, unshared_pairs, layout_ok)``.

    A pair's prompt is each row's tokens before its first completion token; a pair whose two prompts
    are equal token for token shares it, any other pair is a segment without a prefix (its two full
    rows, exact, no saving), counted in ``unshared_pairs``. Tokens after a row's last completion token
    are left out (causal attention: they change no scored position).

    ``batch`` is None where the shared layout would not help or might not be exact: no pair shares its
    prompt, or the rows are not TRL's layout (``layout_ok`` False: an odd row count, rows not right
    padded, a row whose completion tokens are not one span inside its tokens, or a row without any).
    """
    rows, width = input_ids.shape
    if rows % 2:
        return None, 0, False
    positions = torch.arange(width, device=input_ids.device)
    attended, completion = attention_mask != 0, completion_mask != 0
    length = attended.sum(1)
    first = torch.where(completion, positions, width).amin(1)
    last = torch.where(completion, positions, -1).amax(1)
    right_padded = (attended == (positions[None, :] < length[:, None])).all(1)
    one_span = completion.sum(1) == last - first + 1
    fits = right_padded & one_span & (last >= 0) & (last < length)
    # One device-to-host copy per batch: the tokens and each row's completion span and check.
    table = torch.cat([input_ids, first[:, None], last[:, None], fits[:, None].long()], dim=1).tolist()
    if not all(row[width + 2] for row in table):
        return None, 0, False
    half, pairs, unshared = rows // 2, [], 0
    for chosen, rejected in zip(table[:half], table[half:]):
        (fc, lc), (fr, lr) = chosen[width : width + 2], rejected[width : width + 2]
        if chosen[:fc] == rejected[:fr]:
            pairs.append(SharedPair(chosen[:fc], chosen[fc : lc + 1], rejected[fr : lr + 1]))
        else:
            unshared += 1
            pairs.append(
                SharedPair(
                    [], chosen[: lc + 1], rejected[: lr + 1], chosen_label_start=fc, rejected_label_start=fr
                )
            )
    if unshared == half:
        return None, unshared, True
    batch = shared_prefix_batch(pairs, pad_token_id)
    return {k: batch[k].to(input_ids.device, non_blocking=True) for k in _SHARED_KEYS}, unshared, True


def _mean_token_counts(dataset, limit: int = 100_000) -> tuple[float, float]:
    """Mean prompt and completion token counts of a tokenized dataset (``prompt_ids``/``chosen_ids``/
    ``rejected_ids``), over its first ``limit`` rows (zeros for an empty one)."""
    import itertools

    from datasets import Dataset

    prompt = response = rows = 0
    if isinstance(dataset, Dataset):
        import pyarrow.compute as pc

        # Arrow list lengths: no token list becomes a Python object.
        head = dataset.select(range(min(len(dataset), limit))).select_columns(list(_TOKENIZED))
        for table in head.with_format("arrow").iter(batch_size=10_000):
            length = {c: pc.sum(pc.list_value_length(table[c])).as_py() or 0 for c in _TOKENIZED}
            prompt += length["prompt_ids"]
            response += length["chosen_ids"] + length["rejected_ids"]
            rows += table.num_rows
    else:
        for example in itertools.islice(dataset, limit):
            prompt += len(example["prompt_ids"])
            response += len(example["chosen_ids"]) + len(example["rejected_ids"])
            rows += 1
    return prompt / max(rows, 1), response / max(2 * rows, 1)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
