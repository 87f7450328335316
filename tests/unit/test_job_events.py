"""The console lines that tell a user waiting for a SLURM job why an attempt ended and who requeued it."""
from __future__ import annotations

import json

from smat_dist.launch import job_events as ev


def test_events_are_told_once_per_job_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    ev.record(tmp_path, "stopped", signal="SIGTERM", tasks=7)           # before the relay: not told
    told = []
    relay = ev.EventRelay(tmp_path, "42", tell=told.append)
    ev.record(tmp_path, "stopped", signal="SIGTERM", tasks=8)           # job 41's: another job's
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    ev.record(tmp_path, "stopped", signal="SIGUSR2", tasks=12, requeued_by="smat_dist", count=1, limit=3)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    ev.record(tmp_path, "failed", message="rank 1 of 2 raised ValueError: boom", why="retry 1 of 2",
              requeued_by="smat_dist's teardown")
    relay.poll()
    assert [(r["event"], r["attempt"]) for r in told] == [("stopped", 1), ("failed", 2)]
    relay.poll()
    assert len(told) == 2                                                # each event once
    line = json.dumps({"event": "failed", "job": "42", "attempt": 3})
    with open(tmp_path / ev.EVENTS, "a") as f:                          # a line still being written waits
        f.write(line[:20])
    relay.poll()
    assert len(told) == 2
    with open(tmp_path / ev.EVENTS, "a") as f:
        f.write(line[20:] + "\n")
    with relay:                                                          # the thread's last read as it closes
        pass
    assert [r["attempt"] for r in told] == [1, 2, 3]
    empty = ev.EventRelay(tmp_path / "nothing", "42", tell=told.append)
    empty.poll()
    assert len(told) == 3


def test_lines_say_what_ended_the_attempt_and_who_requeued_it():
    base = {"job": "42", "attempt": 1}
    usr2 = ev.describe({**base, "event": "stopped", "signal": "SIGUSR2", "tasks": 12, "requeued_by": "smat_dist",
                        "count": 1, "limit": 3})
    assert usr2 == ("job 42 attempt 1: stopped at task 12 by SIGUSR2 (sent by SLURM as the time limit nears, "
                    "submitit's --signal); checkpoint written; requeued by smat_dist (1 of 3)")
    term = ev.describe({**base, "event": "stopped", "signal": "SIGTERM", "tasks": 5})
    assert "by SIGTERM (sent by SLURM: preemption, `scontrol requeue` or `scancel`)" in term
    assert term.endswith("SLURM requeues or cancels the job")
    gave_up = ev.describe({**base, "event": "stopped", "signal": "SIGUSR2", "tasks": 5,
                           "gave_up": "launcher.max_requeues=3 reached"})
    assert gave_up.endswith("not requeued: launcher.max_requeues=3 reached")
    failed = ev.describe({**base, "event": "failed", "message": "rank 1 of 2 was killed", "why": "retry 1 of 2",
                          "requeued_by": "smat_dist's teardown"})
    assert failed == ("job 42 attempt 1: failed: rank 1 of 2 was killed; requeued by smat_dist's teardown "
                      "(retry 1 of 2)")
    final = ev.describe({**base, "event": "failed", "message": "m", "why": "not retried", "requeued_by": None})
    assert final.endswith("failed: m; not requeued (not retried)")


def test_sacct_states_are_explained():
    assert ev.explain_state("CANCELLED by 0") == "CANCELLED by 0 (cancelled by user root)"
    assert ev.explain_state("CANCELLED by 987654") == "CANCELLED by 987654 (cancelled by user uid 987654)"
    assert ev.explain_state("PREEMPTED") == "PREEMPTED (preempted by SLURM for another job)"
    assert ev.explain_state("TIMEOUT") == "TIMEOUT (killed by SLURM at its time limit)"
    assert ev.explain_state("REQUEUED").startswith("REQUEUED (requeued")
    assert ev.explain_state("RUNNING") == "RUNNING"
