"""The loss registry: one entry per loss, everything else derived from it. A toy loss registered here
works through every entry point (sequence op, fused op, trainer config) without any other code, and
docs/losses.md holds the tables generated from the registry."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import synpo_kernels as sk
from synpo_kernels import loss_registry as LR
from synpo_kernels import reference as R

DOCS = Path(__file__).resolve().parents[1] / "docs" / "losses.md"


def toy_loss() -> LR.LossDef:
    """A squared-hinge-like loss with a new option name and the pooled NLL (a batch constant)."""
    return LR.LossDef(
        name="toy",
        formula=lambda w, lo, o, ctx: (
            (o.delta - o.scale * (w.mean_logp - lo.mean_logp)) ** 2
            - o.nll * w.sum_logp * ctx.num_pairs / ctx.chosen_tokens
        ),
        margin=lambda w, lo, o, ctx: o.scale * (w.mean_logp - lo.mean_logp),
        params=(
            LR.Param("delta", 1.0, "target margin"),
            LR.Param("scale", 0.5, "scale", low=0.0, low_open=True),
            LR.Param("nll", 0.3, "NLL weight", low=0.0),
        ),
        needs_reference=False,
        summary="(δ − c (m_w − m_l))² + ν NLL",
        margin_doc="c (m_w − m_l)",
        description="a toy loss for the registry test",
    )


def toy_by_hand(hidden, weight, labels, delta=1.0, scale=0.5, nll=0.3):
    logits = R.linear_logits_ref(hidden, weight)
    tok = R.token_logprobs_ref(logits, labels)
    mask = R.response_mask(labels)
    s, n = (tok * mask).sum(-1), mask.sum(-1).double()
    m, half = s / n, labels.shape[0] // 2
    pref = ((delta - scale * (m[:half] - m[half:])) ** 2).mean()
    return pref + nll * (-s[:half].sum() / n[:half].sum())


def batch(pairs=3, seq=11, dim=8, vocab=23, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    hidden = torch.randn(rows, seq, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, dim, generator=gen, dtype=torch.float64).requires_grad_(True)
    labels = torch.randint(0, vocab, (rows, seq), generator=gen)
    for r in range(rows):
        labels[r, : 1 + r % 4] = -100
        labels[r, seq - r % 3 :] = -100
    return hidden, weight, labels


def test_a_registered_loss_works_everywhere_without_other_code():
    from synpo.config import ConfigError, config_from_dict, config_to_dict, load_config

    hidden, weight, labels = batch()
    with sk.registered_loss(toy_loss()):
        assert "toy" in sk.LOSSES and "toy" in sk.PREFERENCE_LOSSES and "toy" in LR.loss_tables()
        expected = toy_by_hand(hidden, weight, labels, delta=2.0)
        eh, ew = torch.autograd.grad(expected, (hidden, weight))
        # Sequence op on full logits.
        logits = R.linear_logits_ref(hidden, weight)
        seq = sk.preference_loss(logits, labels, loss="toy", delta=2.0)
        torch.testing.assert_close(seq, expected, rtol=1e-10, atol=1e-12)
        # Fused op, in several chunks of whole pairs: the pooled NLL is a batch constant.
        for chunk_bytes in (None, 12 * 23 * 8):
            fused, stats = sk.fused_linear_preference_loss(
                hidden, weight, labels, loss="toy", delta=2.0, return_stats=True, chunk_bytes=chunk_bytes
            )
            gh, gw = torch.autograd.grad(fused, (hidden, weight))
            torch.testing.assert_close(fused, expected, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(gh, eh, rtol=1e-8, atol=1e-11)
            torch.testing.assert_close(gw, ew, rtol=1e-8, atol=1e-11)
            torch.testing.assert_close(stats.reward_margin, 0.5 * (stats.chosen_logps - stats.rejected_logps))
        with pytest.raises(TypeError, match="delta: expected a number, got str"):
            sk.fused_linear_preference_loss(hidden, weight, labels, loss="toy", delta="2")
        with pytest.raises(ValueError, match="scale: must be > 0, got 0"):
            sk.preference_loss(logits, labels, loss="toy", scale=0)
        # Trainer config: the loss, its options (flat under `loss:`), their checks.
        cfg = config_from_dict({"loss": {"name": "toy", "delta": 2}})
        assert cfg.loss.options() == {"delta": 2.0} and not cfg.loss.needs_reference
        assert config_from_dict(config_to_dict(cfg)) == cfg
        assert load_config(None, ["--loss.name", "toy", "--loss.scale", "3"]).loss.options() == {"scale": 3.0}
        with pytest.raises(ConfigError, match=r"loss\.scale: must be > 0"):
            config_from_dict({"loss": {"name": "toy", "scale": -1.0}})
        with pytest.raises(ConfigError, match=r"loss\.alpha: does not apply to loss 'toy'"):
            config_from_dict({"loss": {"name": "toy", "alpha": 1.0}})
    assert "toy" not in sk.LOSSES and "toy" not in sk.PREFERENCE_LOSSES
    with pytest.raises(ConfigError, match=r"loss\.name: unknown preference loss 'toy'"):
        config_from_dict({"loss": {"name": "toy"}})
    with pytest.raises(ValueError, match="loss: unknown preference loss 'toy'"):
        sk.preference_loss(logits, labels, loss="toy")


def test_registration_errors():
    with pytest.raises(ValueError, match="already registered"):
        sk.register_loss(LR.get_loss("dpo"))
    bad = toy_loss()
    with pytest.raises(ValueError, match="reserved option names"):
        sk.register_loss(
            LR.LossDef(**{**bad.__dict__, "params": (*bad.params, LR.Param("ref_logps", 0.0, "x"))})
        )
    with pytest.raises(ValueError, match="name: expected a lower-case identifier"):
        sk.register_loss(LR.LossDef(**{**bad.__dict__, "name": "Toy Loss"}))
    with pytest.raises(ValueError, match=r"unknown preference loss 'orpoo'.*did you mean 'orpo'"):
        LR.get_loss("orpoo")


def test_param_checks_name_the_argument():
    beta = LR.get_loss("dpo").param("beta")
    assert beta.check(1) == 1.0 and isinstance(beta.check(1), float)
    for value, error, message in [
        ("0.1", TypeError, "beta: expected a number, got str"),
        (True, TypeError, "beta: expected a number, got bool"),
        (torch.tensor(0.1), TypeError, "beta: expected a number, got Tensor"),
        (math.nan, ValueError, "beta: must be finite"),
        (0.0, ValueError, "beta: must be > 0, got 0"),
    ]:
        with pytest.raises(error, match=message):
            beta.check(value)
    with pytest.raises(TypeError, match="average: expected a bool, got int"):
        LR.get_loss("cpo").param("average").check(1)


def test_reference_functions_are_derived_from_the_registry():
    assert list(sk.PREFERENCE_LOSSES) == list(sk.LOSSES)
    gen = torch.Generator().manual_seed(0)
    stats = R.RowStats(
        -torch.rand(4, generator=gen, dtype=torch.float64) * 9 - 1,
        torch.rand(4),
        torch.tensor([3.0, 5, 2, 4]),
    )
    for name, definition in sk.LOSSES.items():
        opts = (
            {"ref_logps": -torch.rand(4, generator=gen, dtype=torch.float64) * 9}
            if definition.needs_reference
            else {}
        )
        named = getattr(R, f"{name}_loss_from_stats")
        torch.testing.assert_close(named(stats, **opts), R.PREFERENCE_LOSSES[name](stats, **opts))


def test_per_row_rewards_differ_by_the_margin():
    """``LossDef.reward`` (TRL's rewards/chosen|rejected): chosen minus rejected is the loss's margin, with
    every boolean option both ways; float64 rows of unequal lengths, random reference sums."""
    gen = torch.Generator().manual_seed(3)
    rows, half = 14, 7
    n = torch.randint(1, 12, (rows,), generator=gen).double()
    s = -(torch.rand(rows, generator=gen, dtype=torch.float64) * 3 + 0.02) * n
    stats = R.RowStats(s, torch.rand(rows, generator=gen, dtype=torch.float64) * n, n)
    ref = s + torch.randn(rows, generator=gen, dtype=torch.float64)
    checked = 0
    for definition in sk.LOSSES.values():
        flags = [p.name for p in definition.params if p.type is bool]
        for flip in [None, *flags]:
            options = definition.resolve({flip: not definition.param(flip).default} if flip else {})
            r = ref if definition.needs_reference else None
            rewards = definition.rewards(stats, options, r)
            assert rewards.shape == (rows,) and rewards.dtype == torch.float64
            margin = definition.reward_margin(stats, options, r)
            torch.testing.assert_close(rewards[:half] - rewards[half:], margin, rtol=1e-12, atol=1e-12)
            checked += 1
    assert checked >= len(sk.LOSSES) + 3  # dpo, ipo and cpo have an `average` flag
    with pytest.raises(ValueError, match="ref_logps: loss 'dpo' needs"):
        sk.LOSSES["dpo"].rewards(stats, sk.LOSSES["dpo"].resolve({}))
    assert toy_loss().rewards(stats, toy_loss().resolve({})) is None  # a loss may define none


def test_docs_tables_are_generated_from_the_registry():
    text = DOCS.read_text()
    assert LR.render_docs(text) == text, (
        "docs/losses.md is stale: python -m synpo_kernels.loss_registry docs/losses.md"
    )
    for name in sk.LOSSES:
        assert f"| `{name}` |" in text


def test_cli_help_lists_the_registry(capsys):
    from synpo.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for name, definition in sk.LOSSES.items():
        assert f"  {name}" in out and all(f"{p.name}=" in out for p in definition.params)


def test_bad_combinations_of_trl_dpo_options_name_the_argument():
    """TRL's DPO loss types: an option the loss would ignore, or a value TRL rejects, is an error."""
    from synpo.config import ConfigError, config_from_dict

    hidden, weight, labels = batch()
    ref = torch.randn(labels.shape[0], dtype=torch.float64) - 8
    fused = sk.fused_linear_preference_loss
    with pytest.raises(
        TypeError, match=r"\['f_divergence_type'\] for loss 'nca_pair'.*applies f_divergence_type"
    ):
        fused(hidden, weight, labels, loss="nca_pair", ref_logps=ref, f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="f_alpha_divergence_coef: only used with f_divergence_type='alpha_"):
        fused(hidden, weight, labels, loss="hinge", ref_logps=ref, f_alpha_divergence_coef=0.3)
    with pytest.raises(ValueError, match="f_divergence_type: must be one of"):
        fused(hidden, weight, labels, loss="dpo", ref_logps=ref, f_divergence_type="kl")
    with pytest.raises(TypeError, match="ref_logps: loss 'sft' takes no reference log-probs"):
        fused(hidden, weight, labels, loss="sft", ref_logps=ref)
    with pytest.raises(ValueError, match="ref_logps: loss 'bco_pair' needs ref_logps="):
        fused(hidden, weight, labels, loss="bco_pair")
    with pytest.raises(TypeError, match=r"\['label_smoothing'\] for loss 'hinge'.*ignore label_smoothing"):
        fused(hidden, weight, labels, loss="hinge", ref_logps=ref, label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"label_smoothing: must be in \(0, 1\), got 0"):
        fused(hidden, weight, labels, loss="exo_pair", ref_logps=ref, label_smoothing=0.0)
    with pytest.raises(ValueError, match=r"label_smoothing: must be in \[0, 0.5\), got 0.5"):
        fused(hidden, weight, labels, loss="robust", ref_logps=ref, label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta: must be > 0, got 0"):
        fused(hidden, weight, labels, loss="sppo_hard", ref_logps=ref, beta=0.0)
    with pytest.raises(ValueError, match="discopop_tau: must be > 0"):
        fused(hidden, weight, labels, loss="discopop", ref_logps=ref, discopop_tau=-1.0)
    # The same through the trainer config.
    with pytest.raises(ConfigError, match=r"loss\.f_divergence_type: does not apply to loss 'apo_zero'"):
        config_from_dict({"loss": {"name": "apo_zero", "f_divergence_type": "forward_kl"}})
    with pytest.raises(ConfigError, match=r"loss\.f_alpha_divergence_coef: only used with"):
        config_from_dict({"loss": {"name": "robust", "f_alpha_divergence_coef": 2.0}})
    with pytest.raises(ConfigError, match=r"loss\.reference: set, but loss 'sft' is reference-free"):
        config_from_dict({"loss": {"name": "sft", "reference": {"precompute": True}}})
    cfg = config_from_dict({"loss": {"name": "exo_pair", "f_divergence_type": "alpha_divergence",
                                     "f_alpha_divergence_coef": 2.0}})  # fmt: skip
    assert cfg.loss.needs_reference and cfg.loss.options()["f_alpha_divergence_coef"] == 2.0


def test_f_divergence_scores_against_closed_forms():
    """``f_score`` is ``f'(e^u)`` of each divergence (float64, against the textbook ``f'`` at ``t = e^u``)."""
    u = torch.linspace(-6, 3, 37, dtype=torch.float64)
    t = u.exp()
    o = LR.Options
    expected = {
        "reverse_kl": torch.log(t),
        "forward_kl": 1 - 1 / t,
        "js_divergence": torch.log(2 * t / (t + 1)),
    }
    for kind, want in expected.items():
        got = LR.f_score(u, o({"f_divergence_type": kind, "f_alpha_divergence_coef": 0.5}))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a in (0.3, 1.7):
        got = LR.f_score(u, o({"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": a}))
        torch.testing.assert_close(got, (t ** (a - 1) - 1) / (a - 1), rtol=1e-12, atol=1e-12)
    one = LR.f_score(u, o({"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.0}))
    torch.testing.assert_close(one, u, rtol=0, atol=0)


def test_weighted_sum_of_losses_is_one_loss():
    """``loss="dpo+bco_pair+sft"`` (TRL's loss_type list with loss_weights): through the fused op in
    chunks, equal to the weighted sum of each loss's own fused value and gradients (float64); its
    margin is that of its first loss with a reference; the trainer config takes it and its weights."""
    from synpo.config import ConfigError, config_from_dict, load_config

    hidden, weight, labels = batch(pairs=4, seed=5)
    ref = torch.randn(labels.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64) - 9
    fused = sk.fused_linear_preference_loss
    weights = {"dpo": 0.8, "bco_pair": 0.2, "sft": 1.3}

    def alone(name):
        return fused(
            hidden, weight, labels, loss=name, **({} if name == "sft" else {"ref_logps": ref, "beta": 0.3})
        )

    expected = sum(w * alone(n) for n, w in weights.items())
    eh, ew = torch.autograd.grad(expected, (hidden, weight))
    options = {f"{n}_weight": w for n, w in weights.items()}
    value, stats = fused(
        hidden, weight, labels, loss="dpo+bco_pair+sft", ref_logps=ref, beta=0.3, return_stats=True,
        chunk_bytes=12 * 23 * 8, **options,
    )  # fmt: skip
    gh, gw = torch.autograd.grad(value, (hidden, weight))
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh, eh, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gw, ew, rtol=1e-9, atol=1e-12)
    _, dpo_stats = fused(hidden, weight, labels, loss="dpo", ref_logps=ref, beta=0.3, return_stats=True)
    torch.testing.assert_close(stats.reward_margin, dpo_stats.reward_margin)
    summed = LR.get_loss("dpo+bco_pair+sft")
    assert summed.needs_reference and summed.param_names[:3] == (
        "dpo_weight",
        "bco_pair_weight",
        "sft_weight",
    )
    assert not LR.get_loss("sft+simpo").needs_reference and "dpo+sft" not in sk.LOSSES
    # Errors name the argument.
    for name, message in [
        ("dpo+ipo", r"loss: 'dpo\+ipo': option 'average' of 'dpo' \(False.*and of 'ipo' \(True"),
        ("robust+exo_pair", "option 'label_smoothing' of 'robust'"),
        ("dpo+dpo", "each loss may appear once"),
        ("dpo+", "an empty loss name"),
        ("dpo+kto", "unknown preference loss 'kto'"),
    ]:
        with pytest.raises(ValueError, match=message):
            fused(hidden, weight, labels, loss=name, ref_logps=ref)
    with pytest.raises(ValueError, match=r"f_divergence_type: 'forward_kl' does not apply to \['bco_pair'\]"):
        fused(hidden, weight, labels, loss="dpo+bco_pair+sft", ref_logps=ref, f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="sft_weight: must be >= 0"):
        fused(hidden, weight, labels, loss="dpo+sft", ref_logps=ref, sft_weight=-1.0)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['bco_pair_weight'\] for loss 'dpo\+sft'"):
        fused(hidden, weight, labels, loss="dpo+sft", ref_logps=ref, bco_pair_weight=1.0)
    # Trainer config: the sum, its weights flat under `loss:`, and the same checks.
    cfg = load_config(None, ["--loss.name", "hinge+sft", "--loss.sft_weight", "0.5"])
    assert cfg.loss.options() == {"sft_weight": 0.5} and cfg.loss.needs_reference
    with pytest.raises(ConfigError, match=r"loss\.name: 'dpo\+ipo': option 'average'"):
        config_from_dict({"loss": {"name": "dpo+ipo"}})
    with pytest.raises(ConfigError, match=r"loss\.dpo_weight: does not apply to loss 'sft\+simpo'"):
        config_from_dict({"loss": {"name": "sft+simpo", "dpo_weight": 1.0}})
    with pytest.raises(ConfigError, match=r"loss\.f_divergence_type: 'js_divergence' does not apply"):
        config_from_dict({"loss": {"name": "nca_pair+dpo", "f_divergence_type": "js_divergence"}})
