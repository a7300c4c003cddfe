"""The vision-language path: a tiny LLaVA, frames sampled from a generated video with PyAV, vision
tower and projector frozen (and without LoRA adapters), fused loss == naive loss."""

from __future__ import annotations

import json
import re

import av
import numpy as np
import pytest
import torch

from synpo.config import LoraConfig
from synpo.data import DataError, PreferenceCollator
from synpo.models import apply_lora, freeze_vision, vision_modules, vision_parameter_prefixes
from synpo.objective import PreferenceObjective
from synpo.tiny import build_tiny_vlm
from synpo.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_video(path, *, seconds: float = 5.0, fps: int = 6, size: int = 40):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(int(seconds * fps)):
            image = np.zeros((size, size, 3), dtype=np.uint8)
            image[:, : (i * 3) % size] = (200, 40, 40)  # a red bar growing over time
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def video_pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    write_video(root / "clip.mp4")
    records = []
    for i in range(4):
        if i % 2:
            # Upstream format: video_name relative to the JSONL's directory, no prompt.
            records.append(
                {
                    "video_name": "clip.mp4",
                    "pos_pre": f"A red bar grows to the right {i}.",
                    "neg_pre": "A blue circle bounces.",
                    "pos_score": 12,
                    "neg_score": 5,
                }
            )
        else:
            records.append({"prompt": "Describe the video.", "video": "clip.mp4",
                            "chosen": "A red bar grows from the left edge.", "rejected": "Nothing happens.",
                            "chosen_score": 11, "rejected_score": 2})  # fmt: skip
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def vlm_config(output_dir, train_file, **loss) -> dict:
    return {
        "model": {"tiny": {"vision": True}},
        # 5 s at 0.5 fps -> 2 frames (clamped to [2, 4]): 2 x 16 image tokens per prompt.
        "data": {"train_file": str(train_file), "min_frames": 2, "max_frames": 4, "max_length": 256},
        "loss": loss,
        "optim": {"lr": 1e-2, "warmup_ratio": 0.0},
        "train": {"epochs": 1, "max_steps": 2, "micro_batch_size": 2, "gradient_accumulation_steps": 1},
        "checkpoint": {"output_dir": str(output_dir), "save_every": 0, "save_at_end": False},
        "logging": {"progress_bar": False},
    }


def test_vlm_trains_on_video_frames_with_frozen_vision(tmp_path, video_pairs):
    trainer = Trainer(vlm_config(tmp_path / "fused", video_pairs)).setup()
    policy = trainer.objective.policy
    prefixes = vision_parameter_prefixes(policy)
    vision = {n: p.detach().clone() for n, p in policy.named_parameters() if n.startswith(prefixes)}
    language = {n: p.detach().clone() for n, p in policy.named_parameters() if not n.startswith(prefixes)}
    assert vision and all(not p.requires_grad for n, p in policy.named_parameters() if n in vision)

    # With prefix sharing (auto: on for video pairs) one collated micro-batch carries each pair's
    # frames once, one [prompt, chosen, rejected] row per pair; unshared, both rows' frames.
    assert trainer.prefix_sharing
    batch = trainer.collator([trainer.dataset[0], trainer.dataset[1]])
    assert batch["pixel_values"].shape[0] == 2 * 2  # 2 pairs x 2 frames
    unshared = PreferenceCollator(trainer.collator.pad_token_id)([trainer.dataset[0], trainer.dataset[1]])
    assert unshared["pixel_values"].shape[0] == 2 * 2 * 2  # 2 pairs x 2 rows x 2 frames
    image_token = policy.config.image_token_index
    assert ((batch["input_ids"] == image_token).sum(dim=1) == 2 * 16).all()
    assert (batch["labels"][batch["input_ids"] == image_token] == -100).all()

    fused = trainer.train()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in fused.history)
    after = dict(policy.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in vision.items())  # frozen: untouched
    assert any(not torch.equal(after[n], v) for n, v in language.items())

    naive = Trainer(vlm_config(tmp_path / "naive", video_pairs, impl="naive")).train()
    for a, b in zip(fused.history, naive.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["chosen_logps"] == pytest.approx(b["chosen_logps"], rel=1e-4)


def test_vision_modules_and_freeze():
    model, _ = build_tiny_vlm(seed=0)
    modules = vision_modules(model)
    assert modules["vision_tower"] is model.model.vision_tower
    assert modules["projector"] is model.model.multi_modal_projector
    assert vision_parameter_prefixes(model) == ("model.vision_tower.", "model.multi_modal_projector.")
    n_vision = sum(p.numel() for m in modules.values() for p in m.parameters())
    assert freeze_vision(model) == n_vision
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith(vision_parameter_prefixes(model)) for n in trainable)
    with pytest.raises(ValueError, match="vision tower"):
        vision_modules(torch.nn.Linear(2, 2))


def test_lora_on_a_vlm_skips_the_vision_modules():
    model, _ = build_tiny_vlm(seed=0)
    prefixes = vision_parameter_prefixes(model)
    peft_model = apply_lora(model, LoraConfig(enabled=True))
    config = peft_model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (128, 64, 0.05)
    lora_names = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    assert any(".q_proj." in n for n in lora_names) and any(".down_proj." in n for n in lora_names)
    # CLIP's attention also has q/k/v projections: none of them may get an adapter.
    assert not [n for n in lora_names if any(p.rstrip(".") in n for p in prefixes)]
    assert all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match=r"lora\.target_modules"):
        apply_lora(build_tiny_vlm(seed=0)[0], LoraConfig(enabled=True, target_modules=["nope_proj"]))


def test_unreadable_video_is_reported_before_training(tmp_path, video_pairs):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 256)
    lines = video_pairs.read_text().splitlines()
    lines.append(json.dumps({"prompt": "p", "video": str(broken), "chosen": "c", "rejected": "r"}))
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    config = vlm_config(tmp_path / "run", path)
    config["data"]["media_dir"] = str(video_pairs.parent)
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:5: .*cannot open video"):
        Trainer(config).setup()
    trainer = Trainer(config, overrides={"data.on_error": "skip"}).setup()
    assert len(trainer.dataset) == 4 and trainer.dataset.media_skipped == 1


def test_a_micro_batch_may_mix_video_and_text_only_pairs(tmp_path, video_pairs):
    lines = video_pairs.read_text().splitlines()[:1]
    lines.append(json.dumps({"prompt": "Say hi.", "chosen": "Hi there.", "rejected": "No."}))
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    config = vlm_config(tmp_path / "run", path)
    config["data"]["media_dir"] = str(video_pairs.parent)
    config["train"]["micro_batch_size"] = 2
    trainer = Trainer(config).setup()
    assert trainer.prefix_sharing  # auto: on for media pairs
    batch = trainer.collator([trainer.dataset[0], trainer.dataset[1]])
    assert batch["pixel_values"].shape[0] == 2  # the video pair's 2 frames, once for its shared row
    loss, metrics = trainer.objective(**batch)
    assert torch.isfinite(loss) and metrics[0] == 2
    unshared = PreferenceCollator(trainer.collator.pad_token_id)([trainer.dataset[0], trainer.dataset[1]])
    assert unshared["pixel_values"].shape[0] == 2 * 2  # the video pair's 2 frames, for both its rows
    objective = PreferenceObjective(trainer.objective.policy)  # the model serves unshared batches as before
    unshared_loss, unshared_metrics = objective(**unshared)
    torch.testing.assert_close(loss, unshared_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics, unshared_metrics, rtol=1e-5, atol=1e-6)
