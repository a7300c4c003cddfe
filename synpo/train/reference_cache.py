"""Reference log-probs computed once per run (``loss.reference.precompute``) and cached on disk, keyed by
the data, model and settings they depend on."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from synpo.config import TrainerConfig
from synpo.train.engine import Dist

__all__ = ["reference_logps"]

logger = logging.getLogger("synpo.train")


def reference_logps(
    config: TrainerConfig,
    *,
    dataset,
    collator,
    module: torch.nn.Module,
    dist: Dist,
    to_device: Callable[[dict], dict],
    model_source: str,
    output_dir: Path,
) -> torch.Tensor | None:
    """(N, 2) summed reference log-probs [chosen, rejected] per pair of ``dataset``, computed once with
    ``module`` (the objective, or its DeepSpeed engine; collective) and cached; None when the loss
    does not use precomputed reference log-probs."""
    cfg = config
    if not (cfg.loss.needs_reference and cfg.loss.reference.precompute):
        return None
    from safetensors.torch import load_file, save_file

    path = Path(cfg.loss.reference.cache_file or output_dir / "reference_logps.safetensors")
    key = json.dumps(
        {
            "data": dataset.fingerprint(),
            "model": model_source,
            "seed": cfg.train.seed if cfg.model.name_or_path is None else None,
            "ref_logps": "sum",  # per-row summed log-probs (a cache of per-token means is recomputed)
            "impl": cfg.loss.impl,
            "max_length": cfg.data.max_length,
            "reference": cfg.loss.reference.name_or_path,
        },
        sort_keys=True,
    )
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            stored_key = (handle.metadata() or {}).get("key")
        if stored_key == key:
            values = load_file(str(path))["ref_logps"]
            if values.shape == (len(dataset), 2):
                if dist.is_main:
                    logger.info("reference log-probs: loaded cache %s", path)
                return values
        if dist.is_main:
            logger.info("reference log-probs: cache %s is for other data/model; recomputing", path)
    n = len(dataset)
    m = cfg.train.micro_batch_size
    chunks = [list(range(s, min(s + m, n))) for s in range(0, n, m)]
    world, rank = dist.world_size, dist.rank
    mine = chunks[rank::world]
    # Every rank runs the same number of forwards (ZeRO-3 gathers are collective).
    rounds = math.ceil(len(chunks) / world)
    values = torch.zeros(n, 2, dtype=torch.float64, device=dist.device)
    with torch.no_grad():
        for r in range(rounds):
            real = r < len(mine)
            indices = mine[r] if real else chunks[0]
            batch = collator([dataset[i] for i in indices])
            if batch.get("empty"):
                continue
            batch = to_device(batch)
            logps = module(mode="reference", **batch).double()
            if real:
                half = logps.shape[0] // 2
                idx = batch["example_index"]
                values[idx, 0] = logps[:half]
                values[idx, 1] = logps[half:]
    dist.all_reduce_sum(values)
    values = values.float().cpu()
    if dist.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file({"ref_logps": values}, str(tmp), metadata={"key": key})
        os.replace(tmp, path)
        logger.info("reference log-probs: computed for %d pairs, cached at %s", n, path)
    dist.barrier()
    return values
