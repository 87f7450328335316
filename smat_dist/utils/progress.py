"""Console progress for long work: done/total, rate and ETA.

On a terminal it is a tqdm bar, with the smat_dist / data_tools log lines printed above it
(`tqdm.contrib.logging.logging_redirect_tqdm`); elsewhere (a log file, CI, a pipe) it is a plain log line
at most every `every_s` seconds, and always for the first and the last step:

    train: 40/160 tasks (25%), 1.32 tasks/s, ETA 1m31s | loss 1.2034 acc 0.612

Torch-free (smat-convert uses it).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

from smat_dist.utils.log import get_logger

log = get_logger("smat_dist.progress")
LOGGERS = ("smat_dist", "data_tools")


def fmt_duration(seconds: float) -> str:
    """3725 -> '1h02m05s', 91 -> '1m31s', 4.2 -> '4s'; '?' when unknown."""
    if seconds != seconds or seconds in (float("inf"), float("-inf")) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{sec:02d}s"
    return f"{m}m{sec:02d}s" if m else f"{sec}s"


def eta(done: int, total: int, elapsed: float, start: int = 0) -> tuple[float, float]:
    """(rate per second, seconds left) from `done - start` units in `elapsed` seconds; nan when unknown."""
    n = done - start
    if n <= 0 or elapsed <= 0:
        return float("nan"), float("nan")
    rate = n / elapsed
    return rate, max(0, total - done) / rate


def rate_eta(done: int, total: int, elapsed: float, units: str = "its") -> str:
    """'1.32 tasks/s, ETA 1m31s' for a log line."""
    rate, left = eta(done, total, elapsed)
    return f"{rate:.3g} {units}/s, ETA {fmt_duration(left)}" if rate == rate else f"? {units}/s, ETA ?"


def _is_tty(stream) -> bool:
    """A terminal that can show a bar: a 0 x 0 pseudo-terminal (some CI runners) would hide tqdm's output."""
    try:
        if not stream.isatty():
            return False
        size = os.get_terminal_size(stream.fileno())
        return size.columns > 0 and size.lines > 0
    except (AttributeError, ValueError, OSError):
        return False


class Progress:
    """`with Progress(total, "train", unit="task") as p: p.update_to(done, extra="loss 1.2")`.

    `bar=None` picks a tqdm bar when stderr is a terminal; `start` is where this run starts counting (a
    resumed run), so the rate counts only the work done now."""

    def __init__(self, total: int, desc: str, unit: str = "it", every_s: float = 10.0, bar: bool | None = None,
                 start: int = 0, logger: logging.Logger | None = None, units: str | None = None):
        self.total, self.desc, self.unit, self.every_s = int(total), desc, unit, every_s
        self.units = units or unit + "s"
        self.start = self.done = int(start)
        self.log = logger or log
        self.t0 = time.monotonic()
        self.last_line = float("-inf")
        self.extra = ""
        self.rate: float | None = None   # a rate measured where the work runs (ProgressRelay), else timed here
        self._bar = None
        self._redirect = contextlib.ExitStack()
        if bar is None:
            bar = _is_tty(sys.stderr)
        if bar:
            try:
                from tqdm import tqdm
                from tqdm.contrib.logging import logging_redirect_tqdm
            except ImportError:  # tqdm missing: plain lines
                bar = False
            else:
                self._redirect.enter_context(logging_redirect_tqdm([logging.getLogger(n) for n in LOGGERS]))
                self._bar = tqdm(total=self.total, initial=self.start, desc=desc, unit=unit, dynamic_ncols=True,
                                 file=sys.stderr)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def line(self) -> str:
        rate, left = eta(self.done, self.total, time.monotonic() - self.t0, self.start)
        if self.rate is not None and self.rate > 0:
            rate, left = self.rate, max(0, self.total - self.done) / self.rate
        pct = 100.0 * self.done / self.total if self.total else 100.0
        rate_s = f"{rate:.3g} {self.units}/s" if rate == rate else f"? {self.units}/s"
        text = (f"{self.desc}: {self.done}/{self.total} {self.units} ({pct:.0f}%), {rate_s}, "
                f"ETA {fmt_duration(left) if self.done < self.total else '0s'}")
        return text + (f" | {self.extra}" if self.extra else "")

    def update_to(self, done: int, total: int | None = None, extra: str = "", rate: float | None = None) -> None:
        """Progress at `done`; `rate`: units/s measured by whoever did the work (shown instead of this timer's)."""
        self.rate = rate
        if total is not None and total != self.total:
            self.total = int(total)
            if self._bar is not None:
                self._bar.total = self.total
        done = int(done)
        if done < self.done:   # counting restarted (e.g. a requeued attempt resumed earlier): follow it
            self.start = done
            self.t0 = time.monotonic()
        self.extra = extra
        if self._bar is not None:
            self._bar.n = done
            if extra:
                self._bar.set_postfix_str(extra, refresh=False)
            self._bar.refresh()
            self.done = done
            return
        first = self.done == self.start and done > self.start
        self.done = done
        now = time.monotonic()
        if first or done >= self.total or now - self.last_line >= self.every_s:
            self.last_line = now
            self.log.info("%s", self.line())

    def restart_at(self, done: int) -> None:
        """The work goes on from `done` (a resumed run): count the rate from here."""
        self.start = self.done = int(done)
        self.t0 = time.monotonic()
        if self._bar is not None:
            self._bar.n = self._bar.last_print_n = self._bar.initial = self.done
            self._bar.start_t = self._bar._time()
            self._bar.refresh()

    def update(self, n: int = 1, extra: str = "") -> None:
        self.update_to(self.done + n, extra=extra)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._redirect.close()
