"""Integrations of the fused preference losses with other libraries' trainers.

- :mod:`synpo.integrations.trl`: ``SynPOConfig`` / ``SynPOTrainer``, a TRL-style preference trainer
  (from the clone: ``pip install --no-build-isolation ".[trl]"``). Imported lazily: ``import
  synpo.integrations`` needs no TRL.
"""

from __future__ import annotations

__all__ = ["SynPOConfig", "SynPOTrainer"]


def __getattr__(name: str):
    if name in __all__:
        from synpo.integrations import trl

        return getattr(trl, name)
    raise AttributeError(f"module 'synpo.integrations' has no attribute {name!r}")
