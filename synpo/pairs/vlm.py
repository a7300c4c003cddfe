"""Captioning frames with any Hugging Face vision-language model and its processor.

:class:`VideoCaptioner` turns (frames, instruction) into the model's chat format through the processor's
own chat template, then calls ``generate``. Frames go in either as one image per frame (LLaVA, SmolVLM,
Idefics, and any image VLM) or as one video (Qwen2-VL, LLaVA-OneVision, LLaVA-NeXT-Video); ``frames_as``
picks, and ``"auto"`` uses video input when the processor has a video processor.

Contrastive decoding (SynPO's inference helper) scores each next token with
``strong_weight * logits(all frames) - weak_weight * logits(a subset of the frames)`` (1.5 and 0.5, a
third of the frames): details supported by the whole video gain over what a few frames already suggest.
It runs as a logits processor inside ``generate`` that keeps its own KV cache for the weak context, so
it costs one extra incremental forward per token, not a re-encoding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from transformers import LogitsProcessor

TINY_MODEL = "tiny"  # model spec that builds synpo.tiny's random model instead of loading one


@dataclass(frozen=True)
class Sampling:
    """Decoding settings. ``do_sample=False`` is greedy and ignores temperature/top_p/top_k."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    max_new_tokens: int = 800

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if self.do_sample:
            if not self.temperature > 0:
                raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
            if not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
            if not isinstance(self.top_k, int) or self.top_k < 0:
                raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {self.top_k!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def greedy(max_new_tokens: int = 800) -> Sampling:
    return Sampling(do_sample=False, max_new_tokens=max_new_tokens)


@dataclass(frozen=True)
class Contrastive:
    """``strong_weight * logits(all frames) - weak_weight * logits(weak_fraction of the frames)``."""

    strong_weight: float = 1.5
    weak_weight: float = 0.5
    weak_fraction: float = 1 / 3

    def __post_init__(self):
        if not 0 < self.weak_fraction < 1:
            raise ValueError(f"weak_fraction must be in (0, 1), got {self.weak_fraction}")

    def weak_indices(self, n_frames: int) -> list[int]:
        """Evenly spaced frame indices, at least one."""
        n_weak = max(1, round(n_frames * self.weak_fraction))
        return sorted({int(i) for i in np.linspace(0, n_frames - 1, n_weak + 2)[1:-1].round()})

    def to_dict(self) -> dict:
        return asdict(self)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in choices:
        raise ValueError(f"dtype must be one of auto, {', '.join(choices)}; got {dtype!r}")
    return choices[dtype]


def _load(spec: str, device: str, dtype: str, tiny, auto_model: str, auto_processor: str):
    """(model, processor or tokenizer), eval mode on the device: ``tiny()`` for ``"tiny"``, else the
    transformers Auto classes named (from a local folder or hub id)."""
    torch_device = _resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, torch_device)
    if spec == TINY_MODEL:
        model, processor = tiny()
    else:
        import transformers

        processor = getattr(transformers, auto_processor).from_pretrained(spec)
        model = getattr(transformers, auto_model).from_pretrained(spec, dtype=torch_dtype)
    return model.to(device=torch_device, dtype=torch_dtype).eval(), processor


def load_vlm(spec: str, *, device: str = "auto", dtype: str = "auto", seed: int = 0):
    """(model, processor) from a local folder or hub id, or synpo.tiny's random VLM for ``"tiny"``."""
    from synpo.tiny import build_tiny_vlm

    tiny = lambda: build_tiny_vlm(seed=seed)
    return _load(spec, device, dtype, tiny, "AutoModelForImageTextToText", "AutoProcessor")


def load_causal_lm(spec: str, *, device: str = "auto", dtype: str = "auto", seed: int = 0):
    """(model, tokenizer) from a local folder or hub id, or synpo.tiny's random LM for ``"tiny"``."""
    from synpo.tiny import build_tiny_causal_lm

    tiny = lambda: build_tiny_causal_lm(seed=seed)
    return _load(spec, device, dtype, tiny, "AutoModelForCausalLM", "AutoTokenizer")


class VideoCaptioner:
    """Generates descriptions of frames with a HF vision-language model and its processor."""

    def __init__(self, model, processor, *, frames_as: str = "auto"):
        if frames_as not in ("auto", "images", "video"):
            raise ValueError(f"frames_as must be 'auto', 'images' or 'video', got {frames_as!r}")
        if getattr(processor, "chat_template", None) is None:
            raise ValueError("processor: has no chat template; give a processor saved with one")
        if frames_as == "auto":
            frames_as = "video" if getattr(processor, "video_processor", None) is not None else "images"
        self.model = model
        self.processor = processor
        self.frames_as = frames_as
        self.tokenizer = getattr(processor, "tokenizer", processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def build_inputs(self, frames: list[np.ndarray], instruction: str) -> dict:
        """Processor outputs for one user turn holding the frames then the instruction."""
        if not frames:
            raise ValueError("frames must not be empty")
        if not instruction.strip():
            raise ValueError("instruction must not be empty")
        if self.frames_as == "images":
            content = [{"type": "image"} for _ in frames]
        else:
            content = [{"type": "video"}]
        content.append({"type": "text", "text": instruction})
        prompt = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        if self.frames_as == "images":
            inputs = self.processor(text=[prompt], images=list(frames), return_tensors="pt")
        else:
            inputs = self.processor(text=[prompt], videos=[np.stack(frames)], return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        return {
            key: value.to(self.device, dtype=dtype if value.is_floating_point() else None)
            for key, value in inputs.items()
            if isinstance(value, torch.Tensor)
        }

    def generate(
        self,
        frames: list[np.ndarray],
        instruction: str,
        sampling: Sampling,
        *,
        num_return_sequences: int = 1,
        contrastive: Contrastive | None = None,
    ) -> list[str]:
        """``num_return_sequences`` descriptions (whitespace-stripped; may be empty)."""
        if num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be >= 1, got {num_return_sequences}")
        inputs = self.build_inputs(frames, instruction)
        if contrastive is None:
            kwargs = {"do_sample": sampling.do_sample, "num_return_sequences": num_return_sequences}
            if sampling.do_sample:
                kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
            return self._generate(inputs, sampling.max_new_tokens, **kwargs)
        # The weak context is a single sequence with its own cache: one generate call per output.
        weak_inputs = self.build_inputs(
            [frames[i] for i in contrastive.weak_indices(len(frames))], instruction
        )
        return [
            self._generate_contrastive(inputs, weak_inputs, sampling, contrastive)[0]
            for _ in range(num_return_sequences)
        ]

    def _generate_contrastive(self, inputs, weak_inputs, sampling: Sampling, contrastive: Contrastive):
        from transformers import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        processors = LogitsProcessorList(
            [
                FrameContrastLogitsProcessor(
                    self.model,
                    weak_inputs,
                    prompt_length=inputs["input_ids"].shape[1],
                    strong_weight=contrastive.strong_weight,
                    weak_weight=contrastive.weak_weight,
                )
            ]
        )
        # generate() appends custom processors after its own warpers, which would filter (top-k/top-p)
        # and scale the strong logits before the contrast. So its warpers are switched off (temperature 1,
        # top_k 0, top_p 1) and applied here, after the contrast, in generate's own order.
        if sampling.do_sample:
            if sampling.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k > 0:
                processors.append(TopKLogitsWarper(sampling.top_k))
            if sampling.top_p < 1.0:
                processors.append(TopPLogitsWarper(sampling.top_p))
        neutral = {"temperature": 1.0, "top_k": 0, "top_p": 1.0} if sampling.do_sample else {}
        return self._generate(
            inputs,
            sampling.max_new_tokens,
            do_sample=sampling.do_sample,
            logits_processor=processors,
            **neutral,
        )

    @torch.inference_mode()
    def _generate(self, inputs: dict, max_new_tokens: int, **kwargs) -> list[str]:
        tokenizer = self.tokenizer
        output = self.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
            **kwargs,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


# Attributes some VLMs keep on modules between forward calls of one generation (Qwen2-VL family: the
# offset of multimodal rotary positions). Two interleaved contexts must each see their own value.
_PER_CONTEXT_STATE = ("rope_deltas",)


class FrameContrastLogitsProcessor(LogitsProcessor):
    """``strong_weight * scores - weak_weight * logits(weak context)`` for each generated position.

    ``scores`` are the logits of the main (all-frames) context as ``generate`` passes them; the weak
    context (the same instruction with fewer frames) is run incrementally with its own KV cache on the
    tokens generated so far. Batch size 1.
    """

    def __init__(
        self, model, weak_inputs: dict, *, prompt_length: int, strong_weight: float, weak_weight: float
    ):
        self.model = model
        self.weak_inputs = weak_inputs
        self.prompt_length = prompt_length
        self.strong_weight = strong_weight
        self.weak_weight = weak_weight
        self._cache = None
        self._consumed = 0
        self._attention_mask = weak_inputs.get("attention_mask")
        self._stateful = [
            (module, name)
            for module in model.modules()
            for name in _PER_CONTEXT_STATE
            if hasattr(module, name)
        ]
        self._weak_state = [None] * len(self._stateful)

    def _swap_state(self, values: list) -> list:
        previous = [getattr(module, name) for module, name in self._stateful]
        for (module, name), value in zip(self._stateful, values):
            setattr(module, name, value)
        return previous

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[0] != 1:
            raise ValueError(
                f"contrastive decoding runs one sequence at a time, got batch {input_ids.shape[0]}"
            )
        new_tokens = input_ids[:, self.prompt_length + self._consumed :]
        main_state = self._swap_state(self._weak_state)
        try:
            if self._cache is None:
                out = self.model(**self.weak_inputs, use_cache=True)
                if new_tokens.shape[1]:  # only when called mid-generation
                    out = self._extend(out.past_key_values, new_tokens)
            else:
                out = self._extend(self._cache, new_tokens)
            self._weak_state = [getattr(module, name) for module, name in self._stateful]
        finally:
            self._swap_state(main_state)
        self._cache = out.past_key_values
        self._consumed += new_tokens.shape[1]
        weak = out.logits[:, -1, : scores.shape[-1]].to(scores.dtype)
        return self.strong_weight * scores - self.weak_weight * weak

    def _extend(self, cache, new_tokens):
        if self._attention_mask is not None:
            ones = self._attention_mask.new_ones((1, new_tokens.shape[1]))
            self._attention_mask = torch.cat([self._attention_mask, ones], dim=1)
        return self.model(
            input_ids=new_tokens, attention_mask=self._attention_mask, past_key_values=cache, use_cache=True
        )
