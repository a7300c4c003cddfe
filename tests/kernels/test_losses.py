"""The loss side of the fused ops (synpo_kernels.losses): every loss of the family against its
formula written out independently here (from its paper), the per-row coefficients ``(a, b)`` against
autograd through token-level log-probs, option validation, and pair selection."""

from __future__ import annotations

import pytest
import torch

from synpo_kernels import losses as L
from synpo_kernels import reference as R


def random_block(pairs, seed=0, max_len=9):
    """Token log-probs (2P, T) with per-row lengths, as a [chosen; rejected] block."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    logp = -torch.rand(rows, max_len, generator=gen, dtype=torch.float64) * 4 - 0.01
    lengths = torch.randint(1, max_len + 1, (rows,), generator=gen)
    mask = torch.arange(max_len)[None, :] < lengths[:, None]
    return logp, mask


def stats_of(logp, mask):
    return R.row_stats_from_token_logprobs(logp, mask)


def logsig(x):
    return -torch.log1p(torch.exp(-x))


def formula(loss, logp, mask, opts):
    """Per-pair losses written from the papers' definitions, on token log-probs, with the TRL/Liger
    conventions: ``ref_logps`` are per-row sums; the NLL term is by default the pooled mean over all
    chosen tokens of the batch (per pair: its share ``-s_w * P / N_w``)."""
    pairs = logp.shape[0] // 2
    n = mask.sum(1).double()
    s = torch.where(mask, logp, 0.0).sum(1)
    m = s / n
    mean_p = torch.where(mask, logp.exp(), 0.0).sum(1) / n
    w, lo = slice(0, pairs), slice(pairs, 2 * pairs)

    def nll():
        if opts.get("nll_reduction", "pooled") == "per_row":
            return -m[w]
        return -s[w] * pairs / n[w].sum()

    def smoothed(x, eps):
        return -(1 - eps) * logsig(x) - eps * logsig(-x)

    if loss == "synpo":
        a, b = opts.get("alpha", 30.0), opts.get("beta", 0.2)
        return -torch.sigmoid(a * (m[w].exp() - m[lo].exp())) - b * mean_p[w]
    if loss in ("dpo", "ipo"):
        ref = opts["ref_logps"]  # summed reference log-probs
        average = opts.get("average", loss == "ipo")
        norm = n if average else torch.ones_like(n)
        h = (s[w] - ref[w]) / norm[w] - (s[lo] - ref[lo]) / norm[lo]
        if loss == "dpo":
            return smoothed(opts.get("beta", 0.1) * h, opts.get("cdpo_smoothing", 0.0))
        return (h - 1 / (2 * opts.get("tau", 0.1))) ** 2
    if loss == "simpo":
        beta, gamma = opts.get("beta", 0.1), opts.get("gamma", 0.5)
        pref = smoothed(beta * (m[w] - m[lo]) - gamma, opts.get("label_smoothing", 0.0))
        return pref + opts.get("nll_weight", 0.0) * nll()
    if loss == "cpo":
        beta = opts.get("beta", 0.1)
        pi = m if opts.get("average", False) else s
        pref = smoothed(beta * (pi[w] - pi[lo]), opts.get("label_smoothing", 0.0))
        return pref + opts.get("nll_weight", 1.0) * nll()
    if loss == "orpo":
        lam = opts.get("lam", 0.1)
        odds = lambda x: torch.log(x.exp() / (1 - x.exp()))
        return nll() - lam * logsig(odds(m[w]) - odds(m[lo]))
    raise AssertionError(loss)


CASES = [
    ("synpo", {}),
    ("synpo", {"alpha": 7.0, "beta": 0.9}),
    ("dpo", {"ref": True}),
    ("dpo", {"ref": True, "beta": 0.5, "cdpo_smoothing": 0.1, "average": True}),
    ("ipo", {"ref": True}),
    ("ipo", {"ref": True, "tau": 0.3, "average": False}),
    ("simpo", {}),
    ("simpo", {"beta": 1.5, "gamma": 1.0, "label_smoothing": 0.1, "nll_weight": 0.5}),
    ("cpo", {}),
    ("cpo", {"beta": 0.4, "nll_weight": 0.5, "average": True, "label_smoothing": 0.2}),
    ("cpo", {"nll_reduction": "per_row"}),
    ("orpo", {}),
    ("orpo", {"lam": 0.7, "nll_reduction": "per_row"}),
]


def options(opts, rows, seed=3):
    opts = dict(opts)
    if opts.pop("ref", False):
        gen = torch.Generator().manual_seed(seed)
        opts["ref_logps"] = -torch.rand(rows, generator=gen, dtype=torch.float64) * 30  # sums
    return opts


@pytest.mark.parametrize(("loss", "raw"), CASES)
def test_pair_losses_match_paper_formulas(loss, raw):
    logp, mask = random_block(4, seed=len(raw))
    opts = options(raw, 8)
    spec, tensors = L.make_loss_spec(loss, **opts)
    got = L.pair_losses(stats_of(logp, mask), spec, tensors)
    torch.testing.assert_close(got, formula(loss, logp, mask, opts), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("loss", "raw"), CASES)
def test_coefficients_give_token_gradients(loss, raw):
    """a + b p_t equals d(mean pair loss)/d logp_t obtained by autograd through token log-probs."""
    logp, mask = random_block(3, seed=10 + len(raw))
    opts = options(raw, 6)
    spec, tensors = L.make_loss_spec(loss, **opts)
    st = stats_of(logp, mask)
    losses, a, b = L.loss_coefficients(st.sum_logp, st.sum_p, st.count, spec, tensors, scale=1 / 3)
    torch.testing.assert_close(losses, formula(loss, logp, mask, opts), rtol=1e-12, atol=1e-12)
    leaf = logp.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(formula(loss, leaf, mask, opts).mean(), leaf)
    got = torch.where(mask, a[:, None] + b[:, None] * logp.exp(), 0.0)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)


def test_synpo_coefficients_match_closed_form():
    logp, mask = random_block(5, seed=2)
    spec, tensors = L.make_loss_spec("synpo", alpha=30.0, beta=0.2)
    st = stats_of(logp, mask)
    _, a, b = L.loss_coefficients(st.sum_logp.float(), st.sum_p.float(), st.count, spec, tensors, scale=0.2)
    assert a.dtype == torch.float32  # returned in the stats' dtype
    expected = R.synpo_token_grad_ref(st, logp.exp(), mask)
    got = torch.where(mask, a.double()[:, None] + b.double()[:, None] * logp.exp(), 0.0)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)


def test_make_loss_spec_validation():
    spec, tensors = L.make_loss_spec("simpo", beta=3)
    assert spec.kwargs() == {
        "beta": 3.0,
        "gamma": 0.5,
        "label_smoothing": 0.0,
        "nll_weight": 0.0,
        "nll_reduction": "pooled",
    }
    assert tensors == {}
    assert hash(spec) == hash(L.make_loss_spec("simpo", beta=3.0)[0])
    with pytest.raises(ValueError, match="loss: unknown preference loss 'kto'"):
        L.make_loss_spec("kto")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['tau'\] for loss 'dpo'"):
        L.make_loss_spec("dpo", ref_logps=torch.zeros(2), tau=1.0)
    with pytest.raises(ValueError, match="ref_logps: loss 'ipo' needs ref_logps="):
        L.make_loss_spec("ipo")
    with pytest.raises(TypeError, match=r"ref_logps: expected a torch\.Tensor"):
        L.make_loss_spec("dpo", ref_logps=[0.0, 1.0])
    with pytest.raises(TypeError, match="average: expected a bool"):
        L.make_loss_spec("cpo", average=1)
    with pytest.raises(TypeError, match="beta: expected a number, got Tensor"):
        L.make_loss_spec("synpo", beta=torch.tensor(0.2))
    with pytest.raises(TypeError, match="alpha: expected a number, got str"):
        L.make_loss_spec("synpo", alpha="30")
    with pytest.raises(ValueError, match="beta: must be > 0, got -1"):
        L.make_loss_spec("simpo", beta=-1)
    with pytest.raises(ValueError, match=r"label_smoothing: must be in \[0, 0.5\), got 0.5"):
        L.make_loss_spec("cpo", label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"nll_reduction: must be one of \['pooled', 'per_row'\]"):
        L.make_loss_spec("orpo", nll_reduction="mean")
    with pytest.raises(TypeError, match=r"sigmoid DPO loss; conservative DPO .* is cdpo_smoothing="):
        L.make_loss_spec("dpo", ref_logps=torch.zeros(2), label_smoothing=0.1)
    with pytest.raises(ValueError, match="alpha: must be finite"):
        L.make_loss_spec("synpo", alpha=float("inf"))
    with pytest.raises(ValueError, match=r"ref_logps: expected shape \(4,\)"):
        L.check_tensor_options({"ref_logps": torch.zeros(5)}, 4, torch.device("cpu"))
    with pytest.raises(TypeError, match="ref_logps: expected a floating"):
        L.check_tensor_options({"ref_logps": torch.zeros(4, dtype=torch.long)}, 4, torch.device("cpu"))


def test_select_pairs_keeps_chosen_rejected_layout():
    ref = torch.arange(10.0)  # 5 pairs: chosen 0..4, rejected 5..9
    got = L.select_pairs({"ref_logps": ref}, 5, 1, 3)["ref_logps"]
    assert got.tolist() == [1.0, 2.0, 6.0, 7.0]
    assert L.select_pairs({"ref_logps": ref}, 5, 0, 5)["ref_logps"] is ref


def test_preference_stats_and_margins():
    logp, mask = random_block(3, seed=4)
    st = stats_of(logp, mask)
    spec, tensors = L.make_loss_spec("simpo", beta=2.0)
    losses = L.pair_losses(st, spec, tensors)
    ps = L.preference_stats(st, spec, tensors, losses)
    chosen, rejected = st.split_pairs()
    torch.testing.assert_close(ps.reward_margin, 2.0 * (chosen.mean_logp - rejected.mean_logp))
    assert ps.chosen_count.dtype == torch.long
    assert ps.chosen_count.tolist() == mask[:3].sum(1).tolist()
    d = ps.as_dict()
    assert d["pair_losses"] == pytest.approx(losses.mean().item())
