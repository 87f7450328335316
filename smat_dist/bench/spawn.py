"""Run a function on N local CPU ranks over gloo: the harness of the benchmarks and the distributed tests
(users' jobs start through smat_dist.launch)."""
from __future__ import annotations

import io
import os

import torch
import torch.multiprocessing as mp

from smat_dist.distributed.process_group import init_gloo, shutdown_distributed
from smat_dist.launch.env import free_port


def _entry(rank: int, world: int, port: int, fn, args, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init_gloo(rank, world)
    try:
        out = fn(rank, world, *args)
        # Serialise to bytes: tensors passed through torch's shared-memory reducers would die with the process.
        buf = io.BytesIO()
        torch.save(out, buf)
        queue.put((rank, buf.getvalue()))
    finally:
        # free the groups (and join their threads) now, not during interpreter exit: see shutdown_distributed
        shutdown_distributed()


# What a forkserver imports once, before it forks any rank: the trainer pulls in torch, DeepSpeed and timm
# (about 4 s of imports per spawned rank on a 2-core machine).
FORKSERVER_PRELOAD = ("smat_dist.train.trainer",)


def run_ranks(fn, world: int, *args, start_method: str = "spawn"):
    """fn(rank, world, *args) on `world` processes; returns the list of results by rank.

    start_method "spawn" (the default): every rank is a fresh interpreter, as a launched rank is, so its peak
    resident memory is its own (the benches) and its interpreter exit runs (atexit, finalisation).
    "forkserver": ranks are forked from one server process that imported FORKSERVER_PRELOAD once (it lives as long
    as the calling process), so a rank starts in milliseconds instead of re-importing torch and DeepSpeed; the
    rank's environment is the server's, taken when this process first used it, and a rank ends with os._exit
    (no atexit): for the test suite's many short 2-rank runs, not for measuring a rank's memory or its exit."""
    if start_method not in ("spawn", "forkserver"):
        raise ValueError(f"run_ranks: start_method must be 'spawn' or 'forkserver', not {start_method!r}")
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(list(FORKSERVER_PRELOAD))
    q = ctx.SimpleQueue()
    port = free_port()
    ctx_procs = mp.start_processes(_entry, args=(world, port, fn, args, q), nprocs=world, join=False,
                                   start_method=start_method)
    # Read results while the ranks run: a large result blocks its writer until the pipe is drained.
    res = {}
    while len(res) < world:
        if not q.empty():
            r, b = q.get()
            res[r] = torch.load(io.BytesIO(b), weights_only=False)
            continue
        if ctx_procs.join(timeout=0.2):  # all exited (raises if one failed)
            while not q.empty():
                r, b = q.get()
                res[r] = torch.load(io.BytesIO(b), weights_only=False)
            break
    while not ctx_procs.join():
        pass
    if len(res) < world:
        raise RuntimeError(f"only ranks {sorted(res)} of {world} returned a result")
    return [res[r] for r in range(world)]
