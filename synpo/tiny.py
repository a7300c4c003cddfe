"""Tiny, randomly initialised models built locally: no downloads, deterministic for a seed.

They exist so that tests, CI and the README walk-through can exercise the real code paths (tokenizer,
chat template, ``generate``, a forward with labels, a vision tower fed with video frames) in seconds on
a CPU. Their outputs are meaningless text; only shapes, dtypes and plumbing are real.

- :func:`build_tiny_tokenizer`: a byte-level BPE tokenizer (~1k tokens) trained with ``tokenizers`` on
  an embedded corpus of caption-like English, with a Vicuna-style chat template (as AuroraCap upstream)
  and ``<image>`` / ``<video>`` placeholder tokens.
- :func:`build_random_causal_lm`: a ``LlamaForCausalLM`` or ``Qwen2ForCausalLM`` of any size and vocab
  (no tokenizer), for benchmarks and examples; :func:`build_tiny_causal_lm`: a small one with the tiny
  tokenizer, ready for ``generate``.
- :func:`build_tiny_vlm`: a ``LlavaForConditionalGeneration`` (CLIP vision tower + MLP projector +
  Llama) with a ``LlavaProcessor`` built from the tiny tokenizer and a PIL-backed image processor (no
  torchvision needed). Video frames are passed as a list of images, one ``<image>`` per frame.
"""

from __future__ import annotations

import functools

import torch

from synpo.data.encode import PLAIN_SYSTEM_PROMPT

# Special tokens. Ids are fixed by their order here: <unk>=0, <s>=1, </s>=2, <pad>=3, <image>=4, <video>=5.
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN)

DEFAULT_VOCAB_SIZE = 1024

# Vicuna v1 style, as AuroraCap upstream: a system line, then "USER: ... ASSISTANT: ...</s>".
# Message content may be a string or a list of typed parts ({"type": "image"|"video"|"text"}), which is
# what processors' apply_chat_template passes for multimodal messages.
VICUNA_SYSTEM = PLAIN_SYSTEM_PROMPT  # the plain template of synpo.data writes the same system line
VICUNA_CHAT_TEMPLATE = (
    "{%- set system = namespace(text='" + VICUNA_SYSTEM.replace("'", "\\'") + "') -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set system.text = messages[0]['content'] -%}"
    "{%- else -%}{%- set system.text = messages[0]['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join(' ') -%}{%- endif -%}"
    "{%- set messages = messages[1:] -%}"
    "{%- endif -%}"
    "{{ bos_token }}{{ system.text }}{{ ' ' }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ 'USER: ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' }}"
    "{%- else -%}{{ raise_exception('Unsupported role: ' ~ message['role']) }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '" + IMAGE_TOKEN + "\n' }}"
    "{%- elif part['type'] == 'video' -%}{{ '" + VIDEO_TOKEN + "\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{ eos_token }}{%- else -%}{{ ' ' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

# A small corpus of video-caption-like English so that BPE learns whole words and captions tokenize to
# lengths resembling a real tokenizer's (a few tokens per word, not one per byte).
_CAPTION_CORPUS = """\
The video begins with a wide shot of a quiet street at dawn, where a man in a blue jacket walks a small dog.
A woman in a red coat opens the door of a white car and places a bag on the back seat before driving away.
The camera slowly pans to the left, revealing a green park with tall trees, a wooden bench and a fountain.
Two children run across the grass, chasing a yellow ball while their parents watch from a picnic blanket.
In the next scene, a chef in a white uniform chops onions on a cutting board in a bright kitchen.
He adds the vegetables to a hot pan, stirs them with a wooden spoon, and steam rises from the pan.
The clip shows a red square moving from the left side of the frame to the right against a dark background.
A blue circle bounces up and down near the center of the screen while a green triangle rotates slowly.
The background changes color from black to gray as the shapes move faster toward the edges of the frame.
At the end of the video, all of the shapes disappear and the screen fades to black.
A person wearing glasses sits at a desk, types on a laptop, and then turns to look at the camera.
The scene cuts to a close-up of the screen, which displays a chart with several colored bars.
A group of people stand on a stage, holding microphones and singing while lights flash behind them.
The audience claps and cheers as the performers bow and walk off the stage.
A cyclist rides along a mountain road, passing a river and a small village with stone houses.
The weather is cloudy and the road is wet, so the cyclist slows down before turning a sharp corner.
A cat jumps onto a kitchen counter, sniffs a bowl of milk, and then drinks from it.
A hand picks up a cup of coffee from a table and lifts it out of the frame.
The camera zooms in on a bird sitting on a branch; the bird flaps its wings and flies away.
Cars move along a busy highway at night, their headlights forming long streaks of light.
A woman stretches on a yoga mat in a sunny room, raising both arms above her head and bending forward.
Text appears on the screen for a few seconds, then the video shows a map with a moving arrow.
The player kicks the ball toward the goal; the goalkeeper dives to the right but misses it.
Snow falls on a frozen lake while a man in a black hat skates in slow circles near the shore.
Waves crash against the rocks, and a boat with a white sail moves slowly across the water.
First, a box appears in the upper left corner. Then it slides down. Finally, it stops at the bottom.
Throughout the video, the lighting stays soft and the camera remains mostly still, with small movements.
USER: Describe the video in detail. ASSISTANT: The video shows a scene with moving objects and people.
USER: Please describe what happens in this clip. ASSISTANT: A red shape moves to the right, then stops.
Hallucination score: 4. Harmony score: 5. Consistency score: 3. The description matches the clips.
{"hallucination": 5, "harmony": 4, "consistency": 2}
"""


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    # Training is deterministic for a fixed corpus and vocab size; caching the serialized tokenizer keeps
    # repeated builds (one per test) cheap while every call still returns a fresh, independent object.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CAPTION_CORPUS.splitlines(), trainer=trainer)
    # trim_offsets=False keeps offsets exact; BOS is added by the chat template, not here, so that a
    # templated prompt does not get two of them.
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer.to_str()


def build_tiny_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on an embedded caption corpus.

    Special tokens: ``<unk>`` (0), ``<s>`` (1, bos), ``</s>`` (2, eos), ``<pad>`` (3), ``<image>`` (4),
    ``<video>`` (5). Every byte is in the alphabet, so any text round-trips. The chat template is
    Vicuna-style (``USER: ... ASSISTANT: ...</s>``) and accepts typed multimodal content parts.
    Padding side is left, which is what batched ``generate`` needs; training code that wants right
    padding sets it explicitly.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if not isinstance(vocab_size, int) or not 300 <= vocab_size <= 4096:
        raise ValueError(
            f"vocab_size must be an int in [300, 4096] (256 bytes + specials + merges), got {vocab_size!r}"
        )
    backend = Tokenizer.from_str(_tokenizer_json(vocab_size))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN, "video_token": VIDEO_TOKEN},
        model_max_length=4096,
        padding_side="left",
        chat_template=VICUNA_CHAT_TEMPLATE,
    )
    return tokenizer


_ARCHS = ("llama", "qwen2")


def _text_config(
    arch: str,
    *,
    vocab_size: int,
    hidden_size: int,
    layers: int,
    heads: int,
    kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 4096,
    special_token_ids: tuple[int, int, int] = (1, 2, 0),
    tie_word_embeddings: bool = False,
):
    from transformers import LlamaConfig, Qwen2Config

    if arch not in _ARCHS:
        raise ValueError(f"arch must be one of {_ARCHS}, got {arch!r}")
    kv_heads = heads if kv_heads is None else kv_heads
    intermediate_size = 2 * hidden_size if intermediate_size is None else intermediate_size
    for name, value in (
        ("vocab_size", vocab_size),
        ("hidden_size", hidden_size),
        ("layers", layers),
        ("heads", heads),
        ("kv_heads", kv_heads),
        ("intermediate_size", intermediate_size),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if hidden_size % heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by heads ({heads})")
    if (hidden_size // heads) % 2:
        raise ValueError(f"hidden_size // heads must be even (rotary embeddings), got {hidden_size // heads}")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be divisible by kv_heads ({kv_heads})")
    bos, eos, pad = special_token_ids
    config_cls = LlamaConfig if arch == "llama" else Qwen2Config
    return config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=tie_word_embeddings,
    )


def _tokenizer_ids(tokenizer) -> tuple[int, int, int]:
    return tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id


def _seeded(seed: int, device: torch.device | None = None):
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    # fork_rng keeps the caller's global RNG stream untouched: building a model must not change the
    # random numbers a test or training run draws afterwards.
    cuda = [device.index or 0] if device is not None and device.type == "cuda" else []
    return torch.random.fork_rng(devices=cuda)


def build_random_causal_lm(
    *,
    vocab_size: int,
    arch: str = "llama",
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 4096,
    special_token_ids: tuple[int, int, int] = (1, 2, 0),
    tie_word_embeddings: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """A randomly initialised ``LlamaForCausalLM`` (or ``Qwen2ForCausalLM``) of any size, no tokenizer.

    ``kv_heads`` defaults to ``heads``, ``intermediate_size`` to ``2 * hidden_size``;
    ``special_token_ids`` are ``(bos, eos, pad)``. The model is built directly on ``device`` in
    ``dtype`` (a 7B model never exists in fp32 on the host), attention ``sdpa``, in eval mode. The
    same ``seed`` gives the same weights; the global RNG state is left unchanged.
    """
    from transformers import AutoModelForCausalLM

    config = _text_config(
        arch,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        special_token_ids=special_token_ids,
        tie_word_embeddings=tie_word_embeddings,
    )
    device = torch.device(device)
    with _seeded(seed, device), device:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def build_tiny_causal_lm(
    tokenizer=None,
    *,
    arch: str = "llama",
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
    tie_word_embeddings: bool = False,
):
    """A randomly initialised ``LlamaForCausalLM`` (or ``Qwen2ForCausalLM``) and its tokenizer
    (:func:`build_tiny_tokenizer` unless given), ready for ``generate``.

    ``tie_word_embeddings`` is set explicitly (transformers 5 defaults it to False); attention is
    ``sdpa``. The same ``seed`` gives bit-identical weights; the global RNG state is left unchanged.
    The model is in eval mode, on CPU, fp32.
    """
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    model = build_random_causal_lm(
        vocab_size=len(tokenizer),
        arch=arch,
        hidden_size=hidden_size,
        layers=layers,
        heads=heads,
        special_token_ids=_tokenizer_ids(tokenizer),
        tie_word_embeddings=tie_word_embeddings,
        seed=seed,
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model, tokenizer


# The tiny VLM's frames are 32x32 with 8x8 patches: 16 patch tokens per frame (the CLS token is dropped
# by the "default" feature-select strategy), so 4 frames cost 64 sequence positions.
TINY_IMAGE_SIZE = 32
TINY_PATCH_SIZE = 8


def build_tiny_image_processor(image_size: int = TINY_IMAGE_SIZE):
    """A PIL/numpy-backed LLaVA image processor (shortest edge resize + center crop to ``image_size``)."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    return LlavaImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )


def build_tiny_vlm(
    seed: int = 0,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    image_size: int = TINY_IMAGE_SIZE,
    vocab_size: int | None = None,
    intermediate_size: int | None = None,
):
    """A tiny ``LlavaForConditionalGeneration`` and its ``LlavaProcessor``, built offline.

    Frames go in as images: build the prompt with one ``{"type": "image"}`` content part per frame
    (``processor.apply_chat_template``), then call ``processor(text=..., images=frames)``. Each frame
    becomes ``(image_size / 8) ** 2`` ``<image>`` positions (16 at the default 32x32).
    ``vocab_size`` (default: the tiny tokenizer's) may exceed the tokenizer's: a benchmark's realistic
    lm_head. Vision tower and projector: see :func:`synpo.models.vision_modules`
    (``model.model.vision_tower`` and ``model.model.multi_modal_projector``).
    """
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = build_tiny_tokenizer()
    text_config = _text_config(
        "llama",
        vocab_size=max(len(tokenizer), vocab_size or 0),
        hidden_size=hidden_size,
        layers=layers,
        heads=heads,
        intermediate_size=intermediate_size,
        special_token_ids=_tokenizer_ids(tokenizer),
    )
    vision_config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=TINY_PATCH_SIZE,
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(image_size // TINY_PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )
    with _seeded(seed):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration._from_config(
            config, attn_implementation="sdpa", dtype=torch.float32
        )
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    processor = LlavaProcessor(
        image_processor=build_tiny_image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=TINY_PATCH_SIZE,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        # CLIP adds a CLS token that the "default" strategy drops again: 16 + 1 - 1 = 16 per frame.
        num_additional_image_tokens=1,
        chat_template=VICUNA_CHAT_TEMPLATE,
    )
    return model.eval(), processor
