"""The tiny offline models: build (any size without a tokenizer, too), generate, forward with labels,
determinism, no network."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from synpo import tiny


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tiny_tokenizer()


def test_tokenizer_special_tokens_and_roundtrip(tokenizer):
    assert 300 <= len(tokenizer) <= 2048
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS}
    assert ids == {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<image>": 4, "<video>": 5}
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 3)
    text = "A red square moves to the right; then a blue circle bounces. Ünïcode ✓\n"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    # <image> is one token even inside running text (the VLM processor relies on that).
    assert tokenizer("frame <image> here").input_ids.count(4) == 1


def test_tokenizer_is_compact_on_captions(tokenizer):
    caption = "The video begins with a wide shot of a quiet street where a man walks a small dog."
    n_tokens = len(tokenizer(caption).input_ids)
    # Trained BPE merges whole words: well under the ~80 bytes a byte-level fallback would give.
    assert n_tokens <= 2 * len(caption.split()), n_tokens


def test_chat_template_vicuna(tokenizer):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the video."}]},
        {"role": "assistant", "content": "A red square."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text.startswith("<s>A chat between")
    assert text.endswith(" USER: <image>\nDescribe the video. ASSISTANT: A red square.</s>")
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("Describe the video. ASSISTANT:")
    custom = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], tokenize=False
    )
    assert custom == "<s>Be brief. USER: Hi "


def test_tokenizer_rejects_bad_vocab_size():
    with pytest.raises(ValueError, match="vocab_size"):
        tiny.build_tiny_tokenizer(vocab_size=10)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tie", [False, True])
def test_causal_lm_generate_and_loss(tokenizer, arch, tie):
    model, tok = tiny.build_tiny_causal_lm(tokenizer, arch=arch, tie_word_embeddings=tie)
    assert type(model).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    assert model.config.tie_word_embeddings is tie
    assert (model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()) is tie
    assert model.config._attn_implementation == "sdpa"
    assert model.config.vocab_size == len(tok)
    batch = tok.apply_chat_template(
        [[{"role": "user", "content": "Describe the video."}], [{"role": "user", "content": "Hi"}]],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
        padding=True,
    )
    out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    prompt_len = batch["input_ids"].shape[1]
    assert out.shape[0] == 2 and prompt_len < out.shape[1] <= prompt_len + 6
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = model(**batch, labels=labels).loss
    assert torch.isfinite(loss) and loss.item() > 0
    hidden = model(**batch, output_hidden_states=True)
    assert len(hidden.hidden_states) == model.config.num_hidden_layers + 1


def test_causal_lm_deterministic_and_rng_neutral(tokenizer):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, _ = tiny.build_tiny_causal_lm(tokenizer, seed=7)
    after = torch.rand(3)
    assert torch.equal(after, expected_next), "building a model must not consume the caller's RNG"
    b, _ = tiny.build_tiny_causal_lm(tokenizer, seed=7)
    c, _ = tiny.build_tiny_causal_lm(tokenizer, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"arch": "gpt2"}, "arch"),
        ({"hidden_size": 65}, "divisible"),
        ({"layers": 0}, "layers"),
        ({"hidden_size": 36, "heads": 4}, "even"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_causal_lm_bad_arguments(tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny.build_tiny_causal_lm(tokenizer, **kwargs)


def _frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8) for _ in range(n)]


def _vlm_inputs(processor, frames, text="Describe the video."):
    messages = [
        {"role": "user", "content": [*({"type": "image"} for _ in frames), {"type": "text", "text": text}]}
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[prompt], images=frames, return_tensors="pt")


@pytest.fixture(scope="module")
def vlm():
    return tiny.build_tiny_vlm(seed=0)


def test_vlm_generate_and_forward_with_labels(vlm):
    model, processor = vlm
    frames = _frames(3)
    inputs = _vlm_inputs(processor, frames)
    image_id = model.config.image_token_id
    assert (inputs["input_ids"] == image_id).sum().item() == 3 * 16
    assert inputs["pixel_values"].shape == (3, 3, tiny.TINY_IMAGE_SIZE, tiny.TINY_IMAGE_SIZE)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert (
        out.shape[0] == 1 and inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 8
    )
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == image_id, -100)
    result = model(**inputs, labels=labels)
    assert torch.isfinite(result.loss)
    result.loss.backward()
    # Gradients reach both the language model and the vision tower (the trainer decides what to freeze).
    assert model.lm_head.weight.grad is not None
    assert model.model.vision_tower.embeddings.patch_embedding.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_vlm_deterministic(vlm):
    model, processor = vlm
    again, _ = tiny.build_tiny_vlm(seed=0)
    other, _ = tiny.build_tiny_vlm(seed=1)
    sa, sb, sc = model.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["lm_head.weight"], sc["lm_head.weight"])
    inputs = _vlm_inputs(processor, _frames(2))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, again(**inputs).logits)


def test_random_causal_lm_of_any_size_without_a_tokenizer():
    model = tiny.build_random_causal_lm(
        vocab_size=96, arch="qwen2", hidden_size=32, heads=4, kv_heads=2, intermediate_size=48,
        special_token_ids=(1, 2, 0), seed=3, dtype=torch.bfloat16,
    )  # fmt: skip
    config = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM" and not model.training
    assert (config.vocab_size, config.num_key_value_heads, config.intermediate_size) == (96, 2, 48)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="kv_heads"):
        tiny.build_random_causal_lm(vocab_size=96, heads=4, kv_heads=3)


def test_vlm_save_and_reload_with_auto_classes(vlm, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, processor = vlm
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model2 = AutoModelForImageTextToText.from_pretrained(tmp_path)
    processor2 = AutoProcessor.from_pretrained(tmp_path)
    inputs = _vlm_inputs(processor, _frames(2))
    inputs2 = _vlm_inputs(processor2, _frames(2))
    assert torch.equal(inputs["input_ids"], inputs2["input_ids"])
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, model2(**inputs2).logits)


def test_builds_offline_without_network():
    # A fresh interpreter with HF offline mode and every socket connection refused: any attempted
    # download would raise.
    code = textwrap.dedent(
        """
        import socket
        def refuse(*args, **kwargs):
            raise OSError("network access attempted")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        from synpo import tiny
        tok = tiny.build_tiny_tokenizer()
        model, _ = tiny.build_tiny_causal_lm(tok)
        vlm, processor = tiny.build_tiny_vlm()
        print("ok", len(tok), type(vlm).__name__)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok" in result.stdout and "LlavaForConditionalGeneration" in result.stdout
