"""SLURM launcher: one submitit job per run, every LauncherConfig field an sbatch option.

Preemption / timeout: SLURM sends USR2 `launcher.signal_delay_s` before the time limit (or on
preemption notice). Our handler - installed over submitit's, which would checkpoint from inside the
signal handler - only sets the trainer's stop flag; the training loop checkpoints collectively at the next
step boundary and returns "stopped"; then global rank 0 requeues the job (`scontrol requeue`, at most
`launcher.max_requeues` times, counted by SLURM_RESTART_COUNT) and the requeued job auto-resumes from
`<run_dir>/checkpoints/latest`. A SIGTERM (`scontrol requeue`, `scancel`, preemption with
PreemptMode=REQUEUE) also checkpoints at the next boundary; SLURM itself then requeues or cancels.

Failure: the ranks run as one srun step with --kill-on-bad-exit=1, so the step ends as soon as one rank
exits with an error; a rank that raised writes its report into the run folder first. The batch script's
teardown (launch/requeue.py) names the cause in `<run_dir>/failure.json` and requeues the job, at most
`launcher.max_failures` times (counted apart from max_requeues) and never for the same failure at the same task
twice in a row; the requeued job resumes from `latest`.
"""
from __future__ import annotations

import contextlib
import io
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import submitit
from submitit.core.utils import FailedJobError, FailedSubmissionError, UncompletedJobError

from smat_dist.config.schema import Config, LauncherConfig
from smat_dist.launch import failure, job_events
from smat_dist.launch.env import (
    DEFAULT_RANK_FN,
    LaunchError,
    RankFnSpec,
    StopFlag,
    apply_rank_math,
    last_error_line,
    resolve_rank_fn,
    run_rank_fn,
    slurm_torch_env,
)
from smat_dist.launch.sbatch_errors import submission_error
from smat_dist.utils.log import get_logger

log = get_logger(__name__)


def executor_parameters(lc: LauncherConfig, name: str) -> dict:
    """LauncherConfig -> submitit AutoExecutor parameters (optional fields only when set)."""
    p = {"name": name, "nodes": lc.nodes, "tasks_per_node": lc.tasks_per_node, "cpus_per_task": lc.cpus_per_task,
         "mem_gb": lc.mem_gb, "timeout_min": lc.timeout_min, "slurm_signal_delay_s": lc.signal_delay_s,
         # requeue must be allowed even where the cluster's JobRequeue=0
         "slurm_additional_parameters": {"requeue": True},
         # one rank exiting with an error ends the step at once (SLURM would keep the others waiting in a collective)
         "slurm_srun_args": ["--kill-on-bad-exit=1"]}
    if lc.gpus_per_node:
        p["gpus_per_node"] = lc.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(lc, key) is not None:
            p[f"slurm_{key}"] = getattr(lc, key)
    return p


class SlurmTrainTask(submitit.helpers.Checkpointable):
    """The callable submitit runs in every task of the job (one task = one rank)."""

    def __init__(self, cfg: Config, run_dir: str, rank_fn: RankFnSpec = DEFAULT_RANK_FN):
        self.cfg, self.run_dir, self.rank_fn = cfg, run_dir, rank_fn

    def __call__(self) -> dict:
        from smat_dist.utils.log import setup_logging

        setup_logging()
        # launcher.threads / launcher.portable_math before torch runs anything (threads=0: cpus_per_task)
        log.info("%s", apply_rank_math(self.cfg.launcher, self.cfg.launcher.cpus_per_task))
        # multi-node torch.distributed from SLURM's variables (MASTER_ADDR = first node, port from job id)
        denv = slurm_torch_env().export(set_cuda_visible_devices=False)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if denv.rank == 0:
            log.info("job %s attempt %d: %d rank(s), master %s:%s, run %s", os.environ.get("SLURM_JOB_ID"),
                     restarts + 1, denv.world_size, denv.master_addr, denv.master_port, self.run_dir)
        flag = StopFlag().install((signal.SIGUSR2, signal.SIGTERM, signal.SIGINT))
        try:
            result = run_rank_fn(self.rank_fn, self.cfg, self.run_dir, flag)
        except Exception as e:  # noqa: BLE001 - every error is reported, then the process leaves at once
            _fail_fast(e, denv.rank, self.run_dir)
        restarts -= failure.failed_retries(self.run_dir)   # time-limit requeues have their own counter
        if result.get("status") != "stopped":
            return result
        self._after_stop(flag, denv.rank, restarts, result)
        return result  # not reached: _after_stop exits or raises

    def _after_stop(self, flag: StopFlag, rank: int, restarts: int, result: dict) -> None:
        job_id = os.environ.get("SLURM_JOB_ID", "?")
        sig = flag.signal_name
        if sig == "SIGUSR2":
            if restarts >= self.cfg.launcher.max_requeues:
                if rank == 0:
                    job_events.record(self.run_dir, "stopped", signal=sig, tasks=result.get("tasks"),
                                      gave_up=f"launcher.max_requeues={self.cfg.launcher.max_requeues} reached")
                raise UncompletedJobError(
                    f"job {job_id} stopped by {sig} at task {result.get('tasks')} after {restarts} requeue(s) "
                    f"(launcher.max_requeues={self.cfg.launcher.max_requeues}); its checkpoint is in {self.run_dir}: "
                    f"continue with `smat-train resume={self.run_dir}`")
            if rank == 0:
                subprocess.check_call(["scontrol", "requeue", job_id], timeout=60)
                log.warning("job %s: %s at task %s, checkpoint written, requeued (%d of %d)", job_id, sig,
                            result.get("tasks"), restarts + 1, self.cfg.launcher.max_requeues)
                job_events.record(self.run_dir, "stopped", signal=sig, tasks=result.get("tasks"),
                                  requeued_by="smat_dist", count=restarts + 1, limit=self.cfg.launcher.max_requeues)
        else:
            log.warning("job %s: %s at task %s, checkpoint written; SLURM requeues or cancels the job", job_id,
                        sig, result.get("tasks"))
            if rank == 0:
                job_events.record(self.run_dir, "stopped", signal=sig, tasks=result.get("tasks"))
        # leave without a result pickle, so submitit keeps waiting for the requeued attempt (same as
        # submitit's own checkpoint-and-requeue path)
        sys.stdout.flush()
        sys.stderr.flush()
        sys.exit(0)

    def checkpoint(self, *args, **kwargs):
        # only reached if a signal lands before our handler is installed: requeue the same task, which
        # resumes from the latest checkpoint on disk
        return submitit.helpers.DelayedSubmission(SlurmTrainTask(self.cfg, self.run_dir, self.rank_fn))


def _fail_fast(e: Exception, rank: int, run_dir: str) -> None:
    """A rank that raised: its report for the teardown (launch/requeue.py), submitit's error result (what
    submitit itself writes for an exception), then exit at once: a normal interpreter exit spent ~5 s in
    native teardown (measured on the dev cluster; no Python frame left) before srun's --kill-on-bad-exit could
    end the step."""
    from submitit.core import utils as submitit_utils

    tb = traceback.format_exc()
    log.error("rank failed:\n%s", tb)
    failure.write_rank_outcome(run_dir, failure.rank_outcome(rank, e, tb), _attempt())
    with submitit_utils.temporary_save_path(submitit.JobEnvironment().paths.result_pickle) as tmp:
        submitit_utils.cloudpickle_dump(("error", tb), tmp)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _attempt() -> str:
    return f"{os.environ.get('SLURM_JOB_ID', '?')}.{os.environ.get('SLURM_RESTART_COUNT', '0')}"


def teardown(cfg: Config, run_dir: str, folder: str) -> list[str]:
    """The batch script's lines after srun: name the failure and requeue (launch/requeue.py); srun's status
    is kept as the job's unless the job was requeued."""
    lc = cfg.launcher
    cmd = [sys.executable, "-m", "smat_dist.launch.requeue", str(Path(run_dir).resolve()), "$smat_rc",
           str(lc.nodes * lc.tasks_per_node), str(lc.max_failures), str(Path(folder).resolve())]
    return ["smat_rc=$?", " ".join(shlex.quote(c) if c != "$smat_rc" else c for c in cmd), "exit $?"]


def submit(cfg: Config, run_dir: str, rank_fn: RankFnSpec = DEFAULT_RANK_FN) -> submitit.Job:
    """Submit the run as one SLURM job (nodes x tasks_per_node ranks). Returns the submitit Job."""
    if shutil.which("sbatch") is None:
        raise LaunchError("launcher=slurm but SLURM's sbatch is not on PATH (use launcher=local, or on a dev "
                          "machine: slurm/install.sh && slurm/devcluster.sh start)")
    if isinstance(rank_fn, str):
        resolve_rank_fn(rank_fn)
    if not cfg.launcher.gpus_per_node:
        log.warning("launcher.gpus_per_node=0: this job asks SLURM for no GPU, so its ranks train on the CPU "
                    "(gloo); set launcher.gpus_per_node (and tasks_per_node to match) to train on GPUs")
    folder = cfg.launcher.folder or str(Path(run_dir) / "submitit")
    # max_num_timeout bounds submitit's own requeue path (a signal before our handler is installed)
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=cfg.launcher.max_requeues)
    ex.update_parameters(**executor_parameters(cfg.launcher, name=f"smat-{Path(run_dir).name}"),
                         slurm_teardown=teardown(cfg, run_dir, folder))
    try:
        with contextlib.redirect_stderr(io.StringIO()):   # submitit echoes sbatch's stderr: reported in one line
            job = ex.submit(SlurmTrainTask(cfg, run_dir, rank_fn))
    except (FailedJobError, FailedSubmissionError, OSError) as e:
        raise LaunchError(submission_error(e)) from None
    log.info("submitted SLURM job %s (%d node(s) x %d task(s)); log %s", job.job_id, cfg.launcher.nodes,
             cfg.launcher.tasks_per_node, job.paths.stderr)
    return job


def wait(job: submitit.Job, poll_s: float = 5.0, total: int | None = None, run_dir: str | None = None) -> dict:
    """Wait for the job (across requeues, the teardown's included), report state changes and, given the run's
    `total` tasks, rank 0's training progress from the run folder's progress records (done/total, rate, ETA);
    rank 0's result dict with `"ranks"`. `run_dir` (default: the submitted task's): where rank 0 records its
    progress, the job its events (launch/job_events.py) and the teardown a failure.

    Raises LaunchError with the job's error line and its log path when it fails, times out for good or is
    cancelled."""
    from smat_dist.launch.relay import ProgressRelay

    last = None
    run_dir = _run_dir(job, run_dir)
    relay_s = min(poll_s, 2.0)
    relay = ProgressRelay(run_dir, total, poll_s=relay_s) if total and run_dir else contextlib.nullcontext()
    events = job_events.EventRelay(run_dir, job.job_id, poll_s=relay_s) if run_dir else contextlib.nullcontext()
    with relay, events:   # the relays read once more as they close: the teardown's last event is told
        while not _finished(job):
            state = job.state
            if state != last:
                log.info("job %s: %s", job.job_id, job_events.explain_state(state))
                last = state
            time.sleep(poll_s)
    try:
        results = job.results()
    except (FailedJobError, UncompletedJobError) as e:
        named = _named_failure(job, run_dir)
        if named is not None:   # the teardown named the cause (launch/requeue.py)
            msg, task = named
        else:
            text = str(e)
            task = _failed_task(job)
            log_path = _task_log(job, task)
            # The cause is in the failing task's own log; the exception submitit raises may be another task's
            # "peer went away" error.
            cause = last_error_line(log_path.read_text(errors="replace")) if log_path.is_file() else ""
            msg = cause or last_error_line(text) or text[:300]
        log_path = _task_log(job, task)
        raise LaunchError(f"SLURM job {job.job_id} failed ({job.state}): {msg}", log_path=str(log_path),
                          job_id=job.job_id) from e
    result = dict(results[0] or {})
    result["ranks"] = list(results)
    result["job_id"] = job.job_id
    return result


# sacct states of a job that is not over: a teardown may still requeue it, or a requeued attempt is coming
ACTIVE = ("RUNNING", "PENDING", "REQUEUED", "COMPLETING", "CONFIGURING", "RESIZING", "SUSPENDED", "REQUEUE")


def _finished(job: submitit.Job) -> bool:
    """Every task's result is there (or SLURM says it ended) and the job is not about to run again: the
    results of a failed attempt exist until its teardown removes them and requeues."""
    if not job.done():
        return False
    return not job.watcher.get_state(job.job_id, mode="force").startswith(ACTIVE)


def _run_dir(job: submitit.Job, run_dir: str | None) -> str | None:
    """The run folder the job trains in: the caller's, else the submitted task's."""
    if run_dir is None:
        try:
            run_dir = getattr(job.submission().function, "run_dir", None)
        except (OSError, ValueError):   # no submitted pickle (not our job)
            return None
    return run_dir


def _named_failure(job: submitit.Job, run_dir: str | None) -> tuple[str, int] | None:
    """(message, the cause's task) from <run_dir>/failure.json when this job's teardown wrote it."""
    import json

    run_dir = _run_dir(job, run_dir)
    p = Path(run_dir) / failure.FAILURE_JSON if run_dir else None
    if p is None or not p.is_file() or p.stat().st_mtime < job.paths.submitted_pickle.stat().st_mtime:
        return None
    f = json.loads(p.read_text())
    return f"{f['message']}; {f['why']} (details in {p})", int(f["cause"]["rank"])


def _task_log(job: submitit.Job, task: int) -> Path:
    return Path(job.paths.folder) / f"{job.job_id}_{task}_log.err"


def _failed_task(job: submitit.Job) -> int:
    """The task whose log shows the earliest Python traceback (the rank that raised first; the others
    usually fail only because it left), else task 0."""
    hits = []
    for t in range(job.num_tasks):
        p = _task_log(job, t)
        text = p.read_text(errors="replace") if p.is_file() else ""
        if "Traceback (most recent call last)" in text:
            victim = failure.is_peer_error(last_error_line(text)) or "gloo" in last_error_line(text)
            hits.append((victim, p.stat().st_mtime_ns, t))
    return min(hits)[2] if hits else 0
