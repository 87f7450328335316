"""Training progress as records: `<run_dir>/progress.jsonl`, one JSON object a line, written by rank 0.

The launcher shows rank 0's progress on its console (launch/relay.py). It reads these records rather than rank 0's
log text, so the wording of a log line can change without the console going silent, and it finds them in the
run folder whatever launched the ranks (a local log file, a SLURM task's submitit log). Kinds (`"kind"`):

    progress    tasks, total, rate (tasks/s since this attempt started, timed where the tasks ran), eta_s,
                loss, acc, shown (what follows "|" on the console: "loss 1.2034 acc 0.612")
    resumed     resumed_at (tasks), checkpoint, ranks (the world size that wrote it), text
    validation  tasks, acc_mean, text

`text` is the sentence rank 0 also logs; the launcher relays it as "rank 0: <text>". The file is appended to
across attempts (a resumed run goes on in the same folder). Standard library only: the launcher reads it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

FILE = "progress.jsonl"


def path_of(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / FILE


def write(run_dir: str | os.PathLike, kind: str, **fields) -> None:
    """Append one record (rank 0 only calls it). A line is written whole, then flushed: a reader polling the file
    sees complete lines and at most one partial tail."""
    p = path_of(run_dir)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a") as f:
        f.write(json.dumps({"kind": kind, **fields}) + "\n")


def parse(line: str) -> dict | None:
    """The record on one line of the file; None for a blank or unreadable line (a reader skips it)."""
    line = line.strip()
    if not line:
        return None
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and "kind" in rec else None
