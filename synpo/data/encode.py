"""Tokenization of preference pairs: the chat template (or a plain Vicuna-style one), the prompt shared by
both responses, truncation counted, video frames and images through the processor."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from synpo.data.media import example_frames
from synpo.data.records import DataError, PreferenceExample

# The plain (no chat template) prompt's system line: Vicuna v1's, as AuroraCap upstream.
PLAIN_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

__all__ = ["PLAIN_SYSTEM_PROMPT", "EncodeStats", "EncodedPair", "PairEncoder"]


@dataclass
class EncodedPair:
    """One tokenized pair: prompt ids (shared) and each response's ids; labels are derived."""

    index: int  # position in the dataset (for cached reference log-probs)
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    # Per-token extras the processor returned for the prompt (e.g. token type ids), padded with 0.
    prompt_token_extras: dict[str, list[int]] = field(default_factory=dict)
    # Vision inputs (pixel_values, image sizes...), concatenated along dim 0 when batching.
    vision_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    truncated_rows: int = 0
    tokens_cut: int = 0

    @property
    def num_tokens(self) -> int:
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class EncodeStats:
    pairs: int = 0
    truncated_rows: int = 0  # sequences shortened (prompt or response)
    tokens_cut: int = 0
    dropped_too_long: int = 0  # pairs whose prompt alone leaves no room for a response token
    media_ignored: int = 0  # pairs with video/images given to a text-only model
    # The longest prompt + response before responses are cut: the max_length that cuts none.
    longest: int = 0

    def truncation_advice(self, max_length: int) -> str | None:
        """One line on what truncation cut and the ``data.max_length`` that cuts nothing; None when
        nothing was cut. Cut responses change the training signal (the end of a response is lost)."""
        if not self.truncated_rows:
            return None
        advice = (
            f"data.max_length {self.longest} fits every pair (now {max_length})"
            if self.longest > max_length
            else "only prompts were cut, by data.max_prompt_length: raise it (or null) to keep them"
        )
        return (
            f"truncation cut {self.truncated_rows} sequences ({self.tokens_cut} tokens): "
            f"the cut tokens are not trained on; {advice}"
        )

    def summary(self) -> str:
        return (
            f"{self.pairs} pairs tokenized; {self.truncated_rows} sequences truncated "
            f"({self.tokens_cut} tokens cut), {self.dropped_too_long} pairs dropped (prompt too long)"
            + (
                f", media ignored for {self.media_ignored} pairs (text-only model)"
                if self.media_ignored
                else ""
            )
        )


class PairEncoder:
    """Tokenizes :class:`PreferenceExample` s into prompt/response token ids.

    ``tokenizer`` is a Hugging Face tokenizer; ``processor`` (optional) a VLM processor whose
    ``tokenizer`` it wraps. With ``template="auto"`` the chat template is used when there is one,
    else a plain Vicuna-style ``"<system> USER: <prompt> ASSISTANT:"`` prompt and ``" <response></s>"``.
    The prompt is never learned (labels -100). Truncation: a text prompt longer than
    ``max_prompt_length`` keeps its last tokens; then a response that does not fit ``max_length`` is
    cut at the end. A pair whose prompt leaves no room for one response token is dropped (``None``).
    A video is shown as the frames :func:`synpo.video.sample_video` picks with ``fps``,
    ``min_frames`` and ``max_frames``: the same RGB arrays the candidates stage captioned.
    """

    def __init__(
        self,
        tokenizer,
        processor=None,
        *,
        max_length: int = 2560,
        max_prompt_length: int | None = None,
        template: str = "auto",
        system_prompt: str | None = None,
        fps: float = 0.5,
        min_frames: int = 8,
        max_frames: int = 16,
    ):
        if tokenizer is None:
            raise ValueError("tokenizer: required")
        if template not in ("auto", "chat", "plain"):
            raise ValueError(f"template: must be 'auto', 'chat' or 'plain', got {template!r}")
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length: must be an int >= 2, got {max_length!r}")
        chat_template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
        if template == "chat" and not chat_template:
            raise ValueError("template: 'chat' requested but the tokenizer/processor has no chat template")
        self.tokenizer = tokenizer
        self.processor = processor
        self.use_chat_template = template == "chat" or (template == "auto" and bool(chat_template))
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.system_prompt = system_prompt
        self.fps, self.min_frames, self.max_frames = fps, min_frames, max_frames
        self.stats = EncodeStats()

    @property
    def supports_media(self) -> bool:
        return self.processor is not None

    def _templater(self):
        return self.processor if self.processor is not None else self.tokenizer

    def _messages(self, prompt: str, n_images: int) -> list[dict]:
        messages = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        if n_images:
            content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
            messages.append({"role": "user", "content": content})
        else:
            messages.append({"role": "user", "content": prompt})
        return messages

    def _texts(self, prompt: str, response: str, n_images: int) -> tuple[str, str]:
        """(prompt text, response text) such that their concatenation is the full conversation."""
        if not self.use_chat_template:
            image_token = getattr(self.processor, "image_token", None) or "<image>"
            media = "".join(f"{image_token}\n" for _ in range(n_images))
            system = self.system_prompt if self.system_prompt is not None else PLAIN_SYSTEM_PROMPT
            return f"{system} USER: {media}{prompt} ASSISTANT:", f" {response}"
        templater = self._templater()
        messages = self._messages(prompt, n_images)
        prompt_text = templater.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        full_text = templater.apply_chat_template(
            [*messages, {"role": "assistant", "content": response}], tokenize=False
        )
        if not full_text.startswith(prompt_text):
            raise DataError(
                "the chat template's conversation does not start with its generation prompt; "
                "set data.template: plain"
            )
        return prompt_text, full_text[len(prompt_text) :]

    def _response_ids(self, response_text: str) -> list[int]:
        ids = list(self.tokenizer(response_text, add_special_tokens=False)["input_ids"])
        eos = self.tokenizer.eos_token_id
        if not self.use_chat_template and eos is not None:
            ids.append(eos)  # the chat template writes its own end-of-turn token
        return ids

    def _frames(self, example: PreferenceExample) -> list:
        return example_frames(example, fps=self.fps, min_frames=self.min_frames, max_frames=self.max_frames)

    def encode(self, example: PreferenceExample, index: int) -> EncodedPair | None:
        frames = []
        if example.has_media:
            if self.supports_media:
                try:
                    frames = self._frames(example)
                except DataError as exc:
                    raise DataError(f"{example.source}: {exc}") from exc
            else:
                self.stats.media_ignored += 1
        prompt_text, chosen_text = self._texts(example.prompt, example.chosen, len(frames))
        _, rejected_text = self._texts(example.prompt, example.rejected, len(frames))

        extras: dict[str, list[int]] = {}
        vision: dict[str, torch.Tensor] = {}
        if frames:
            out = self.processor(text=[prompt_text], images=frames, return_tensors="pt")
            prompt_ids = out["input_ids"][0].tolist()
            for key, value in out.items():
                if key in ("input_ids", "attention_mask") or not isinstance(value, torch.Tensor):
                    continue
                if value.dim() == 2 and value.shape == out["input_ids"].shape:
                    extras[key] = value[0].tolist()  # per-token (e.g. token type ids)
                else:
                    vision[key] = value
        else:
            plain_bos = not self.use_chat_template
            prompt_ids = list(self.tokenizer(prompt_text, add_special_tokens=plain_bos)["input_ids"])

        truncated_rows = 0
        tokens_cut = 0
        if self.max_prompt_length is not None and len(prompt_ids) > self.max_prompt_length:
            if frames:
                self.stats.dropped_too_long += 1  # image tokens cannot be cut
                return None
            cut = len(prompt_ids) - self.max_prompt_length
            prompt_ids = prompt_ids[cut:]  # keep the end: the request and the assistant tag
            truncated_rows += 2
            tokens_cut += 2 * cut
        room = self.max_length - len(prompt_ids)
        if room < 1:
            self.stats.dropped_too_long += 1
            return None
        responses = []
        for text in (chosen_text, rejected_text):
            ids = self._response_ids(text)
            self.stats.longest = max(self.stats.longest, len(prompt_ids) + len(ids))
            if len(ids) > room:
                tokens_cut += len(ids) - room
                truncated_rows += 1
                ids = ids[:room]
            responses.append(ids)
        self.stats.pairs += 1
        self.stats.truncated_rows += truncated_rows
        self.stats.tokens_cut += tokens_cut
        return EncodedPair(
            index=index,
            prompt_ids=prompt_ids,
            chosen_ids=responses[0],
            rejected_ids=responses[1],
            prompt_token_extras=extras,
            vision_inputs=vision,
            truncated_rows=truncated_rows,
            tokens_cut=tokens_cut,
        )
