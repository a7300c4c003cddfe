"""Checkpoint files: atomic publish, latest pointer, pruning, partial checkpoints, RNG state, safe loads."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from synpo import checkpoint as ckpt


def _write_complete(output_dir, step):
    tmp = ckpt.temp_checkpoint_dir(output_dir, step)
    ckpt.save_torch_state({"w": torch.full((2,), float(step))}, tmp / "optimizer.pt")
    ckpt.write_json_atomic(tmp / ckpt.STATE_FILE, {"step": step})
    return ckpt.publish_checkpoint(tmp, output_dir, step)


def test_publish_latest_and_prune(tmp_path):
    assert ckpt.find_checkpoint("auto", tmp_path) is None
    paths = [_write_complete(tmp_path, step) for step in (2, 4, 6)]
    assert [p.name for p in paths] == ["step-00000002", "step-00000004", "step-00000006"]
    assert (ckpt.checkpoint_root(tmp_path) / "latest").read_text().strip() == "step-00000006"
    assert ckpt.find_checkpoint("auto", tmp_path) == paths[-1]
    assert ckpt.find_checkpoint(str(tmp_path), tmp_path / "elsewhere") == paths[-1]
    assert ckpt.find_checkpoint(str(paths[0]), tmp_path) == paths[0]
    deleted = ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert deleted == [paths[0]] and not paths[0].exists()
    assert ckpt.list_checkpoints(tmp_path) == paths[1:]
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        ckpt.find_checkpoint(str(tmp_path / "missing"), tmp_path)


def test_partial_checkpoint_is_never_picked(tmp_path):
    good = _write_complete(tmp_path, 2)
    # A run killed while writing step 4: the temp dir holds files but no state file, never renamed.
    tmp = ckpt.temp_checkpoint_dir(tmp_path, 4)
    ckpt.save_torch_state({"w": torch.zeros(1)}, tmp / "optimizer.pt")
    assert ckpt.find_checkpoint("auto", tmp_path) == good
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.publish_checkpoint(tmp, tmp_path, 4)
    # A stale "latest" pointing at a removed checkpoint falls back to the newest complete one.
    (ckpt.checkpoint_root(tmp_path) / "latest").write_text("step-00000099\n")
    assert ckpt.find_checkpoint("auto", tmp_path) == good
    # Re-saving the same step replaces it atomically.
    again = _write_complete(tmp_path, 2)
    assert again == good and ckpt.list_checkpoints(tmp_path) == [good]


def test_rng_state_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    ckpt.save_rng_state(tmp_path, rank=0)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ckpt.load_rng_state(tmp_path, rank=0)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
    with pytest.raises(ckpt.CheckpointError, match="no RNG state for rank 1"):
        ckpt.load_rng_state(tmp_path, rank=1)


class _Payload:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_state_loads_refuse_arbitrary_pickles(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        torch.save({"x": _Payload()}, handle)
    with pytest.raises(pickle.UnpicklingError):
        ckpt.load_torch_state(path)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    optimizer.param_groups[0]["params"][0].grad = torch.ones(3)
    optimizer.step()
    ckpt.save_torch_state(optimizer.state_dict(), tmp_path / "opt.pt")
    restored = ckpt.load_torch_state(tmp_path / "opt.pt")
    assert torch.equal(restored["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
