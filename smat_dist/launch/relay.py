"""Following, on the launcher's console, what a rank writes to a file while the job runs.

`FileRelay` tails a file that another process appends to, in a thread, and hands each complete new line to
`feed`. Two kinds of feed:

- `ProgressRelay`: rank 0's training progress from the records the trainer writes to `<run_dir>/progress.jsonl`
  (train/progress_records.py), shown by a `smat_dist.utils.progress.Progress` (a tqdm bar on a terminal, plain
  lines elsewhere):

      train: 40/160 tasks (25%), 1.32 tasks/s, ETA 1m31s | loss 1.2034 acc 0.612

  and its resume and validation sentences as "rank 0: <text>". The rate shown is the trainer's (tasks since this
  attempt started, timed where they ran): one the relay timed itself would count from when it read the records,
  and a resume and the first steps after it often arrive in one read.
- `LineRelay`: the log lines of a rank's log file that contain one of some keys, as "[label] <message>" (smat-demo's
  evaluation phase).
"""
from __future__ import annotations

import abc
import os
import threading
from pathlib import Path

from smat_dist.train import progress_records
from smat_dist.utils.log import get_logger
from smat_dist.utils.progress import Progress

log = get_logger(__name__)


class FileRelay(abc.ABC):
    """`with FileRelay(path): ...` feeds each line appended to `path` while the block runs to `self.feed`.

    Only what is appended after the relay is made is read (a resumed run appends to the earlier file); a file
    that shrinks (a new attempt rewrote it) is read again from its start. The owner may call `poll()` too (a last
    read after the job ends)."""

    def __init__(self, path: str | os.PathLike, poll_s: float = 1.0):
        self.path = Path(path)
        self.pos = self.path.stat().st_size if self.path.is_file() else 0
        self.poll_s = poll_s
        self._buf = ""
        # poll() runs in the relay's thread and may also be called by its owner: unserialised, one caller's stale
        # size against the other's advanced position looked like a rewritten file and re-read it from the start
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="smat-relay", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

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

    @abc.abstractmethod
    def feed(self, line: str) -> None:
        """One complete new line of the file (without its newline)."""


class ProgressRelay(FileRelay):
    """`with ProgressRelay(run_dir, total): ...` shows the progress that rank 0 of the run in `run_dir` records."""

    def __init__(self, run_dir: str | os.PathLike, total: int, desc: str = "train", unit: str = "task",
                 poll_s: float = 1.0, every_s: float = 10.0, bar: bool | None = None):
        super().__init__(progress_records.path_of(run_dir), poll_s=poll_s)
        self.total, self.desc, self.unit, self.every_s, self.bar = total, desc, unit, every_s, bar
        self.progress: Progress | None = None
        self.seen = 0          # progress records relayed (tests read it)

    def __enter__(self) -> "ProgressRelay":
        self.progress = Progress(self.total, self.desc, unit=self.unit, every_s=self.every_s, bar=self.bar)
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        if self.progress is not None:
            self.progress.close()

    def feed(self, line: str) -> None:
        rec = progress_records.parse(line)
        if rec is None:
            return
        kind = rec["kind"]
        if kind == "progress":
            if self.progress is not None:
                self.progress.update_to(int(rec["tasks"]), int(rec["total"]), extra=str(rec.get("shown", "")),
                                        rate=rec.get("rate"))
            self.seen += 1
            return
        if kind == "resumed" and self.progress is not None:
            self.progress.restart_at(int(rec["resumed_at"]))
        if rec.get("text"):
            log.info("rank 0: %s", rec["text"])


class LineRelay(FileRelay):
    """`with LineRelay(log_file, "eval", keys): ...` relays the log lines holding one of `keys` as
    "[label] <message>" (the message: what follows the logger's name) on `logger` (default: this module's)."""

    def __init__(self, path: str | os.PathLike, label: str, keys: tuple[str, ...], poll_s: float = 2.0,
                 logger=None):
        super().__init__(path, poll_s=poll_s)
        self.label, self.keys, self.log = label, keys, logger or log

    def feed(self, line: str) -> None:
        if any(k in line for k in self.keys):
            self.log.info("[%s] %s", self.label, line.split(": ", 1)[-1])
