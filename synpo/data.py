"""Preference data: JSONL readers, video frames, tokenization, batching.

Pipeline: :func:`read_preference_jsonl` (both record formats, the ``min_score_gap`` filter, malformed
lines reported as ``file:line``) -> :class:`PairEncoder` (chat template or a plain Vicuna-style one,
prompt masked with -100, truncation counted) -> :class:`PreferenceDataset` -> :class:`PairBatchPlan`
(the deterministic, resumable order of micro-batches per rank) -> :class:`PreferenceCollator`
(``[chosen; rejected]`` rows, padded or packed, plus the response windows the fused loss reads).

Record formats (one JSON object per line; extra keys are ignored):

- generic: ``prompt``, ``chosen``, ``rejected``; optional ``video`` (path), ``images`` (path or list),
  ``chosen_score``, ``rejected_score``, ``id``.
- upstream SynPO: ``video_name``, ``pos_pre``, ``neg_pre``, ``pos_score``, ``neg_score``; the prompt is
  ``data.default_prompt`` unless the record has ``prompt``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100
SAMPLE_PAIRS_PATH = Path(__file__).parent / "assets" / "sample_pairs.jsonl"
PLAIN_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

__all__ = [
    "IGNORE_INDEX",
    "SAMPLE_PAIRS_PATH",
    "DataError",
    "EncodedPair",
    "PairBatchPlan",
    "PairEncoder",
    "PreferenceCollator",
    "PreferenceDataset",
    "PreferenceExample",
    "ReadReport",
    "read_preference_jsonl",
    "split_eval_examples",
]


class DataError(ValueError):
    """A data record or media file is invalid; the message names the file and line."""


# ---------------------------------------------------------------------------------------------
# Reading records.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferenceExample:
    prompt: str
    chosen: str
    rejected: str
    video: str | None = None
    images: tuple[str, ...] = ()
    chosen_score: float | None = None
    rejected_score: float | None = None
    id: str | None = None
    source: str = ""  # "file:line", for error messages

    @property
    def has_media(self) -> bool:
        return self.video is not None or bool(self.images)


@dataclass
class ReadReport:
    path: str
    lines: int = 0  # non-blank lines read
    kept: int = 0
    malformed_skipped: int = 0
    filtered_score_gap: int = 0
    first_errors: list[str] = field(default_factory=list)  # the first few skipped lines' messages

    def summary(self) -> str:
        text = (
            f"{self.path}: {self.kept} pairs kept of {self.lines} lines "
            f"({self.filtered_score_gap} below min_score_gap, {self.malformed_skipped} malformed skipped)"
        )
        if self.first_errors:
            text += "; first malformed: " + " | ".join(self.first_errors)
        return text


def _require_text(record: dict, key: str, where: str) -> str:
    if key not in record:
        raise DataError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value


def _optional_score(record: dict, key: str, where: str) -> float | None:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: field {key!r} must be a finite number or null, got {value!r}")
    return float(value)


def _resolve_media(path_value: Any, key: str, where: str, media_dir: Path) -> str:
    if not isinstance(path_value, str) or not path_value:
        raise DataError(f"{where}: field {key!r} must be a non-empty path string, got {path_value!r}")
    path = Path(path_value).expanduser()
    if not path.is_absolute():
        path = media_dir / path
    if not path.is_file():
        raise DataError(f"{where}: {key} file not found: {path}")
    return str(path)


def _parse_record(record: Any, where: str, default_prompt: str, media_dir: Path) -> PreferenceExample:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    upstream = "chosen" not in record and ("pos_pre" in record or "video_name" in record)
    if upstream:
        chosen = _require_text(record, "pos_pre", where)
        rejected = _require_text(record, "neg_pre", where)
        prompt = _require_text(record, "prompt", where) if "prompt" in record else default_prompt
        chosen_score = _optional_score(record, "pos_score", where)
        rejected_score = _optional_score(record, "neg_score", where)
        video_value = record.get("video", record.get("video_name"))
    else:
        prompt = _require_text(record, "prompt", where)
        chosen = _require_text(record, "chosen", where)
        rejected = _require_text(record, "rejected", where)
        chosen_score = _optional_score(record, "chosen_score", where)
        rejected_score = _optional_score(record, "rejected_score", where)
        video_value = record.get("video")
    video = None if video_value is None else _resolve_media(video_value, "video", where, media_dir)
    images_value = record.get("images")
    if images_value is None:
        images: tuple[str, ...] = ()
    else:
        if isinstance(images_value, str):
            images_value = [images_value]
        if not isinstance(images_value, list):
            raise DataError(f"{where}: field 'images' must be a path or a list of paths")
        images = tuple(_resolve_media(p, "images", where, media_dir) for p in images_value)
    if video is not None and images:
        raise DataError(f"{where}: a record has either 'video' or 'images', not both")
    record_id = record.get("id")
    return PreferenceExample(
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        video=video,
        images=images,
        chosen_score=chosen_score,
        rejected_score=rejected_score,
        id=None if record_id is None else str(record_id),
        source=where,
    )


def read_preference_jsonl(
    path: str | os.PathLike,
    *,
    default_prompt: str = "Describe the video in detail.",
    min_score_gap: float | None = 4.0,
    on_error: str = "raise",
    media_dir: str | os.PathLike | None = None,
) -> tuple[list[PreferenceExample], ReadReport]:
    """Read a preference JSONL file (generic or upstream format) into examples and a report.

    A malformed line (bad JSON, missing/empty/mistyped field, missing media file) raises
    :class:`DataError` naming ``file:line``, or with ``on_error="skip"`` is counted in the report and
    skipped. Pairs whose ``chosen_score - rejected_score < min_score_gap`` are filtered (counted);
    records without both scores are kept. Everything is checked here, before training starts.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error: must be 'raise' or 'skip', got {on_error!r}")
    if not isinstance(default_prompt, str) or not default_prompt.strip():
        raise ValueError("default_prompt: must be a non-empty string")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: preference file not found")
    base = Path(media_dir) if media_dir is not None else path.parent
    report = ReadReport(path=str(path))
    examples: list[PreferenceExample] = []
    with path.open("r", encoding="utf-8", errors="strict") as handle:
        lineno = 0
        while True:
            try:
                line = handle.readline()
            except UnicodeDecodeError as exc:
                # The rest of the file cannot be read reliably after a decoding error.
                raise DataError(f"{path}:{lineno + 1}: not valid UTF-8 ({exc.reason})") from exc
            if not line:
                break
            lineno += 1
            if not line.strip():
                continue
            report.lines += 1
            where = f"{path}:{lineno}"
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
                example = _parse_record(record, where, default_prompt, base)
            except DataError as exc:
                if on_error == "raise":
                    raise
                report.malformed_skipped += 1
                if len(report.first_errors) < 3:
                    report.first_errors.append(str(exc))
                continue
            if (
                min_score_gap is not None
                and example.chosen_score is not None
                and example.rejected_score is not None
                and example.chosen_score - example.rejected_score < min_score_gap
            ):
                report.filtered_score_gap += 1
                continue
            examples.append(example)
    report.kept = len(examples)
    return examples, report


def split_eval_examples(
    examples: Sequence[PreferenceExample], fraction: float, seed: int
) -> tuple[list[PreferenceExample], list[PreferenceExample]]:
    """``(train, eval)``: ``round(fraction * n)`` pairs (at least one) held out for evaluation, chosen
    by a private generator seeded with ``seed`` (the global RNG is not touched); both keep the file
    order. :class:`DataError` when no training pair would be left."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction: must be in (0, 1), got {fraction}")
    n = len(examples)
    n_eval = max(1, round(fraction * n))
    if n_eval >= n:
        raise DataError(
            f"data.eval_split: {fraction} of {n} pairs holds out {n_eval}, leaving none to train on"
        )
    generator = torch.Generator().manual_seed(seed)
    held_out = set(torch.randperm(n, generator=generator)[:n_eval].tolist())
    train = [ex for i, ex in enumerate(examples) if i not in held_out]
    evaluation = [ex for i, ex in enumerate(examples) if i in held_out]
    return train, evaluation


# ---------------------------------------------------------------------------------------------
# Media checks (videos: synpo.pairs.video) and images (PIL).
# ---------------------------------------------------------------------------------------------


def _check_video(path: str | os.PathLike) -> None:
    """Open and probe a video up front; :class:`DataError` if unusable."""
    from synpo.pairs.video import VideoError, probe

    try:
        probe(path)
    except VideoError as exc:
        raise DataError(f"cannot open video: {exc}") from exc


def _load_images(paths: Sequence[str]) -> list:
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"{path}: cannot read image ({exc})") from exc
    return images


# ---------------------------------------------------------------------------------------------
# Tokenization.
# ---------------------------------------------------------------------------------------------


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
    A video is shown as the frames :func:`synpo.pairs.video.sample_video` picks with ``fps``,
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
        if example.video is not None:
            from synpo.pairs.video import VideoError, sample_video

            try:
                sample = sample_video(
                    example.video, fps=self.fps, min_frames=self.min_frames, max_frames=self.max_frames
                )
            except VideoError as exc:
                raise DataError(f"cannot decode video: {exc}") from exc
            return sample.frames
        return _load_images(example.images)

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


class PreferenceDataset(torch.utils.data.Dataset):
    """Examples encoded by a :class:`PairEncoder`.

    Text-only data is tokenized up front (so truncation counts and dropped pairs are known before
    training and indices are stable). Pairs with media are encoded on access (frame decoding is
    costly); their media files are opened and checked here, before training, so that a bad file is
    reported as ``file:line`` up front (or, with ``on_error="skip"``, dropped and counted) rather
    than failing mid-epoch. A lazily encoded pair that still fails, or whose prompt cannot fit, comes
    back as ``None`` and the collator drops it (counted).
    """

    def __init__(
        self, examples: Sequence[PreferenceExample], encoder: PairEncoder, *, on_error: str = "raise"
    ):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error: must be 'raise' or 'skip', got {on_error!r}")
        self.encoder = encoder
        self.on_error = on_error
        self.media_skipped = 0
        lazy = encoder.supports_media and any(ex.has_media for ex in examples)
        self.lazy = lazy
        if lazy:
            self.examples = [ex for ex in examples if self._media_ok(ex)]
            self.encoded: list[EncodedPair] | None = None
        else:
            self.examples = []
            self.encoded = []
            for example in examples:
                pair = encoder.encode(example, index=len(self.encoded))
                if pair is not None:
                    self.examples.append(example)
                    self.encoded.append(pair)

    def _media_ok(self, example: PreferenceExample) -> bool:
        try:
            for path in [example.video] if example.video else []:
                _check_video(path)
            if example.images:
                _load_images(example.images)
        except DataError as exc:
            if self.on_error == "raise":
                raise DataError(f"{example.source}: {exc}") from exc
            self.media_skipped += 1
            return False
        return True

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> EncodedPair | None:
        if self.encoded is not None:
            return self.encoded[index]
        try:
            return self.encoder.encode(self.examples[index], index=index)
        except DataError:
            if self.on_error == "raise":
                raise
            return None  # dropped by the collator, counted as a dropped pair

    def fingerprint(self) -> str:
        """A hash of the examples and token ids (text data) for keying cached reference log-probs."""
        digest = hashlib.sha256()
        for i, example in enumerate(self.examples):
            digest.update(
                json.dumps(
                    [example.prompt, example.chosen, example.rejected, example.video, list(example.images)]
                ).encode()
            )
            if self.encoded is not None:
                pair = self.encoded[i]
                digest.update(json.dumps([pair.prompt_ids, pair.chosen_ids, pair.rejected_ids]).encode())
        return digest.hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# Order of micro-batches: deterministic per (seed, epoch), split across ranks, resumable.
# ---------------------------------------------------------------------------------------------


class PairBatchPlan:
    """Which pairs each rank's micro-batches hold, for every optimizer step of every epoch.

    Per epoch the pairs are permuted with a generator seeded by ``seed + epoch`` and cut into global
    micro-batches of ``micro_batch_size``. Optimizer step ``s`` consumes global micro-batches
    ``[s*A*W, (s+1)*A*W)`` (A = accumulation steps, W = world size); rank ``r`` takes every W-th one
    from offset ``r``. So one process with accumulation ``A*W`` sees exactly the same pairs per
    optimizer step as W ranks with accumulation A, and resuming at ``(epoch, step)`` needs no replay.
    Micro-batches that do not fill a whole optimizer step at the end of an epoch are not used.
    """

    def __init__(
        self,
        num_pairs: int,
        *,
        micro_batch_size: int,
        gradient_accumulation_steps: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ):
        for name, value in (
            ("micro_batch_size", micro_batch_size),
            ("gradient_accumulation_steps", gradient_accumulation_steps),
            ("world_size", world_size),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive int, got {value!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: must be in [0, {world_size}), got {rank}")
        self.num_pairs = num_pairs
        self.micro_batch_size = micro_batch_size
        self.accumulation = gradient_accumulation_steps
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        per_step = micro_batch_size * gradient_accumulation_steps * world_size
        self.pairs_per_step = per_step
        self.steps_per_epoch = num_pairs // per_step
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"data: {num_pairs} pairs cannot fill one optimizer step of {per_step} pairs "
                f"(micro_batch_size {micro_batch_size} x accumulation {gradient_accumulation_steps} "
                f"x world size {world_size}); use more data or a smaller batch"
            )
        self.unused_pairs_per_epoch = num_pairs - self.steps_per_epoch * per_step

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_pairs))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_pairs, generator=generator).tolist()

    def step_micro_batches(self, epoch: int, step: int, order: list[int] | None = None) -> list[list[int]]:
        """This rank's ``A`` micro-batches (lists of pair indices) for optimizer step ``step``."""
        order = self._order(epoch) if order is None else order
        m = self.micro_batch_size
        first = step * self.accumulation * self.world_size
        batches = []
        for a in range(self.accumulation):
            g = first + a * self.world_size + self.rank
            batches.append(order[g * m : (g + 1) * m])
        return batches

    def micro_batches(self, epoch: int, start_step: int = 0) -> Iterator[list[int]]:
        """This rank's micro-batches for ``epoch`` from optimizer step ``start_step`` on."""
        order = self._order(epoch)
        for step in range(start_step, self.steps_per_epoch):
            yield from self.step_micro_batches(epoch, step, order)


# ---------------------------------------------------------------------------------------------
# Collation.
# ---------------------------------------------------------------------------------------------


class PreferenceCollator:
    """Builds a ``[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]`` batch from encoded pairs.

    Padded (default): ``input_ids``/``attention_mask``/``labels`` of shape ``(2B, T)``, right-padded.
    Packed (``pack=True``): all 2B sequences in one row ``(1, S)`` with ``position_ids`` restarting
    at 0 per sequence and no attention mask; transformers then keeps attention within each sequence
    (flash-attention varlen, or a block-diagonal mask for sdpa/eager).

    Either way ``response_index`` ``(2B, L)`` indexes the flattened ``(rows*T, D)`` hidden states at
    each sequence's last prompt position and its response positions, and ``response_labels`` holds
    the matching labels (-100 at the prompt position and at padding): the fused loss reads only these
    windows, so prompt and video tokens never reach the lm_head GEMM.
    """

    def __init__(self, pad_token_id: int, *, pack: bool = False):
        if not isinstance(pad_token_id, int):
            raise TypeError(f"pad_token_id: expected an int, got {pad_token_id!r}")
        self.pad_token_id = pad_token_id
        self.pack = pack

    def __call__(self, pairs: Sequence[EncodedPair | None]) -> dict[str, Any]:
        requested = len(pairs)
        pairs = [p for p in pairs if p is not None]
        if not pairs:
            return {"empty": True, "dropped_pairs": requested}
        rows = [(p, p.chosen_ids) for p in pairs] + [(p, p.rejected_ids) for p in pairs]
        sequences = [p.prompt_ids + resp for p, resp in rows]
        prompt_lens = [len(p.prompt_ids) for p, _ in rows]
        lengths = [len(s) for s in sequences]
        n_rows = len(rows)
        extra_keys = sorted({k for p in pairs for k in p.prompt_token_extras})

        if self.pack:
            total = sum(lengths)
            width = total
            input_ids = torch.tensor([[t for s in sequences for t in s]], dtype=torch.long)
            position_ids = torch.tensor([[i for n in lengths for i in range(n)]], dtype=torch.long)
            starts = [sum(lengths[:i]) for i in range(n_rows)]
            labels = torch.full((1, total), IGNORE_INDEX, dtype=torch.long)
            for (_p, resp), start, plen in zip(rows, starts, prompt_lens):
                labels[0, start + plen : start + plen + len(resp)] = torch.tensor(resp, dtype=torch.long)
            batch: dict[str, Any] = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
            for key in extra_keys:
                values = [
                    v
                    for (p, resp) in rows
                    for v in p.prompt_token_extras.get(key, [0] * len(p.prompt_ids)) + [0] * len(resp)
                ]
                batch[key] = torch.tensor([values], dtype=torch.long)
        else:
            width = max(lengths)
            input_ids = torch.full((n_rows, width), self.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((n_rows, width), dtype=torch.long)
            labels = torch.full((n_rows, width), IGNORE_INDEX, dtype=torch.long)
            for r, ((_p, resp), seq, plen) in enumerate(zip(rows, sequences, prompt_lens)):
                input_ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                attention_mask[r, : len(seq)] = 1
                labels[r, plen : len(seq)] = torch.tensor(resp, dtype=torch.long)
            starts = [r * width for r in range(n_rows)]
            batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
            for key in extra_keys:
                values = torch.zeros((n_rows, width), dtype=torch.long)
                for r, (p, _resp) in enumerate(rows):
                    extra = p.prompt_token_extras.get(key)
                    if extra:
                        values[r, : len(extra)] = torch.tensor(extra, dtype=torch.long)
                batch[key] = values

        # Response windows: from the last prompt position (its output scores the first response
        # token) to the sequence end; the loss shifts labels by one inside the window.
        window_starts = [max(plen - 1, 0) for plen in prompt_lens]
        window_lens = [n - s for n, s in zip(lengths, window_starts)]
        window = max(window_lens)
        response_index = torch.zeros((n_rows, window), dtype=torch.long)
        response_labels = torch.full((n_rows, window), IGNORE_INDEX, dtype=torch.long)
        flat_labels = labels.reshape(-1)
        for r in range(n_rows):
            first = starts[r] + window_starts[r]
            idx = torch.arange(first, first + window_lens[r], dtype=torch.long)
            response_index[r, : window_lens[r]] = idx
            response_labels[r, : window_lens[r]] = flat_labels[idx]
            # Padding positions point at the row's first window position; their labels stay -100.
            response_index[r, window_lens[r] :] = first
        batch["response_index"] = response_index
        batch["response_labels"] = response_labels

        vision_keys = sorted({k for p in pairs for k in p.vision_inputs})
        for key in vision_keys:
            # Row order is [chosen...; rejected...] and the model matches image features to image
            # tokens in that order, so the media go in that order too (text-only pairs have none).
            per_pair = [p.vision_inputs[key] for p in pairs if key in p.vision_inputs]
            batch[key] = torch.cat(per_pair + per_pair, dim=0)

        batch["example_index"] = torch.tensor([p.index for p in pairs], dtype=torch.long)
        batch["num_tokens"] = int(sum(lengths))
        batch["num_response_tokens"] = int(sum(len(resp) for _p, resp in rows))
        batch["truncated_rows"] = int(sum(p.truncated_rows for p in pairs))
        batch["tokens_cut"] = int(sum(p.tokens_cut for p in pairs))
        batch["padded_width"] = width
        batch["dropped_pairs"] = requested - len(pairs)
        return batch
