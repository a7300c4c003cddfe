"""The preference losses, each defined once: formula, hyper-parameters, margin, peers' names.

Every loss of the family is a *mean over pairs* of a small function of per-row statistics of a
``[chosen; rejected]`` batch (``sum_logp``, ``sum_p``, ``count``; see
:class:`synpo_kernels.reference.RowStats`), of the reference model's per-row log-probs for the losses
that need them, and of batch constants (:class:`LossContext`: the number of pairs and of chosen
response tokens, both known from the labels before any logits exist). That is what the fused ops
exploit (gradients ``a_row + b_row * p_t``, chunks of whole pairs); see :mod:`synpo_kernels.losses`.

One :class:`LossDef` per loss holds everything about it: the per-pair formula, its hyper-parameters
(:class:`Param`: default, type, allowed range), the reward margin logged next to it, whether it needs
reference log-probs, a one-line formula for the docs, and the corresponding TRL / Liger-Kernel
arguments. Everything else is derived from :data:`LOSSES`: ``reference.PREFERENCE_LOSSES``, option
validation (``losses.make_loss_spec``), the trainer config (``synpo.config``) and the tables of
``docs/losses.md`` (:func:`render_docs`; ``python -m synpo_kernels.loss_registry docs/losses.md``
rewrites them, ``--check`` verifies them).

Conventions (the ones TRL and Liger-Kernel users bring):

- ``ref_logps`` are per-row *summed* reference log-probs for every loss (what TRL precomputes); a loss
  that length-normalizes divides by the row's token count itself (the reference scores the same labels).
- The NLL term of CPO/ORPO (and SimPO's optional one) is by default the pooled mean over all chosen
  response tokens of the batch, ``-sum_b s_w,b / sum_b n_w,b``: per pair, ``-s_w * B / N_w``.

Adding a loss is one :func:`register_loss` call (:func:`registered_loss` for a temporary one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import re
import sys
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "LOSSES",
    "TRL_LOSS_TYPES",
    "CombinedLoss",
    "LossContext",
    "LossDef",
    "Param",
    "Peer",
    "combine_losses",
    "from_trl_loss_type",
    "get_loss",
    "loss_tables",
    "register_loss",
    "registered_loss",
    "render_docs",
    "unregister_loss",
    "weight_option",
]

REFERENCE_OPTION = "ref_logps"
"""The per-row tensor option of losses with ``needs_reference``: ``(2B,)`` summed reference log-probs."""


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """The argument of a peer library (TRL, Liger-Kernel) that corresponds to one of ours."""

    name: str
    default: Any
    note: str = ""

    def render(self) -> str:
        text = f"`{self.name}={self.default!r}`"
        return f"{text} ({self.note})" if self.note else text


@dataclass(frozen=True)
class Param:
    """One hyper-parameter: default, type (from the default: float, bool or one of ``choices``) and range.

    ``check`` raises ``TypeError`` for a wrong type and ``ValueError`` for a bad value, both naming it.
    ``trl`` / ``liger``: the peer's corresponding argument (:class:`Peer`), a note (str), or None.
    ``requires``: ``(option, value)`` that a non-default value of this one needs (else it would be
    silently unused): :meth:`LossDef.resolve` raises ``ValueError`` naming both.
    """

    name: str
    default: float | bool | str
    doc: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    trl: Peer | str | None = None
    liger: Peer | str | None = None
    requires: tuple[str, Any] | None = None

    @property
    def type(self) -> type:
        return bool if isinstance(self.default, bool) else str if self.choices else float

    def allowed(self) -> str:
        """The allowed values, for messages and docs (``"> 0"``, ``"[0, 0.5)"``, ``"true/false"`` ...)."""
        if self.type is bool:
            return "true/false"
        if self.type is str:
            return " / ".join(self.choices)
        if self.low is not None and self.high is not None:
            return (
                f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
            )
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return "finite"

    def check(self, value: Any) -> float | bool | str:
        """``value`` validated (numbers become Python floats)."""
        name = self.name
        if self.type is bool:
            if not isinstance(value, bool):
                raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
            return value
        if self.type is str:
            if not isinstance(value, str):
                raise TypeError(f"{name}: expected a string, got {type(value).__name__}")
            if value not in self.choices:
                raise ValueError(f"{name}: must be one of {list(self.choices)}, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{name}: must be finite, got {value}")
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high:
            allowed = self.allowed()
            where = f"in {allowed}" if allowed[0] in "[(" else allowed
            raise ValueError(f"{name}: must be {where}, got {value:g}")
        return value


@dataclass(frozen=True)
class LossContext:
    """What a pair's loss may need beyond its own two rows.

    ``ref_w`` / ``ref_l``: summed reference log-probs of the chosen / rejected rows (None without a
    reference). ``num_pairs`` / ``chosen_tokens``: pairs and chosen response tokens of the *whole batch*
    (not of the chunk being processed), for pooled means.
    """

    num_pairs: int
    chosen_tokens: float | torch.Tensor
    ref_w: torch.Tensor | None = None
    ref_l: torch.Tensor | None = None


class Options:
    """A loss's resolved options as attributes (``o.beta``), what a :data:`Formula` receives.

    A plain class rather than ``types.SimpleNamespace`` so that ``torch.compile`` traces the formulas
    (Dynamo does not trace ``SimpleNamespace``'s constructor).
    """

    def __init__(self, options: Mapping[str, Any]):
        for name, value in options.items():
            setattr(self, name, value)

    def __repr__(self) -> str:
        return f"Options({vars(self)})"


Formula = Callable[[Any, Any, Options, LossContext], torch.Tensor]
"""``(chosen, rejected, options, context) -> (P,)``; chosen/rejected are RowStats of the pairs' rows."""

RowFormula = Callable[[Any, Options, "torch.Tensor | None"], torch.Tensor]
"""``(rows, options, ref) -> (rows,)``: a per-row quantity of RowStats rows (either side of the pairs);
``ref`` their summed reference log-probs (None for a loss without a reference)."""


@dataclass(frozen=True)
class LossDef:
    """A preference loss: everything the package, the trainer and the docs know about it.

    ``reward``: the per-row reward the loss compares (what TRL logs as ``rewards/chosen`` and
    ``rewards/rejected``), such that ``reward(chosen) - reward(rejected)`` is ``margin`` (up to rounding;
    ``margin`` keeps its own formula, the one the fused ops' statistics report). None: no per-row reward.
    ``whole_batch``: the formula couples the pairs of the batch (AOT sorts their log-ratios), so it
    must see all of them at once: the fused op then makes the whole batch one chunk (past its buffer,
    that costs a second logits pass, 8 n D V instead of 6).
    """

    name: str
    formula: Formula
    margin: Formula
    params: tuple[Param, ...]
    needs_reference: bool
    summary: str  # one-line formula for the docs
    margin_doc: str
    description: str
    trl: str | None = None  # the TRL class/config and settings that compute this loss
    liger: str | None = None  # the Liger-Kernel class (or why there is none)
    hints: Mapping[str, str] = field(default_factory=dict)  # option -> why it is not ours
    reward: RowFormula | None = None
    whole_batch: bool = False

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise ValueError(f"{name}: not an option of loss {self.name!r}")

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def unknown_option(self, name: str) -> str:
        """The message for an option this loss does not take (with a hint where a peer has it)."""
        hint = self.hints.get(name)
        return f"{name}: not an option of loss {self.name!r}" + (f"; {hint}" if hint else "")

    def resolve(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """All hyper-parameters, checked, defaults filled in. ``TypeError`` for an unknown option."""
        unknown = sorted(set(options) - set(self.param_names))
        if unknown:
            hints = "".join(f"; {self.hints[u]}" for u in unknown if u in self.hints)
            raise TypeError(
                f"loss_options: unknown option(s) {unknown} for loss {self.name!r}; "
                f"accepted: {sorted(self.param_names)}{hints}"
            )
        resolved = {p.name: p.check(options[p.name]) if p.name in options else p.default for p in self.params}
        for p in self.params:
            if p.requires is not None and resolved[p.name] != p.default:
                key, value = p.requires
                if resolved[key] != value:
                    raise ValueError(
                        f"{p.name}: only used with {key}={value!r}, but {key}={resolved[key]!r} "
                        f"(loss {self.name!r})"
                    )
        return resolved

    def _apply(self, fn, stats, options, ref_logps, context) -> torch.Tensor:
        chosen, rejected = stats.split_pairs()
        if context is None:
            context = LossContext(chosen.count.shape[0], chosen.count.sum())
        if ref_logps is not None:
            ref = ref_logps.to(stats.sum_logp.dtype)
            half = chosen.count.shape[0]
            context = LossContext(context.num_pairs, context.chosen_tokens, ref[:half], ref[half:])
        return fn(chosen, rejected, Options(options), context)

    def pair_losses(self, stats, options, ref_logps=None, context=None) -> torch.Tensor:
        """Per-pair losses ``(P,)`` of a ``[chosen; rejected]`` block, ``options`` already resolved.

        ``context`` defaults to the block itself being the whole batch.
        """
        return self._apply(self.formula, stats, options, ref_logps, context)

    def reward_margin(self, stats, options, ref_logps=None, context=None) -> torch.Tensor:
        return self._apply(self.margin, stats, options, ref_logps, context)

    def rewards(self, stats, options, ref_logps=None) -> torch.Tensor | None:
        """Per-row rewards ``(rows,)`` of ``stats`` (RowStats of any rows), ``options`` already resolved;
        ``ref_logps``: the rows' summed reference log-probs. None for a loss without a ``reward``."""
        if self.reward is None:
            return None
        if self.needs_reference and ref_logps is None:
            raise ValueError(f"{REFERENCE_OPTION}: loss {self.name!r} needs {REFERENCE_OPTION}= for rewards")
        ref = None if ref_logps is None else ref_logps.to(stats.sum_logp.dtype)
        return self.reward(stats, Options(options), ref)

    def from_stats(self, stats, **options) -> torch.Tensor:
        """Per-pair losses of a whole batch's statistics; ``options`` as keywords (``ref_logps=``)."""
        ref = options.pop(REFERENCE_OPTION, None)
        if self.needs_reference and ref is None:
            raise ValueError(f"{REFERENCE_OPTION}: loss {self.name!r} needs {REFERENCE_OPTION}=")
        if ref is not None and not self.needs_reference:
            raise TypeError(f"{REFERENCE_OPTION}: loss {self.name!r} takes no reference log-probs")
        return self.pair_losses(stats, self.resolve(options), ref)


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------

_REGISTRY: dict[str, LossDef] = {}
LOSSES: Mapping[str, LossDef] = types.MappingProxyType(_REGISTRY)
"""Name -> :class:`LossDef`, in registration order (read-only view; use :func:`register_loss`)."""


def get_loss(name: Any, key: str = "loss") -> LossDef:
    """The registered loss ``name``, or the weighted sum ``"a+b+..."`` of registered losses
    (:func:`combine_losses`); the one place an unknown loss is reported (``ValueError``)."""
    if isinstance(name, str) and name in _REGISTRY:
        return _REGISTRY[name]
    if isinstance(name, str) and COMBINE in name:
        return combine_losses(name.split(COMBINE), key)
    close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1, cutoff=0.5)
    suggestion = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"{key}: unknown preference loss {name!r}; one of {sorted(_REGISTRY)}{suggestion}")


def register_loss(loss: LossDef, *, replace: bool = False) -> LossDef:
    """Add ``loss`` to :data:`LOSSES` (every API, the trainer config and the docs pick it up)."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", loss.name):
        raise ValueError(f"name: expected a lower-case identifier, got {loss.name!r}")
    if loss.name in _REGISTRY and not replace:
        raise ValueError(f"name: loss {loss.name!r} is already registered")
    names = [p.name for p in loss.params]
    if len(set(names)) != len(names) or REFERENCE_OPTION in names:
        raise ValueError(f"params: duplicate or reserved option names in {names}")
    for p in loss.params:
        if p.check(p.default) != p.default:
            raise ValueError(f"{p.name}: default {p.default!r} is not a valid value")
    _REGISTRY[loss.name] = loss
    return loss


def unregister_loss(name: str) -> None:
    get_loss(name)
    del _REGISTRY[name]


@contextlib.contextmanager
def registered_loss(loss: LossDef) -> Iterator[LossDef]:
    """Register ``loss`` for the duration of a ``with`` block (tests, experiments)."""
    register_loss(loss)
    try:
        yield loss
    finally:
        _REGISTRY.pop(loss.name, None)


# ---------------------------------------------------------------------------------------------
# Weighted sums of losses (TRL's `loss_type=[...]` with `loss_weights`, e.g. the MPO recipe)
# ---------------------------------------------------------------------------------------------

COMBINE = "+"
"""``loss="dpo+bco_pair+sft"``: the weighted sum of those losses (weights: the ``<name>_weight`` options)."""
WEIGHT_SUFFIX = "_weight"

_COMBINED: dict[str, tuple[tuple[LossDef, ...], LossDef]] = {}

# The shared hyper-parameters of two losses must mean the same thing to be one option of their sum.
_SAME_MEANING = ("default", "low", "high", "low_open", "high_open", "choices")


def weight_option(name: str) -> str:
    """The option holding loss ``name``'s weight in a sum of losses (``dpo`` -> ``dpo_weight``)."""
    return f"{name}{WEIGHT_SUFFIX}"


# TRL DPOConfig ``loss_type`` names that are a registry entry with an option set: (entry, options).
TRL_LOSS_TYPES: Mapping[str, tuple[str, Mapping[str, Any]]] = types.MappingProxyType(
    {"sigmoid": ("dpo", {}), "sigmoid_norm": ("dpo", {"average": True})}
)


def from_trl_loss_type(loss_type: str | list[str] | tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """TRL's ``loss_type`` (a name, TRL's list of names, or ``"a+b"``) in the registry's spelling, and
    the options its TRL names imply: ``"sigmoid_norm"`` -> ``("dpo", {"average": True})``,
    ``["sigmoid", "sft"]`` -> ``("dpo+sft", {})``. Other names pass through (checked by :func:`get_loss`)."""
    parts = list(loss_type) if isinstance(loss_type, (list, tuple)) else str(loss_type).split(COMBINE)
    if not parts or not all(isinstance(p, str) and p for p in parts):
        raise ValueError(f"loss_type: expected a loss name or a list of them, got {loss_type!r}")
    names, implied = [], {}
    for part in parts:
        name, options = TRL_LOSS_TYPES.get(part, (part, {}))
        for key, value in options.items():
            if implied.get(key, value) != value:
                raise ValueError(f"loss_type: {loss_type!r} implies two values of {key!r}")
            implied[key] = value
        names.append(name)
    return COMBINE.join(names), implied


def combine_losses(names: list[str] | tuple[str, ...], key: str = "loss") -> LossDef:
    """The loss ``sum_k weight_k * loss_k`` of registered losses, as one :class:`LossDef`.

    TRL's ``loss_type=[...], loss_weights=[...]``: each pair's loss is still a function of its own rows,
    so the sum runs in the fused op's one pass like any loss. Options: ``<name>_weight`` (default 1.0,
    TRL's ``loss_weights``) per loss, and the union of the losses' own options, one value each, as TRL
    shares ``beta`` and ``label_smoothing`` between the loss types. ``ValueError`` (naming ``key``) for
    an unknown or repeated loss or two losses whose options of the same name differ in meaning
    (default or range). The reward and margin are those of the first loss that uses a reference (of
    the first loss when none does): TRL's ``β u`` and ``β h`` for its loss types.
    """
    names = tuple(names)
    name = COMBINE.join(names)
    if not all(names):
        raise ValueError(f"{key}: {name!r}: an empty loss name in the sum")
    parts = tuple(get_loss(n, key) for n in names)
    cached = _COMBINED.get(name)
    if cached is not None and cached[0] == parts:
        return cached[1]
    if len(parts) < 2:
        raise ValueError(f"{key}: {name!r}: a sum of losses needs two or more, separated by {COMBINE!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{key}: {name!r}: each loss may appear once")
    params = [
        Param(weight_option(n), 1.0, f"weight of `{n}` in the sum", low=0.0, trl=f"`loss_weights[{i}]`")
        for i, n in enumerate(names)
    ]
    owner: dict[str, tuple[str, Param]] = {}
    for part in parts:
        for p in part.params:
            if p.name in owner:
                first, q = owner[p.name]
                if any(getattr(p, a) != getattr(q, a) for a in _SAME_MEANING):
                    raise ValueError(
                        f"{key}: {name!r}: option {p.name!r} of {first!r} ({q.default!r}, {q.allowed()}) "
                        f"and of {part.name!r} ({p.default!r}, {p.allowed()}) differ; they cannot share it"
                    )
                continue
            owner[p.name] = (part.name, p)
            params.append(p)
    if len({p.name for p in params}) != len(params):
        raise ValueError(f"{key}: {name!r}: a loss's weight option collides with an option of the losses")
    shown = next((p for p in parts if p.needs_reference), parts[0])

    def formula(w, lo, o, ctx):
        total = 0.0
        for n, part in zip(names, parts):
            sub = Options({q: getattr(o, q) for q in part.param_names})
            total = total + getattr(o, weight_option(n)) * part.formula(w, lo, sub, ctx)
        return total

    def sub_options(o):
        return Options({q: getattr(o, q) for q in shown.param_names})

    hints: dict[str, str] = {}
    for part in parts:
        hints.update({k: v for k, v in part.hints.items() if k not in owner})
    combined = CombinedLoss(
        name=name,
        formula=formula,
        margin=lambda w, lo, o, ctx: shown.margin(w, lo, sub_options(o), ctx),
        reward=None if shown.reward is None else lambda row, o, ref: shown.reward(row, sub_options(o), ref),
        params=tuple(params),
        needs_reference=any(p.needs_reference for p in parts),
        whole_batch=any(p.whole_batch for p in parts),
        summary=" + ".join(f"w_{n} · ({p.summary})" for n, p in zip(names, parts)),
        margin_doc=f"{shown.margin_doc} (of `{shown.name}`)",
        description=f"the weighted sum of {', '.join(names)}",
        trl=f"`trl.DPOConfig(loss_type={list(names)}, loss_weights=[...])`",
        hints=hints,
        parts=parts,
    )
    _COMBINED[name] = (parts, combined)
    return combined


@dataclass(frozen=True)
class CombinedLoss(LossDef):
    """A weighted sum of registered losses (:func:`combine_losses`)."""

    parts: tuple[LossDef, ...] = ()

    def resolve(self, options: Mapping[str, Any]) -> dict[str, Any]:
        resolved = super().resolve(options)
        # As TRL: an f-divergence only where every loss with a reference scores the chosen-minus-rejected
        # difference (sft has no reference and ignores it, as in TRL).
        if resolved.get("f_divergence_type", "reverse_kl") != "reverse_kl":
            without = [
                p.name for p in self.parts if p.needs_reference and "f_divergence_type" not in p.param_names
            ]
            if without:
                raise ValueError(
                    f"f_divergence_type: {resolved['f_divergence_type']!r} does not apply to {without} in "
                    f"loss {self.name!r}; {_NO_F_DIVERGENCE}"
                )
        return resolved


# ---------------------------------------------------------------------------------------------
# Shared pieces of the formulas
# ---------------------------------------------------------------------------------------------


def smoothed_logsigmoid_loss(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``-(1 - eps) logsigmoid(x) - eps logsigmoid(-x)`` (label smoothing, conservative DPO)."""
    loss = -F.logsigmoid(x)
    return loss if eps == 0.0 else (1.0 - eps) * loss - eps * F.logsigmoid(-x)


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """``log(p / (1 - p))`` with ``log p = mean_logp < 0``; ``log(1 - p)`` branches as TRL's log1mexp."""
    log1mexp = torch.where(
        mean_logp < -math.log(2.0), torch.log1p(-torch.exp(mean_logp)), torch.log(-torch.expm1(mean_logp))
    )
    return mean_logp - log1mexp


def chosen_nll(chosen, o: Options, ctx: LossContext) -> torch.Tensor:
    """Per-pair share of the NLL of the chosen rows: pooled (``-s_w * B / N_w``) or per-row mean."""
    if o.nll_reduction == "per_row":
        return -chosen.mean_logp
    return -chosen.sum_logp * (ctx.num_pairs / ctx.chosen_tokens)


def _pick(row, average: bool) -> torch.Tensor:
    return row.mean_logp if average else row.sum_logp


def _log_ratio(row, o, ref) -> torch.Tensor:
    """A row's policy-minus-reference log-ratio ``s - r``, divided by its token count with ``average``."""
    d = row.sum_logp - ref
    return d / row.count if getattr(o, "average", False) else d


def _reference_margin(w, lo, o, ctx) -> torch.Tensor:
    """``h = (s_w - r_w) - (s_l - r_l)``, each side divided by its row's token count with ``average``."""
    return _log_ratio(w, o, ctx.ref_w) - _log_ratio(lo, o, ctx.ref_l)


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
"""TRL's ``f_divergence_type`` values: the divergence whose derivative ``f'`` scores a row's log-ratio."""


def f_score(log_ratio: torch.Tensor, o: Options) -> torch.Tensor:
    """``f'(π/π_ref)`` of a row's log-ratio ``u = s - r`` for the loss's ``f_divergence_type``, as TRL's
    ``DPOTrainer`` scores it (``u`` itself for ``reverse_kl``, the default, and for a loss without one)."""
    kind = getattr(o, "f_divergence_type", "reverse_kl")
    if kind == "forward_kl":  # f'(t) = 1 - 1/t
        return 1.0 - torch.exp(-log_ratio)
    if kind == "js_divergence":  # f'(t) = log(2t / (t + 1))
        return math.log(2.0) + F.logsigmoid(log_ratio)
    if kind == "alpha_divergence" and abs(o.f_alpha_divergence_coef - 1.0) >= 1e-6:
        # f'(t) = (t^(a-1) - 1) / (a - 1); a = 1 is reverse KL (TRL's limit case). TRL clamps the exponent
        # at 80 so that exp stays finite in float32; the same clamp keeps the two equal there.
        a1 = o.f_alpha_divergence_coef - 1.0
        return torch.expm1(torch.clamp(a1 * log_ratio, max=80.0)) / a1
    return log_ratio


def _score(row, o, ref) -> torch.Tensor:
    """A row's f-divergence score ``f'(s - r)``, divided by its token count with ``average``."""
    score = f_score(row.sum_logp - ref, o)
    return score / row.count if getattr(o, "average", False) else score


def _score_margin(w, lo, o, ctx) -> torch.Tensor:
    """TRL's ``delta_score``: ``_score`` of the chosen minus that of the rejected row."""
    return _score(w, o, ctx.ref_w) - _score(lo, o, ctx.ref_l)


def _geometric_mean_prob(row, o=None, ref=None) -> torch.Tensor:
    """SynPO's ``G = exp(m)``, the geometric-mean token probability of a row."""
    return row.mean_logp.exp()


def _sigmoid_plus_nll(value, margin_offset: str | None = None) -> dict[str, Any]:
    """Formula, margin and reward of ``-(1-ε) logσ(x) - ε logσ(-x) + nll_weight * NLL`` with
    ``x = β (v_w - v_l) - γ`` (``v`` = ``value(row, options)``, ``γ`` the option named ``margin_offset``,
    if any); the reward of a row is ``β v``, the margin ``β (v_w - v_l)``."""

    def score(w, lo, o):
        return value(w, o) - value(lo, o)

    def formula(w, lo, o, ctx):
        x = o.beta * score(w, lo, o) - (getattr(o, margin_offset) if margin_offset else 0.0)
        return smoothed_logsigmoid_loss(x, o.label_smoothing) + o.nll_weight * chosen_nll(w, o, ctx)

    return {
        "formula": formula,
        "margin": lambda w, lo, o, ctx: o.beta * score(w, lo, o),
        "reward": lambda row, o, ref: o.beta * value(row, o),
    }


def _beta(doc: str) -> Param:
    """A positive ``beta``, called ``beta`` (default 0.1) by TRL and Liger alike."""
    return Param("beta", 0.1, doc, low=0.0, low_open=True, trl=Peer("beta", 0.1), liger=Peer("beta", 0.1))


def _nll_weight(default: float, trl: Peer, liger: Peer) -> Param:
    return Param(
        "nll_weight", default, "weight of the NLL term on the chosen rows", low=0.0, trl=trl, liger=liger
    )


_SMOOTHING = dict(low=0.0, high=0.5, high_open=True)
_LABEL_SMOOTHING = Param(
    "label_smoothing",
    0.0,
    "label smoothing of the preference term",
    **_SMOOTHING,
    trl=Peer("label_smoothing", 0.0),
    liger=Peer("label_smoothing", 0.0),
)
_NLL_REDUCTION = Param(
    "nll_reduction",
    "pooled",
    "NLL as the mean over all chosen tokens of the batch (pooled) or the mean of per-row means",
    choices=("pooled", "per_row"),
    trl="pooled (`nn.CrossEntropyLoss` mean)",
    liger="pooled (sum / chosen tokens of the whole target)",
)
_LIGER = "liger_kernel.chunked_loss."
_F_DIVERGENCE_TYPE = Param(
    "f_divergence_type",
    "reverse_kl",
    "the f-divergence whose f' scores each row's log-ratio (f-DPO); reverse_kl is DPO's",
    choices=F_DIVERGENCES,
    trl=Peer("f_divergence_type", "reverse_kl"),
    liger="—",
)
_F_ALPHA = Param(
    "f_alpha_divergence_coef",
    0.5,
    "α of `f_divergence_type=alpha_divergence` (1: reverse KL); an error with another divergence",
    trl=Peer("f_alpha_divergence_coef", 0.5),
    liger="—",
    requires=("f_divergence_type", "alpha_divergence"),
)
_F_DIVERGENCE = (_F_DIVERGENCE_TYPE, _F_ALPHA)
_F_DIVERGENCE_LOSSES = "dpo, ipo, hinge, exo_pair, robust and discopop"
_NO_F_DIVERGENCE = (
    f"TRL 1.16 applies f_divergence_type only where the loss is a function of the chosen-minus-rejected "
    f"score ({_F_DIVERGENCE_LOSSES} here)"
)

# ---------------------------------------------------------------------------------------------
# The losses
# ---------------------------------------------------------------------------------------------

register_loss(
    LossDef(
        name="synpo",
        formula=lambda w, lo, o, ctx: (
            -torch.sigmoid(o.alpha * (_geometric_mean_prob(w) - _geometric_mean_prob(lo))) - o.beta * w.mean_p
        ),
        margin=lambda w, lo, o, ctx: _geometric_mean_prob(w) - _geometric_mean_prob(lo),
        reward=_geometric_mean_prob,
        params=(
            Param("alpha", 30.0, "scale of the geometric-mean probability gap", low=0.0, low_open=True),
            Param("beta", 0.2, "weight of the chosen row's mean token probability", low=0.0),
        ),
        needs_reference=False,
        summary="-σ(α (G_w − G_l)) − β P_w",
        margin_doc="G_w − G_l",
        description="SynPO (arXiv 2506.00835): bounded in [-1-β, 0], no reference model.",
    )
)

register_loss(
    LossDef(
        name="dpo",
        formula=lambda w, lo, o, ctx: smoothed_logsigmoid_loss(
            o.beta * _score_margin(w, lo, o, ctx), o.cdpo_smoothing
        ),
        margin=lambda w, lo, o, ctx: o.beta * _reference_margin(w, lo, o, ctx),
        reward=lambda row, o, ref: o.beta * _log_ratio(row, o, ref),
        params=(
            _beta("inverse temperature"),
            Param(
                "average",
                False,
                "divide each row's policy-minus-reference log-ratio by its token count",
                trl='`loss_type="sigmoid_norm"` when true',
                liger=Peer("average_log_prob", False),
            ),
            Param(
                "cdpo_smoothing",
                0.0,
                "conservative DPO: probability that a preference label is flipped",
                **_SMOOTHING,
                trl="— (`sigmoid` ignores `label_smoothing`)",
                liger="— (`sigmoid` ignores `label_smoothing`)",
            ),
            *_F_DIVERGENCE,
        ),
        needs_reference=True,
        summary="-(1−ε) logσ(β d) − ε logσ(−β d), d = f′(s_w − r_w) − f′(s_l − r_l)",
        margin_doc="β h",
        description="DPO with the sigmoid loss on summed log-probs (per-token means with `average`: TRL's "
        "`sigmoid_norm`).",
        trl='`trl.DPOConfig(loss_type="sigmoid")`',
        liger=f'`{_LIGER}LigerFusedLinearDPOLoss(loss_type="sigmoid")`',
        hints={
            "label_smoothing": "TRL 1.16 and Liger ignore label_smoothing in the sigmoid DPO loss; "
            "conservative DPO (the old TRL meaning) is cdpo_smoothing="
        },
    )
)

register_loss(
    LossDef(
        name="ipo",
        formula=lambda w, lo, o, ctx: (_score_margin(w, lo, o, ctx) - 1.0 / (2.0 * o.tau)) ** 2,
        margin=_reference_margin,
        reward=_log_ratio,
        params=(
            Param(
                "tau",
                0.1,
                "regularization (the margin target is 1 / (2 tau))",
                low=0.0,
                low_open=True,
                trl=Peer("beta", 0.1),
            ),
            Param(
                "average",
                True,
                "length-normalize each row's log-ratio (false: the paper's sums)",
                trl="always normalized",
            ),
            *_F_DIVERGENCE,
        ),
        needs_reference=True,
        summary="(d − 1/(2τ))², d = f′(s_w − r_w)/n_w − f′(s_l − r_l)/n_l",
        margin_doc="(s_w − r_w)/n_w − (s_l − r_l)/n_l",
        description="IPO, length-normalized as in TRL (confirmed with the IPO authors); `average=false` "
        "uses the paper's sums.",
        trl='`trl.DPOConfig(loss_type="ipo")`',
        liger='none (`loss_type="ipo"` raises NotImplementedError in 0.8.5)',
    )
)

register_loss(
    LossDef(
        name="simpo",
        **_sigmoid_plus_nll(lambda row, o: row.mean_logp, margin_offset="gamma"),
        params=(
            _beta("scale of the length-normalized reward"),
            Param(
                "gamma", 0.5, "target reward margin", trl=Peer("simpo_gamma", 0.5), liger=Peer("gamma", 0.5)
            ),
            _LABEL_SMOOTHING,
            _nll_weight(
                0.0,
                trl=Peer("cpo_alpha", 1.0, "CPO-SimPO; `cpo_alpha=0` is SimPO"),
                liger=Peer("alpha", 1.0, "applied when `compute_nll_loss`, default True in the module"),
            ),
            _NLL_REDUCTION,
        ),
        needs_reference=False,
        summary="-(1−ε) logσ(β (m_w − m_l) − γ) − ε logσ(γ − β (m_w − m_l)) + λ NLL",
        margin_doc="β (m_w − m_l)",
        description="SimPO on per-token mean log-probs; no NLL term unless `nll_weight` (CPO-SimPO).",
        trl='`trl.experimental.cpo.CPOConfig(loss_type="simpo")`',
        liger=f"`{_LIGER}LigerFusedLinearSimPOLoss`",
    )
)

register_loss(
    LossDef(
        name="cpo",
        **_sigmoid_plus_nll(lambda row, o: _pick(row, o.average)),
        params=(
            _beta("inverse temperature"),
            _LABEL_SMOOTHING,
            Param(
                "average",
                False,
                "per-token mean log-probs instead of sums",
                trl="sums",
                liger=Peer("average_log_prob", False),
            ),
            _nll_weight(1.0, trl=Peer("cpo_alpha", 1.0), liger=Peer("alpha", 1.0)),
            _NLL_REDUCTION,
        ),
        needs_reference=False,
        summary="-(1−ε) logσ(β (s_w − s_l)) − ε logσ(−β (s_w − s_l)) + λ NLL",
        margin_doc="β (s_w − s_l)",
        description="CPO: sigmoid preference term on summed log-probs plus NLL on the chosen rows.",
        trl='`trl.experimental.cpo.CPOConfig(loss_type="sigmoid")`',
        liger=f"`{_LIGER}LigerFusedLinearCPOLoss`",
    )
)

register_loss(
    LossDef(
        name="orpo",
        formula=lambda w, lo, o, ctx: (
            chosen_nll(w, o, ctx) - o.lam * F.logsigmoid(log_odds(w.mean_logp) - log_odds(lo.mean_logp))
        ),
        margin=lambda w, lo, o, ctx: log_odds(w.mean_logp) - log_odds(lo.mean_logp),
        reward=lambda row, o, ref: log_odds(row.mean_logp),
        params=(
            Param(
                "lam",
                0.1,
                "weight of the odds-ratio term",
                low=0.0,
                trl=Peer("beta", 0.1),
                liger=Peer("beta", 0.1),
            ),
            _NLL_REDUCTION,
        ),
        needs_reference=False,
        summary="NLL − λ logσ(logodds(m_w) − logodds(m_l))",
        margin_doc="logodds(m_w) − logodds(m_l)",
        description="ORPO: NLL on the chosen rows plus the odds-ratio term on per-token mean log-probs.",
        trl="`trl.experimental.orpo.ORPOConfig`",
        liger=f"`{_LIGER}LigerFusedLinearORPOLoss`",
    )
)


# ---------------------------------------------------------------------------------------------
# The other loss types of TRL's DPOTrainer (and Liger's LigerFusedLinearDPOLoss), on summed log-probs
# ---------------------------------------------------------------------------------------------

_ONLY_DPO_SMOOTHING = "TRL 1.16 and Liger ignore label_smoothing for this loss type"


def _trl_dpo_loss(
    name: str, formula: Formula, params: tuple[Param, ...], *, liger: bool | str = True, **kw
) -> LossDef:
    """A ``trl.DPOConfig(loss_type=name)`` loss: needs the reference, and TRL's rewards ``β u``
    (whatever the f-divergence, as TRL logs them) and margin ``β h``."""
    hints = {"label_smoothing": _ONLY_DPO_SMOOTHING, "f_divergence_type": _NO_F_DIVERGENCE}
    hints.update(kw.pop("hints", {}))
    hints = {k: v for k, v in hints.items() if k not in {p.name for p in params}}
    return LossDef(
        name=name,
        formula=formula,
        margin=lambda w, lo, o, ctx: o.beta * _reference_margin(w, lo, o, ctx),
        reward=lambda row, o, ref: o.beta * _log_ratio(row, o, ref),
        params=params,
        needs_reference=True,
        margin_doc="β h",
        trl=f'`trl.DPOConfig(loss_type="{name}")`',
        liger=f'`{_LIGER}LigerFusedLinearDPOLoss(loss_type="{name}")`' if liger is True else liger,
        hints=hints,
        **kw,
    )


def _u(row, o, ref) -> torch.Tensor:
    """``β u``: a row's reward, the scaled summed log-ratio (what TRL's nca/bco/sppo/apo losses take)."""
    return o.beta * (row.sum_logp - ref)


def _exo_pair(w, lo, o, ctx) -> torch.Tensor:
    x = o.beta * _score_margin(w, lo, o, ctx)
    eps = o.label_smoothing
    return torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps)) + torch.sigmoid(-x) * (
        F.logsigmoid(-x) - math.log(eps)
    )


def _robust(w, lo, o, ctx) -> torch.Tensor:
    x, eps = o.beta * _score_margin(w, lo, o, ctx), o.label_smoothing
    return (-(1.0 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1.0 - 2.0 * eps)


def _discopop(w, lo, o, ctx) -> torch.Tensor:
    x = o.beta * _score_margin(w, lo, o, ctx)
    mix = torch.sigmoid(x / o.discopop_tau)
    return -F.logsigmoid(x) * (1.0 - mix) + torch.exp(-x) * mix


register_loss(
    _trl_dpo_loss(
        "hinge",
        lambda w, lo, o, ctx: torch.relu(1.0 - o.beta * _score_margin(w, lo, o, ctx)),
        (_beta("inverse temperature (the hinge is at β d = 1)"), *_F_DIVERGENCE),
        summary="max(0, 1 − β d)",
        description="SLiC's hinge loss on the reference log-ratios (RSO's `hinge`).",
    )
)

register_loss(
    _trl_dpo_loss(
        "exo_pair",
        _exo_pair,
        (
            _beta("inverse temperature"),
            Param(
                "label_smoothing",
                1e-3,
                "ε: the target distribution is [1 − ε, ε] over (chosen, rejected)",
                low=0.0,
                high=1.0,
                low_open=True,
                high_open=True,
                trl="`label_smoothing` (default 0.0 is an error for exo_pair; the paper recommends 1e-3)",
                liger="`label_smoothing` (default 0.0 is an error for exo_pair; the paper recommends 1e-3)",
            ),
            *_F_DIVERGENCE,
        ),
        summary="σ(x) (logσ(x) − log(1−ε)) + σ(−x) (logσ(−x) − log ε), x = β d",
        description="EXO (arXiv 2402.00856, eq. 16): KL from the model's pair distribution to [1 − ε, ε].",
    )
)

register_loss(
    _trl_dpo_loss(
        "nca_pair",
        lambda w, lo, o, ctx: (
            -F.logsigmoid(_u(w, o, ctx.ref_w))
            - 0.5 * F.logsigmoid(-_u(w, o, ctx.ref_w))
            - 0.5 * F.logsigmoid(-_u(lo, o, ctx.ref_l))
        ),
        (_beta("inverse temperature"),),
        summary="-logσ(β u_w) − ½ logσ(−β u_w) − ½ logσ(−β u_l)",
        description="NCA (arXiv 2402.05369), pairwise: absolute rewards of each row, not only their gap.",
    )
)

register_loss(
    _trl_dpo_loss(
        "robust",
        _robust,
        (_beta("inverse temperature"), _LABEL_SMOOTHING, *_F_DIVERGENCE),
        summary="(-(1−ε) logσ(β d) + ε logσ(−β d)) / (1 − 2ε)",
        description="Robust DPO (arXiv 2403.00409): unbiased under a fraction ε of flipped labels.",
    )
)

register_loss(
    _trl_dpo_loss(
        "bco_pair",
        lambda w, lo, o, ctx: -F.logsigmoid(_u(w, o, ctx.ref_w)) - F.logsigmoid(-_u(lo, o, ctx.ref_l)),
        (_beta("inverse temperature"),),
        summary="-logσ(β u_w) − logσ(−β u_l)",
        description="Pairwise BCO as TRL 1.16 computes it: no running reward mean (TRL keeps none here).",
    )
)

register_loss(
    _trl_dpo_loss(
        "sppo_hard",
        lambda w, lo, o, ctx: (
            (w.sum_logp - ctx.ref_w - 0.5 / o.beta) ** 2 + (lo.sum_logp - ctx.ref_l + 0.5 / o.beta) ** 2
        ),
        (_beta("the targets of the log-ratios are ±1/(2β)"),),
        summary="(u_w − 1/(2β))² + (u_l + 1/(2β))²",
        description="SPPO (arXiv 2405.00675) with hard win probabilities (1 for chosen, 0 for rejected).",
    )
)

register_loss(
    _trl_dpo_loss(
        "apo_zero",
        lambda w, lo, o, ctx: 1.0 - torch.sigmoid(_u(w, o, ctx.ref_w)) + torch.sigmoid(_u(lo, o, ctx.ref_l)),
        (_beta("inverse temperature"),),
        summary="1 − σ(β u_w) + σ(β u_l)",
        description="APO-zero (arXiv 2408.06266, eq. 7): chosen better than the model's own outputs.",
    )
)

register_loss(
    _trl_dpo_loss(
        "apo_down",
        lambda w, lo, o, ctx: (
            torch.sigmoid(_u(w, o, ctx.ref_w))
            + 1.0
            - torch.sigmoid(o.beta * _reference_margin(w, lo, o, ctx))
        ),
        (_beta("inverse temperature"),),
        summary="σ(β u_w) + 1 − σ(β h)",
        description="APO-down (arXiv 2408.06266, eq. 8): chosen worse than the model's own outputs.",
    )
)

register_loss(
    _trl_dpo_loss(
        "discopop",
        _discopop,
        (
            _beta("inverse temperature"),
            Param(
                "discopop_tau",
                0.05,
                "temperature of the logistic/exponential mix",
                low=0.0,
                low_open=True,
                trl=Peer("discopop_tau", 0.05),
                liger=Peer("discopop_tau", 0.05),
            ),
            *_F_DIVERGENCE,
        ),
        summary="-logσ(x) (1 − σ(x/τ)) + e^(−x) σ(x/τ), x = β d",
        description="DiscoPOP (arXiv 2406.08414, eq. 5): log-ratio modulated logistic/exponential loss.",
    )
)


def _aot_loss(delta, o) -> torch.Tensor:
    """TRL's AOT losses: the smoothed sigmoid loss of ``β δ`` over the sorted positions."""
    return smoothed_logsigmoid_loss(o.beta * delta, o.label_smoothing)


def _sorted(x: torch.Tensor) -> torch.Tensor:
    return torch.sort(x, dim=0).values


_AOT_PARAMS = tuple(
    dataclasses.replace(p, liger=None) for p in (_beta("inverse temperature"), _LABEL_SMOOTHING)
)
_AOT_DOC = (
    "; a loss of the whole batch (its sort couples the pairs): the fused op runs the batch as one chunk"
)

register_loss(
    _trl_dpo_loss(
        "aot",
        lambda w, lo, o, ctx: _aot_loss(
            _sorted(w.sum_logp - lo.sum_logp) - _sorted(ctx.ref_w - ctx.ref_l), o
        ),
        _AOT_PARAMS,
        liger="none (not among `LigerFusedLinearDPOLoss`'s loss types in 0.8.5)",
        summary="-(1−ε) logσ(β δ_k) − ε logσ(−β δ_k), δ = sort(s_w − s_l) − sort(r_w − r_l)",
        description="AOT (arXiv 2406.05882), paired: the sorted policy log-ratio gaps against the sorted "
        f"reference ones (the k-th loss is the k-th sorted position, not pair k){_AOT_DOC}.",
        whole_batch=True,
    )
)

register_loss(
    _trl_dpo_loss(
        "aot_unpaired",
        lambda w, lo, o, ctx: _aot_loss(
            _sorted(w.sum_logp - ctx.ref_w) - _sorted(lo.sum_logp - ctx.ref_l), o
        ),
        _AOT_PARAMS,
        liger="none (not among `LigerFusedLinearDPOLoss`'s loss types in 0.8.5)",
        summary="-(1−ε) logσ(β δ_k) − ε logσ(−β δ_k), δ = sort(u_w) − sort(u_l)",
        description=f"AOT, unpaired: the sorted chosen log-ratios against the sorted rejected "
        f"ones{_AOT_DOC}.",
        whole_batch=True,
    )
)

register_loss(
    LossDef(
        name="sft",
        formula=lambda w, lo, o, ctx: chosen_nll(w, o, ctx),
        margin=lambda w, lo, o, ctx: w.sum_logp - lo.sum_logp,
        reward=lambda row, o, ref: row.sum_logp,
        params=(
            dataclasses.replace(
                _NLL_REDUCTION, trl="pooled (mean over the batch's chosen tokens)", liger="—"
            ),
        ),
        needs_reference=False,
        summary="NLL of the chosen rows (the rejected rows get no gradient)",
        margin_doc="s_w − s_l",
        description='SFT on the chosen responses, as TRL\'s DPO `loss_type="sft"` (which still runs a '
        "reference it does not use; this loss takes none).",
        trl='`trl.DPOConfig(loss_type="sft")`',
        liger="none (`LigerFusedLinearDPOLoss(compute_nll_loss=True)` adds this NLL to another loss)",
        hints={"beta": "the sft loss has no β", "f_divergence_type": _NO_F_DIVERGENCE},
    )
)


# ---------------------------------------------------------------------------------------------
# Docs: the tables of docs/losses.md
# ---------------------------------------------------------------------------------------------

BEGIN_MARK = "<!-- BEGIN GENERATED by `python -m synpo_kernels.loss_registry docs/losses.md` -->"
END_MARK = "<!-- END GENERATED -->"


def _peer(value: Peer | str | None) -> str:
    if value is None:
        return "—"
    return value.render() if isinstance(value, Peer) else value


def loss_tables() -> str:
    """A list of the losses and two Markdown tables (losses; arguments) generated from :data:`LOSSES`."""
    lines = [f"- `{d.name}`: {d.description}" for d in LOSSES.values()]
    lines += [
        "",
        "| Loss | Per-pair loss | Reward margin | `ref_logps` | TRL 1.16 | Liger-Kernel 0.8.5 |",
        "|---|---|---|---|---|---|",
    ]
    for d in LOSSES.values():
        ref = "summed, required" if d.needs_reference else "—"
        lines.append(
            f"| `{d.name}` | `{d.summary}` | `{d.margin_doc}` | {ref} | {d.trl or '—'} | {d.liger or '—'} |"
        )
    lines += [
        "",
        "| Loss | Argument | Default | Allowed | Meaning | TRL | Liger |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in LOSSES.values():
        for p in d.params:
            default = str(p.default).lower() if p.type is bool else p.default
            lines.append(
                f"| `{d.name}` | `{p.name}` | `{default}` | {p.allowed()} | {p.doc} "
                f"| {_peer(p.trl)} | {_peer(p.liger)} |"
            )
    return "\n".join(lines) + "\n"


def render_docs(text: str) -> str:
    """``text`` (docs/losses.md) with the part between the markers replaced by :func:`loss_tables`."""
    start, end = text.find(BEGIN_MARK), text.find(END_MARK)
    if start < 0 or end < start:
        raise ValueError("docs: the generated-table markers are missing")
    return text[: start + len(BEGIN_MARK)] + "\n" + loss_tables() + text[end:]


def main(argv: list[str] | None = None) -> int:
    """``python -m synpo_kernels.loss_registry [--check] docs/losses.md``."""
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    paths = [a for a in args if a != "--check"] or ["docs/losses.md"]
    path = Path(paths[0])
    text = path.read_text()
    new = render_docs(text)
    if check:
        if new != text:
            print(f"{path}: out of date; run python -m synpo_kernels.loss_registry {path}", file=sys.stderr)
            return 1
        return 0
    path.write_text(new)
    return 0


if __name__ == "__main__":
    # `python -m` runs a second copy of this module; use the package's (the registry everyone sees).
    from synpo_kernels.loss_registry import main as _main

    sys.exit(_main())
