"""Name the cause of a failed attempt, and decide whether running it again can help.

Every launcher reduces an attempt to one outcome per rank (the same dict on both launchers):

    {"rank", "ok": bool, "error": "ValueError: ..." or how the process ended, "died": no report (a signal,
     the OOM killer, a lost node), "stopped": killed by the launcher after the others had failed (it hung),
     "victim": its error only says a peer went away or a collective timed out, "at": when it failed,
     "tasks": tasks done when it failed, "host"}

`pick_cause` names the rank that failed first (a rank that died before one that raised; a rank whose error
is "the peer went away" is a victim; if every error is a victim's and a rank had to be killed, that rank
hung). `record_failure` writes `<run_dir>/failure.json` (the cause, the victims, the step and whether the run
is retried) and appends it to `failures.jsonl`, whose last lines `decide` reads: an attempt is retried at most
`launcher.max_failures` times, never after a deterministic error (a config or checkpoint error), and never when
the same failure happened at the same task in the previous attempt (a NaN that recurs, a bad shard).
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from smat_dist.launch.env import last_error_line

# error text of a rank that failed only because a peer went away or stopped answering (a victim, not the
# cause): gloo's socket errors and timeouts, NCCL's remote / aborted-communicator errors and its watchdog
PEER_ERRORS = ("Connection reset by peer", "Connection closed by peer", "Connection refused", "Broken pipe",
               "DistBackendError", "DistNetworkError", "Timed out waiting", "ncclRemoteError", "ncclSystemError",
               "NCCL communicator was aborted", "Watchdog caught collective", "ProcessGroupNCCL", "Socket Timeout",
               # NonFiniteLoss (train/step.py) on a rank whose own losses were finite
               "every rank stops at this step")
# a victim's error that says it waited for a peer until the process-group timeout (gloo; NCCL's watchdog)
TIMEOUT_ERRORS = ("Timed out waiting", "Watchdog caught collective", "Socket Timeout")
# exception classes a rerun meets again at once: not retried
DETERMINISTIC = ("ConfigError", "CheckpointError")
RANK_DIR = "failures"          # per-rank reports of the attempt in progress (SLURM: read by the teardown)
FAILURE_JSON = "failure.json"
HISTORY = "failures.jsonl"


def is_peer_error(text: str) -> bool:
    return any(p in text for p in PEER_ERRORS)


def rank_outcome(rank: int, exc: BaseException, traceback_text: str = "") -> dict:
    """The outcome of a rank that raised `exc` (the trainer tags it with `smat_tasks`)."""
    error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    error = error if len(error) <= 300 else error[:297] + "..."
    text = error + " " + last_error_line(traceback_text)
    return {"rank": rank, "ok": False, "error": error, "died": False, "stopped": False,
            "victim": is_peer_error(text), "at": time.time(), "tasks": getattr(exc, "smat_tasks", None),
            "host": host(), "pid": os.getpid()}


def host() -> str:
    """The node's name as the scheduler knows it (SLURM's, where several nodes share a machine), else the host's."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def write_rank_outcome(run_dir: str | os.PathLike, outcome: dict, attempt: str) -> None:
    """A rank's own report, written atomically before it exits (the SLURM teardown collects them)."""
    d = Path(run_dir) / RANK_DIR
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".rank{outcome['rank']}.json.tmp"
    tmp.write_text(json.dumps({**outcome, "attempt": attempt}))
    os.replace(tmp, d / f"rank{outcome['rank']}.json")


def read_rank_outcomes(run_dir: str | os.PathLike, attempt: str) -> dict[int, dict]:
    """This attempt's rank reports (older attempts' files are ignored)."""
    out = {}
    for p in sorted((Path(run_dir) / RANK_DIR).glob("rank*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if rec.get("attempt") == attempt:
            out[int(rec["rank"])] = rec
    return out


def clear_rank_outcomes(run_dir: str | os.PathLike) -> None:
    for p in (Path(run_dir) / RANK_DIR).glob("rank*.json"):
        p.unlink(missing_ok=True)


def timed_out(o: dict) -> bool:
    return any(m in (o.get("error") or "") for m in TIMEOUT_ERRORS)


def hung_ranks(outcomes: list[dict]) -> set[int]:
    """Ranks that stopped answering: killed by the launcher after the others had failed, or, when every error
    is a victim's, the ranks that did not time out themselves while the others timed out waiting (SLURM
    resumes a stopped rank before ending the step, so it then reports the connection its peers closed)."""
    bad = [r for r, o in enumerate(outcomes) if not o["ok"]]
    stopped = {r for r in bad if outcomes[r].get("stopped")}
    if stopped or any(not outcomes[r].get("victim") or outcomes[r].get("died") for r in bad):
        return stopped
    waited = {r for r in bad if timed_out(outcomes[r])}
    return set(bad) - waited if waited else set()


def pick_cause(outcomes: list[dict], first_died: int | None = None) -> int:
    """The index of the rank that caused the failure (see the module doc); `first_died`: the rank the
    launcher saw dead first, when it saw one."""
    bad = [r for r, o in enumerate(outcomes) if not o["ok"]]
    died = [r for r in bad if outcomes[r].get("died")]
    if died:
        return first_died if first_died in died else died[0]
    at = lambda r: (outcomes[r].get("at") or float("inf"), r)  # noqa: E731
    raised = [r for r in bad if not outcomes[r].get("stopped") and not outcomes[r].get("victim")]
    if raised:
        return min(raised, key=at)
    hung = hung_ranks(outcomes)
    return min(hung) if hung else min(bad, key=at)


def describe(o: dict, hung: bool = False) -> str:
    """One line for a rank's outcome: 'failed: ValueError: ...', 'was killed by SIGKILL (...)', 'hung: ...'."""
    if hung or o.get("stopped"):
        return f"hung: the other ranks timed out or failed waiting for it (then: {o['error']})"
    return o["error"] if o.get("died") else f"failed: {o['error']}"


def summarize(outcomes: list[dict], cause: int) -> dict:
    """failure.json's content (without the retry decision)."""
    c = dict(outcomes[cause])
    tasks = c.get("tasks")
    if tasks is None:   # a rank that died wrote nothing: the others were in the same step
        known = [o["tasks"] for o in outcomes if o.get("tasks") is not None]
        tasks = max(known) if known else None
    c["tasks"] = tasks
    hung = hung_ranks(outcomes)
    c["stopped"] = cause in hung
    victims = [{"rank": o["rank"], "error": describe(o)} for o in outcomes if not o["ok"] and o["rank"] != cause]
    at = f" after {tasks} tasks" if tasks is not None else ""
    host = f" on host {c['host']}" if c.get("host") else ""
    return {"cause": {k: c.get(k) for k in ("rank", "host", "error", "tasks", "died", "stopped")},
            "message": f"rank {cause} of {len(outcomes)} {describe(c, cause in hung)}{at}{host}", "tasks": tasks,
            "victims": victims, "time": time.time()}


def _signature(f: dict) -> tuple:
    """What makes two failures "the same": the kind of error (its class, or how the rank died) and the task
    count; not the message, which names per-attempt details (ports, addresses)."""
    c = f["cause"]
    return ((c.get("error") or "").split(":", 1)[0], c.get("tasks"), bool(c.get("stopped")))


def read_history(run_dir: str | os.PathLike) -> list[dict]:
    p = Path(run_dir) / HISTORY
    if not p.is_file():
        return []
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def decide(failure: dict, history: list[dict], max_failures: int) -> tuple[bool, str]:
    """(retry?, why) for `failure`, given the earlier failed attempts of this run (oldest first)."""
    cls = (failure["cause"].get("error") or "").split(":", 1)[0]
    if cls in DETERMINISTIC:
        return False, f"{cls} is not retried: a rerun would fail the same way"
    if history and _signature(history[-1]) == _signature(failure):
        return False, ("the previous attempt failed the same way at the same task: deterministic (a recurring "
                       "NaN, a bad shard, a config error), not retried")
    retried = sum(1 for h in history if h.get("retry"))
    if retried >= max_failures:
        return False, f"{retried} failed attempt(s) already retried (launcher.max_failures={max_failures})"
    return True, f"retry {retried + 1} of {max_failures} (launcher.max_failures), resuming from the latest checkpoint"


def record_failure(run_dir: str | os.PathLike, failure: dict, max_failures: int) -> dict:
    """Decide, then write failure.json and append to failures.jsonl; returns the failure with `retry`, `why`."""
    run_dir = Path(run_dir)
    retry, why = decide(failure, read_history(run_dir), max_failures)
    failure = {**failure, "retry": retry, "why": why}
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (FAILURE_JSON + ".tmp")
    tmp.write_text(json.dumps(failure, indent=2) + "\n")
    os.replace(tmp, run_dir / FAILURE_JSON)
    with open(run_dir / HISTORY, "a") as f:
        f.write(json.dumps(failure) + "\n")
    return failure


def failed_retries(run_dir: str | os.PathLike) -> int:
    """How many requeues of this run were failure retries (the time-limit counter leaves them out)."""
    return sum(1 for h in read_history(run_dir) if h.get("retry"))
