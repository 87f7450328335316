"""Faults injected into a real training run, for `smat-bench fault` and the failure tests.

`inject` is a rank function (the trainer's contract) that trains with `smat_dist.train.trainer:train` after
arming the fault that `<run_dir>/fault.json` describes on the rank it names:

    {"case": "kill" | "nan" | "hang", "rank": 1, "at_tasks": 6, "every_attempt": false}

in the step that starts at `at_tasks` tasks: `kill` SIGKILLs the rank as it enters the step's first all-to-all
(its peers are in that collective); `hang` SIGSTOPs it there (it never answers again); `nan` makes one of its
task losses non-finite. Just before, the rank writes the time to `fault.fired`; by default the fault fires in
the first attempt only (a transient fault), `every_attempt` makes it deterministic. In a later attempt rank 0
writes the time its first step completed to `fault.resumed`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path

FAULT_SPEC = "fault.json"
FIRED = "fault.fired"
RESUMED = "fault.resumed"
CASES = ("kill", "nan", "hang")


def write_spec(run_dir, case: str, rank: int, at_tasks: int, every_attempt: bool = False) -> None:
    if case not in CASES:
        raise ValueError(f"fault case {case!r}: expected one of {', '.join(CASES)}")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    spec = {"case": case, "rank": rank, "at_tasks": at_tasks, "every_attempt": every_attempt}
    (Path(run_dir) / FAULT_SPEC).write_text(json.dumps(spec))


def _stamp(path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(repr(time.time()))
    os.replace(tmp, path)


def _arm(spec: dict, run_dir: Path, method, pool) -> None:
    """Make the fault happen in the step about to run on this rank."""
    from smat_dist.distributed.comm import Comm

    if spec["case"] == "nan":
        real = method.task

        def poisoned(ep, *a, **k):
            method.task = real   # one task of the step
            res = real(ep, *a, **k)
            _stamp(run_dir / FIRED)
            return dataclasses.replace(res, loss=res.loss * float("nan"))

        method.task = poisoned
        return
    real_a2a = Comm.all_to_all
    sig = signal.SIGKILL if spec["case"] == "kill" else signal.SIGSTOP

    def faulty(self, t):
        Comm.all_to_all = real_a2a
        _stamp(run_dir / FIRED)
        os.kill(os.getpid(), sig)
        return real_a2a(self, t)

    Comm.all_to_all = faulty


def inject(cfg, run_dir: str, should_stop=None) -> dict:
    from smat_dist.train import trainer

    run_dir = Path(run_dir)
    spec = json.loads((run_dir / FAULT_SPEC).read_text())
    rank = int(os.environ["RANK"])
    later_attempt = (run_dir / FIRED).exists()
    fire = rank == spec["rank"] and (spec["every_attempt"] or not later_attempt)
    real_step = trainer.smat_step

    def step(method, pool, hyper, episodes, first_index, tasks_seen, *a, **k):
        if fire and tasks_seen == spec["at_tasks"]:
            _arm(spec, run_dir, method, pool)
        out = real_step(method, pool, hyper, episodes, first_index, tasks_seen, *a, **k)
        if later_attempt and rank == 0 and not (run_dir / RESUMED).exists():
            _stamp(run_dir / RESUMED)
        return out

    trainer.smat_step = step
    return trainer.train(cfg, str(run_dir), should_stop)


def read_stamp(run_dir, name: str) -> float | None:
    p = Path(run_dir) / name
    return float(p.read_text()) if p.is_file() else None
