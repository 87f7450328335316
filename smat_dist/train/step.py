"""One optimiser step over this rank's tasks, the same code for one process, torchrun and submitit.

What differs between those settings is passed in: the merger (local / sharded / gather), the hypernetwork
optimiser (plain torch, or a DeepSpeed engine behind smat_dist.distributed) and `reduce` (sum over ranks).
"""
from __future__ import annotations

import math
from typing import Callable, Protocol

import torch

from smat_dist.method.optim import PoolOptimizer, lr_factor
from smat_dist.method.smat import SMAT


class NonFiniteLoss(RuntimeError):
    pass


class HyperOptimizer(Protocol):
    def backward(self, loss: torch.Tensor, tasks_per_step: int) -> None: ...
    def step(self, factor: float) -> dict[str, float]: ...
    def with_full_params(self, fn) -> None: ...  # run fn with every replicated parameter whole (ZeRO-3 gathers)


class TorchHyperOptimizer:
    """Single-process optimiser for the replicated trainables (hypernetwork, or P>M>F's dense weights)."""

    def __init__(self, optimizer: torch.optim.Optimizer, clip: float | None):
        self.opt, self.clip = optimizer, clip

    def backward(self, loss: torch.Tensor, tasks_per_step: int) -> None:
        (loss / tasks_per_step).backward()

    def step(self, factor: float) -> dict[str, float]:
        params = [p for g in self.opt.param_groups for p in g["params"]]
        out = {}
        if self.clip:
            out["grad_norm/hypernet"] = float(torch.nn.utils.clip_grad_norm_(params, self.clip))
        for g in self.opt.param_groups:
            g["lr"] = g.get("base_lr", g["lr"]) * factor
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return out

    def with_full_params(self, fn) -> None:
        fn()

    def state_dict(self):
        return self.opt.state_dict()

    def load_state_dict(self, sd):
        self.opt.load_state_dict(sd)


def _check_finite(res, ep, index: int) -> None:
    if not torch.isfinite(res.loss):
        bad = {k: v for k, v in res.metrics.items() if isinstance(v, float) and not math.isfinite(v)}
        raise NonFiniteLoss(f"non-finite loss at task {index} (source {getattr(ep, 'source', '?')}, "
                            f"episode {getattr(ep, 'index', '?')}): non-finite terms {bad or res.metrics}")


def smat_step(method: SMAT, merger, pool, pool_opt: PoolOptimizer, hyper: HyperOptimizer, episodes,
              first_index: int, tasks_seen: int, world: int, reduce: Callable[[torch.Tensor], torch.Tensor]
              ) -> dict[str, float]:
    """Train on `episodes` (this rank's tasks, global indices first_index..); returns averaged metrics."""
    cfg = method.cfg
    factor = lr_factor(tasks_seen, cfg)
    k = len(episodes)
    z = merger.begin_step(train=True)
    w_sum = torch.zeros(cfg.experts, device=pool.log_alpha.device)
    sums: dict[str, float] = {}
    for j, ep in enumerate(episodes):
        res = method.task(ep, merger, first_index + j, train=True)
        _check_finite(res, ep, first_index + j)
        hyper.backward(res.loss, k)
        w_sum += res.w
        for key, v in res.metrics.items():
            sums[key] = sums.get(key, 0.0) + v
    out = {key: v / k for key, v in sums.items()}
    pool_metrics, coef = method.pool_terms(pool, z, w_sum, k, reduce, factor, local=merger.stats)
    out.update(pool_metrics)
    merger.end_step(coef)
    out.update(pool_opt.step(factor, reduce))
    out.update(hyper.step(factor))
    hyper.with_full_params(method.hypernet.power_iteration_)
    with torch.no_grad():
        method.hypernet.tasks_seen += k * world
    out["temperature"] = method.hypernet.temperature()
    out["lr_factor"] = factor
    return out


def dense_step(method, hyper: HyperOptimizer, episodes, first_index: int, tasks_seen: int) -> dict[str, float]:
    """P>M>F: dense meta-tuning step."""
    factor = lr_factor(tasks_seen, method.cfg)
    k = len(episodes)
    sums: dict[str, float] = {}
    for j, ep in enumerate(episodes):
        res = method.task(ep, None, first_index + j, train=True)
        _check_finite(res, ep, first_index + j)
        hyper.backward(res.loss, k)
        for key, v in res.metrics.items():
            sums[key] = sums.get(key, 0.0) + v
    out = {key: v / k for key, v in sums.items()}
    out.update(hyper.step(factor))
    out["lr_factor"] = factor
    return out
