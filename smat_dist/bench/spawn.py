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


def run_ranks(fn, world: int, *args):
    """fn(rank, world, *args) on `world` processes; returns the list of results by rank."""
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    port = free_port()
    ctx_procs = mp.start_processes(_entry, args=(world, port, fn, args, q), nprocs=world, join=False,
                                   start_method="spawn")
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
