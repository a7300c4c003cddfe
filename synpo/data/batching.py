"""From encoded pairs to training batches: the dataset, the deterministic and resumable order of
micro-batches per rank (:class:`PairBatchPlan`), and the collator (``[chosen; rejected]`` rows, padded or
packed, plus the response windows the fused loss reads)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import torch

from synpo.data.encode import EncodedPair, PairEncoder
from synpo.data.media import check_video, load_images
from synpo.data.records import DataError, PreferenceExample
from synpo.prefix_sharing import SEGMENTS_KEY

IGNORE_INDEX = -100  # label of positions that are not learned (prompt, padding)

__all__ = [
    "IGNORE_INDEX",
    "PairBatchPlan",
    "PreferenceCollator",
    "PreferenceDataset",
    "SharedPair",
    "response_windows",
    "shared_prefix_batch",
]


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
                check_video(path)
            if example.images:
                load_images(example.images)
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


@dataclass
class PairBatchPlan:
    """Which pairs each rank's micro-batches hold, for every optimizer step of every epoch.

    Per epoch the pairs are permuted with a generator seeded by ``seed + epoch`` and cut into global
    micro-batches of ``micro_batch_size``. Optimizer step ``s`` consumes global micro-batches
    ``[s*A*W, (s+1)*A*W)`` (A = accumulation steps, W = world size); rank ``r`` takes every W-th one
    from offset ``r``. So one process with accumulation ``A*W`` sees exactly the same pairs per
    optimizer step as W ranks with accumulation A, and resuming at ``(epoch, step)`` needs no replay.
    Micro-batches that do not fill a whole optimizer step at the end of an epoch are not used.
    """

    num_pairs: int
    _: KW_ONLY
    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int = 1
    rank: int = 0
    seed: int = 0
    shuffle: bool = True
    # Derived: pairs one optimizer step consumes (all ranks), whole steps per epoch, the epoch's rest.
    pairs_per_step: int = field(init=False)
    steps_per_epoch: int = field(init=False)
    unused_pairs_per_epoch: int = field(init=False)

    def __post_init__(self):
        for name in ("micro_batch_size", "gradient_accumulation_steps", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive int, got {value!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank: must be in [0, {self.world_size}), got {self.rank}")
        self.pairs_per_step = self.micro_batch_size * self.gradient_accumulation_steps * self.world_size
        self.steps_per_epoch = self.num_pairs // self.pairs_per_step
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"data: {self.num_pairs} pairs cannot fill one optimizer step of {self.pairs_per_step} "
                f"pairs (micro_batch_size {self.micro_batch_size} x accumulation "
                f"{self.gradient_accumulation_steps} x world size {self.world_size}); "
                "use more data or a smaller batch"
            )
        self.unused_pairs_per_epoch = self.num_pairs - self.steps_per_epoch * self.pairs_per_step

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_pairs))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_pairs, generator=generator).tolist()

    def step_micro_batches(self, epoch: int, step: int, order: list[int] | None = None) -> list[list[int]]:
        """This rank's ``A`` micro-batches (lists of pair indices) for optimizer step ``step``."""
        order = self._order(epoch) if order is None else order
        m = self.micro_batch_size
        first = step * self.gradient_accumulation_steps * self.world_size
        batches = []
        for a in range(self.gradient_accumulation_steps):
            g = first + a * self.world_size + self.rank
            batches.append(order[g * m : (g + 1) * m])
        return batches

    def micro_batches(self, epoch: int, start_step: int = 0) -> Iterator[list[int]]:
        """This rank's micro-batches for ``epoch`` from optimizer step ``start_step`` on."""
        order = self._order(epoch)
        for step in range(start_step, self.steps_per_epoch):
            yield from self.step_micro_batches(epoch, step, order)


class PreferenceCollator:
    """Builds a ``[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]`` batch from encoded pairs.

    Padded (default): ``input_ids``/``attention_mask``/``labels`` of shape ``(2B, T)``, right-padded.
    Packed (``pack=True``): all 2B sequences in one row ``(1, S)`` with ``position_ids`` restarting
    at 0 per sequence and no attention mask; transformers then keeps attention within each sequence
    (flash-attention varlen, or a block-diagonal mask for sdpa/eager).

    Shared prefix (``prefix_sharing=True``): one ``[prompt, chosen, rejected]`` segment per pair
    (a row each, or all in one row with ``pack``), ``position_ids`` restarting after the prompt for the
    rejected tokens, and ``prefix_sharing_segments`` for the attention of :mod:`synpo.prefix_sharing`
    (the model must have it enabled); images and video frames go in once per pair.

    Either way ``response_index`` ``(2B, L)`` indexes the flattened ``(rows*T, D)`` hidden states at
    each sequence's last prompt position and its response positions, and ``response_labels`` holds
    the matching labels (-100 at the prompt position and at padding): the fused loss reads only these
    windows, so prompt and video tokens never reach the lm_head GEMM. Shared or not, the windows of a
    pair hold the same positions' states: the first token of both responses is scored from the one
    last prompt position.
    """

    def __init__(self, pad_token_id: int, *, pack: bool = False, prefix_sharing: bool = False):
        if not isinstance(pad_token_id, int):
            raise TypeError(f"pad_token_id: expected an int, got {pad_token_id!r}")
        self.pad_token_id = pad_token_id
        self.pack = pack
        self.prefix_sharing = prefix_sharing

    def __call__(self, pairs: Sequence[EncodedPair | None]) -> dict[str, Any]:
        requested = len(pairs)
        pairs = [p for p in pairs if p is not None]
        if not pairs:
            return {"empty": True, "dropped_pairs": requested}
        if self.prefix_sharing:
            shared = [
                SharedPair(p.prompt_ids, p.chosen_ids, p.rejected_ids, prompt_extras=p.prompt_token_extras)
                for p in pairs
            ]
            batch = shared_prefix_batch(shared, self.pad_token_id, pack=self.pack)
            return self._finish(batch, pairs, requested)
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

        batch["num_tokens"] = int(sum(lengths))
        batch["padded_width"] = width
        return self._finish(batch, pairs, requested)

    @staticmethod
    def _finish(batch: dict[str, Any], pairs: list[EncodedPair], requested: int) -> dict[str, Any]:
        shared = SEGMENTS_KEY in batch
        vision_keys = sorted({k for p in pairs for k in p.vision_inputs})
        for key in vision_keys:
            # Row order is [chosen...; rejected...] (or one segment per pair) and the model matches
            # image features to image tokens in that order, so the media go in that order too.
            per_pair = [p.vision_inputs[key] for p in pairs if key in p.vision_inputs]
            batch[key] = torch.cat(per_pair if shared else per_pair + per_pair, dim=0)
        batch["example_index"] = torch.tensor([p.index for p in pairs], dtype=torch.long)
        batch["num_response_tokens"] = int(sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs))
        batch["truncated_rows"] = int(sum(p.truncated_rows for p in pairs))
        batch["tokens_cut"] = int(sum(p.tokens_cut for p in pairs))
        batch["dropped_pairs"] = requested - len(pairs)
        return batch


@dataclass
class SharedPair:
    """One pair for :func:`shared_prefix_batch`: the shared ``prefix`` and what follows it per response.

    ``chosen_label_start``/``rejected_label_start``: where the learned tokens begin in each tail (0
    when the prefix is the whole prompt). A pair whose responses do not continue one prompt token for
    token has an empty ``prefix`` and its two full sequences as tails, learned from their own prompt
    length on: no saving, still exact.
    """

    prefix: list[int]
    chosen: list[int]
    rejected: list[int]
    chosen_label_start: int = 0
    rejected_label_start: int = 0
    prompt_extras: dict[str, list[int]] = field(default_factory=dict)


def shared_prefix_batch(pairs: Sequence[SharedPair], pad_token_id: int, *, pack: bool = False) -> dict:
    """Model inputs and response windows of ``[prefix, chosen, rejected]`` segments (see
    :mod:`synpo.prefix_sharing`): ``input_ids``, ``position_ids`` (rejected restarts after the
    prefix), ``attention_mask`` (padded rows; none when packed), ``labels``, ``prefix_sharing_segments``,
    ``response_index``/``response_labels`` (rows ``[chosen...; rejected...]`` as the unshared batch),
    ``num_tokens`` and ``padded_width``."""
    lengths = [len(p.prefix) + len(p.chosen) + len(p.rejected) for p in pairs]
    n = len(pairs)
    if pack:
        starts = [(0, sum(lengths[:i])) for i in range(n)]
        shape = (1, sum(lengths))
    else:
        starts = [(i, 0) for i in range(n)]
        shape = (n, max(lengths))
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    extra_keys = sorted({k for p in pairs for k in p.prompt_extras})
    extras = {key: torch.zeros(shape, dtype=torch.long) for key in extra_keys}
    segments, windows = [], [[], []]
    for p, (row, start), length in zip(pairs, starts, lengths):
        P, C, R = len(p.prefix), len(p.chosen), len(p.rejected)
        input_ids[row, start : start + length] = torch.tensor(
            p.prefix + p.chosen + p.rejected, dtype=torch.long
        )
        position_ids[row, start : start + P + C] = torch.arange(P + C)
        position_ids[row, start + P + C : start + length] = torch.arange(P, P + R)
        for key in extra_keys:
            values = p.prompt_extras.get(key)
            if values:
                extras[key][row, start : start + len(values)] = torch.tensor(values, dtype=torch.long)
        segments.append([row, start, P, C, R])
        flat = row * shape[1] + start
        for side, (tail, base, label_start) in enumerate(
            ((p.chosen, P, p.chosen_label_start), (p.rejected, P + C, p.rejected_label_start))
        ):
            learned = tail[label_start:]
            labels[row, start + base + label_start : start + base + len(tail)] = torch.tensor(
                learned, dtype=torch.long
            )
            # The position whose output scores the first learned token: the tail's own previous
            # position, or (learning from the tail's start) the prefix's last position.
            if label_start > 0:
                before = base + label_start - 1
            elif P > 0:
                before = P - 1
            else:  # no prompt at all: nothing scores the first token (as in the unshared rows)
                before = base
                learned = learned[1:]
            window = [flat + before] + [flat + base + t for t in range(len(tail) - len(learned), len(tail))]
            windows[side].append((window, [IGNORE_INDEX, *learned]))
    rows = windows[0] + windows[1]
    width = max(len(w) for w, _ in rows)
    response_index = torch.zeros((2 * n, width), dtype=torch.long)
    response_labels = torch.full((2 * n, width), IGNORE_INDEX, dtype=torch.long)
    for r, (window, window_labels) in enumerate(rows):
        response_index[r, : len(window)] = torch.tensor(window, dtype=torch.long)
        response_index[r, len(window) :] = window[0]
        response_labels[r, : len(window_labels)] = torch.tensor(window_labels, dtype=torch.long)
    batch: dict[str, Any] = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
    if not pack:
        batch["attention_mask"] = (torch.arange(shape[1])[None, :] < torch.tensor(lengths)[:, None]).long()
    batch.update(extras)
    batch[SEGMENTS_KEY] = torch.tensor(segments, dtype=torch.long)
    batch["response_index"] = response_index
    batch["response_labels"] = response_labels
    batch["num_tokens"] = int(sum(lengths))
    batch["padded_width"] = shape[1]
    return batch


def response_windows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``response_index`` / ``response_labels`` of a padded ``(rows, T)`` batch, from its labels alone.

    What :class:`PreferenceCollator` builds for the rows it pads (the TRL integration gets its batches
    from TRL's collator): each row's window runs from the position before its first label (whose output
    scores that label) to its last label; windows shorter than the longest repeat their first position
    with ``IGNORE_INDEX`` labels. A row without labels gets a one-position window that scores nothing.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels: expected shape (rows, T), got {tuple(labels.shape)}")
    rows, width = labels.shape
    scored = labels != IGNORE_INDEX
    positions = torch.arange(width, device=labels.device)
    any_scored = scored.any(dim=1)
    first = torch.where(scored, positions, width).amin(dim=1)
    last = torch.where(scored, positions, -1).amax(dim=1)
    start = torch.where(any_scored, (first - 1).clamp(min=0), 0)
    length = torch.where(any_scored, last + 1 - start, 1)
    offsets = torch.arange(int(length.max()), device=labels.device)
    inside = offsets[None, :] < length[:, None]
    index = start[:, None] + torch.where(inside, offsets[None, :], 0)
    index = index + torch.arange(rows, device=labels.device)[:, None] * width
    window_labels = labels.reshape(-1)[index].masked_fill(~inside, IGNORE_INDEX)
    return index, window_labels
