"""synpo.data: readers (both formats, score-gap filter, malformed lines), tokenization and truncation,
collation (padded and packed, response windows), the micro-batch plan, and the encoder's video frames."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from synpo.data.batching import (
    IGNORE_INDEX,
    PairBatchPlan,
    PreferenceCollator,
    PreferenceDataset,
    response_windows,
)
from synpo.data.encode import PairEncoder
from synpo.data.records import SAMPLE_PAIRS_PATH, DataError, PreferenceExample, read_preference_jsonl
from synpo.tiny import build_tiny_causal_lm, build_tiny_tokenizer


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_tiny_tokenizer()
    tok.padding_side = "right"
    return tok


def test_reads_both_formats_and_filters_by_score_gap(tmp_path):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not decoded here")
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "Describe.", "chosen": "A cat runs.", "rejected": "A dog sits.", "chosen_score": 9,
             "rejected_score": 3, "id": 7},
            {"video_name": "clip.mp4", "pos_pre": "Good caption.", "neg_pre": "Bad caption.",
             "pos_score": 12.5, "neg_score": 8.6},  # gap 3.9 < 4: filtered
            {"video_name": "clip.mp4", "pos_pre": "Good caption.", "neg_pre": "Bad caption.",
             "pos_score": 12.0, "neg_score": 8.0},
            "",
            {"prompt": "Describe.", "chosen": "x", "rejected": "y"},  # no scores: kept
            {"prompt": "p", "chosen": "c", "rejected": "r", "chosen_score": 1, "rejected_score": -100},
        ],
    )  # fmt: skip
    examples, report = read_preference_jsonl(path, default_prompt="Caption this video.")
    assert (report.lines, report.kept, report.filtered_score_gap, report.malformed_skipped) == (5, 4, 1, 0)
    upstream = examples[1]
    assert upstream.prompt == "Caption this video."
    assert upstream.chosen == "Good caption." and upstream.video == str(video)
    assert (upstream.chosen_score, upstream.rejected_score) == (12.0, 8.0)
    assert examples[0].id == "7" and examples[0].source == f"{path}:1"
    # Without the filter every pair is kept.
    _, report = read_preference_jsonl(path, min_score_gap=None)
    assert report.kept == 5


def test_bundled_sample_has_both_formats_and_filtered_pairs():
    lines = SAMPLE_PAIRS_PATH.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert 24 <= len(records) <= 100
    assert any("pos_pre" in r for r in records) and any("chosen" in r for r in records)
    examples, report = read_preference_jsonl(SAMPLE_PAIRS_PATH)
    assert report.filtered_score_gap > 0 and report.kept == len(examples) > 20


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "p", "chosen": "c", "rejected": ', "invalid JSON"),
        ('{"prompt": "p", "chosen": "c"}', "missing field 'rejected'"),
        ('{"prompt": "p", "chosen": 3, "rejected": "r"}', "field 'chosen' must be a string"),
        ('{"prompt": "p", "chosen": "  ", "rejected": "r"}', "field 'chosen' is empty"),
        ('["not", "an", "object"]', "expected a JSON object"),
        ('{"prompt": "p", "chosen": "c", "rejected": "r", "video": "missing.mp4"}', "video file not found"),
        ('{"prompt": "p", "chosen": "c", "rejected": "r", "chosen_score": "high"}', "'chosen_score' must be"),
        ('{"pos_pre": "c", "neg_pre": "r", "pos_score": true}', "'pos_score' must be"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, line, good])
    with pytest.raises(DataError) as info:
        read_preference_jsonl(path)
    assert f"{path}:3" in str(info.value) and message in str(info.value)
    examples, report = read_preference_jsonl(path, on_error="skip")
    assert len(examples) == 3 and report.malformed_skipped == 1
    assert message in report.first_errors[0] and "1 malformed skipped" in report.summary()


def test_invalid_utf8_is_a_data_error(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b'{"prompt": "p", "chosen": "c", "rejected": "r"}\n\xff\xfe\n')
    with pytest.raises(DataError, match="not valid UTF-8"):
        read_preference_jsonl(path)


def test_encoder_masks_prompt_and_uses_the_chat_template(tokenizer):
    encoder = PairEncoder(tokenizer, max_length=512)
    example = PreferenceExample(prompt="Describe the video.", chosen="A cat runs.", rejected="A dog.")
    pair = encoder.encode(example, index=0)
    prompt_text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Describe the video."}], add_generation_prompt=True, tokenize=False
    )
    assert tokenizer.decode(pair.prompt_ids) == prompt_text
    assert tokenizer.decode(pair.chosen_ids) == " A cat runs.</s>"  # the template's end of turn
    assert pair.chosen_ids[-1] == tokenizer.eos_token_id
    batch = PreferenceCollator(tokenizer.pad_token_id)([pair])
    labels = batch["labels"]
    n_prompt = len(pair.prompt_ids)
    assert (labels[:, :n_prompt] == IGNORE_INDEX).all()
    assert labels[0, n_prompt : n_prompt + len(pair.chosen_ids)].tolist() == pair.chosen_ids
    assert labels[1, n_prompt : n_prompt + len(pair.rejected_ids)].tolist() == pair.rejected_ids
    assert (
        batch["input_ids"][1, len(pair.prompt_ids) + len(pair.rejected_ids) :]
        .eq(tokenizer.pad_token_id)
        .all()
    )


def test_plain_template_without_chat_template(tokenizer):
    plain = PairEncoder(tokenizer, template="plain")
    pair = plain.encode(PreferenceExample(prompt="Hi?", chosen="Yes.", rejected="No."), index=0)
    text = tokenizer.decode(pair.prompt_ids)
    assert text.endswith("USER: Hi? ASSISTANT:") and "A chat between" in text
    assert pair.chosen_ids[-1] == tokenizer.eos_token_id


def test_truncation_is_counted(tokenizer):
    long_response = " ".join(["the red square moves to the right"] * 20)
    example = PreferenceExample(prompt="Describe.", chosen=long_response, rejected="Short.")
    full = PairEncoder(tokenizer, max_length=4096).encode(example, 0)
    limit = len(full.prompt_ids) + 10
    encoder = PairEncoder(tokenizer, max_length=limit)
    pair = encoder.encode(example, 0)
    assert len(pair.prompt_ids) + len(pair.chosen_ids) == limit
    assert pair.truncated_rows == 1 and pair.tokens_cut == len(full.chosen_ids) - 10
    assert pair.rejected_ids == full.rejected_ids
    # A prompt longer than max_prompt_length keeps its end (the request and the assistant tag).
    encoder = PairEncoder(tokenizer, max_length=limit, max_prompt_length=8)
    cut = encoder.encode(example, 0)
    assert cut.prompt_ids == full.prompt_ids[-8:]
    assert encoder.stats.truncated_rows == 2 + 1  # prompt of both rows; the long response is not cut
    # A prompt that leaves no room for a response token drops the pair, counted.
    encoder = PairEncoder(tokenizer, max_length=len(full.prompt_ids))
    assert encoder.encode(example, 0) is None
    assert encoder.stats.dropped_too_long == 1
    dataset = PreferenceDataset([example, example], encoder)
    assert len(dataset) == 0 and encoder.stats.dropped_too_long == 3


def _pairs(tokenizer, n=3):
    encoder = PairEncoder(tokenizer, max_length=512)
    texts = ["A cat runs across the grass.", "A dog.", "The red square moves to the left side of the frame."]
    return [
        encoder.encode(
            PreferenceExample(
                prompt=f"Describe clip {i}." + " Details." * i,
                chosen=texts[i % 3],
                rejected=texts[(i + 1) % 3],
            ),
            index=i,
        )
        for i in range(n)
    ]


def test_response_windows_select_exactly_the_scored_positions(tokenizer):
    from synpo_kernels.reference import preference_loss_ref

    pairs = _pairs(tokenizer)
    batch = PreferenceCollator(tokenizer.pad_token_id)(pairs)
    rows, width = batch["input_ids"].shape
    dim, vocab = 8, len(tokenizer)
    hidden = torch.randn(rows, width, dim, dtype=torch.float64)
    weight = torch.randn(vocab, dim, dtype=torch.float64)
    full = preference_loss_ref(hidden @ weight.T, batch["labels"], loss="synpo")
    windows = hidden.reshape(-1, dim)[batch["response_index"]]
    windowed = preference_loss_ref(windows @ weight.T, batch["response_labels"], loss="synpo")
    torch.testing.assert_close(windowed, full)
    # The window is the longest response plus one prompt position, not the whole padded row.
    longest = max(max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    assert batch["response_index"].shape[1] == longest + 1 < width
    # The same windows from the padded labels alone (what the TRL integration has).
    index, labels = response_windows(batch["labels"])
    assert torch.equal(index, batch["response_index"]) and torch.equal(labels, batch["response_labels"])


def test_response_windows_from_labels_edge_rows():
    """A response at position 0 (nothing scores it), a gap, a row without labels, a row ending in padding."""
    x = IGNORE_INDEX
    labels = torch.tensor(
        [
            [7, 8, 9, x, x, x],  # no prompt: the window starts at 0, label 7 is dropped by the shift
            [x, x, 4, x, 5, x],  # an ignored position inside the response stays inside the window
            [x, x, x, x, x, x],  # no labels: one position, scoring nothing
            [x, x, x, x, x, 6],
        ]
    )
    index, window = response_windows(labels)
    assert index.tolist() == [[0, 1, 2, 0], [7, 8, 9, 10], [12, 12, 12, 12], [22, 23, 22, 22]]
    assert window.tolist() == [[7, 8, 9, x], [x, 4, x, 5], [x, x, x, x], [x, 6, x, x]]
    with pytest.raises(ValueError, match="labels: expected shape"):
        response_windows(labels[0])


def test_packed_batch_gives_the_same_hidden_states_as_padded(tokenizer):
    model, _ = build_tiny_causal_lm(tokenizer, seed=3)
    pairs = _pairs(tokenizer)
    padded = PreferenceCollator(tokenizer.pad_token_id)(pairs)
    packed = PreferenceCollator(tokenizer.pad_token_id, pack=True)(pairs)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert packed["input_ids"].shape[1] == padded["attention_mask"].sum()
    torch.testing.assert_close(packed["response_labels"], padded["response_labels"])
    with torch.no_grad():
        # use_cache=False as in training: with a cache, transformers does not detect packed rows.
        h_pad = model.model(
            input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False
        ).last_hidden_state
        h_pack = model.model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
        ).last_hidden_state
    mask = padded["response_labels"] != IGNORE_INDEX
    win_pad = h_pad.reshape(-1, h_pad.shape[-1])[padded["response_index"]][mask]
    win_pack = h_pack.reshape(-1, h_pack.shape[-1])[packed["response_index"]][mask]
    torch.testing.assert_close(win_pack, win_pad, atol=1e-5, rtol=1e-4)


def test_collator_drops_missing_pairs_and_reports_empty(tokenizer):
    pairs = _pairs(tokenizer, 2)
    collate = PreferenceCollator(tokenizer.pad_token_id)
    batch = collate([pairs[0], None, pairs[1]])
    assert batch["dropped_pairs"] == 1 and batch["input_ids"].shape[0] == 4
    assert batch["example_index"].tolist() == [0, 1]
    assert collate([None, None]) == {"empty": True, "dropped_pairs": 2}
    with pytest.raises(TypeError, match="pad_token_id"):
        PreferenceCollator(None)


def test_batch_plan_splits_ranks_like_accumulation():
    single = PairBatchPlan(50, micro_batch_size=2, gradient_accumulation_steps=4, seed=5)
    ranks = [
        PairBatchPlan(50, micro_batch_size=2, gradient_accumulation_steps=2, world_size=2, rank=r, seed=5)
        for r in range(2)
    ]
    assert single.steps_per_epoch == ranks[0].steps_per_epoch == 6 and single.unused_pairs_per_epoch == 2
    for epoch in range(2):
        for step in range(single.steps_per_epoch):
            merged = sorted(i for plan in ranks for mb in plan.step_micro_batches(epoch, step) for i in mb)
            assert merged == sorted(i for mb in single.step_micro_batches(epoch, step) for i in mb)
    # Resuming at a step yields exactly the tail of the epoch.
    whole = list(single.micro_batches(1))
    assert list(single.micro_batches(1, start_step=4)) == whole[4 * 4 :]
    assert list(single.micro_batches(0)) != whole  # epochs are shuffled differently
    with pytest.raises(ValueError, match="cannot fill one optimizer step"):
        PairBatchPlan(3, micro_batch_size=2, gradient_accumulation_steps=2)


def write_video(path, *, seconds: float, fps: int = 8, size: int = 32):
    """A tiny H.264 video whose frame i is a flat gray level i (so frames can be told apart)."""
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(int(seconds * fps)):
            image = np.full((size, size, 3), (i * 5) % 256, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_encoder_samples_video_frames_with_the_pairs_sampler(tmp_path, tokenizer):
    # The sampler itself (synpo.video.sample_video) is tested in test_pairs_video.py and
    # test_video_sampling.py; here: the encoder's settings reach it and errors name the file.
    encoder = PairEncoder(tokenizer, fps=0.5, min_frames=4, max_frames=16)
    video = write_video(tmp_path / "v.mp4", seconds=4.0)
    frames = encoder._frames(PreferenceExample("p", "c", "r", video=str(video)))
    assert [(f.shape, f.dtype) for f in frames] == [((32, 32, 3), np.uint8)] * 4  # round(2) -> min 4
    # Bin centres 0.5, 1.5, 2.5, 3.5 s at 8 fps: frames 4, 12, 20, 28, whose gray level is 5 * index.
    levels = [float(f.mean()) for f in frames]
    assert levels == pytest.approx([20, 60, 100, 140], abs=3)  # lossy codec
    with pytest.raises(DataError, match="cannot decode video: unreadable video"):
        encoder._frames(PreferenceExample("p", "c", "r", video=str(write_jsonl(tmp_path / "x.mp4", ["x"]))))
