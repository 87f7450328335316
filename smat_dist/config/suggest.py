"""`did you mean` for a config key outside the schema: the closest field names of the section it was aimed at
(`method.expert` -> method.experts, `metod.experts` -> method)."""
from __future__ import annotations

import dataclasses
import difflib
import typing


def _section(cls, parts: list[str]):
    """The dataclass that `parts` (a dotted path below `cls`) leads to, or None where it leaves the schema."""
    for part in parts:
        if not dataclasses.is_dataclass(cls):
            return None
        hint = typing.get_type_hints(cls).get(part)
        if hint is None or not dataclasses.is_dataclass(hint):
            return None
        cls = hint
    return cls if dataclasses.is_dataclass(cls) else None


def did_you_mean(full_key: str) -> str | None:
    """`did you mean a.b?` for the unknown key `full_key` (e.g. "method.expert"), or None if nothing is close."""
    from smat_dist.config.schema import Config

    parts = [p for p in str(full_key).split(".") if p]
    if not parts:
        return None
    section = _section(Config, parts[:-1])
    if section is None:
        return None
    names = [f.name for f in dataclasses.fields(section)]
    close = difflib.get_close_matches(parts[-1], names, n=2, cutoff=0.6)
    if not close:
        return None
    prefix = ".".join(parts[:-1] + [""])
    return "did you mean " + " or ".join(prefix + c for c in close) + "?"
