"""dist.pool=zero3: the expert pool under real DeepSpeed ZeRO-3 (a benchmark comparison path).

The pool is an nn.Module of per-chunk parameters (each chunk: delta [c] and the mask logits [c, M] of the
rows [lo, hi) of the padded flat space), built under `deepspeed.zero.Init` so that no rank ever holds more
than its partitions, and trained by its own DeepSpeed engine at ZeRO stage 3 with a torch SGD (two groups:
delta, logits). In a merge DeepSpeed all-gathers each chunk's parameters in the chunk's forward (M x c
numbers per chunk and task: M x P per task, what ZeRO-3 moves), and in the backward gathers them again and
reduce-scatters their gradients. The hypernetwork's engine (or a plain torch backward) drives the backward;
this engine only steps.

Chunk rows are a multiple of the world size, so DeepSpeed's partition of a chunk (a contiguous 1/R of its
flattened elements) is a whole block of rows: rank r holds rows [lo + r c/R, lo + (r+1) c/R) of every chunk,
and the pool side (smat_dist.pool.zero3) works on those blocks for what is elementwise per row (the clamp,
the sparsity counts, the penalty's gradient, the clip norm) without a gather.

This module holds parameters and the engine only: the merge's arithmetic is a function handed in by the pool
side (the distributed layer imports no pool code), and it never imports the pool.
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch
from torch import nn

from smat_dist.distributed.process_group import device

# stage-3 settings of the pool's engine (also reported in every smat-bench scale row of the zero3 path)
ZERO3_SETTINGS = {
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_max_reuse_distance": 1_000_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 0,        # every chunk partitioned, however small
    "stage3_model_persistence_threshold": 0,
    "reduce_bucket_size": 50_000_000,
    "allgather_bucket_size": 50_000_000,
    "overlap_comm": False,
    "contiguous_gradients": True,
    "reduce_scatter": True,
    "sub_group_size": 1_000_000_000,
}
CHUNK_ELEMENTS = 1 << 21   # logits per chunk (8 MB fp32), as the pool passes' chunk


def chunk_bounds(padded: int, experts: int, world: int, elements: int = CHUNK_ELEMENTS) -> list[tuple[int, int]]:
    """Row ranges [lo, hi) covering [0, padded): each a multiple of `world` rows (padded is one)."""
    if padded % world:
        raise ValueError(f"the padded space ({padded}) must be a multiple of the world size ({world})")
    rows = max(world, (elements // max(1, experts)) // world * world)
    return [(lo, min(padded, lo + rows)) for lo in range(0, padded, rows)]


def zero3_config(world: int, settings: dict | None = None) -> dict:
    """The pool engine's config, every arithmetic key set (as ds_config_for does for the replicated engine)."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,          # one engine.step per training step; the tasks' backward
        "train_batch_size": world,                 # passes accumulate into the partitions in between
        "gradient_clipping": 0.0,                  # the logits' clip is applied by the pool (one value per
        "prescale_gradients": False,               # engine would clip delta too)
        "gradient_predivide_factor": 1.0,
        "communication_data_type": "fp32",
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "zero_optimization": {"stage": 3, **(settings or ZERO3_SETTINGS)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class _Chunk(nn.Module):
    def __init__(self, lo: int, hi: int, init: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.lo, self.hi = lo, hi
        d, la = init(lo, hi)
        self.delta = nn.Parameter(d)
        self.log_alpha = nn.Parameter(la)

    def forward(self, w: torch.Tensor, fn) -> torch.Tensor:
        return fn(self.lo, self.hi, self.delta, self.log_alpha, w)


class Zero3PoolModule(nn.Module):
    """The pool as chunk modules: ZeRO-3 gathers a chunk's parameters in its own forward (and backward) only."""

    def __init__(self, bounds, init):
        super().__init__()
        self.chunks = nn.ModuleList([_Chunk(lo, hi, init) for lo, hi in bounds])

    def forward(self, w: torch.Tensor, fn) -> torch.Tensor:
        return torch.cat([c(w, fn) for c in self.chunks])


class Part:
    """One chunk's partition on this rank: global rows [row_lo, row_lo + rows)."""

    def __init__(self, chunk: _Chunk, rank: int, world: int, experts: int):
        rows = (chunk.hi - chunk.lo) // world
        self.chunk, self.rows, self.experts = chunk, rows, experts
        self.row_lo = chunk.lo + rank * rows

    def logits(self) -> torch.Tensor:
        """The working copy DeepSpeed gathers from (ds_tensor), [rows, M]."""
        return self.chunk.log_alpha.ds_tensor.view(self.rows, self.experts)

    def logit_grad(self) -> torch.Tensor:
        from deepspeed.utils import safe_get_local_grad

        return safe_get_local_grad(self.chunk.log_alpha).view(self.rows, self.experts)

    def set_logit_grad(self, g: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_local_grad

        safe_set_local_grad(self.chunk.log_alpha, g.reshape(-1))

    @torch.no_grad()
    def clamp_(self, c: float) -> None:
        """Both copies: the optimiser's fp32 master partition and the working copy."""
        from deepspeed.utils import safe_get_local_fp32_param

        safe_get_local_fp32_param(self.chunk.log_alpha).clamp_(-c, c)
        self.logits().clamp_(-c, c)


class Zero3PoolStore:
    """The pool's parameters under a ZeRO-3 engine; what smat_dist.pool.zero3.Zero3Pool drives."""

    def __init__(self, padded: int, experts: int, rank: int, world: int,
                 init: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]],
                 delta_sgd: dict, logits_sgd: dict, settings: dict | None = None, comms_log: bool = False):
        import deepspeed
        import deepspeed.comm as ds_comm
        import torch.distributed as dist

        if not ds_comm.is_initialized():   # zero.Init reads the world size from deepspeed.comm
            deepspeed.init_distributed(dist_backend=str(dist.get_backend()), auto_mpi_discovery=False)
        self.settings = dict(settings or ZERO3_SETTINGS)
        cfg = zero3_config(world, self.settings)
        if comms_log:   # the bench counts this engine's traffic with DeepSpeed's own comms logger
            cfg["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True, "debug": False}
        self.bounds = chunk_bounds(padded, experts, world)
        self.rank, self.world, self.experts = rank, world, experts
        with deepspeed.zero.Init(config_dict_or_path=cfg):
            module = Zero3PoolModule(self.bounds, init)
        deltas = [c.delta for c in module.chunks]
        logits = [c.log_alpha for c in module.chunks]
        opt = torch.optim.SGD([{"params": deltas, "name": "delta", **delta_sgd},
                               {"params": logits, "name": "log_alpha", **logits_sgd}])
        dev = device()
        args = argparse.Namespace(device_rank=dev.index) if dev.type == "cuda" else None
        self.engine, self.optimizer, _, _ = deepspeed.initialize(args=args, model=module, optimizer=opt, config=cfg)
        self.parts = [Part(c, rank, world, experts) for c in module.chunks]
        self.device = dev

    def forward(self, w: torch.Tensor, fn) -> torch.Tensor:
        """The merged delta over [0, padded): fn(lo, hi, delta_chunk, logits_chunk, w) per chunk, on the
        gathered chunk parameters."""
        return self.engine(w, fn)

    def step(self, lrs: dict[str, float]) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lrs[g["name"]]
        self.engine.step()

    def partition_bytes(self) -> int:
        return sum(p.ds_tensor.numel() * p.ds_tensor.element_size()
                   for c in self.engine.module.chunks for p in (c.delta, c.log_alpha))

    def full_state(self) -> dict[str, torch.Tensor]:
        """The whole pool gathered (tests): delta [padded], log_alpha [padded, M]."""
        import deepspeed

        params = [p for c in self.engine.module.chunks for p in (c.delta, c.log_alpha)]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {"delta": torch.cat([c.delta.detach().clone() for c in self.engine.module.chunks]),
                    "log_alpha": torch.cat([c.log_alpha.detach().clone() for c in self.engine.module.chunks])}


# Per-rank bytes sent by each collective, from the message size DeepSpeed's comms logger records (its `tensor`
# argument: the local input of an all-gather, the full input of a reduce-scatter / all-reduce / all-to-all), by
# the ring / pairwise volumes smat_dist.distributed.comm.Comm counts for the sharded and gather paths.
def _sent(op: str, msg: int, world: int) -> float:
    if world == 1:
        return 0.0
    if "all_gather" in op or "allgather" in op:
        return (world - 1) * msg
    if "all_reduce" in op or "allreduce" in op:
        return 2 * (world - 1) / world * msg
    if "reduce_scatter" in op or "all_to_all" in op:
        return (world - 1) / world * msg
    if "broadcast" in op:
        return (world - 1) / world * msg
    return float(msg)


def logs_to_stderr() -> None:
    """DeepSpeed's logger writes to stdout; the benchmarks' stdout is JSON lines. Call before DeepSpeed is
    imported: on the CPU it names its accelerator first (as init_distributed does), else it says so on stdout."""
    import logging
    import os
    import sys

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.logging import logger

    for h in logger.handlers:
        if isinstance(h, logging.StreamHandler):
            h.setStream(sys.stderr)


def reset_comms_log() -> None:
    from deepspeed.comm.comm import comms_logger

    comms_logger.reset_data()


def comms_log_bytes(world: int) -> tuple[float, dict]:
    """(bytes this rank sent, per op {calls, message_bytes, sent_bytes}) since reset_comms_log, from DeepSpeed's
    comms logger (every collective DeepSpeed issued; the pool engine's when it is the only DeepSpeed user)."""
    from deepspeed.comm.comm import comms_logger

    ops, total = {}, 0.0
    for op, sizes in comms_logger.get_raw_data().items():
        calls = sum(rec[0] for rec in sizes.values())
        msg = sum(size * rec[0] for size, rec in sizes.items())
        sent = sum(_sent(op, size, world) * rec[0] for size, rec in sizes.items())
        ops[op] = {"calls": calls, "message_bytes": msg, "sent_bytes": sent}
        total += sent
    return total, ops
