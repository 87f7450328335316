"""launch/failure.py and launch/requeue.py on recorded outcomes: which rank is named, what is retried, and how
the SLURM teardown reads srun's own report. (The failures themselves run for real in tests/distributed/
test_failures.py and tests/slurm/test_slurm_failures.py.)"""
from __future__ import annotations

import json

from smat_dist.launch import failure
from smat_dist.launch.requeue import attempt_outcomes, srun_deaths


def _o(rank, **kw):
    return {"rank": rank, "ok": False, "died": False, "stopped": False, "victim": False, "at": None, **kw}


def test_a_killed_rank_is_the_cause_not_the_peer_that_lost_it():
    outs = [_o(0, error="RuntimeError: Connection closed by peer", victim=True, at=1.0, tasks=6),
            _o(1, died=True, error="was killed by SIGKILL")]
    cause = failure.pick_cause(outs)
    assert cause == 1
    f = failure.summarize(outs, cause)
    assert f["message"] == "rank 1 of 2 was killed by SIGKILL after 6 tasks"   # the step from the survivor
    assert f["victims"] == [{"rank": 0, "error": "failed: RuntimeError: Connection closed by peer"}]


def test_the_first_real_error_wins_and_a_rank_killed_after_timeouts_hung():
    raised = [_o(0, error="NonFiniteLoss: b", at=2.0), _o(1, error="NonFiniteLoss: a", at=1.0)]
    assert failure.pick_cause(raised) == 1
    hung = [_o(0, error="RuntimeError: Timed out waiting 15000ms for recv", victim=True, at=1.0),
            _o(1, stopped=True, error="was killed by the launcher (launcher.kill_grace_s)")]
    assert failure.pick_cause(hung) == 1
    assert failure.summarize(hung, 1)["message"].startswith("rank 1 of 2 hung: the other ranks timed out")
    # SLURM resumes a stopped rank before ending the step: it then reports the connection its peer closed
    resumed = [hung[0], _o(1, error="RuntimeError: Connection closed by peer", victim=True, at=3.0)]
    assert failure.pick_cause(resumed) == 1 and failure.summarize(resumed, 1)["cause"]["stopped"]


def test_retry_rules(tmp_path):
    def f(error, tasks):
        return {"cause": {"rank": 1, "error": error, "tasks": tasks, "stopped": False}, "tasks": tasks}

    assert failure.decide(f("ConfigError: x", 0), [], 3)[0] is False
    first = failure.record_failure(tmp_path, f("NonFiniteLoss: at task 7", 6), max_failures=2)
    assert first["retry"] and json.loads((tmp_path / "failure.json").read_text())["retry"] is True
    again = failure.record_failure(tmp_path, f("NonFiniteLoss: at task 7", 6), max_failures=2)
    assert not again["retry"] and "same way at the same task" in again["why"]
    # a different failure is retried, until max_failures retries were spent
    third = failure.record_failure(tmp_path, f("was killed by SIGKILL", 10), max_failures=2)
    assert third["retry"] and failure.failed_retries(tmp_path) == 2
    fourth = failure.record_failure(tmp_path, f("was killed by SIGKILL", 14), max_failures=2)
    assert not fourth["retry"] and "launcher.max_failures=2" in fourth["why"]
    assert len(failure.read_history(tmp_path)) == 4


def test_teardown_names_the_silent_rank_from_srun_and_the_reports(tmp_path):
    log = tmp_path / "7_0_log.err"
    log.write_text("noise\nsrun: error: smat-node1: tasks 0-1: Killed\nsrun: launch/slurm: _step_signal: x\n")
    assert srun_deaths(log) == [(0, "smat-node1", "Killed"), (1, "smat-node1", "Killed")]
    peer = failure.rank_outcome(0, RuntimeError("Connection reset by peer"))
    failure.write_rank_outcome(tmp_path, peer, "7.0")
    outs = attempt_outcomes(tmp_path, 2, "7.0", log)
    assert outs[0]["victim"] and outs[1]["died"] and outs[1]["host"] == "smat-node1"
    assert failure.pick_cause(outs) == 1
    # a report of another attempt is not read; a rank that raised makes the silent one a --kill-on-bad-exit victim
    assert failure.read_rank_outcomes(tmp_path, "7.1") == {}
    failure.write_rank_outcome(tmp_path, failure.rank_outcome(0, ValueError("bad shard")), "7.1")
    outs = attempt_outcomes(tmp_path, 2, "7.1", log)
    assert outs[1]["stopped"] and "kill-on-bad-exit" in outs[1]["error"] and failure.pick_cause(outs) == 0
