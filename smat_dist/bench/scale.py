"""Scale benchmark: real SMAT training steps as the number of experts M and of ranks grow, sharded vs gather vs zero3.

Each point runs in fresh processes (`run_ranks`, gloo; on a GPU machine each rank takes its own device) so
its peak memory is its own: `torch.cuda.max_memory_allocated` on GPU, the process's peak RSS on CPU (reported
absolute and above the RSS measured just before the pool is built). Every rank trains `smat_step` with the
ShardedMerger or GatherMerger on its own synthetic episodes; the hypernetwork's gradients are all-reduced
(what DeepSpeed's ZeRO-0 engine does) so the step is a real data-parallel step. Bytes are counted by Comm at
the collective calls: the merge's (`sent_bytes_per_task`), the hypernetwork's and the sparsity terms' apart.
The zero3 path (dist.pool=zero3: the pool under a real DeepSpeed ZeRO-3 engine, smat_dist/pool/zero3.py) counts
its bytes with DeepSpeed's own comms logger (every collective DeepSpeed issues in the timed steps: the pool
engine's gathers, reduce-scatters and its step's norm; the hypernetwork's all-reduce and the sparsity terms go
through Comm here, not DeepSpeed), converted to the same per-rank send volumes; its rows state the stage-3
settings and the per-op records, and its planned peak is the gather path's (the same M x P gathered per task).

A point whose planned peak (smat_dist.bench.plan) exceeds the memory budget is skipped with a JSON line
saying why; with `depth='auto'` the ViT is truncated to the deepest depth whose largest point fits (pool
cost and backbone cost both scale with depth, so the time ratios stay representative); the rows say so.
"""
from __future__ import annotations

import os
import statistics
import time

import torch

from smat_dist.bench.plan import plan
from smat_dist.bench.step import autocast_for, model_config, synthetic_episode
from smat_dist.utils.log import get_logger
from smat_dist.utils.memory import peak_rss_bytes

log = get_logger(__name__)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _available_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[0])
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 << 30


class _AllReducedHyper:
    """TorchHyperOptimizer + the data-parallel all-reduce of the hypernetwork's gradients (mean over ranks)."""

    def __init__(self, inner, params, comm):
        self.inner, self.params, self.comm = inner, list(params), comm

    def __getattr__(self, name):
        # the rest of the HyperOptimizer protocol (e.g. with_full_params) is the plain optimiser's
        return getattr(self.inner, name)

    def backward(self, loss, k, prescaled=False):
        self.inner.backward(loss, k, prescaled)

    def step(self, factor):
        if self.comm.world > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            flat = self.comm.all_reduce(torch.cat([g.reshape(-1) for g in grads])) / self.comm.world
            off = 0
            for p in self.params:
                p.grad = flat[off:off + p.numel()].view_as(p).clone()
                off += p.numel()
        return self.inner.step(factor)


def scale_rank(rank: int, world: int, point: dict) -> dict:
    """One rank of one point: build, warm up one step, time `steps` steps; returns its measurements."""
    if point["path"] == "zero3":
        from smat_dist.distributed.zero3_pool import logs_to_stderr

        logs_to_stderr()   # before anything imports DeepSpeed's accelerator (its first warning goes to stdout)
    from smat_dist.build import build_pool
    from smat_dist.config.schema import MethodConfig
    from smat_dist.distributed.comm import Comm
    from smat_dist.method.optim import TorchHyperOptimizer, hypernet_optimizer
    from smat_dist.method.smat import SMAT
    from smat_dist.model.backbone import FunctionalBackbone, build_backbone
    from smat_dist.train.step import smat_step

    if point.get("threads"):
        torch.set_num_threads(int(point["threads"]))
    cuda = torch.cuda.is_available() and point.get("device", "auto") != "cpu"
    dev = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    mc = model_config(point["model"], point["image_size"], point.get("patch_size", "auto"), point.get("depth"))
    M, seed = point["experts"], point.get("seed", 0)
    torch.manual_seed(seed)
    fb = FunctionalBackbone(build_backbone(mc), pad_to=world).to(dev)
    cfg = MethodConfig(name="smat", experts=M)
    cfg.sparsity.structured = bool(point.get("structured", False))
    cfg.sparsity.lean = bool(point.get("lean", False))
    cfg.sparsity.compile = bool(point.get("compile", False))
    method = SMAT(fb, cfg, seed).to(dev)
    k = point["tasks_per_rank"]
    eps = [synthetic_episode(point["ways"], point["shots"], point["queries"], point["image_size"], seed,
                             rank * 1000 + j, dev) for j in range(k)]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = int(torch.cuda.memory_allocated())
    else:
        base = _rss()
    comm, rep_comm, ctl_comm = Comm(device_bound=True), Comm(device_bound=True), Comm(device_bound=True)
    zero3 = point["path"] == "zero3"
    if zero3:
        from smat_dist.config.schema import DistConfig
        from smat_dist.distributed import zero3_pool
        from smat_dist.distributed.process_group import init_distributed

        init_distributed(DistConfig())   # DeepSpeed on this process group (CPU accelerator, no shm op build)
    sparse = build_pool(fb, cfg, seed, comm, ctl_comm, merge=point["path"], comms_log=zero3)
    pool = sparse.shard
    params = list(method.hypernet.parameters())
    hyper = _AllReducedHyper(TorchHyperOptimizer(hypernet_optimizer(params, cfg), cfg.hypernet.clip), params, rep_comm)
    amp = autocast_for(dev, point.get("precision", "auto"))
    times = []
    for s in range(point["steps"] + 1):
        if s == 1:  # step 0 is the warm-up; bytes are counted over the timed steps only
            sent0, rep0, ctl0 = comm.sent_bytes, rep_comm.sent_bytes, ctl_comm.sent_bytes
            if zero3:
                zero3_pool.reset_comms_log()
        comm.barrier()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        smat_step(method, sparse, hyper, eps, (s * world + rank) * k, s * world * k, amp)
        if cuda:
            torch.cuda.synchronize()
        comm.barrier()
        if s:
            times.append(time.perf_counter() - t0)
    tasks = point["steps"] * k
    extra = {}
    if zero3:
        sent, ops = zero3_pool.comms_log_bytes(world)
        extra = {"ds_comms": ops, "zero3_settings": dict(sparse.store.settings),
                 "zero3_chunks": len(sparse.store.bounds)}
        pool_bytes = sparse.pool_bytes_per_rank()
        merge_bytes = sent / tasks
    else:
        pool_bytes = (pool.delta.numel() * pool.delta.element_size()
                      + pool.log_alpha.numel() * pool.log_alpha.element_size())
        merge_bytes = (comm.sent_bytes - sent0) / tasks
    if cuda:
        peak = int(torch.cuda.max_memory_allocated())
    else:
        peak = peak_rss_bytes()   # VmHWM: a spawned rank's own peak (ru_maxrss keeps the parent's)
    return {"s_per_step": statistics.median(times), "s_per_task": statistics.median(times) / k,
            "pool_bytes_per_rank": pool_bytes,
            "peak_mem_bytes": peak, "peak_mem_over_base_bytes": peak - base, "base_mem_bytes": base,
            "sent_bytes_per_task": merge_bytes,
            "replicated_bytes_per_step": (rep_comm.sent_bytes - rep0) / point["steps"],
            "control_bytes_per_step": (ctl_comm.sent_bytes - ctl0) / point["steps"],
            "params": fb.space.numel, "device": dev.type, **extra}


def measure_point(point: dict) -> dict:
    from smat_dist.bench.spawn import run_ranks

    res = run_ranks(scale_rank, point["ranks"], point)
    r0 = res[0]
    row = {"bench": "scale", **{k: point[k] for k in ("model", "experts", "ranks", "path", "image_size", "depth",
                                                      "tasks_per_rank", "steps", "ways", "shots", "queries")},
           "lean": bool(point.get("lean", False)), "compile": bool(point.get("compile", False))}
    row.update({
        "s_per_task": max(r["s_per_task"] for r in res),      # the step waits for the slowest rank
        "pool_bytes_per_rank": max(r["pool_bytes_per_rank"] for r in res),
        "peak_mem_bytes": max(r["peak_mem_bytes"] for r in res),
        "peak_mem_over_base_bytes": max(r["peak_mem_over_base_bytes"] for r in res),
        "sent_bytes_per_task": max(r["sent_bytes_per_task"] for r in res),
        "replicated_bytes_per_step": r0["replicated_bytes_per_step"],
        "control_bytes_per_step": r0["control_bytes_per_step"],
        "params": r0["params"], "device": r0["device"],
    })
    if "zero3_settings" in r0:
        def sent(ops):
            return sum(o["sent_bytes"] for o in ops.values())
        row.update(zero3_settings=r0["zero3_settings"], zero3_chunks=r0["zero3_chunks"],
                   ds_comms=max((r["ds_comms"] for r in res), key=sent))
    return row


def _auto_depth(model: str, image_size: int, experts: list[int], ranks: list[int], paths: list[str], budget: int,
                images: int, lean: bool = False) -> int | None:
    """None (the full model) if the sharded path's largest point fits the budget, else the deepest ViT depth
    at which it does. The sharded path is the one being measured; gather-all points that do not fit at that
    depth are reported as skipped rather than shrinking the model for everything."""
    sized = ["sharded"] if "sharded" in paths else paths

    def need(depth):
        kw = {"depth": depth} if depth else None
        worst = 0
        for r in ranks:
            for x in sized:
                p = plan(model, max(experts), r, image_size=image_size, batch_images=images, kwargs=kw,
                         lean=lean and x == "sharded")
                worst = max(worst, p["peak_bytes"][x] * r)   # all ranks share this machine
        return worst

    if need(None) <= budget:
        return None
    if "vit" not in model and "deit" not in model:
        return None
    from smat_dist.bench.plan import _meta_model

    full = len(getattr(_meta_model(model_config(model, image_size)), "blocks", [])) or 12
    for d in range(full - 1, 0, -1):
        if need(d) <= budget:
            return d
    return 1


def run(experts=(4, 16, 64, 256), ranks=(1, 2), paths=("sharded", "gather"), model: str = "vit_tiny_patch16_224",
        image_size: int = 84, depth: int | str | None = "auto", ways: int = 10, shots: int = 5, queries: int = 10,
        tasks_per_rank: int = 1, steps: int = 2, budget_bytes: int | None = None, precision: str = "auto",
        threads: int | None = None, lean: bool = False, compile: bool = False, emit=None) -> list[dict]:
    """All points (each passed to `emit` as it finishes; the CLI prints them), then a summary row with the
    target ratios."""
    experts, ranks, paths = list(experts), list(ranks), list(paths)
    budget = budget_bytes or int(0.6 * _available_bytes())
    images = ways * (shots + queries)
    if depth == "auto":
        depth = _auto_depth(model, image_size, experts, ranks, paths, budget, images, lean)
        if depth is not None:
            log.info("scale bench: %s truncated to depth %d so that M=%d fits %.1f GB", model, depth, max(experts),
                     budget / 2**30)
    rows = []
    for path in paths:
        for r in ranks:
            for M in experts:
                point = dict(model=model, experts=M, ranks=r, path=path, image_size=image_size, depth=depth,
                             tasks_per_rank=tasks_per_rank, steps=steps, ways=ways, shots=shots, queries=queries,
                             precision=precision, threads=threads or max(1, (os.cpu_count() or 2) // r),
                             lean=lean and path == "sharded", compile=compile)
                kw = {"depth": depth} if depth else None
                need = plan(model, M, r, image_size=image_size, batch_images=images, kwargs=kw,
                            lean=point["lean"])["peak_bytes"][path] * r
                if need > budget:
                    row = {"bench": "scale", "model": model, "experts": M, "ranks": r, "path": path, "depth": depth,
                           "skipped": f"planned peak {need / 2**30:.1f} GB exceeds the budget {budget / 2**30:.1f} GB"}
                else:
                    log.info("scale bench: %s M=%d ranks=%d %s", model, M, r, path)
                    try:
                        row = measure_point(point)
                        row["planned_peak_bytes"] = need // r
                    except Exception as e:  # keep the other points' figures
                        log.exception("scale point failed")
                        row = {"bench": "scale", "model": model, "experts": M, "ranks": r, "path": path,
                               "depth": depth, "error": f"{type(e).__name__}: {e}"}
                if emit:
                    emit(row)
                rows.append(row)
    summary = summarise(rows)
    if emit:
        emit(summary)
    return rows + [summary]


def summarise(rows: list[dict]) -> dict:
    """The issue's target ratios from the measured points (None where a point is missing)."""
    def get(path, r, M, key):
        for row in rows:
            if (row.get("path"), row.get("ranks"), row.get("experts")) == (path, r, M) and key in row:
                return row[key]
        return None

    def ratio(a, b):
        return a / b if a is not None and b else None

    ranks = sorted({row["ranks"] for row in rows if "ranks" in row})
    multi = max(ranks) if ranks else 2
    out = {"bench": "scale_summary",
           f"sharded_bytes_M64_over_M4_ranks{multi}": ratio(get("sharded", multi, 64, "sent_bytes_per_task"),
                                                             get("sharded", multi, 4, "sent_bytes_per_task")),
           f"gather_bytes_M64_over_M4_ranks{multi}": ratio(get("gather", multi, 64, "sent_bytes_per_task"),
                                                            get("gather", multi, 4, "sent_bytes_per_task")),
           "pool_bytes_2ranks_over_1rank_M64": ratio(get("sharded", 2, 64, "pool_bytes_per_rank"),
                                                     get("sharded", 1, 64, "pool_bytes_per_rank"))}
    z64, z4, s64 = (get("zero3", multi, 64, "sent_bytes_per_task"), get("zero3", multi, 4, "sent_bytes_per_task"),
                    get("sharded", multi, 64, "sent_bytes_per_task"))
    out.update({"zero3_bytes_M64_over_M4": ratio(z64, z4),
                "sharded_bytes_M64_over_M4": ratio(s64, get("sharded", multi, 4, "sent_bytes_per_task")),
                "zero3_over_sharded_bytes_M64": ratio(z64, s64),
                "zero3_over_sharded_time_M64": ratio(get("zero3", multi, 64, "s_per_task"),
                                                     get("sharded", multi, 64, "s_per_task")),
                "zero3_over_sharded_peak_M64": ratio(get("zero3", multi, 64, "peak_mem_bytes"),
                                                     get("sharded", multi, 64, "peak_mem_bytes"))})
    for r in ranks:
        out[f"sharded_time_M64_over_M4_ranks{r}"] = ratio(get("sharded", r, 64, "s_per_task"),
                                                          get("sharded", r, 4, "s_per_task"))
    out["targets"] = {"bytes_M64_over_M4": "<= 1.1", "pool_bytes_2_over_1": "<= 0.55", "time_M64_over_M4": "<= 1.3"}
    return out
