"""Checkpoint benchmark: what saving, resuming, re-slicing and verifying cost one rank, against its own slice.

A synthetic expert pool (no backbone: the checkpoint sees only the pool's tensors) of `pool_gb` in total is
split over `ranks` gloo ranks. Each phase runs in fresh rank processes so its peak resident memory is its own:
  save    : a sync save and an async save (bytes hashed vs bytes written; seconds blocked vs total);
  resume  : the same world size: peak RSS over the slice, bytes hashed over the rank's own files;
  reshard : `reshard_to` ranks read the same checkpoint: peak RSS over their (larger) slice;
  eval    : pool bytes a rank holds after the evaluation load at `ranks` ranks vs 1 rank.
Peaks are measured as the process's VmHWM minus the resident size just before the pool is built (the interpreter,
torch and the process group are the baseline, not the checkpoint).
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch

from smat_dist.utils.log import get_logger

log = get_logger(__name__)


from smat_dist.utils.memory import peak_rss_bytes as _peak  # noqa: E402
from smat_dist.utils.memory import rss_bytes as _rss  # noqa: E402


def _pool(rank: int, world: int, numel: int, experts: int, seed: int = 0):
    from smat_dist.config.schema import MethodConfig
    from smat_dist.distributed.comm import Comm
    from smat_dist.pool.merge import LocalMerger
    from smat_dist.pool.pool import Pool
    from smat_dist.pool.shard import PoolShard

    padded = -(-numel // world) * world
    n = padded // world
    cfg = MethodConfig(name="smat", experts=experts)
    shard = PoolShard(rank * n, (rank + 1) * n, numel, experts, cfg.sparsity, seed)
    comm = Comm()
    pool = Pool(shard, LocalMerger(shard, padded), cfg, reduce=comm.all_reduce, world=world)
    pool.optimizer.opt.state[shard.delta]["momentum_buffer"] = torch.zeros_like(shard.delta)
    return pool, comm


def _slice_bytes(pool) -> int:
    return sum(t.numel() * t.element_size() for t in pool.sharded_tensors().values())


def _save_rank(rank: int, world: int, root: str, numel: int, experts: int) -> dict:
    from smat_dist.checkpoint import Checkpointer

    torch.set_num_threads(1)
    pool, comm = _pool(rank, world, numel, experts)
    with torch.no_grad():
        pool.shard.delta.normal_(0, 1, generator=torch.Generator().manual_seed(rank))
    out = {"slice_bytes": _slice_bytes(pool)}
    sync = Checkpointer(Path(root) / "sync", comm, async_save=False)
    t0 = time.perf_counter()
    sync.save(1, {"pool": pool}, {"experts": experts})
    out.update(sync_save_s=time.perf_counter() - t0, sync_hashed=sync.stats["hashed"],
               sync_written=sync.stats["written"])
    ck = Checkpointer(Path(root) / "async", comm, async_save=True)
    for step in (1, 2):   # the first save allocates the host buffers; later ones reuse them (steady state)
        comm.barrier()
        t0 = time.perf_counter()
        ck.save(step, {"pool": pool}, {"experts": experts})
        out[f"async_block_s_{step}"] = time.perf_counter() - t0
        ck.wait()
        comm.barrier()
        out[f"async_total_s_{step}"] = time.perf_counter() - t0
    own = Path(root) / "async" / "step-000000002" / f"pool-rank{rank:05d}.safetensors"
    out.update(async_hashed=ck.stats["hashed"], own_bytes=own.stat().st_size)
    return out


def _load_rank(rank: int, world: int, root: str, numel: int, experts: int) -> dict:
    from smat_dist.checkpoint import Checkpointer, find_latest

    torch.set_num_threads(1)
    _pool(rank, world, 1024, experts)   # lazy imports (torch.optim, ...) belong to the baseline, not the slice
    base = _rss()
    pool, comm = _pool(rank, world, numel, experts, seed=1)
    built = _rss() - base
    ck = Checkpointer(Path(root) / "async", comm)
    t0 = time.perf_counter()
    ck.load(find_latest(Path(root) / "async"), {"pool": pool}, expect={"experts": experts})
    return {"load_s": time.perf_counter() - t0, "peak_over_base": _peak() - base, "built_bytes": built,
            "slice_bytes": _slice_bytes(pool), "hashed": ck.stats["hashed"],
            "pool_bytes": sum(t.numel() * t.element_size() for t in (pool.shard.delta, pool.shard.log_alpha))}


def run(ranks: int = 4, reshard_to: int = 3, pool_gb: float = 1.0, experts: int = 8, root: str | None = None,
        emit=None) -> list[dict]:
    from smat_dist.bench.spawn import run_ranks

    # per entry: delta + momentum + M logits, fp32
    numel = int(pool_gb * (1 << 30) / (4 * (experts + 2)))
    tmp = Path(root or tempfile.mkdtemp(prefix="smat-bench-ckpt-"))
    rows = []
    try:
        log.info("ckpt bench: %.2f GB pool (%d entries x %d experts) on %d ranks", pool_gb, numel, experts, ranks)
        save = run_ranks(_save_rank, ranks, str(tmp), numel, experts)
        same = run_ranks(_load_rank, ranks, str(tmp), numel, experts)
        resh = run_ranks(_load_rank, reshard_to, str(tmp), numel, experts)
        one = run_ranks(_load_rank, 1, str(tmp), numel, experts)
        worst = lambda rs, f: max(f(r) for r in rs)  # noqa: E731 (the slowest / largest rank is the figure)
        row = {
            "bench": "ckpt", "ranks": ranks, "reshard_to": reshard_to, "experts": experts, "entries": numel,
            "pool_bytes_total": sum(r["slice_bytes"] for r in save),
            "slice_bytes_per_rank": save[0]["slice_bytes"],
            "resume_peak_over_slice": worst(same, lambda r: r["peak_over_base"] / r["slice_bytes"]),
            "reshard_peak_over_slice": worst(resh, lambda r: r["peak_over_base"] / r["slice_bytes"]),
            "hashed_over_own": worst(zip(save, same), lambda p: (p[0]["async_hashed"] + p[1]["hashed"])
                                     / (2 * p[0]["own_bytes"])),
            "save_hashed_over_written": worst(save, lambda r: r["async_hashed"] / r["own_bytes"]),
            "resume_hashed_over_own": worst(zip(save, same), lambda p: p[1]["hashed"] / p[0]["own_bytes"]),
            "reshard_hashed_over_slice": worst(resh, lambda r: r["hashed"] / r["slice_bytes"]),
            "sync_save_s": worst(save, lambda r: r["sync_save_s"]),
            "async_block_s": worst(save, lambda r: r["async_block_s_2"]),
            "async_total_s": worst(save, lambda r: r["async_total_s_2"]),
            "async_block_s_first": worst(save, lambda r: r["async_block_s_1"]),
            "resume_s": worst(same, lambda r: r["load_s"]), "reshard_s": worst(resh, lambda r: r["load_s"]),
            "eval_pool_bytes_per_rank_4r_over_1r": worst(same, lambda r: r["pool_bytes"]) / one[0]["pool_bytes"],
        }
        row["async_block_over_sync_save"] = row["async_block_s"] / row["sync_save_s"]
        rows.append(row)
        if emit:
            emit(row)
    finally:
        if root is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return rows
