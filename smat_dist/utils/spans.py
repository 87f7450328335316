"""Named spans around the phases of the real training step, for the step benchmark's breakdown.

`span(name)` is a no-op by default (one global lookup); a benchmark installs a recorder with `recording(fn)`,
where fn(name) returns a context manager (a timer that synchronises the device, or
`torch.profiler.record_function`). Timing the real code means there is no hand copy of the step to keep in sync.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

_NULL = contextlib.nullcontext()
_recorder: Callable[[str], ContextManager] | None = None


def span(name: str) -> ContextManager:
    return _NULL if _recorder is None else _recorder(name)


@contextlib.contextmanager
def recording(fn: Callable[[str], ContextManager]):
    """Route every span(name) through fn while the block runs (not re-entrant, not thread-aware)."""
    global _recorder
    prev, _recorder = _recorder, fn
    try:
        yield
    finally:
        _recorder = prev
