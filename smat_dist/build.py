"""The composition root: the one place a method is assembled from config (backbone, replicated module, pool
component, optimiser), above the pool, the methods and the checkpoint, below train.

Training, evaluation, analysis, the benchmarks and the tests all build through `build`; they differ only in
the pool's merge strategy (local in one process, sharded / gather across ranks) and in the replicated
optimiser (a DeepSpeed engine in training, plain torch in single-process use, none for evaluation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from smat_dist.config.schema import DistConfig, MethodConfig, ModelConfig
from smat_dist.distributed.comm import Comm
from smat_dist.method.baselines import PMF, Pretrained
from smat_dist.method.optim import TorchHyperOptimizer, hypernet_optimizer
from smat_dist.method.smat import SMAT
from smat_dist.model.backbone import FunctionalBackbone, build_backbone
from smat_dist.pool.merge import LocalMerger
from smat_dist.pool.sharded import build_merger
from smat_dist.pool.passes import chunk_rows
from smat_dist.pool.pool import Pool
from smat_dist.pool.shard import PoolShard


@dataclass
class MethodSetup:
    fb: FunctionalBackbone
    method: torch.nn.Module
    pool: Pool | None               # SMAT only: this rank's slice of the expert pool and its updates
    hyper: object | None            # the replicated trainables' optimiser (HyperOptimizer); None: not trained
    kind: str                       # "smat" | "pmf" | "pretrained"


@dataclass
class _Parts:
    method: torch.nn.Module
    pool: Pool | None
    optimizer: torch.optim.Optimizer | None
    clip: float | None


def build_pool(fb: FunctionalBackbone, cfg: MethodConfig, seed: int, comm: Comm, control: Comm | None = None,
               merge: str = "sharded", comms_log: bool = False) -> Pool:
    """This rank's slice of the expert pool over fb's flat space, with its merge strategy and optimiser.
    merge="zero3": the pool as per-chunk parameters under a DeepSpeed ZeRO-3 engine (a comparison path;
    comms_log: DeepSpeed's comms logger on, what smat-bench scale counts its bytes with)."""
    if merge == "zero3":
        return _zero3_pool(fb, cfg, seed, comm, control, comms_log)
    shard = PoolShard.for_space(fb.space, comm.rank, comm.world, cfg.experts, cfg.sparsity, seed)
    shard = shard.to(fb.theta_pre.device)
    merger = LocalMerger(shard, fb.space.padded) if merge == "local" else build_merger(merge, shard,
                                                                                      fb.space.padded, comm)
    return Pool(shard, merger, cfg, reduce=(control or comm).all_reduce, world=comm.world)


def _zero3_pool(fb: FunctionalBackbone, cfg: MethodConfig, seed: int, comm: Comm, control: Comm | None,
                comms_log: bool = False) -> Pool:
    from smat_dist.distributed.zero3_pool import Zero3PoolStore
    from smat_dist.pool.zero3 import Zero3Pool, zero3_init

    sp = cfg.sparsity
    store = Zero3PoolStore(fb.space.padded, cfg.experts, comm.rank, comm.world, zero3_init(cfg, fb.space.numel, seed),
                           delta_sgd={"lr": cfg.delta_lr, "momentum": cfg.delta_momentum,
                                      "weight_decay": cfg.delta_weight_decay},
                           logits_sgd={"lr": sp.mask_lr, "momentum": 0.0, "weight_decay": 0.0},
                           comms_log=comms_log)
    return Zero3Pool(store, cfg, fb.space.numel, reduce=(control or comm).all_reduce, world=comm.world)


def _smat(fb, cfg: MethodConfig, seed: int, comm: Comm, control: Comm, merge: str) -> _Parts:
    method = SMAT(fb, cfg, seed)
    pool = build_pool(fb, cfg, seed, comm, control, merge)
    return _Parts(method, pool, hypernet_optimizer(method.hypernet.parameters(), cfg), cfg.hypernet.clip)


def _pmf(fb, cfg: MethodConfig, seed: int, comm: Comm, control: Comm, merge: str) -> _Parts:
    method = PMF(fb, cfg)
    opt = torch.optim.SGD([{"params": list(method.parameters()), "lr": cfg.pmf_lr, "momentum": cfg.pmf_momentum,
                            "base_lr": cfg.pmf_lr, "name": "pmf"}])
    return _Parts(method, None, opt, None)


def _pretrained(fb, cfg: MethodConfig, seed: int, comm: Comm, control: Comm, merge: str) -> _Parts:
    return _Parts(Pretrained(fb, cfg), None, None, None)


# The one registry of method choices (method.name).
METHODS: dict[str, Callable[..., _Parts]] = {"smat": _smat, "pmf": _pmf, "pretrained": _pretrained}


def _pad_to(cfg: MethodConfig, world: int, dist_cfg: DistConfig | None) -> int:
    """The flat space's padding. With dist.aligned_slices, an unstructured SMAT pool on several ranks: every
    slice starts on a pool chunk boundary, so its sums over rows split at the same global chunks at every
    world size (pool/ordered.py) and a resume on another world size is bit-exact (at most world x 2^21 / M
    padding entries). Structured gates
    (rows are gate groups, not aligned to chunks) and the dense baselines (their replicated delta would change
    size with the world size) keep the plain padding."""
    if dist_cfg is not None and dist_cfg.aligned_slices and cfg.name == "smat" and world > 1 \
            and not cfg.sparsity.structured:
        return world * chunk_rows(cfg.experts)
    return world


def build(model_cfg: ModelConfig, cfg: MethodConfig, *, seed: int = 0, comm: Comm | None = None,
          control: Comm | None = None, merge: str = "local", hyper: str | None = "torch",
          dist_cfg: DistConfig | None = None,
          tasks_per_rank: int = 1, universal: bool = False, fb: FunctionalBackbone | None = None,
          device: torch.device | None = None) -> MethodSetup:
    """comm: the pool's collectives (counted apart: the benchmarks' bytes per task); control: the step's small
    all-reduces (sparsity counts, clip norm), default comm; merge: "local" (the whole pool in this process)
    or dist.pool's "sharded" / "gather" / "zero3" (the pool under a DeepSpeed ZeRO-3 engine, a comparison path);
    hyper: "torch", "deepspeed" (needs dist_cfg; universal: loading another world size's ZeRO state) or None."""
    if cfg.name not in METHODS:
        raise ValueError(f"method.name={cfg.name!r}: expected one of {sorted(METHODS)}")
    comm = comm or Comm()
    world = comm.world
    if merge == "local" and world > 1:
        raise ValueError("a local merge holds the whole pool in one process: use dist.pool=sharded on several ranks")
    torch.manual_seed(seed)
    if fb is None:
        fb = FunctionalBackbone(build_backbone(model_cfg), pad_to=_pad_to(cfg, world, dist_cfg))
    if device is not None:
        fb = fb.to(device)
    parts = METHODS[cfg.name](fb, cfg, seed, comm, control or comm, merge)
    method, pool = parts.method, parts.pool
    if getattr(pool, "shard", None) is not None and dist_cfg is not None and dist_cfg.aligned_slices:
        pool.shard.passes.ordered = True     # the pool's row sums in global chunk order (pool/ordered.py)
    if device is not None:
        method = method.to(device)
        if pool is not None:
            pool.to(device)
    opt = None
    if hyper is not None and parts.optimizer is not None:
        if hyper == "torch":
            opt = TorchHyperOptimizer(parts.optimizer, parts.clip)
        elif hyper == "deepspeed":
            from smat_dist.distributed.engine import DeepSpeedOptimizer

            opt = DeepSpeedOptimizer(method, parts.optimizer, dist_cfg or DistConfig(), tasks_per_rank, world,
                                     parts.clip, universal=universal)
        else:
            raise ValueError(f"hyper={hyper!r}: expected 'torch', 'deepspeed' or None")
    return MethodSetup(fb, method, pool, opt, cfg.name)


def build_local(model_cfg: ModelConfig, cfg: MethodConfig, seed: int = 0, fb: FunctionalBackbone | None = None,
                device: torch.device | None = None) -> MethodSetup:
    """Single process: the whole pool local, a plain torch optimiser (tests, benchmarks, analysis)."""
    return build(model_cfg, cfg, seed=seed, fb=fb, comm=Comm(local=True), device=device)
