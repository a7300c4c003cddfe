"""The benchmark presets file: every preset builds, ``base:`` inherits, bad entries name themselves."""

from __future__ import annotations

import pytest

from synpo.benchmarking import kernels, presets, quality, trainer


def test_every_preset_builds_from_the_one_file():
    assert set(kernels.PRESETS) == {"smoke", "cpu", "cpu-large", "gpu"}
    assert set(trainer.PRESETS) == {"smoke", "cpu", "cpu-interleaved", "cpu-video", "prefix-sweep", "gpu"}
    assert set(quality.PRESETS) == {"smoke", "cpu"}
    for table in (kernels.PRESETS, trainer.PRESETS, quality.PRESETS):
        for name, preset in table.items():
            assert preset.name == name and preset.description
    # Every model a trainer preset runs is one of the models section's, and quality's speed model too.
    for preset in trainer.PRESETS.values():
        for spec, batch in preset.models:
            assert trainer.MODELS[spec.name] is spec and batch.tokens > 0
    assert quality.PRESETS["smoke"].speed_model in trainer.MODELS


def test_base_replaces_only_the_keys_it_lists():
    large, cpu = kernels.PRESETS["cpu-large"], kernels.PRESETS["cpu"]
    assert large.isolation == "task" and cpu.isolation == "group"
    assert (large.warmup, large.repeats, large.gemm_size, large.threads) == (
        cpu.warmup,
        cpu.repeats,
        cpu.gemm_size,
        cpu.threads,
    )
    assert large.cases != cpu.cases and large.run_impls == (kernels.OURS, "naive")
    # synpo_loss cases derive their scored tokens from rows, seq and prompt.
    video = next(c for c in large.cases if c.shape == "video")
    assert video.tokens == video.rows * (video.seq - video.prompt) == 4 * 256
    inter = trainer.PRESETS["cpu-interleaved"]
    assert inter.interleave and inter.steps == 10 and inter.threads == trainer.PRESETS["smoke"].threads
    assert quality.PRESETS["smoke"].speed_warmup == quality.PRESETS["cpu"].speed_warmup
    # Prefix-sharing presets: a method subset (checked against METHODS), video frames that fit the prompt.
    sweep, video = trainer.PRESETS["prefix-sweep"], trainer.PRESETS["cpu-video"]
    assert sweep.methods == (trainer.OURS, trainer.OURS_SHARED) and trainer.BASELINE in video.methods
    for spec, batch in video.models:
        assert spec.vision and 8 <= batch.frames <= 16 and batch.frames * spec.frame_tokens < batch.prompt


def _with_document(monkeypatch, **sections):
    document = {"models": {}, "kernels": {}, "trainer": {}, "quality": {}, **sections}
    monkeypatch.setattr(presets, "_document", lambda: document)


GOOD_CASE = {"op": "token_logprobs", "tokens": 8, "vocab": 16, "dtype": "float32"}
GOOD_KERNELS = {
    "description": "d",
    "device": "cpu",
    "cases": [GOOD_CASE],
    "warmup": 1,
    "repeats": 1,
    "isolation": "none",
    "gemm_size": 8,
    "copy_bytes": 8,
}


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ({"a": {**GOOD_KERNELS, "repeat": 3}}, r"kernels\.a: unknown keys \['repeat'\]"),
        (
            {"a": {k: v for k, v in GOOD_KERNELS.items() if k != "warmup"}},
            r"kernels\.a: missing keys \['warmup'\]",
        ),
        ({"a": {"base": "b", "warmup": 2}}, r"kernels\.a: base 'b' is not a kernels preset"),
        ({"a": {"base": "b"}, "b": {"base": "a"}}, r"kernels\.a: base chain loops: a -> b -> a"),
        (
            {"a": {**GOOD_KERNELS, "cases": [{**GOOD_CASE, "op": "nope"}]}},
            r"kernels\.a\.cases\[0\]: op must be",
        ),
        (
            {"a": {**GOOD_KERNELS, "cases": [{**GOOD_CASE, "vocabs": 1}]}},
            r"cases\[0\]: unknown keys \['vocabs'\]",
        ),
        ({"a": {**GOOD_KERNELS, "run_impls": ["nope"]}}, r"kernels\.a: unknown run_impls \['nope'\]"),
    ],
)
def test_bad_kernel_presets_name_the_entry(monkeypatch, entries, match):
    _with_document(monkeypatch, kernels=entries)
    with pytest.raises(ValueError, match=match) as info:
        presets.load("kernels", kernels._preset)
    assert "presets.yaml" in str(info.value)


def test_bad_trainer_model_names_the_entry(monkeypatch):
    entry = {
        "description": "d",
        "device": "cpu",
        "models": [{"model": "13b", "pairs": 1, "prompt": 8, "chosen": 4, "rejected": 4}],
        "warmup_steps": 1,
        "steps": 1,
        "isolation": "none",
        "per_method_process": False,
    }
    _with_document(monkeypatch, trainer={"t": entry})
    with pytest.raises(ValueError, match=r"trainer\.t\.models\[0\]: model must be one of .*'13b'"):
        presets.load("trainer", trainer._preset)
    with pytest.raises(ValueError, match="section: expected one of"):
        presets.section("nope")
