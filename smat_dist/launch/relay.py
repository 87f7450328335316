"""Rank 0's progress on the launcher's console: follow its log file and show done/total, rate and ETA.

The ranks log to files (`<run_dir>/logs/rank0.log` locally, submitit's `<job>_0_log.err` on SLURM); the
trainer's progress line there is

    12:00:01 [r0] INFO smat_dist.train.metrics: tasks 40/160 loss 1.2034 acc 0.612 1.32 tasks/s eta 1m31s

`LogRelay` tails the file in a thread and feeds a `smat_dist.utils.progress.Progress` (a tqdm bar on a
terminal, plain lines elsewhere); the trainer's validation lines and its resume line are relayed as they are.
"""
from __future__ import annotations

import os
import re
import threading
from pathlib import Path

from smat_dist.utils.log import get_logger
from smat_dist.utils.progress import Progress

log = get_logger(__name__)

# the trainer's line (smat_dist.train.metrics, formerly smat_dist.train.trainer). Its own rate (tasks since this
# attempt started, timed where they ran) is shown: a rate the relay timed itself would count from when it read
# the lines, and the resume line and the first steps after it often arrive in one read (thousands of tasks/s)
PROGRESS = re.compile(r"smat_dist\.train\.\w+: tasks (\d+)/(\d+)\s*(.*?)(?:\s+([\d.eE+naif-]+) tasks/s.*)?\s*$")
RESUMED = re.compile(r"resumed from .* at (\d+) tasks")
RELAYED = ("validation at", "resumed from")


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


class LogRelay:
    """`with LogRelay(path, total): ...` shows the progress that the rank logging to `path` reports.

    Only what is appended after the relay starts is read (a resumed run appends to the earlier log); a file
    that shrinks (a new attempt rewrote it) is read again from its start."""

    def __init__(self, path: str | os.PathLike, total: int, desc: str = "train", unit: str = "task",
                 poll_s: float = 1.0, every_s: float = 10.0, bar: bool | None = None):
        self.path = Path(path)
        self.pos = self.path.stat().st_size if self.path.is_file() else 0
        self.total, self.desc, self.unit, self.poll_s, self.every_s, self.bar = total, desc, unit, poll_s, every_s, bar
        self.progress: Progress | None = None
        self.seen = 0          # progress lines relayed (tests read it)
        self._buf = ""
        # poll() runs in the relay's thread and may also be called by its owner (a last read after the job
        # ends): unserialised, one caller's stale size against the other's advanced position looked like a
        # rewritten file and re-read it from the start (seen on CI: lines relayed 3 times)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="smat-log-relay", daemon=True)

    def __enter__(self) -> "LogRelay":
        self.progress = Progress(self.total, self.desc, unit=self.unit, every_s=self.every_s, bar=self.bar)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.progress is not None:
            self.progress.close()

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            try:
                self.poll()
            except OSError:  # the file is being replaced; next poll
                pass
            if stopping:
                return
            self._stop.wait(self.poll_s)

    def poll(self) -> None:
        with self._lock:
            self._poll()

    def _poll(self) -> None:
        if not self.path.is_file():
            return
        size = self.path.stat().st_size
        if size < self.pos:
            self.pos, self._buf = 0, ""
        if size == self.pos:
            return
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            data = f.read(size - self.pos)
        self.pos += len(data)
        *lines, self._buf = (self._buf + data.decode("utf-8", "replace")).split("\n")
        for line in lines:
            self.feed(line)

    def feed(self, line: str) -> None:
        m = PROGRESS.search(line)
        if m:
            done, total, extra = int(m.group(1)), int(m.group(2)), m.group(3).strip()
            rate = _number(m.group(4))
            if self.progress is not None:
                self.progress.update_to(done, total, extra=extra, rate=rate)
            self.seen += 1
            return
        r = RESUMED.search(line)
        if r and self.progress is not None:
            self.progress.restart_at(int(r.group(1)))
        if "smat_dist.train." in line and any(k in line for k in RELAYED):
            log.info("rank 0: %s", line.split(": ", 1)[-1].strip())
