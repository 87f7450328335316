"""DataLoader worker failures as the original exception, and workers that never outlive their command.

torch re-raises a worker's exception as `type(e)("Caught X in DataLoader worker process N.\\nOriginal
Traceback ...")`: the user's one-line error would carry a whole traceback with the real message at its end.
`guarded(iterator)` re-raises the same exception type with the original message only.

The workers ignore SIGTERM (SLURM signals every process of a step; only the rank reacts, see
episodes._worker_init), so the `terminate()` that multiprocessing's exit handler sends them does nothing and
its `join()` then waits forever: a command that failed while a loader was alive never exited. A guarded
loader shuts its workers down when it raises, and every live one is shut down at interpreter exit, before
multiprocessing's own exit handler (atexit runs the later registration first).
"""
from __future__ import annotations

import atexit
import weakref
from typing import Iterator, TypeVar

T = TypeVar("T")
_live: "weakref.WeakSet" = weakref.WeakSet()
_registered = False


def original_message(text: str) -> str | None:
    """The original exception's message out of torch's worker wrapper text, or None if `text` is not one."""
    if "Original Traceback (most recent call last):" not in text:
        return None
    lines = text.split("Original Traceback (most recent call last):", 1)[1].splitlines()
    last_frame = max((i for i, ln in enumerate(lines) if ln.startswith("  File ")), default=-1)
    i = last_frame + 1
    while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
        i += 1                       # the frame's source line and its ^^^ markers
    rest = "\n".join(lines[i:]).strip()
    head, sep, msg = rest.partition(": ")
    # "pkg.module.ShardError: message" (or a bare "pkg.Error" without a message)
    return msg.strip() if sep and " " not in head else rest or None


def unwrapped(e: BaseException) -> BaseException:
    """`e` itself, or for a re-raised worker exception the same type carrying only the original message."""
    msg = original_message(str(e))
    if msg is None:
        return e
    try:
        out = type(e)(msg)
    except Exception:  # noqa: BLE001 - an exception type whose constructor wants other arguments
        out = RuntimeError(msg)
    return out


def shutdown(it) -> None:
    """Stop a multi-process DataLoader iterator's workers now (a no-op for any other iterator)."""
    stop = getattr(it, "_shutdown_workers", None)
    if stop is not None:
        stop()


def _shutdown_all() -> None:
    for it in list(_live):
        shutdown(it)


def guarded(it: Iterator[T]) -> Iterator[T]:
    """Iterate a DataLoader iterator; on a failure shut its workers down and raise the original error. Its
    workers are also stopped at exit if it is still alive then (registered now: the workers already run)."""
    global _registered
    if not _registered:
        atexit.register(_shutdown_all)
        _registered = True
    _live.add(it)
    return _iterate(it)


def _iterate(it: Iterator[T]) -> Iterator[T]:
    try:
        yield from it
    except Exception as e:
        shutdown(it)
        raise unwrapped(e) from None
