"""The benchmark presets, read from ``presets.yaml`` beside this file (the one place they are defined).

Each benchmark turns a section's entries into its own frozen preset class with
:func:`from_mapping`, which names the file, preset and key of anything that does not fit.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from synpo.config import read_config_file

PRESETS_PATH = Path(__file__).with_name("presets.yaml")
SECTIONS = ("models", "kernels", "trainer", "quality")

T = TypeVar("T")


@functools.cache
def _document() -> dict:
    data = read_config_file(PRESETS_PATH, key="presets", fmt="YAML")
    if not isinstance(data, dict) or sorted(data) != sorted(SECTIONS):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{PRESETS_PATH}: expected the sections {list(SECTIONS)}, got {found}")
    return data


def section(name: str) -> dict[str, dict]:
    """The entries of one section, ``base:`` resolved (a preset's own keys replace its base's)."""
    if name not in SECTIONS:
        raise ValueError(f"section: expected one of {list(SECTIONS)}, got {name!r}")
    raw = _document()[name]
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise ValueError(f"{PRESETS_PATH}: {name}: expected a mapping of name -> mapping")

    def resolve(key: str, chain: tuple[str, ...]) -> dict:
        entry = dict(raw[key])
        base = entry.pop("base", None)
        if base is None:
            return entry
        if base not in raw:
            raise invalid(f"{name}.{key}", f"base {base!r} is not a {name} preset")
        if base in chain:
            raise invalid(f"{name}.{chain[0]}", f"base chain loops: {' -> '.join((*chain, base))}")
        return {**resolve(base, (*chain, base)), **entry}

    return {key: resolve(key, (key,)) for key in raw}


def invalid(where: str, message: str) -> ValueError:
    """A ``ValueError`` naming the presets file and the entry ``where`` (``"kernels.cpu.cases[2]"``)."""
    return ValueError(f"{PRESETS_PATH}: {where}: {message}")


def from_mapping(cls: Callable[..., T], mapping: Mapping[str, Any], where: str) -> T:
    """``cls(**mapping)`` for a dataclass, with a ``ValueError`` naming ``where`` and the bad keys."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise invalid(where, f"unknown keys {unknown} (known: {sorted(fields)})")
    required = {
        n
        for n, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = sorted(required - set(mapping))
    if missing:
        raise invalid(where, f"missing keys {missing}")
    return cls(**mapping)


def load(name: str, build: Callable[[str, dict], T]) -> dict[str, T]:
    """``{preset name: build(name, resolved entry)}`` for one section, in the file's order."""
    return {key: build(key, entry) for key, entry in section(name).items()}
