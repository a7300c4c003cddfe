"""The launch-configuration table (synpo_kernels/ops/kernel_configs.json) and the launch configs
derived from it: coverage, lookup order, occupancy arithmetic, grids sized from ``ctas_per_sm``."""

from __future__ import annotations

import json

import pytest
import torch

from synpo_kernels.ops import kernel_tuning as tuning

K = pytest.importorskip("synpo_kernels.ops.fused_linear_kernels")
pytestmark = pytest.mark.skipif(not K.HAS_TRITON, reason="the launch configs need triton.cdiv")

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
VOCABS = [1, 333, 32001, 65535, 65536, 152064, 262144]
KERNELS = ["row_lse", "row_grad", "row_grad_bias", "wgrad"]


@pytest.mark.parametrize("arch", ["interpreter", "default", "sm_90", "sm_80", "sm_120"])
def test_every_kernel_dtype_and_vocab_has_an_entry(arch):
    for kernel in KERNELS:
        for dtype in DTYPES:
            for vocab in VOCABS:
                entry = tuning.lookup(kernel, arch, dtype, vocab)
                assert entry.kernel == kernel and entry.ctas_per_sm >= 1
                assert entry.arch == (arch if arch != "sm_120" else "default")
                assert entry.vocab_min <= vocab and (entry.vocab_max is None or vocab < entry.vocab_max)


def test_a_dtype_entry_wins_over_the_wildcard():
    wildcard = [
        e for e in tuning.entries() if e.arch == "sm_90" and e.kernel == "row_grad" and e.dtype == "*"
    ]
    specific = [
        e for e in tuning.entries() if e.arch == "sm_90" and e.kernel == "row_grad" and e.dtype == "bf16"
    ]
    # The specific entries may split the vocabulary (tune_kernels.py writes one per measured size).
    covering = [
        e for e in specific if e.vocab_min <= 152064 and (e.vocab_max is None or e.vocab_max > 152064)
    ]
    assert wildcard and len(covering) == 1
    assert tuning.lookup("row_grad", "sm_90", torch.bfloat16, 152064) == covering[0]
    assert tuning.lookup("row_grad", "sm_90", torch.float64, 152064) == wildcard[0]


@pytest.mark.parametrize(
    ("arch", "regs", "warps", "smem", "expected"),
    [
        ("sm_90", 59, 8, 32, 4),  # 1920 registers per warp: 34 warps' worth, 4 programs of 8
        ("sm_90", 110, 8, 0, 2),  # 3584 per warp: 18 warps, 2 programs
        ("sm_90", 255, 4, 0, 2),  # 8192 per warp: 8 warps
        ("sm_90", 16, 16, 0, 4),  # thread-bound: 2048 / 512
        ("sm_90", 32, 4, 100_000, 2),  # shared-memory-bound: 233472 // (100000 + 1024)
        ("sm_80", 32, 4, 100_000, 1),  # 167936 // 101024
        ("sm_90", 32, 1, 0, 32),  # the CTA limit
        ("sm_90", 64, 8, 300_000, 0),  # does not fit at all
    ],
)
def test_occupancy_arithmetic(arch, regs, warps, smem, expected):
    assert tuning.occupancy(arch, regs=regs, num_warps=warps, smem=smem) == expected


@pytest.mark.parametrize("n_rows", [1, 100, 2176, 50_000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_lse_grid_is_persistent_and_sized_from_the_entry(n_rows, dtype):
    cfg = K.lse_config(n_rows, 152064, dtype, arch="sm_90", sm_count=132)
    entry = tuning.lookup("row_lse", "sm_90", dtype, 152064)
    assert cfg.entry == entry
    blocks = -(-n_rows // cfg.constexprs["BLOCK_M"])
    assert cfg.grid == (min(blocks, entry.ctas_per_sm * 132),)
    assert cfg.num_warps == entry.config["num_warps"]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("n_rows", "vocab"), [(2176, 152064), (7, 152064), (4000, 32001), (64, 1000)])
def test_row_grad_split_fills_the_resident_slots(bias, n_rows, vocab):
    cfg = K.grad_config(n_rows, vocab, torch.bfloat16, has_bias_grad=bias, arch="sm_90", sm_count=132)
    entry = tuning.lookup("row_grad_bias" if bias else "row_grad", "sm_90", torch.bfloat16, vocab)
    assert cfg.entry == entry and cfg.constexprs["HAS_BIAS_GRAD"] is bias
    v_blocks, splits = cfg.grid
    block_m = cfg.constexprs["BLOCK_M"]
    assert v_blocks == -(-vocab // cfg.constexprs["BLOCK_V"])
    # Every row is covered exactly once, in whole row blocks per split.
    assert cfg.rows_per_split % block_m == 0 and (splits - 1) * cfg.rows_per_split < n_rows
    assert splits * cfg.rows_per_split >= n_rows
    target = K.GRAD_WAVES * entry.ctas_per_sm * 132
    # About GRAD_WAVES waves of resident programs (never less than one row block each): the fewest
    # splits of whole row blocks that reach the target (one more block per split would not).
    row_blocks = -(-n_rows // block_m)
    per_split = cfg.rows_per_split // block_m
    assert v_blocks * splits >= target or splits == row_blocks
    assert per_split == row_blocks or v_blocks * -(-row_blocks // (per_split + 1)) < target


def test_interpreter_entries_run_a_persistent_loop():
    cfg = K.lse_config(300, 333, torch.float32, arch="interpreter", sm_count=0)
    entry = tuning.lookup("row_lse", "interpreter", torch.float32, 333)
    blocks = -(-300 // cfg.constexprs["BLOCK_M"])
    assert cfg.grid == (entry.ctas_per_sm,) and blocks > entry.ctas_per_sm


def test_malformed_table_entries_are_named(tmp_path):
    good = tuning.entries()[0].to_json()
    for bad, message in [
        ({**good, "kernel": "row_softmax"}, "unknown kernel"),
        ({**good, "ctas_per_sm": 0}, "ctas_per_sm must be >= 1"),
        ({k: v for k, v in good.items() if k != "config"}, "malformed"),
    ]:
        path = tmp_path / "table.json"
        path.write_text(json.dumps({"entries": [good, bad]}))
        with pytest.raises(ValueError, match=rf"entry 1: .*{message}"):
            tuning.load_table(path)


def test_entries_round_trip_through_json():
    for entry in tuning.entries():
        assert tuning._entry(json.loads(json.dumps(entry.to_json())), "x") == entry
