"""Local launcher: `launcher.nproc` rank processes on this machine, torchrun-style.

Each rank is a spawned process with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set and its
stdout+stderr in `<run_dir>/logs/rank<r>.log`; with `progress=True` rank 0's training progress (its records in
`<run_dir>/progress.jsonl`) is shown on this console (launch/relay.py). Ctrl-C / SIGTERM is turned into the
trainer's stop flag (checkpoint at the next step boundary, then exit); a second Ctrl-C stops at once. When a rank
fails, ranks still alive `launcher.kill_grace_s` later are SIGKILLed (a rank blocked in a collective never reads
a stop flag), the cause is named (launch/failure.py: the first rank to fail, its error or signal, its host and
task; the others as victims) on the console and in `<run_dir>/failure.json`, and with `restarts` > 0 the ranks
are started again (they resume from `latest`) unless the failure cannot be helped by a rerun.
LaunchError names the cause and its log.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import time
import traceback
from pathlib import Path

from smat_dist.config.schema import Config
from smat_dist.launch import failure
from smat_dist.launch.env import (
    DEFAULT_RANK_FN,
    LaunchError,
    RankFnSpec,
    StopFlag,
    apply_rank_math,
    describe_exit,
    free_port,
    rank_env,
    resolve_rank_fn,
    run_rank_fn,
    tail,
)
from smat_dist.utils.log import get_logger

log = get_logger(__name__)


def _rank_main(rank: int, world: int, port: int, cfg: Config, run_dir: str, rank_fn: RankFnSpec,
               log_path: str, result_path: str, threads: int) -> None:
    # runs in the spawned child: all output of this rank goes to its log file (appended, so a resumed
    # run keeps the earlier attempt's log above the new one)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(rank_env(rank, world, rank, world, "127.0.0.1", port))
    # threads/ISA from the config (launcher.threads, launcher.portable_math) before torch runs anything;
    # `threads` is only the machine's share, used when launcher.threads=0
    math_line = apply_rank_math(cfg.launcher, threads)
    from smat_dist.utils.log import setup_logging

    setup_logging(all_ranks=True)   # each rank has its own file: log INFO on every rank
    log.info("%s", math_line)
    flag = StopFlag().install()
    try:
        result = run_rank_fn(rank_fn, cfg, run_dir, flag)
        with open(result_path + ".tmp", "wb") as f:
            pickle.dump({"ok": True, "result": result, "signal": flag.signal_name}, f)
    except BaseException as e:  # noqa: BLE001 - report everything (incl. KeyboardInterrupt) to the parent
        tb = traceback.format_exc()
        log.error("rank failed:\n%s", tb)
        with open(result_path + ".tmp", "wb") as f:
            pickle.dump({**failure.rank_outcome(rank, e, tb), "traceback": tb}, f)
        os.replace(result_path + ".tmp", result_path)
        os._exit(1)
    os.replace(result_path + ".tmp", result_path)


def _check_devices(cfg: Config, nproc: int) -> None:
    """One GPU per local rank under NCCL, refused before any rank starts (not an 'invalid device ordinal')."""
    from smat_dist.utils.device import DeviceError, check_local_ranks

    backend = str(getattr(cfg.dist.backend, "value", cfg.dist.backend) or "nccl")
    if backend == "nccl":
        try:
            check_local_ranks(nproc)
        except DeviceError as e:
            raise LaunchError(str(e)) from None


def launch_local(cfg: Config, run_dir: str, rank_fn: RankFnSpec = DEFAULT_RANK_FN, nproc: int | None = None,
                 progress: bool = False, progress_label: str = "train", restarts: int = 0) -> dict:
    """Run `nproc` (default `cfg.launcher.nproc`) ranks of `rank_fn`; return rank 0's result dict
    with `"ranks": [every rank's result]` added. Raises LaunchError if any rank fails and the failure is not
    retried. `progress`: show rank 0's training progress (the trainer's `tasks N/M` lines) on this console.
    `restarts`: how many failed attempts may be started again (smat-train: launcher.max_failures); the rank
    function must resume from the run folder by itself, as the trainer does."""
    nproc = nproc or cfg.launcher.nproc
    if nproc < 1:
        raise LaunchError(f"launcher.nproc={nproc}: need at least 1 rank")
    _check_devices(cfg, nproc)
    if isinstance(rank_fn, str):
        resolve_rank_fn(rank_fn)  # fail here, not in every child, on a bad import path
    while True:
        try:
            return _attempt(cfg, run_dir, rank_fn, nproc, progress, progress_label)
        except LaunchError as e:
            f = e.failure
            if f is None:
                raise
            f = failure.record_failure(run_dir, f, restarts)
            if not f["retry"]:
                where = Path(run_dir) / failure.FAILURE_JSON
                raise LaunchError(f"{f['message']}{_others(f)}; {f['why']} (details in {where})",
                                  log_path=e.log_path, rank=e.rank) from None
            log.warning("%s; %s", f["message"], f["why"])


def _others(f: dict) -> str:
    v = [str(x["rank"]) for x in f["victims"]]
    return f" (ranks {', '.join(v)} failed too)" if v else ""


def _attempt(cfg: Config, run_dir: str, rank_fn: RankFnSpec, nproc: int, progress: bool, progress_label: str) -> dict:
    logs = Path(run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // nproc)   # launcher.threads=0 only (machine-dependent)
    ctx = mp.get_context("spawn")
    procs, paths = [], []
    relay = None
    if progress:
        from smat_dist.launch.relay import ProgressRelay

        # rank 0's progress records, from the file's current end (a resume appends)
        relay = ProgressRelay(run_dir, cfg.train.tasks, desc=progress_label)
    for r in range(nproc):
        log_path, result_path = str(logs / f"rank{r}.log"), str(logs / f"rank{r}.result.pkl")
        if os.path.exists(result_path):
            os.remove(result_path)
        p = ctx.Process(target=_rank_main, name=f"smat-rank{r}", daemon=False,
                        args=(r, nproc, port, cfg, run_dir, rank_fn, log_path, result_path, threads))
        p.start()
        procs.append(p)
        paths.append((log_path, result_path))
    log.info("launched %d rank(s) of %s; logs in %s", nproc, getattr(rank_fn, "__name__", rank_fn), logs)
    grace = cfg.launcher.kill_grace_s
    if relay is None:
        return _supervise(procs, paths, grace)
    with relay:
        return _supervise(procs, paths, grace)


def _supervise(procs: list, paths: list[tuple[str, str]], grace_s: float) -> dict:
    interrupted = []
    stopped: set[int] = set()   # ranks this launcher killed after another had failed (or on a second Ctrl-C)

    def on_signal(signum, frame):
        # forward Ctrl-C / TERM to the ranks as a stop request (they checkpoint and exit);
        # on the second one terminate them outright
        interrupted.append(signum)
        for r, p in enumerate(procs):
            if p.is_alive():
                if len(interrupted) > 1:
                    stopped.add(r)
                os.kill(p.pid, signal.SIGTERM if len(interrupted) == 1 else signal.SIGKILL)
        if len(interrupted) == 1:
            log.warning("stop requested: ranks will checkpoint at the next step boundary (again to kill them)")

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    first_failure: int | None = None
    failed_at = 0.0
    try:
        while any(p.is_alive() for p in procs):
            for r, p in enumerate(procs):
                if first_failure is None and p.exitcode not in (None, 0):
                    first_failure, failed_at = r, time.monotonic()
                    log.error("rank %d %s; ranks still running in %.0f s are killed", r, describe_exit(p.exitcode),
                              grace_s)
            if first_failure is not None and time.monotonic() - failed_at > grace_s:
                # SIGKILL, not a stop request: a rank blocked in a collective (or stopped) never reads its flag
                for r, p in enumerate(procs):
                    if p.is_alive():
                        stopped.add(r)
                        p.kill()
            time.sleep(0.1)
        for p in procs:
            p.join()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return _collect(procs, paths, first_failure, stopped, interrupted=bool(interrupted))


def _collect(procs: list, paths: list[tuple[str, str]], first_failure: int | None,
             stopped: set[int] = frozenset(), interrupted: bool = False) -> dict:
    outcomes = []
    why_killed = "a second Ctrl-C" if interrupted else "launcher.kill_grace_s"
    for r, ((log_path, result_path), p) in enumerate(zip(paths, procs)):
        if os.path.exists(result_path):
            with open(result_path, "rb") as f:
                outcomes.append(pickle.load(f))
            outcomes[-1].setdefault("at", os.stat(result_path).st_mtime)
        else:  # killed (by the OOM killer, kill -9, a native crash, or this launcher) before it could report
            outcomes.append({"ok": False, "died": r not in stopped, "stopped": r in stopped,
                             "error": (f"was killed by the launcher ({why_killed})" if r in stopped
                                       else describe_exit(p.exitcode)), "host": failure.host(),
                             "traceback": tail(log_path)})
        outcomes[-1]["rank"] = r
    if any(not o["ok"] for o in outcomes):
        cause = failure.pick_cause(outcomes, first_failure)
        summary = None if interrupted else failure.summarize(outcomes, cause)   # the user's stop is not retried
        raise LaunchError(f"rank {cause} of {len(procs)} {failure.describe(outcomes[cause])}",
                          log_path=paths[cause][0], rank=cause, failure=summary)
    result = dict(outcomes[0]["result"] or {})
    result["ranks"] = [o["result"] for o in outcomes]
    return result
