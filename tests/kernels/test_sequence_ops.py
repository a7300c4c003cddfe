"""Sequence-level ops (per-row log-probs, SynPO and the comparison losses) on full logits, and the
reference formulas themselves (hand-computed values, closed-form gradients)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import synpo_kernels as sk
from synpo_kernels import reference as ref
from synpo_kernels.reference import IGNORE_INDEX


def preference_batch(pairs=3, seq=13, vocab=71, dtype=torch.float32, min_response=1):
    """[chosen; rejected] logits/labels with a prompt prefix and varying response lengths."""
    rows = 2 * pairs
    logits = (torch.randn(rows, seq, vocab) * 2).to(dtype)
    labels = torch.randint(0, vocab, (rows, seq))
    for r in range(rows):
        prompt = int(torch.randint(1, seq - min_response, ()))
        labels[r, :prompt] = IGNORE_INDEX
        pad = int(torch.randint(0, max(1, seq - prompt - min_response), ()))
        if pad:
            labels[r, seq - pad :] = IGNORE_INDEX
    return logits, labels


def loss_options(name, rows):
    if sk.LOSSES[name].needs_reference:
        return {"ref_logps": torch.randn(rows, dtype=torch.float64) * 3 - 10}
    return {}


def test_synpo_hand_computed():
    # One pair, vocab 2. Chosen: two tokens each with p = 0.75; rejected: one token with p = 0.5.
    third = math.log(3.0)
    logits = torch.tensor(
        [[[0.0, third], [0.0, third], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]], dtype=torch.float64
    )
    labels = torch.tensor([[IGNORE_INDEX, 1, 1], [IGNORE_INDEX, 1, IGNORE_INDEX]])
    expected = -1.0 / (1.0 + math.exp(-30.0 * (0.75 - 0.5))) - 0.2 * 0.75
    assert ref.synpo_loss_ref(logits, labels).item() == pytest.approx(expected, rel=1e-12)
    assert sk.synpo_loss(logits.float(), labels).item() == pytest.approx(expected, rel=1e-6)


def test_synpo_loss_is_bounded():
    logits, labels = preference_batch(pairs=8, vocab=13)
    for scale in (0.01, 1.0, 30.0):
        value = sk.synpo_loss(logits * scale, labels, beta=0.2).item()
        assert -1.2 <= value <= 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [71, 70001])
def test_synpo_loss_and_grad_match_reference(dtype, vocab):
    logits, labels = preference_batch(pairs=2, seq=9, vocab=vocab, dtype=dtype)
    x = logits.clone().requires_grad_(True)
    loss = sk.synpo_loss(x, labels, alpha=30.0, beta=0.2)
    x64 = logits.double().requires_grad_(True)
    loss_ref = ref.synpo_loss_ref(x64, labels)
    # Plain PyTorch in the logits' dtype, for the tolerance.
    xb = logits.clone().requires_grad_(True)
    logp_b = xb.log_softmax(-1)
    aligned = ref.shift_labels(labels)
    mask = aligned != IGNORE_INDEX
    tok = logp_b.gather(-1, torch.where(mask, aligned, 0)[..., None]).squeeze(-1).float()
    stats_b = ref.RowStats((tok * mask).sum(-1), (tok.exp() * mask).sum(-1), mask.sum(-1).float())
    loss_b = ref.synpo_loss_from_stats(stats_b).mean()
    assert loss.dtype == torch.float32
    err, base = abs(loss.item() - loss_ref.item()), abs(loss_b.item() - loss_ref.item())
    assert err <= 2 * base + 1e-6
    (g,) = torch.autograd.grad(loss, x)
    (g_ref,) = torch.autograd.grad(loss_ref, x64)
    (g_b,) = torch.autograd.grad(loss_b, xb)
    gerr = (g.double() - g_ref).abs().max().item()
    gbase = (g_b.double() - g_ref).abs().max().item()
    assert gerr <= 2 * gbase + 1e-7


def test_closed_form_token_gradient():
    """SPEC section 1: dL/dlogp_t = (1/B)[-alpha s(1-s) G_w/n_w - beta p_t/n_w] (chosen) and
    (1/B) alpha s(1-s) G_l/n_l (rejected); autograd through the op must agree."""
    logits, labels = preference_batch(pairs=3, seq=11, vocab=37)
    logits = logits.double()
    token_logp = sk.token_logprobs(logits, labels).detach().requires_grad_(True)
    mask = ref.response_mask(labels)
    stats = ref.row_stats_from_token_logprobs(token_logp, mask)
    loss = ref.synpo_loss_from_stats(stats, alpha=30.0, beta=0.2).mean()
    (autograd_grad,) = torch.autograd.grad(loss, token_logp)
    closed = ref.synpo_token_grad_ref(
        ref.row_stats_from_token_logprobs(token_logp.detach(), mask), token_logp.detach().exp(), mask
    )
    torch.testing.assert_close(autograd_grad, closed, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(ref.PREFERENCE_LOSSES))
def test_every_preference_loss_matches_reference(name):
    logits, labels = preference_batch(pairs=3, vocab=53)
    opts = loss_options(name, 6)
    x = logits.clone().requires_grad_(True)
    loss = sk.preference_loss(x, labels, loss=name, **opts)
    x64 = logits.double().requires_grad_(True)
    loss_ref = ref.preference_loss_ref(x64, labels, loss=name, **opts)
    torch.testing.assert_close(loss.double(), loss_ref, rtol=2e-5, atol=2e-5)
    (g,) = torch.autograd.grad(loss, x)
    (g_ref,) = torch.autograd.grad(loss_ref, x64)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-6)


def test_loss_formulas_against_their_papers():
    """Each loss of the family against its own formula, written out independently of the
    stats helpers: sums/means computed directly from token log-probs."""
    logits, labels = preference_batch(pairs=4, vocab=29)
    logits = logits.double()
    tok = ref.token_logprobs_ref(logits, labels)
    mask = ref.response_mask(labels)
    s = (tok * mask).sum(-1)
    n = mask.sum(-1).double()
    m = s / n
    w, lo = slice(0, 4), slice(4, 8)
    ref_logps = torch.randn(8, dtype=torch.float64) - 20  # summed reference log-probs (TRL's convention)
    r_w, r_l = ref_logps[w], ref_logps[lo]
    h_sum = (s[w] - r_w) - (s[lo] - r_l)
    h_mean = (s[w] - r_w) / n[w] - (s[lo] - r_l) / n[lo]  # IPO normalizes each row's log-ratio itself
    pooled_nll = -s[w].sum() / n[w].sum()  # CPO/ORPO: mean over all chosen tokens of the batch
    expected = {
        "dpo": -F.logsigmoid(0.1 * h_sum).mean(),
        "ipo": ((h_mean - 1 / (2 * 0.1)) ** 2).mean(),
        "simpo": -F.logsigmoid(0.1 * (m[w] - m[lo]) - 0.5).mean(),
        "cpo": -F.logsigmoid(0.1 * (s[w] - s[lo])).mean() + pooled_nll,
        "orpo": pooled_nll
        - 0.1
        * F.logsigmoid(
            (m[w] - torch.log1p(-torch.exp(m[w]))) - (m[lo] - torch.log1p(-torch.exp(m[lo])))
        ).mean(),
    }
    for name, value in expected.items():
        opts = {"ref_logps": ref_logps} if name in ("dpo", "ipo") else {}
        got = sk.preference_loss(logits, labels, loss=name, **opts)
        torch.testing.assert_close(got, value, rtol=1e-10, atol=1e-12, msg=name)


def test_sequence_logprobs_mean_and_sum():
    logits, labels = preference_batch(pairs=2, vocab=41)
    logits = logits.reshape(2, 2, *logits.shape[1:])  # leading batch dims are kept
    labels = labels.reshape(2, 2, -1)
    mean = sk.sequence_logprobs(logits, labels)
    total = sk.sequence_logprobs(logits, labels, average=False)
    assert mean.shape == (2, 2)
    torch.testing.assert_close(mean.double(), ref.sequence_logprobs_ref(logits, labels), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        total.double(), ref.sequence_logprobs_ref(logits, labels, average=False), rtol=1e-5, atol=1e-4
    )


def test_modules():
    logits, labels = preference_batch(pairs=2, vocab=31)
    torch.testing.assert_close(
        sk.SynPOLoss(alpha=10.0, beta=0.5)(logits, labels),
        sk.synpo_loss(logits, labels, alpha=10.0, beta=0.5),
    )
    opts = loss_options("dpo", 4)
    torch.testing.assert_close(
        sk.PreferenceLoss("dpo", beta=0.3)(logits, labels, **opts),
        sk.preference_loss(logits, labels, loss="dpo", beta=0.3, **opts),
    )


class TestBadInput:
    def test_odd_rows(self):
        logits, labels = preference_batch(pairs=2, vocab=11)
        with pytest.raises(ValueError, match="even, non-zero number of rows"):
            sk.synpo_loss(logits[:3], labels[:3])

    def test_row_without_response(self):
        logits, labels = preference_batch(pairs=2, vocab=11)
        labels[3, 1:] = IGNORE_INDEX  # position 0 is never scored when shifting
        with pytest.raises(ValueError, match=r"row\(s\) \[3\] have no response tokens"):
            sk.synpo_loss(logits, labels)
        with pytest.raises(ValueError, match="no response tokens"):
            sk.sequence_logprobs(logits, labels)
        # Summed log-probs are defined (0) for an empty row.
        assert sk.sequence_logprobs(logits, labels, average=False)[3].item() == 0.0

    def test_unknown_loss(self):
        logits, labels = preference_batch(pairs=1, vocab=11)
        with pytest.raises(ValueError, match="loss: unknown preference loss 'kto'"):
            sk.preference_loss(logits, labels, loss="kto")

    def test_wrong_rank(self):
        with pytest.raises(ValueError, match="logits: expected"):
            sk.synpo_loss(torch.randn(4, 10), torch.zeros(4, dtype=torch.long))

    def test_labels_out_of_range(self):
        logits, labels = preference_batch(pairs=1, vocab=11)
        labels[0, -1] = 11
        with pytest.raises(ValueError, match="labels: value 11"):
            sk.synpo_loss(logits, labels)
