"""Every loss of docs/losses.md against the installed peers, TRL 1.16 and Liger-Kernel 0.8.5, on the same
inputs: loss values and gradients (hidden states and lm_head weight) to fp32 rounding, odd shapes,
unequal lengths and random ignored labels inside the responses.

The peers' own code computes the loss: TRL's ``DPOTrainer._compute_loss`` on TRL's fused LM head
(``add_fused_lm_head``) with precomputed (summed) reference log-probs, TRL's ``CPOTrainer`` /
``ORPOTrainer.get_batch_loss_metrics`` (their forward, log-prob and loss code) and Liger's chunked
losses (``compiled=False``). The models are stand-ins returning given hidden states, so gradients
reach the same leaf tensors as ours. Liger and TRL's encoder-decoder path take targets already
shifted: ours then runs with ``shift=False`` on the same tensors.

The peers are imported at module top: CI installs them (``pip install -e .[test]``); a missing peer is
an error here, not a skip. (Not under tests/kernels: the GPU machine has no Liger.)
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import inspect
import os
import re
import types

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import liger_kernel.chunked_loss as liger
import pytest
import torch
import trl
from liger_kernel.chunked_loss.functional import liger_fused_linear_simpo
from torch import nn
from transformers import PretrainedConfig
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer
from trl.trainer.utils import add_fused_lm_head

import synpo_kernels as sk

PAIRS, SEQ, DIM, VOCAB = 3, 13, 12, 37  # odd on purpose
RTOL, ATOL = 1e-5, 1e-6


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def make_batch(seed=0, pairs=PAIRS, seq=SEQ, dim=DIM, vocab=VOCAB):
    """fp32 leaves ``hidden (2B, T, D)``, ``weight (V, D)``; HF labels with prompts of different
    lengths, unequal responses, padding and random ignored labels inside the responses.

    Position 0 is always prompt, so counts from TRL's unshifted completion mask equal ours."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    hidden = torch.randn(rows, seq, dim, generator=gen).requires_grad_(True)
    weight = (torch.randn(vocab, dim, generator=gen) * 0.6).requires_grad_(True)
    labels = torch.full((rows, seq), -100, dtype=torch.long)
    for r in range(rows):
        prompt = int(torch.randint(1, 5, (), generator=gen))
        length = int(torch.randint(2, seq - prompt + 1, (), generator=gen))
        labels[r, prompt : prompt + length] = torch.randint(0, vocab, (length,), generator=gen)
        holes = torch.rand(length, generator=gen) < 0.25
        holes[0] = False  # at least one scored token per row
        labels[r, prompt : prompt + length][holes] = -100
    return hidden, weight, labels


def reference_sums(seed, labels):
    """A different random 'reference model' and its summed log-probs (TRL's precomputed convention)."""
    ref_hidden, ref_weight, _ = make_batch(seed + 100)
    ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
    with torch.no_grad():
        sums = sk.fused_linear_sequence_logprobs(ref_hidden, ref_weight, labels, average=False)
    return ref_hidden, ref_weight, sums


def pre_shifted(hidden, labels):
    """Liger's inputs: the positions that score a label, and the labels they score (new leaves)."""
    return hidden.detach()[:, :-1].clone().requires_grad_(True), labels[:, 1:].contiguous()


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------


def grads(loss, *leaves):
    return torch.autograd.grad(loss, leaves)


def compare(tag, ours, theirs, leaves, exact=None):
    """Loss and gradients of both w.r.t. the same leaves; prints the max differences (``-s``).

    Within RTOL (1e-5) of the peer in fp32. Where fp32 rounding alone exceeds that (``exact``: the loss
    in float64 on float64 copies of ``leaves``; TRL upcasts its log-softmax to float32 only, so it is
    ours, checked against float64 references in tests/kernels), ours must be within 4x the peer's own
    fp32 distance from it: a dtype's tolerance is plain PyTorch's in that dtype (forward KL's
    exp(-log-ratio) of fp32 summed log-probs: about 1e-5 for both)."""
    g_ours, g_theirs = grads(ours, *leaves), grads(theirs, *leaves)
    diffs = [abs(ours.item() - theirs.item())] + [
        (a - b).abs().max().item() for a, b in zip(g_ours, g_theirs)
    ]
    print(f"PEER {tag}: loss {ours.item():.6f} vs {theirs.item():.6f}; max |diff| loss {diffs[0]:.2e} "
          f"grad_hidden {diffs[1]:.2e} grad_weight {diffs[2]:.2e}")  # fmt: skip
    try:
        torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=RTOL, atol=ATOL, msg=f"{tag}: loss")
        for name, a, b in zip(("hidden", "weight"), g_ours, g_theirs):
            scale = b.abs().max().item()
            torch.testing.assert_close(
                a, b, rtol=RTOL, atol=ATOL * max(scale, 1.0), msg=f"{tag}: grad {name}"
            )
    except AssertionError:
        if exact is None:
            raise
        leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
        truth = exact(*leaves64)
        g_truth = grads(truth, *leaves64)
        for name, a, b, t in zip(
            ("loss", "hidden", "weight"), (ours, *g_ours), (theirs, *g_theirs), (truth, *g_truth)
        ):
            err_ours, err_theirs = (a.double() - t).abs().max(), (b.double() - t).abs().max()
            assert err_ours <= 4 * err_theirs + 1e-12, (
                f"{tag}: {name} {float(err_ours)} vs TRL fp32 {float(err_theirs)}"
            )


def ours(hidden, weight, labels, loss, shift=True, **options):
    """The fused op, in chunks of whole pairs (~12 tokens each): pooled terms must survive chunking."""
    return sk.fused_linear_preference_loss(
        hidden, weight, labels, loss=loss, shift=shift, chunk_bytes=12 * VOCAB * 4, **options
    )


# ---------------------------------------------------------------------------------------------
# TRL stand-ins: the peers' trainer code, on models that return given hidden states
# ---------------------------------------------------------------------------------------------


class _Backbone(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.hidden = hidden

    def forward(self, *args, **kwargs):
        return types.SimpleNamespace(last_hidden_state=self.hidden)


class FusedHeadLM(nn.Module):
    """A causal LM whose backbone returns ``hidden``; TRL's ``add_fused_lm_head`` patches its forward."""

    def __init__(self, hidden, weight):
        super().__init__()
        self.config = PretrainedConfig()
        self.base_model = _Backbone(hidden)
        self.lm_head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        del self.lm_head.weight
        self.lm_head.weight = weight  # the leaf itself, so its gradient is compared

    def get_output_embeddings(self):
        return self.lm_head


class LogitsLM(nn.Module):
    """``model(input_ids, ...) -> .logits = hidden @ weight.T`` (what TRL's CPO/ORPO forward reads)."""

    def __init__(self, hidden, weight):
        super().__init__()
        self.hidden, self.weight = hidden, weight

    def forward(self, *args, **kwargs):
        return types.SimpleNamespace(logits=self.hidden @ self.weight.t())


def _accelerator():
    return types.SimpleNamespace(
        device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x
    )


def trl_dpo(hidden, weight, labels, ref_sums, loss_type, beta, *, label_smoothing=0.0, discopop_tau=0.05,
            f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):  # fmt: skip
    """TRL 1.16 ``DPOTrainer._compute_loss`` (precomputed reference log-probs, eval mode).

    ``loss_type``: one, or a list of ``(loss_type, weight)`` (TRL's ``loss_type`` and ``loss_weights``)."""
    pairs = [(loss_type, 1.0)] if isinstance(loss_type, str) else loss_type
    loss_types, loss_weights = [t for t, _ in pairs], [w for _, w in pairs]
    model = FusedHeadLM(hidden, weight)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    model.eval()
    trainer = types.SimpleNamespace(
        model=model, accelerator=_accelerator(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, loss_types=loss_types, loss_weights=loss_weights,
        beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        args=types.SimpleNamespace(discopop_tau=discopop_tau),
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)), _total_train_tokens=0,
    )  # fmt: skip
    half = labels.shape[0] // 2
    inputs = {
        "input_ids": labels.clamp(min=0),
        "attention_mask": torch.ones_like(labels),
        "completion_mask": (labels != -100).long(),
        "ref_chosen_logps": ref_sums[:half],
        "ref_rejected_logps": ref_sums[half:],
    }
    return trl.DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)


def _pair_batch(labels, attention_mask=None):
    half = labels.shape[0] // 2
    mask = torch.ones_like(labels) if attention_mask is None else attention_mask
    ids = labels.clamp(min=0)
    return {
        "chosen_input_ids": ids[:half], "chosen_attention_mask": mask[:half], "chosen_labels": labels[:half],
        "rejected_input_ids": ids[half:], "rejected_attention_mask": mask[half:],
        "rejected_labels": labels[half:],
        "prompt_input_ids": ids[:half], "prompt_attention_mask": mask[:half],
    }  # fmt: skip


def trl_cpo(hidden, weight, labels, *, loss_type="sigmoid", beta=0.1, cpo_alpha=1.0, simpo_gamma=0.5,
            label_smoothing=0.0):  # fmt: skip
    """TRL 1.16 ``CPOTrainer.get_batch_loss_metrics`` (decoder-only: TRL shifts the labels)."""
    trainer = types.SimpleNamespace(
        is_encoder_decoder=False, pad_token_id=0, accelerator=_accelerator(), aux_loss_enabled=False,
        cpo_alpha=cpo_alpha, loss_type=loss_type, alpha=0.0, beta=beta, label_smoothing=label_smoothing,
        simpo_gamma=simpo_gamma, concatenated_inputs=CPOTrainer.concatenated_inputs,
        get_batch_logps=CPOTrainer.get_batch_logps,
    )  # fmt: skip
    trainer.concatenated_forward = types.MethodType(CPOTrainer.concatenated_forward, trainer)
    trainer.cpo_loss = types.MethodType(CPOTrainer.cpo_loss, trainer)
    loss, _ = CPOTrainer.get_batch_loss_metrics(trainer, LogitsLM(hidden, weight), _pair_batch(labels))
    return loss


def trl_orpo(hidden, weight, labels, beta=0.1, *, pre_shifted):
    """TRL 1.16 ``ORPOTrainer.get_batch_loss_metrics``.

    ``pre_shifted``: its encoder-decoder path, where the logits score ``labels`` as they are and the
    NLL covers the response tokens only. Otherwise its decoder-only path, whose NLL covers every
    attended token (prompt included): with the prompt and the ignored labels out of the attention
    mask it is the response-only NLL.
    """
    trainer = types.SimpleNamespace(
        is_encoder_decoder=pre_shifted, padding_value=0, accelerator=_accelerator(), aux_loss_enabled=False,
        beta=beta, concatenated_inputs=ORPOTrainer.concatenated_inputs,
        get_batch_logps=ORPOTrainer.get_batch_logps, _shift_right=lambda labels: labels,
    )  # fmt: skip
    trainer.concatenated_forward = types.MethodType(ORPOTrainer.concatenated_forward, trainer)
    trainer.odds_ratio_loss = types.MethodType(ORPOTrainer.odds_ratio_loss, trainer)
    batch = _pair_batch(labels, attention_mask=None if pre_shifted else (labels != -100).long())
    loss, _ = ORPOTrainer.get_batch_loss_metrics(trainer, LogitsLM(hidden, weight), batch)
    return loss


# ---------------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("average", "loss_type"), [(False, "sigmoid"), (True, "sigmoid_norm")])
def test_dpo_vs_trl(average, loss_type):
    hidden, weight, labels = make_batch(1)
    _, _, ref = reference_sums(1, labels)
    mine = ours(hidden, weight, labels, "dpo", ref_logps=ref, beta=0.3, average=average)
    theirs = trl_dpo(hidden, weight, labels, ref, loss_type, beta=0.3)
    compare(f"dpo(average={average}) vs TRL {loss_type}", mine, theirs, (hidden, weight))


@pytest.mark.parametrize("average", [False, True])
def test_dpo_vs_liger(average):
    hidden, weight, labels = make_batch(2)
    ref_hidden, ref_weight, ref = reference_sums(2, labels)
    x, target = pre_shifted(hidden, labels)
    ref_x, _ = pre_shifted(ref_hidden, labels)
    mine = ours(x, weight, target, "dpo", shift=False, ref_logps=ref, average=average)
    module = liger.LigerFusedLinearDPOLoss(compiled=False, average_log_prob=average)
    theirs = module(weight, x, target, ref_input=ref_x, ref_weight=ref_weight)[0]
    compare(f"dpo(average={average}) vs Liger", mine, theirs, (x, weight))


# ---------------------------------------------------------------------------------------------
# IPO (TRL only: Liger 0.8.5 has none)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.1, 0.7])
def test_ipo_vs_trl_with_summed_reference(tau):
    hidden, weight, labels = make_batch(3)
    _, _, ref = reference_sums(3, labels)
    mine = ours(hidden, weight, labels, "ipo", ref_logps=ref, tau=tau)
    theirs = trl_dpo(hidden, weight, labels, ref, "ipo", beta=tau)
    compare(f"ipo(tau={tau}) vs TRL ipo", mine, theirs, (hidden, weight))


def test_ipo_is_not_in_liger():
    hidden, weight, labels = make_batch(3)
    ref_hidden, ref_weight, _ = reference_sums(3, labels)
    x, target = pre_shifted(hidden, labels)
    module = liger.LigerFusedLinearDPOLoss(compiled=False, loss_type="sigmoid")
    module.loss_type = "ipo"  # the constructor rejects it already; the loss function says why
    with pytest.raises(NotImplementedError, match="ipo"):
        module(weight, x, target, ref_input=pre_shifted(ref_hidden, labels)[0], ref_weight=ref_weight)


# ---------------------------------------------------------------------------------------------
# f-divergences (f-DPO) on dpo and ipo, and TRL's other DPO loss types
# ---------------------------------------------------------------------------------------------

F_DIVS = [
    {"f_divergence_type": "forward_kl"},
    {"f_divergence_type": "js_divergence"},
    {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
    {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.0},  # TRL's reverse-KL limit
]


@pytest.mark.parametrize("fdiv", F_DIVS, ids=lambda d: "-".join(map(str, d.values())))
def test_dpo_and_ipo_f_divergences_vs_trl(fdiv):
    hidden, weight, labels = make_batch(11)
    _, _, ref = reference_sums(11, labels)
    for average, loss_type in [(False, "sigmoid"), (True, "sigmoid_norm")]:
        mine = ours(hidden, weight, labels, "dpo", ref_logps=ref, beta=0.2, average=average, **fdiv)
        theirs = trl_dpo(hidden, weight, labels, ref, loss_type, beta=0.2, **fdiv)

        def exact(h, w, average=average):
            return ours(h, w, labels, "dpo", ref_logps=ref.double(), beta=0.2, average=average, **fdiv)

        compare(f"dpo(average={average}, {fdiv}) vs TRL {loss_type}", mine, theirs, (hidden, weight), exact)
    mine = ours(hidden, weight, labels, "ipo", ref_logps=ref, tau=0.4, **fdiv)
    compare(
        f"ipo({fdiv}) vs TRL",
        mine,
        trl_dpo(hidden, weight, labels, ref, "ipo", 0.4, **fdiv),
        (hidden, weight),
    )


# TRL's name and ours agree for these; options are TRL's arguments (beta, label_smoothing, discopop_tau, f_*).
TRL_DPO_CASES = [
    ("hinge", {}),
    ("hinge", {"beta": 0.5, "f_divergence_type": "forward_kl"}),
    ("hinge", {"beta": 0.02}),  # active (β d < 1) on the Liger batch too
    ("exo_pair", {}),
    ("exo_pair", {"beta": 0.3, "label_smoothing": 0.2, "f_divergence_type": "js_divergence"}),
    ("nca_pair", {}),
    ("nca_pair", {"beta": 0.5}),
    ("robust", {}),
    ("robust", {"beta": 0.3, "label_smoothing": 0.3}),
    (
        "robust",
        {"label_smoothing": 0.1, "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.7},
    ),
    ("bco_pair", {}),
    ("bco_pair", {"beta": 0.4}),
    ("sppo_hard", {}),
    ("sppo_hard", {"beta": 2.0}),
    ("apo_zero", {}),
    ("apo_zero", {"beta": 0.5}),
    ("apo_down", {}),
    ("apo_down", {"beta": 0.5}),
    ("discopop", {}),
    ("discopop", {"beta": 0.3, "discopop_tau": 0.2}),
    ("discopop", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.5}),
    ("sft", {}),
    # AOT sorts across the batch: the fused op runs it as one chunk (here past the buffer: two passes).
    ("aot", {}),
    ("aot", {"beta": 0.5, "label_smoothing": 0.2}),
    ("aot_unpaired", {}),
    ("aot_unpaired", {"beta": 0.05, "label_smoothing": 0.1}),
]


@pytest.mark.parametrize(("name", "options"), TRL_DPO_CASES, ids=lambda c: c if isinstance(c, str) else "")
def test_trl_dpo_loss_types_vs_trl(name, options):
    seed = 12 + list(sk.LOSSES).index(name)
    hidden, weight, labels = make_batch(seed)
    _, _, ref = reference_sums(seed, labels)
    definition = sk.LOSSES[name]
    mine = ours(
        hidden, weight, labels, name, **({"ref_logps": ref} if definition.needs_reference else {}), **options
    )
    settings = {k: v for k, v in definition.resolve(options).items() if k != "nll_reduction"}
    # TRL always computes (and here is given) reference log-probs, even for sft, which ignores them.
    theirs = trl_dpo(hidden, weight, labels, ref, name, **{"beta": 0.1, **settings})
    compare(f"{name}{options} vs TRL", mine, theirs, (hidden, weight))


# TRL's loss_type=[...] with loss_weights=[...] is loss="a+b+..." with `<name>_weight=` (TRL's sigmoid: dpo).
TRL_SUM_CASES = [
    ({"dpo": 0.8, "bco_pair": 0.2, "sft": 1.0}, {}),  # the MPO recipe of TRL's docs
    ({"hinge": 0.5, "sft": 0.3}, {"beta": 0.05, "f_divergence_type": "js_divergence"}),
    ({"robust": 1.0, "apo_zero": 2.0, "nca_pair": 0.25}, {"beta": 0.2, "label_smoothing": 0.1}),
    ({"exo_pair": 1.5, "discopop": 0.5, "dpo": 1.0}, {"label_smoothing": 0.05, "discopop_tau": 0.1}),
]


@pytest.mark.parametrize(("weights", "options"), TRL_SUM_CASES, ids=lambda c: "+".join(c) if c else "")
def test_weighted_sums_vs_trl_loss_weights(weights, options):
    hidden, weight, labels = make_batch(30 + len(weights))
    _, _, ref = reference_sums(30 + len(weights), labels)
    name = "+".join(weights)
    mine = ours(
        hidden,
        weight,
        labels,
        name,
        ref_logps=ref,
        **{f"{k}_weight": w for k, w in weights.items()},
        **options,
    )
    trl_names = [("sigmoid" if k == "dpo" else k, w) for k, w in weights.items()]
    settings = {"beta": 0.1, "label_smoothing": 0.0, **options}
    theirs = trl_dpo(hidden, weight, labels, ref, trl_names, **settings)
    compare(f"{name}{options} vs TRL loss_weights", mine, theirs, (hidden, weight))


# Liger 0.8.5 has every one but sft and the AOTs, and no f-divergences.
LIGER_CASES = [
    c for c in TRL_DPO_CASES if c[0] not in ("sft", "aot", "aot_unpaired") and "f_divergence_type" not in c[1]
]


@pytest.mark.parametrize(("name", "options"), LIGER_CASES, ids=lambda c: c if isinstance(c, str) else "")
def test_trl_dpo_loss_types_vs_liger(name, options):
    seed = 40 + list(sk.LOSSES).index(name)
    hidden, weight, labels = make_batch(seed)
    ref_hidden, ref_weight, ref = reference_sums(seed, labels)
    x, target = pre_shifted(hidden, labels)
    mine = ours(x, weight, target, name, shift=False, ref_logps=ref, **options)
    liger_args = {k: v for k, v in sk.LOSSES[name].resolve(options).items() if not k.startswith("f_")}
    module = liger.LigerFusedLinearDPOLoss(compiled=False, loss_type=name, **liger_args)
    theirs = module(weight, x, target, ref_input=pre_shifted(ref_hidden, labels)[0], ref_weight=ref_weight)[0]
    assert name != "hinge" or options or theirs.item() == 0.0  # β = 0.1: inactive; the β = 0.02 case is not
    compare(f"{name}{options} vs Liger", mine, theirs, (x, weight))
    assert name != "hinge" or not options or theirs.item() > 0.0


# ---------------------------------------------------------------------------------------------
# SimPO
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options", [{}, {"nll_weight": 1.0}, {"beta": 2.0, "gamma": 1.2, "label_smoothing": 0.1}]
)
def test_simpo_vs_trl_cpo_trainer(options):
    hidden, weight, labels = make_batch(4)
    mine = ours(hidden, weight, labels, "simpo", **options)
    theirs = trl_cpo(
        hidden, weight, labels, loss_type="simpo", beta=options.get("beta", 0.1),
        simpo_gamma=options.get("gamma", 0.5), cpo_alpha=options.get("nll_weight", 0.0),
        label_smoothing=options.get("label_smoothing", 0.0),
    )  # fmt: skip
    compare(f"simpo{options} vs TRL CPO simpo", mine, theirs, (hidden, weight))


def test_simpo_vs_liger():
    hidden, weight, labels = make_batch(5)
    x, target = pre_shifted(hidden, labels)
    # Defaults: the paper's SimPO is Liger's functional default (compute_nll_loss=False) ...
    mine = ours(x, weight, target, "simpo", shift=False)
    theirs = liger_fused_linear_simpo(x, weight, target, None, -100, 0.1, 1.0, 0.0, False, False, 0.5, 1)[0]
    compare("simpo vs Liger functional", mine, theirs, (x, weight))
    # ... and nll_weight=1 is the module's default (compute_nll_loss=True, alpha=1).
    mine = ours(x, weight, target, "simpo", shift=False, nll_weight=1.0, gamma=0.8, label_smoothing=0.05)
    module = liger.LigerFusedLinearSimPOLoss(compiled=False, gamma=0.8, label_smoothing=0.05)
    compare("simpo(nll_weight=1) vs Liger module", mine, module(weight, x, target)[0], (x, weight))


# ---------------------------------------------------------------------------------------------
# CPO
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"beta": 0.4, "label_smoothing": 0.2, "nll_weight": 0.5}])
def test_cpo_vs_trl(options):
    hidden, weight, labels = make_batch(6)
    mine = ours(hidden, weight, labels, "cpo", **options)
    theirs = trl_cpo(
        hidden, weight, labels, beta=options.get("beta", 0.1), cpo_alpha=options.get("nll_weight", 1.0),
        label_smoothing=options.get("label_smoothing", 0.0),
    )  # fmt: skip
    compare(f"cpo{options} vs TRL", mine, theirs, (hidden, weight))


@pytest.mark.parametrize("options", [{}, {"average": True, "label_smoothing": 0.1, "nll_weight": 2.0}])
def test_cpo_vs_liger(options):
    hidden, weight, labels = make_batch(7)
    x, target = pre_shifted(hidden, labels)
    mine = ours(x, weight, target, "cpo", shift=False, **options)
    module = liger.LigerFusedLinearCPOLoss(
        compiled=False, average_log_prob=options.get("average", False),
        label_smoothing=options.get("label_smoothing", 0.0), alpha=options.get("nll_weight", 1.0),
    )  # fmt: skip
    compare(f"cpo{options} vs Liger", mine, module(weight, x, target)[0], (x, weight))


# ---------------------------------------------------------------------------------------------
# ORPO
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.1, 0.6])
def test_orpo_vs_trl(lam):
    hidden, weight, labels = make_batch(8)
    x, target = pre_shifted(hidden, labels)
    mine = ours(x, weight, target, "orpo", shift=False, lam=lam)
    compare(
        f"orpo(lam={lam}) vs TRL (pre-shifted)",
        mine,
        trl_orpo(x, weight, target, lam, pre_shifted=True),
        (x, weight),
    )
    mine = ours(hidden, weight, labels, "orpo", lam=lam)
    theirs = trl_orpo(hidden, weight, labels, lam, pre_shifted=False)
    compare(f"orpo(lam={lam}) vs TRL (decoder-only)", mine, theirs, (hidden, weight))


def test_orpo_vs_liger():
    hidden, weight, labels = make_batch(9)
    x, target = pre_shifted(hidden, labels)
    mine = ours(x, weight, target, "orpo", shift=False, lam=0.25)
    module = liger.LigerFusedLinearORPOLoss(compiled=False, beta=0.25)
    compare("orpo vs Liger", mine, module(weight, x, target)[0], (x, weight))


# ---------------------------------------------------------------------------------------------
# The registry's peer columns are the installed peers' arguments and defaults
# ---------------------------------------------------------------------------------------------


def _peer_class(text):
    dotted = re.match(r"`([\w.]+)", text or "")
    if dotted is None:
        return None
    module, _, name = dotted.group(1).rpartition(".")
    return getattr(importlib.import_module(module), name)


def _defaults(cls):
    if dataclasses.is_dataclass(cls):
        return {f.name: f.default for f in dataclasses.fields(cls)}
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}


@pytest.mark.parametrize("name", [n for n in sk.LOSSES if n != "synpo"])
def test_documented_peer_defaults_are_the_installed_ones(name):
    definition = sk.LOSSES[name]
    for column in ("trl", "liger"):
        cls = _peer_class(getattr(definition, column))
        defaults = _defaults(cls) if cls is not None else {}
        for param in definition.params:
            peer = getattr(param, column)
            if isinstance(peer, sk.loss_registry.Peer):
                assert cls is not None, f"{name}.{param.name}: {column} argument without a {column} class"
                assert defaults.get(peer.name) == peer.default, (
                    name,
                    param.name,
                    column,
                    defaults.get(peer.name),
                )
