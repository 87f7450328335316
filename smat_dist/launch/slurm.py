"""SLURM launcher: one submitit job per run, every LauncherConfig field an sbatch option.

Preemption / timeout: SLURM sends USR2 `launcher.signal_delay_s` before the time limit (or on
preemption notice). Our handler - installed over submitit's, which would checkpoint from inside the
signal handler - only sets the trainer's stop flag; the training loop checkpoints collectively at the next
step boundary and returns "stopped"; then global rank 0 requeues the job (`scontrol requeue`, at most
`launcher.max_requeues` times, counted by SLURM_RESTART_COUNT) and the requeued job auto-resumes from
`<run_dir>/checkpoints/latest`. A SIGTERM (`scontrol requeue`, `scancel`, preemption with
PreemptMode=REQUEUE) also checkpoints at the next boundary; SLURM itself then requeues or cancels.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

from smat_dist.config.schema import Config, LauncherConfig
from smat_dist.launch.env import (
    DEFAULT_RANK_FN,
    PEER_ERRORS,
    LaunchError,
    RankFnSpec,
    StopFlag,
    apply_rank_math,
    last_error_line,
    resolve_rank_fn,
)
from smat_dist.utils.log import get_logger

log = get_logger(__name__)


def executor_parameters(lc: LauncherConfig, name: str) -> dict:
    """LauncherConfig -> submitit AutoExecutor parameters (optional fields only when set)."""
    p = {"name": name, "nodes": lc.nodes, "tasks_per_node": lc.tasks_per_node, "cpus_per_task": lc.cpus_per_task,
         "mem_gb": lc.mem_gb, "timeout_min": lc.timeout_min, "slurm_signal_delay_s": lc.signal_delay_s,
         # requeue must be allowed even where the cluster's JobRequeue=0
         "slurm_additional_parameters": {"requeue": True}}
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
        denv = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if denv.rank == 0:
            log.info("job %s attempt %d: %d rank(s), master %s:%s, run %s", os.environ.get("SLURM_JOB_ID"),
                     restarts + 1, denv.world_size, denv.master_addr, denv.master_port, self.run_dir)
        flag = StopFlag().install((signal.SIGUSR2, signal.SIGTERM, signal.SIGINT))
        result = resolve_rank_fn(self.rank_fn)(self.cfg, self.run_dir, flag)
        if result.get("status") != "stopped":
            return result
        self._after_stop(flag, denv.rank, restarts, result)
        return result  # not reached: _after_stop exits or raises

    def _after_stop(self, flag: StopFlag, rank: int, restarts: int, result: dict) -> None:
        job_id = os.environ.get("SLURM_JOB_ID", "?")
        sig = flag.signal_name
        if sig == "SIGUSR2":
            if restarts >= self.cfg.launcher.max_requeues:
                raise UncompletedJobError(
                    f"job {job_id} stopped by {sig} at task {result.get('tasks')} after {restarts} requeue(s) "
                    f"(launcher.max_requeues={self.cfg.launcher.max_requeues}); its checkpoint is in {self.run_dir}: "
                    f"continue with `smat-train resume={self.run_dir}`")
            if rank == 0:
                subprocess.check_call(["scontrol", "requeue", job_id], timeout=60)
                log.warning("job %s: %s at task %s, checkpoint written, requeued (%d of %d)", job_id, sig,
                            result.get("tasks"), restarts + 1, self.cfg.launcher.max_requeues)
        else:
            log.warning("job %s: %s at task %s, checkpoint written; SLURM requeues or cancels the job", job_id,
                        sig, result.get("tasks"))
        # leave without a result pickle, so submitit keeps waiting for the requeued attempt (same as
        # submitit's own checkpoint-and-requeue path)
        sys.stdout.flush()
        sys.stderr.flush()
        sys.exit(0)

    def checkpoint(self, *args, **kwargs):
        # only reached if a signal lands before our handler is installed: requeue the same task, which
        # resumes from the latest checkpoint on disk
        return submitit.helpers.DelayedSubmission(SlurmTrainTask(self.cfg, self.run_dir, self.rank_fn))


def submit(cfg: Config, run_dir: str, rank_fn: RankFnSpec = DEFAULT_RANK_FN) -> submitit.Job:
    """Submit the run as one SLURM job (nodes x tasks_per_node ranks). Returns the submitit Job."""
    if shutil.which("sbatch") is None:
        raise LaunchError("launcher=slurm but SLURM's sbatch is not on PATH (use launcher=local, or on a dev "
                          "machine: slurm/install.sh && slurm/devcluster.sh start)")
    if isinstance(rank_fn, str):
        resolve_rank_fn(rank_fn)
    folder = cfg.launcher.folder or str(Path(run_dir) / "submitit")
    # max_num_timeout bounds submitit's own requeue path (a signal before our handler is installed)
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=cfg.launcher.max_requeues)
    ex.update_parameters(**executor_parameters(cfg.launcher, name=f"smat-{Path(run_dir).name}"))
    job = ex.submit(SlurmTrainTask(cfg, run_dir, rank_fn))
    log.info("submitted SLURM job %s (%d node(s) x %d task(s)); log %s", job.job_id, cfg.launcher.nodes,
             cfg.launcher.tasks_per_node, job.paths.stderr)
    return job


def wait(job: submitit.Job, poll_s: float = 5.0, total: int | None = None) -> dict:
    """Wait for the job (across requeues), report state changes and, given the run's `total` tasks, rank 0's
    training progress from task 0's log (done/total, rate, ETA); rank 0's result dict with `"ranks"`.

    Raises LaunchError with the job's error line and its log path when it fails, times out for good or is
    cancelled."""
    import contextlib

    from smat_dist.launch.relay import LogRelay

    last = None
    relay = LogRelay(_task_log(job, 0), total, poll_s=min(poll_s, 2.0)) if total else contextlib.nullcontext()
    with relay:
        while not job.done():
            state = job.state
            if state != last:
                log.info("job %s: %s", job.job_id, state)
                last = state
            time.sleep(poll_s)
    try:
        results = job.results()
    except (FailedJobError, UncompletedJobError) as e:
        text = str(e)
        task = _failed_task(job)
        log_path = _task_log(job, task)
        # The cause is in the failing task's own log; the exception submitit raises may be another task's
        # "peer went away" error.
        cause = last_error_line(log_path.read_text(errors="replace")) if log_path.is_file() else ""
        why = cause or last_error_line(text) or text[:300]
        raise LaunchError(f"SLURM job {job.job_id} failed ({job.state}): {why}", log_path=str(log_path),
                          job_id=job.job_id) from e
    result = dict(results[0] or {})
    result["ranks"] = list(results)
    result["job_id"] = job.job_id
    return result


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
            victim = any(m in last_error_line(text) for m in PEER_ERRORS + ("gloo", "Connection"))
            hits.append((victim, p.stat().st_mtime_ns, t))
    return min(hits)[2] if hits else 0
