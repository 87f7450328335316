"""What happened to a SLURM job between its attempts, told to the user who waits for it.

The job's own processes know why an attempt ended (the signal a rank caught, the failure the teardown named,
who requeued it); the submitting host only sees sacct's state. So the job appends one JSON line per event to
`<run_dir>/job_events.jsonl` and the submitter's `wait` prints each new line of its job as it appears, beside
sacct's state changes explained in words (PREEMPTED, TIMEOUT, NODE_FAIL, `CANCELLED by <uid>`).
"""
from __future__ import annotations

import json
import os
import pwd
import time
from pathlib import Path

from smat_dist.launch.relay import FileRelay
from smat_dist.utils.log import get_logger

log = get_logger(__name__)

EVENTS = "job_events.jsonl"

# what each signal means to a SLURM job, and who sends it
SIGNAL_CAUSE = {
    "SIGUSR2": "sent by SLURM as the time limit nears, submitit's --signal",
    "SIGTERM": "sent by SLURM: preemption, `scontrol requeue` or `scancel`",
    "SIGINT": "an interrupt: Ctrl-C or `scancel --signal=INT`",
}

# sacct's end-of-attempt states in words; the job's own events say more where it could see the cause
STATE_CAUSE = {
    "PREEMPTED": "preempted by SLURM for another job",
    "TIMEOUT": "killed by SLURM at its time limit",
    "NODE_FAIL": "a node of the job failed (SLURM)",
    "REQUEUED": "requeued: the next attempt resumes from checkpoints/latest",
    "OUT_OF_MEMORY": "killed by SLURM for exceeding its memory",
    "BOOT_FAIL": "its nodes failed to boot (SLURM)",
    "DEADLINE": "killed by SLURM at its deadline",
}


def record(run_dir: str | os.PathLike, event: str, **fields) -> dict:
    """Append one event of the running SLURM job (job id and attempt from its environment)."""
    rec = {"event": event, "job": os.environ.get("SLURM_JOB_ID", "?"),
           "attempt": int(os.environ.get("SLURM_RESTART_COUNT", "0")) + 1, "time": time.time(), **fields}
    path = Path(run_dir) / EVENTS
    path.parent.mkdir(parents=True, exist_ok=True)
    # one short write per line with O_APPEND: lines from the ranks' teardown and rank 0 do not interleave
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def describe(rec: dict) -> str:
    """The console line for one event."""
    head = f"job {rec['job']} attempt {rec['attempt']}"
    kind = rec["event"]
    if kind == "stopped":
        sig = rec.get("signal") or "a signal"
        line = (f"{head}: stopped at task {rec.get('tasks')} by {sig} "
                f"({SIGNAL_CAUSE.get(sig, 'sent from outside the job')}); checkpoint written")
        if rec.get("requeued_by"):
            return f"{line}; requeued by {rec['requeued_by']} ({rec['count']} of {rec['limit']})"
        if rec.get("gave_up"):
            return f"{line}; not requeued: {rec['gave_up']}"
        return f"{line}; SLURM requeues or cancels the job"
    if kind == "failed":
        line = f"{head}: failed: {rec.get('message')}"
        if rec.get("requeued_by"):
            return f"{line}; requeued by {rec['requeued_by']} ({rec.get('why')})"
        return f"{line}; not requeued ({rec.get('why')})"
    return f"{head}: {kind}"


def explain_state(state: str) -> str:
    """sacct's state with its cause in words: `CANCELLED by 1000` names the user."""
    word, _, rest = state.partition(" ")
    if word == "CANCELLED" and rest.startswith("by "):
        uid = rest[3:].strip()
        try:
            who = pwd.getpwuid(int(uid)).pw_name
        except (KeyError, ValueError):
            who = f"uid {uid}"
        return f"{state} (cancelled by user {who})"
    cause = STATE_CAUSE.get(word.rstrip("+"))
    return f"{state} ({cause})" if cause else state


class EventRelay(FileRelay):
    """`with EventRelay(run_dir, job_id): ...` tells each event of that job as the job appends it (`tell`: the
    console by default), once, in the order written; events of other jobs in the same run folder are skipped."""

    def __init__(self, run_dir: str | os.PathLike, job_id: str, tell=None, poll_s: float = 1.0):
        super().__init__(Path(run_dir) / EVENTS, poll_s=poll_s)
        self.job_id = str(job_id)
        self.tell = tell or (lambda rec: log.warning("%s", describe(rec)))

    def feed(self, line: str) -> None:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            return
        if isinstance(rec, dict) and str(rec.get("job")) == self.job_id:
            self.tell(rec)
