"""What every launcher shares: the rank-function contract, the stop flag, rank env vars, errors.

A rank function runs ONE rank: ``fn(cfg: Config, run_dir: str, should_stop: Callable[[], bool]) -> dict``
(the trainer, ``smat_dist.train.trainer:train``, is the default). It reads RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT, which the launcher sets, and returns {"status": "done"|"stopped", ...}.
"""
from __future__ import annotations

import importlib
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Callable, Union

from smat_dist.config.schema import Config, LauncherConfig
from smat_dist.utils.malloc import set_mmap_threshold

RankFn = Callable[[Config, str, Callable[[], bool]], dict]
RankFnSpec = Union[str, RankFn]   # "package.module:function" or the function itself
DEFAULT_RANK_FN = "smat_dist.train.trainer:train"


class LaunchError(RuntimeError):
    """A rank or a job failed. `log_path` is the log the user should read first."""

    def __init__(self, message: str, log_path: str | None = None, rank: int | None = None,
                 job_id: str | None = None, failure: dict | None = None):
        full = message + (f"\n  log: {log_path}" if log_path else "")
        super().__init__(full)
        # failure: launch/failure.py's summary of the attempt (cause, victims, task), before the retry decision
        self.log_path, self.rank, self.job_id, self.failure = log_path, rank, job_id, failure


def resolve_rank_fn(spec: RankFnSpec) -> RankFn:
    if callable(spec):
        return spec
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"rank function {spec!r}: expected 'package.module:function' or a callable")
    mod_name, fn_name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"rank function {spec!r} cannot be imported: {e}") from e
    return fn


def run_rank_fn(spec: RankFnSpec, cfg: Config, run_dir: str, should_stop: Callable[[], bool]) -> dict:
    """Run one rank's function, then free its process groups, whether it returned or raised (a refused resume
    raises on every rank): their gloo threads must not outlive the rank into interpreter exit
    (smat_dist.distributed.process_group.shutdown_distributed). A failing teardown never hides the rank's
    own error."""
    from smat_dist.distributed.process_group import shutdown_distributed

    fn = resolve_rank_fn(spec)
    try:
        result = fn(cfg, run_dir, should_stop)
    except BaseException:
        try:
            shutdown_distributed()
        except Exception:  # noqa: BLE001 - the rank's error is the one to report
            pass
        raise
    shutdown_distributed()
    return result


class StopFlag:
    """`should_stop` for the trainer: becomes True once one of the installed signals arrived.

    The handler only records the signal (nothing else is safe inside a signal handler while a collective
    may be in flight); the training loop polls the flag at its next step boundary, agrees across ranks,
    checkpoints and returns {"status": "stopped"}. `signal_name` tells the launcher which signal it was.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.count = 0

    def __call__(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def _handler(self, signum, frame) -> None:
        self.count += 1
        # the first signal wins, except that USR2 (timeout/preemption notice: requeue) overrides TERM
        if self.signum is None or signum == signal.SIGUSR2:
            self.signum = signum
        if signum == signal.SIGINT and self.count >= 2:   # a second Ctrl-C: stop now, not at the boundary
            raise KeyboardInterrupt

    def install(self, signums=(signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)) -> "StopFlag":
        for s in signums:
            signal.signal(s, self._handler)
        return self


# Where a job's master port is derived: below Linux's default ephemeral range (net.ipv4.ip_local_port_range,
# 32768-60999). submitit draws it from 20000-60000, mostly inside that range, where a port can already be taken
# as the local end of an outgoing connection on the master's node; with several ranks on that node (one-node
# jobs, the dev cluster), the other ranks' own connection attempts to the master, retried until it listens, pick
# such local ports: rank 0 then fails with EADDRINUSE and the others wait for it until the group's timeout
# (seen once on the dev cluster: port 35067).
MASTER_PORT_RANGE = (20000, 32767)


def job_master_port(job_id: int | str) -> int:
    """The master port every task of a job derives alike from its SLURM_JOB_ID (numeric, also an array task's own
    id), in MASTER_PORT_RANGE: the sbatch templates compute the same `20000 + SLURM_JOB_ID % 12768`."""
    lo, hi = MASTER_PORT_RANGE
    return lo + int(job_id) % (hi - lo + 1)


def slurm_torch_env():
    """submitit's TorchDistributedEnvironment for this SLURM task (not exported), its master port from
    `job_master_port` unless $MASTER_PORT is set. Both the submitit path and plain srun use it."""
    from submitit.helpers import TorchDistributedEnvironment

    denv = TorchDistributedEnvironment()
    if "MASTER_PORT" not in os.environ:   # submitit's own pick (20000-60000) is replaced; export() writes this one
        denv.master_port = job_master_port(os.environ["SLURM_JOB_ID"])
    return denv


def export_slurm_env() -> dict[str, str]:
    """Plain `srun` (one task per rank, no torchrun) sets SLURM_* but none of torch's variables: export RANK,
    WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR (the job's first node) and MASTER_PORT (from the job
    id, `job_master_port`, or $MASTER_PORT) from them, as the submitit path does. Variables already set are kept.
    Returns what was set."""
    # submitit recognises a SLURM task by the variable its own executor sets; plain srun has none
    had = "SUBMITIT_EXECUTOR" in os.environ
    os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")
    try:
        denv = slurm_torch_env()
    finally:
        if not had:
            del os.environ["SUBMITIT_EXECUTOR"]
    values = {"RANK": denv.rank, "WORLD_SIZE": denv.world_size, "LOCAL_RANK": denv.local_rank,
              "LOCAL_WORLD_SIZE": denv.local_world_size, "MASTER_ADDR": denv.master_addr,
              "MASTER_PORT": denv.master_port}
    added = {k: str(v) for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    return added


def describe_exit(code: int | None) -> str:
    """How a process ended, for an error message: 'was killed by SIGKILL (signal 9: the out-of-memory killer
    or kill -9)', 'exited with code 3'."""
    if code is None:
        return "is still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        why = {signal.SIGKILL: ": possibly the out-of-memory killer, or kill -9",
               signal.SIGSEGV: ": a crash in native code",
               signal.SIGBUS: ": a crash in native code (or /dev/shm full)",
               signal.SIGTERM: ": terminated from outside",
               signal.SIGABRT: ": aborted (native assertion)"}.get(-code, "")
        return f"was killed by {name} (signal {-code}{why})"
    return f"exited with code {code}"


# launcher.portable_math: the instruction-set caps torch's ATen kernels, oneDNN and MKL read when they first
# dispatch (measured on an AVX2 machine: each of the three, set alone, changes the bits of a training run)
PORTABLE_MATH_ENV = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE"}
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def rank_math_env(lc: LauncherConfig, auto_threads: int) -> dict[str, str]:
    """The environment a rank process gets from `launcher.threads` / `launcher.portable_math`: the intra-op thread
    count (`auto_threads`, the machine's share per rank, only when launcher.threads=0) and the ISA caps."""
    n = lc.threads if lc.threads > 0 else max(1, auto_threads)
    env = {k: str(n) for k in THREAD_ENV}
    if lc.portable_math:
        env.update(PORTABLE_MATH_ENV)
    return env


def apply_rank_math(lc: LauncherConfig, auto_threads: int) -> str:
    """In a rank process, before torch runs anything: set rank_math_env over what the shell had (the config
    decides, so the same config gives the same arithmetic) and fix torch's thread count. Returns the line
    the rank logs."""
    env = rank_math_env(lc, auto_threads)
    replaced = [f"{k}={os.environ[k]}" for k in env if os.environ.get(k, env[k]) != env[k]]
    late = "torch" in sys.modules
    os.environ.update(env)
    import torch

    n = int(env["OMP_NUM_THREADS"])
    torch.set_num_threads(n)
    fixed = set_mmap_threshold(lc.malloc_mmap_threshold)
    caps = {k: os.environ[k] for k in PORTABLE_MATH_ENV if k in os.environ}
    line = (f"rank math: {n} intra-op thread(s) (launcher.threads={lc.threads}), portable_math={lc.portable_math}, "
            f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}"
            + (f", {' '.join(f'{k}={v}' for k, v in caps.items())}" if caps else ""))
    if lc.malloc_mmap_threshold:
        line += (f", malloc mmap threshold {lc.malloc_mmap_threshold} B" if fixed
                 else ", launcher.malloc_mmap_threshold not applied (no glibc mallopt)")
    if replaced:
        line += f"; replaced from the environment: {' '.join(replaced)}"
    if late:
        line += "; torch was imported before these were set: the ISA caps may not have taken effect"
    return line


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, local_rank: int, local_world_size: int, master_addr: str,
             master_port: int) -> dict[str, str]:
    return {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(local_world_size), "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)}


def tail(path: str | os.PathLike, lines: int = 20) -> str:
    """The last lines of a log (empty if it does not exist), to quote in an error message."""
    p = Path(path)
    if not p.is_file():
        return ""
    with open(p, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        text = f.read().decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


def last_error_line(text: str) -> str:
    """The exception line of a Python traceback ('ValueError: ...'), else the last non-empty line."""
    rows = [r for r in text.splitlines() if r.strip()]
    for r in reversed(rows):
        head = r.split(":", 1)[0].strip()
        if head and not r.startswith(" ") and (head.endswith(("Error", "Exception", "Interrupt", "Exit"))
                                               or head.startswith("submitit.")):
            return r.strip()
    return rows[-1].strip() if rows else ""
