"""Prefix sharing (synpo.prefix_sharing + the collator's shared layout): each pair's prompt computed once
gives the same hidden states, losses and gradients as the two unshared rows, for every loss of the
registry, padded or packed, with prompts of different lengths, gradient checkpointing, LoRA, the DPO
references, and the tiny VLM (whose vision tower then runs once per pair)."""

from __future__ import annotations

import copy

import pytest
import torch

from synpo.data import EncodedPair, PreferenceCollator
from synpo.data.batching import SharedPair, shared_prefix_batch
from synpo.objective import PreferenceObjective, backbone_hidden_states, model_inputs
from synpo.prefix_sharing import (
    SEGMENTS_KEY,
    PrefixSharingUnsupported,
    enable_prefix_sharing,
    is_prefix_sharing_enabled,
    prefix_sharing_problem,
    shared_prefix_attention,
)
from synpo.tiny import build_random_causal_lm
from synpo_kernels.loss_registry import LOSSES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 301


def random_pairs(n: int, *, vocab: int = VOCAB, seed: int = 0, longest_prompt: int = 12) -> list[EncodedPair]:
    """Pairs with prompts, chosen and rejected of different lengths (each >= 1 token)."""
    g = torch.Generator().manual_seed(seed)

    def ids(low, high):
        length = int(torch.randint(low, high + 1, (1,), generator=g))
        return torch.randint(3, vocab, (length,), generator=g).tolist()

    return [
        EncodedPair(index=i, prompt_ids=ids(1, longest_prompt), chosen_ids=ids(1, 9), rejected_ids=ids(1, 9))
        for i in range(n)
    ]


class Float64RMSNorm(torch.nn.Module):
    """RMSNorm in the input's dtype: transformers' Llama/Qwen2 norm computes in float32 whatever the
    model's dtype, which would make a float64 model's gradients only float32-exact."""

    def __init__(self, norm):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.variance_epsilon

    def forward(self, hidden):
        return self.weight * hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)


def exact_norms(model):
    """``model`` with its RMSNorms replaced by :class:`Float64RMSNorm` (same weights)."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child).__name__.endswith("RMSNorm"):
                setattr(module, name, Float64RMSNorm(child))
    return model


def tiny_lm(dtype=torch.float64, **kwargs):
    kwargs.setdefault("vocab_size", VOCAB)
    model = build_random_causal_lm(dtype=dtype, hidden_size=32, layers=2, heads=4, **kwargs)
    return exact_norms(model) if dtype == torch.float64 else model


def window_states(model, batch) -> torch.Tensor:
    """The final hidden states at each row's response window ``(2B, L, D)``."""
    hidden = backbone_hidden_states(model, model_inputs(batch))
    flat = hidden.reshape(-1, hidden.shape[-1])
    return flat[batch["response_index"].reshape(-1)].reshape(*batch["response_index"].shape, -1)


def scored(batch) -> torch.Tensor:
    """Where the windows hold a scored position (its next label is learned)."""
    labels = batch["response_labels"]
    return torch.cat([labels[:, 1:] != -100, torch.zeros_like(labels[:, :1], dtype=torch.bool)], dim=1)


# -- the attention ------------------------------------------------------------------------------------


def reference_attention(query, key, value, segments):
    """Each segment as its two causal rows [prompt, chosen] and [prompt, rejected], in float64."""
    batch, heads, seq_len, dim = query.shape
    rep = heads // key.shape[1]
    key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    out = torch.zeros(batch, seq_len, heads, dim, dtype=torch.float64)

    def causal(q, k, v):
        scores = (q @ k.transpose(-1, -2)) / dim**0.5
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril(k.shape[-2] - q.shape[-2])
        return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v

    for row, start, p, c, r in segments.tolist():
        sl = lambda t, idx, row=row: t[row, :, idx].double()
        first = list(range(start, start + p + c))
        out[row, start : start + p + c] = causal(
            sl(query, first), sl(key, first), sl(value, first)
        ).transpose(0, 1)
        if r:
            rej = list(range(start, start + p)) + list(range(start + p + c, start + p + c + r))
            o = causal(sl(query, rej[p:]), sl(key, rej), sl(value, rej))
            out[row, start + p + c : start + p + c + r] = o.transpose(0, 1)
    return out


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("packed", [False, True])
def test_segment_attention_matches_two_causal_rows_in_float64(kv_heads, packed):
    # Prompts of different lengths, an empty prompt (an unshared pair), an empty rejected tail.
    layout = [(5, 3, 4), (1, 6, 2), (0, 4, 3), (7, 2, 0)]
    if packed:
        starts, total = [], 0
        for p, c, r in layout:
            starts.append((0, total))
            total += p + c + r
        batch, seq_len = 1, total + 3  # three padding positions at the end
    else:
        starts = [(i, 0) for i in range(len(layout))]
        batch, seq_len = len(layout), max(p + c + r for p, c, r in layout) + 2
    segments = torch.tensor([[row, start, *lens] for (row, start), lens in zip(starts, layout)])
    q = torch.randn(batch, 4, seq_len, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(batch, kv_heads, seq_len, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(batch, kv_heads, seq_len, 8, dtype=torch.float64, requires_grad=True)
    out = shared_prefix_attention(q, k, v, segments)
    expected = reference_attention(q, k, v, segments)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    covered = torch.zeros(batch, seq_len, dtype=torch.bool)
    for row, start, p, c, r in segments.tolist():
        covered[row, start : start + p + c + r] = True
    assert out[~covered].abs().max() == 0  # padding positions: zero, never NaN
    # Gradients through the gathers and the scatter equal those of the reference.
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    expected_grads = torch.autograd.grad(
        (reference_attention(q2, k2, v2, segments) * weights).sum(), (q2, k2, v2)
    )
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# -- the collator -------------------------------------------------------------------------------------


@pytest.mark.parametrize("pack", [False, True])
def test_shared_batch_windows_hold_the_unshared_tokens(pack):
    pairs = random_pairs(5)
    plain = PreferenceCollator(0)(pairs)
    shared = PreferenceCollator(0, pack=pack, prefix_sharing=True)(pairs)
    assert shared[SEGMENTS_KEY].shape == (5, 5)
    # The same learned tokens per row, and each window position holds the token the unshared row has.
    for key in ("example_index", "num_response_tokens", "dropped_pairs"):
        assert (
            shared[key] == plain[key]
            if not torch.is_tensor(plain[key])
            else torch.equal(shared[key], plain[key])
        )
    for batch in (plain, shared):
        batch["window_tokens"] = batch["input_ids"].reshape(-1)[batch["response_index"]]
        batch["window_positions"] = (
            batch["position_ids"].reshape(-1)[batch["response_index"]]
            if "position_ids" in batch
            else batch["response_index"] % batch["input_ids"].shape[1]
        )
    width = plain["response_labels"].shape[1]
    assert shared["response_labels"].shape[1] == width
    assert torch.equal(shared["response_labels"], plain["response_labels"])
    live = plain["response_labels"] != -100
    live[:, 0] = True  # the last prompt position
    for key in ("window_tokens", "window_positions"):
        assert torch.equal(shared[key][live], plain[key][live]), key
    tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    saved = sum(len(p.prompt_ids) for p in pairs)
    assert plain["num_tokens"] == tokens and shared["num_tokens"] == tokens - saved


def test_unshared_pairs_in_a_shared_batch_train_from_their_own_prompts():
    """A pair whose responses do not continue one prompt is a segment with no prefix (TRL's case)."""
    prompt_c, prompt_r = [5, 6, 7], [5, 6, 8, 9]
    pair = SharedPair([], [*prompt_c, 10, 11], [*prompt_r, 12], chosen_label_start=3, rejected_label_start=4)
    batch = shared_prefix_batch([pair], pad_token_id=0)
    assert batch[SEGMENTS_KEY].tolist() == [[0, 0, 0, 5, 5]]
    tokens = batch["input_ids"].reshape(-1)[batch["response_index"]]
    assert tokens.tolist() == [[7, 10, 11], [9, 12, 9]]
    assert batch["response_labels"].tolist() == [[-100, 10, 11], [-100, 12, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]]


# -- the model: hidden states, losses, gradients ----------------------------------------------------------


@pytest.mark.parametrize("arch, kv_heads", [("llama", None), ("qwen2", 2)])
@pytest.mark.parametrize("pack", [False, True])
def test_hidden_states_equal_the_unshared_rows_in_float64(arch, kv_heads, pack):
    model = tiny_lm(arch=arch, kv_heads=kv_heads)
    pairs = random_pairs(4, seed=3)
    plain = PreferenceCollator(0)(pairs)
    before = window_states(model, plain)
    enable_prefix_sharing(model)
    assert is_prefix_sharing_enabled(model)
    after_plain = window_states(model, plain)  # unshared batches: the model's own attention
    shared = window_states(model, PreferenceCollator(0, pack=pack, prefix_sharing=True)(pairs))
    mask = scored(plain)
    torch.testing.assert_close(after_plain, before, rtol=0, atol=0)
    torch.testing.assert_close(shared[mask], before[mask], rtol=1e-10, atol=1e-12)


def gradients(objective, batch):
    objective.zero_grad(set_to_none=True)
    loss, metrics = objective(**batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in objective.policy.named_parameters() if p.grad is not None}
    return loss.detach(), metrics, grads


def assert_same_training(shared, plain, *, loss_rtol, grad_rtol):
    (loss_s, metrics_s, grads_s), (loss_p, metrics_p, grads_p) = shared, plain
    torch.testing.assert_close(loss_s, loss_p, rtol=loss_rtol, atol=0)
    torch.testing.assert_close(metrics_s, metrics_p, rtol=loss_rtol, atol=1e-12)
    assert grads_s.keys() == grads_p.keys() and grads_s
    # A floor for gradients that are zero in exact arithmetic (a key bias: softmax ignores it).
    floor = 1e-3 * grad_rtol * torch.stack([g.norm() for g in grads_p.values()]).norm()
    for name in grads_p:
        scale = grads_p[name].norm()
        err = (grads_s[name] - grads_p[name]).norm()
        assert err <= grad_rtol * scale + floor, (name, float(err), float(scale))


@pytest.mark.parametrize("impl", ["fused", "naive"])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_loss_trains_the_same_in_float64(loss, impl):
    model = tiny_lm()
    pairs = random_pairs(3, seed=7)
    needs_ref = LOSSES[loss].needs_reference
    reference = copy.deepcopy(model) if needs_ref else None
    kwargs = dict(loss=loss, impl=impl, reference_mode="copy" if needs_ref else None, reference=reference)
    plain = gradients(PreferenceObjective(model, **kwargs), PreferenceCollator(0)(pairs))
    shared_objective = PreferenceObjective(model, prefix_sharing=True, **kwargs)
    shared = gradients(shared_objective, PreferenceCollator(0, prefix_sharing=True)(pairs))
    assert_same_training(shared, plain, loss_rtol=1e-10, grad_rtol=1e-10)


@pytest.mark.parametrize("pack", [False, True])
def test_fp32_training_with_checkpointing_and_lora_matches(pack):
    from peft import LoraConfig, get_peft_model

    model = tiny_lm(dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for p in policy.parameters():  # LoRA's B starts at zero: give the adapters a value to differentiate
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    pairs = random_pairs(4, seed=11)
    # DPO with the adapter-disabled reference: the reference pass is shared too.
    kwargs = dict(loss="dpo", reference_mode="adapter_disabled")
    plain = gradients(PreferenceObjective(policy, **kwargs), PreferenceCollator(0, pack=pack)(pairs))
    objective = PreferenceObjective(policy, prefix_sharing=True, **kwargs)
    shared_batch = PreferenceCollator(0, pack=pack, prefix_sharing=True)(pairs)
    shared = gradients(objective, shared_batch)
    assert_same_training(shared, plain, loss_rtol=1e-5, grad_rtol=1e-4)
    # The reference log-probs for a precomputed cache, shared and not.
    ref_plain = PreferenceObjective(policy, **kwargs)(
        mode="reference", **PreferenceCollator(0, pack=pack)(pairs)
    )
    torch.testing.assert_close(objective(mode="reference", **shared_batch), ref_plain, rtol=1e-5, atol=1e-5)


def test_a_shared_batch_without_the_shared_attention_is_refused():
    model = tiny_lm()
    batch = PreferenceCollator(0, prefix_sharing=True)(random_pairs(2))
    with pytest.raises(ValueError, match=SEGMENTS_KEY):
        PreferenceObjective(model)(**batch)


def test_unsupported_models_are_named():
    model = tiny_lm()
    model.config.sliding_window = 16
    model.config.use_sliding_window = True
    model.config.layer_types = None
    assert "sliding" in prefix_sharing_problem(model)
    with pytest.raises(PrefixSharingUnsupported, match="sliding"):
        enable_prefix_sharing(model)
    assert not is_prefix_sharing_enabled(model)


# -- the tiny VLM: frames through the vision tower once per pair ------------------------------------------


def test_vlm_runs_the_vision_tower_once_per_pair_and_trains_the_same():
    Image = pytest.importorskip("PIL.Image")

    from synpo.data import PairEncoder
    from synpo.data.records import PreferenceExample
    from synpo.tiny import build_tiny_vlm

    model, processor = build_tiny_vlm()
    exact_norms(model.double())
    encoder = PairEncoder(processor.tokenizer, processor, max_length=512)
    frames = [Image.new("RGB", (32, 32), color) for color in ("red", "green")]
    pairs = []
    for i, (chosen, rejected) in enumerate(
        [("a red dog runs", "a cat"), ("green trees", "blue sky above us")]
    ):
        example = PreferenceExample("Describe the video.", chosen, rejected, images=("x",))
        encoder._frames = lambda _example, frames=frames: frames  # in-memory frames, no files
        pairs.append(encoder.encode(example, index=i))
    for pair in pairs:
        pair.vision_inputs = {k: v.double() for k, v in pair.vision_inputs.items()}
    calls = []
    model.model.vision_tower.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    plain = gradients(PreferenceObjective(model), PreferenceCollator(0)(pairs))
    assert sum(calls) == 2 * 2 * len(frames)  # every frame of both pairs, twice
    calls.clear()
    shared_batch = PreferenceCollator(0, prefix_sharing=True)(pairs)
    shared = gradients(PreferenceObjective(model, prefix_sharing=True), shared_batch)
    assert sum(calls) == 2 * len(frames)  # once per pair
    assert_same_training(shared, plain, loss_rtol=1e-10, grad_rtol=1e-10)
    # The vision tower keeps its own attention; only the language model's is the shared one.
    assert model.config.vision_config._attn_implementation == "sdpa"


# -- CUDA (benchmarks/gpu_suite.sh runs these on the GPU machine) ------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_shared_states_are_as_close_to_float64_as_the_unshared_ones(dtype):
    """On CUDA (flash / memory-efficient sdpa kernels) in the model's dtype: the shared hidden states
    are within the unshared ones' own distance from the float64 CPU states (plain PyTorch's error in
    that dtype), and training through them gives finite gradients."""
    reference = tiny_lm(kv_heads=2)
    pairs = random_pairs(3, seed=5, longest_prompt=40)
    plain = PreferenceCollator(0)(pairs)
    exact = window_states(reference, plain)
    model = copy.deepcopy(reference).to("cuda", dtype)
    to_cuda = lambda batch: {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    unshared = window_states(model, to_cuda(plain)).double().cpu()
    enable_prefix_sharing(model)
    shared_batch = to_cuda(PreferenceCollator(0, prefix_sharing=True)(pairs))
    shared = window_states(model, shared_batch).double().cpu()
    mask = scored(plain)
    unshared_err = (unshared - exact)[mask].abs().max()
    shared_err = (shared - exact)[mask].abs().max()
    assert shared_err <= 2 * unshared_err + 1e-6, (float(shared_err), float(unshared_err))
    objective = PreferenceObjective(model, prefix_sharing=True)
    loss, _ = objective(**shared_batch)
    loss.backward()
    assert torch.isfinite(loss) and all(
        torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None
    )
