"""Local launcher: `launcher.nproc` rank processes on this machine, torchrun-style.

Each rank is a spawned process with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set and its
stdout+stderr in `<run_dir>/logs/rank<r>.log`; with `progress=True` rank 0's training progress is shown on
this console (launch/relay.py). Ctrl-C / SIGTERM is turned into the trainer's stop flag (checkpoint at the
next step boundary, then exit); a second Ctrl-C stops at once. When a rank fails the others are stopped and
LaunchError names the rank that failed first, its error line (or how it died: a signal, a possible OOM
kill) and its log.
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
from smat_dist.launch.env import (
    DEFAULT_RANK_FN,
    PEER_ERRORS,
    LaunchError,
    RankFnSpec,
    StopFlag,
    apply_rank_math,
    describe_exit,
    free_port,
    last_error_line,
    rank_env,
    resolve_rank_fn,
    tail,
)
from smat_dist.utils.log import get_logger

log = get_logger(__name__)

# after the first rank fails, give the others this long to notice (their collectives error out) before
# they are terminated; a rank blocked in a collective would otherwise hang forever
FAILURE_GRACE_S = 20.0


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
        result = resolve_rank_fn(rank_fn)(cfg, run_dir, flag)
        with open(result_path + ".tmp", "wb") as f:
            pickle.dump({"ok": True, "result": result, "signal": flag.signal_name}, f)
    except BaseException as e:  # noqa: BLE001 - report everything (incl. KeyboardInterrupt) to the parent
        tb = traceback.format_exc()
        log.error("rank failed:\n%s", tb)
        with open(result_path + ".tmp", "wb") as f:
            pickle.dump({"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": tb}, f)
        os.replace(result_path + ".tmp", result_path)
        os._exit(1)
    os.replace(result_path + ".tmp", result_path)


def launch_local(cfg: Config, run_dir: str, rank_fn: RankFnSpec = DEFAULT_RANK_FN, nproc: int | None = None,
                 progress: bool = False, progress_label: str = "train") -> dict:
    """Run `nproc` (default `cfg.launcher.nproc`) ranks of `rank_fn`; return rank 0's result dict
    with `"ranks": [every rank's result]` added. Raises LaunchError if any rank fails. `progress`: show rank 0's
    training progress (the trainer's `tasks N/M` lines) on this console."""
    nproc = nproc or cfg.launcher.nproc
    if nproc < 1:
        raise LaunchError(f"launcher.nproc={nproc}: need at least 1 rank")
    if isinstance(rank_fn, str):
        resolve_rank_fn(rank_fn)  # fail here, not in every child, on a bad import path
    logs = Path(run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // nproc)   # launcher.threads=0 only (machine-dependent)
    ctx = mp.get_context("spawn")
    procs, paths = [], []
    relay = None
    if progress:
        from smat_dist.launch.relay import LogRelay

        # from the log's current end (a resume appends)
        relay = LogRelay(logs / "rank0.log", cfg.train.tasks, desc=progress_label)
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
    if relay is None:
        return _supervise(procs, paths)
    with relay:
        return _supervise(procs, paths)


def _supervise(procs: list, paths: list[tuple[str, str]]) -> dict:
    interrupted = []
    stopped: set[int] = set()   # ranks this launcher terminated or killed: victims, not causes

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
                    log.error("rank %d %s; stopping the other ranks", r, describe_exit(p.exitcode))
            if first_failure is not None and time.monotonic() - failed_at > FAILURE_GRACE_S:
                for r, p in enumerate(procs):
                    if p.is_alive():
                        stopped.add(r)
                        p.terminate()
            time.sleep(0.2)
        for p in procs:
            p.join()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return _collect(procs, paths, first_failure, stopped)


def _is_peer_error(outcome: dict) -> bool:
    text = outcome.get("error", "") + last_error_line(outcome.get("traceback", ""))
    return any(p in text for p in PEER_ERRORS)


def _collect(procs: list, paths: list[tuple[str, str]], first_failure: int | None,
             stopped: set[int] = frozenset()) -> dict:
    outcomes = []
    for (log_path, result_path), p in zip(paths, procs):
        if os.path.exists(result_path):
            with open(result_path, "rb") as f:
                outcomes.append(pickle.load(f))
            outcomes[-1]["at"] = os.stat(result_path).st_mtime_ns
        elif len(outcomes) in stopped:   # terminated by this launcher after another rank failed
            outcomes.append({"ok": False, "error": f"rank process {describe_exit(p.exitcode)} (stopped by the "
                             f"launcher)", "traceback": "", "victim": True})
        else:  # killed (the OOM killer, kill -9, a native crash) before it could report: it is the cause
            outcomes.append({"ok": False, "died": True, "error": describe_exit(p.exitcode),
                             "traceback": tail(log_path)})
    bad = [r for r, o in enumerate(outcomes) if not o["ok"]]
    if bad:
        # report the rank that failed first: a rank that died without reporting (it was killed) before one
        # that raised; among those, the first one seen dead, else the first error written (exit codes can be
        # seen in any order within one poll); a rank whose error is "the peer went away" is a victim
        def order(b: int):
            o = outcomes[b]
            return (not o.get("died", False), b != first_failure if o.get("died") else False, o.get("victim", False),
                    _is_peer_error(o), o.get("at", float("inf")), b)
        r = min(bad, key=order)
        o = outcomes[r]
        others = f" (ranks {', '.join(map(str, [b for b in bad if b != r]))} failed too)" if len(bad) > 1 else ""
        if o.get("died"):
            raise LaunchError(f"rank {r} of {len(procs)} {o['error']}{others}", log_path=paths[r][0], rank=r)
        detail = last_error_line(o.get("traceback", "")) or o["error"]
        raise LaunchError(f"rank {r} of {len(procs)} failed: {detail}{others}", log_path=paths[r][0], rank=r)
    result = dict(outcomes[0]["result"] or {})
    result["ranks"] = [o["result"] for o in outcomes]
    return result
