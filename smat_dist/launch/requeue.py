"""The SLURM job's teardown: after `srun` returned, name the cause of a failed attempt and requeue the job.

    python -m smat_dist.launch.requeue RUN_DIR SRUN_RC WORLD MAX_FAILURES SUBMITIT_FOLDER

runs in the batch script after the ranks' step (slurm.py adds it as submitit's teardown), on the job's first
node, with SLURM_JOB_ID / SLURM_RESTART_COUNT set. srun ran with --kill-on-bad-exit=1, so the step ended as
soon as one rank exited with an error. Each rank that raised wrote its own report (launch/failure.py); a
rank with none was killed: srun's own `srun: error: NODE: task N: ...` lines (in task 0's log, the batch
script's stderr) say which one died first and on which node, and those killed after it by --kill-on-bad-exit
are victims. The failure goes to `<run_dir>/failure.json`; when it is retried (launcher.max_failures), the
attempt's submitit result files are removed (so the submitter keeps waiting) and the job is requeued as the
last act: it resumes from `latest`. Exit status: srun's, unless requeued.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from smat_dist.launch import failure, job_events
from smat_dist.utils.log import get_logger, setup_logging

log = get_logger(__name__)

SRUN_LINE = re.compile(r"^srun: error: (\S+): tasks? ([\d,\-]+): (.+)$")


def _task_ids(spec: str) -> list[int]:
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def srun_deaths(batch_log: Path) -> list[tuple[int, str, str]]:
    """(task, node, what) for each task srun reported as failed, in the order it reported them."""
    if not batch_log.is_file():
        return []
    out, seen = [], set()
    for line in batch_log.read_text(errors="replace").splitlines():
        m = SRUN_LINE.match(line.strip())
        if m:
            for t in _task_ids(m.group(2)):
                if t not in seen:
                    seen.add(t)
                    out.append((t, m.group(1), m.group(3).strip()))
    return out


def attempt_outcomes(run_dir: Path, world: int, attempt: str, batch_log: Path) -> list[dict]:
    """One outcome per rank of the attempt that just ended (launch/failure.py's format).

    A rank without a report that srun saw fail was killed. srun may report several tasks in one line, so the
    reports decide who it was: if a rank raised an error of its own, the silent ones were ended by
    --kill-on-bad-exit after it; if the others only timed out waiting for it, it hung; otherwise (the others
    saw the connection drop) it died first."""
    reports = failure.read_rank_outcomes(run_dir, attempt)
    deaths = {t: (n, w) for t, n, w in srun_deaths(batch_log)}
    raised = any(not o.get("victim") for o in reports.values())
    waited = any(failure.timed_out(o) for o in reports.values())
    outcomes = []
    for r in range(world):
        if r in reports:
            outcomes.append(reports[r])
        elif r not in deaths:   # srun did not report it: it finished, or was ended with the step
            outcomes.append({"rank": r, "ok": True})
        else:
            node, what = deaths[r]
            o = {"rank": r, "ok": False, "host": node, "died": not (raised or waited), "stopped": raised or waited}
            o["error"] = (f"ended by --kill-on-bad-exit (srun: {what})" if raised else
                          f"was killed by srun (srun: {what})" if waited else
                          f"was killed without a Python error (srun: {what}; a signal, the out-of-memory killer "
                          "or a lost node)")
            outcomes.append(o)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    run_dir, rc, world, max_failures, folder = (argv if argv is not None else sys.argv[1:])
    rc, world, max_failures = int(rc), int(world), int(max_failures)
    if rc == 0:
        return 0
    run_dir = Path(run_dir)
    job = os.environ.get("SLURM_JOB_ID", "?")
    attempt = f"{job}.{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    outcomes = attempt_outcomes(run_dir, world, attempt, Path(folder) / f"{job}_0_log.err")
    if all(o["ok"] for o in outcomes):   # nothing to name (srun itself failed): leave it to SLURM
        log.error("job %s: srun exited with %d and no rank reported a failure", job, rc)
        return rc
    cause = failure.pick_cause(outcomes)
    f = failure.record_failure(run_dir, failure.summarize(outcomes, cause), max_failures)
    log.error("job %s attempt %s: %s; %s", job, attempt, f["message"], f["why"])
    failure.clear_rank_outcomes(run_dir)
    job_events.record(run_dir, "failed", message=f["message"], why=f["why"],
                      requeued_by="smat_dist's teardown" if f["retry"] else None)
    if not f["retry"]:
        return rc
    for p in Path(folder).glob(f"{job}_*_result.pkl"):   # the submitter waits for the requeued attempt
        p.unlink(missing_ok=True)
    subprocess.check_call(["scontrol", "requeue", job], timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
