"""One optimiser step over this rank's tasks, the same code for one process, torchrun and submitit.

What differs between those settings is built in (smat_dist.distributed.build): the pool component's merge
strategy (local / sharded / gather) and its sum over ranks, and the replicated optimiser (plain torch, or a
DeepSpeed engine behind smat_dist.distributed).
"""
from __future__ import annotations

import math

import torch

from smat_dist.method.optim import HyperOptimizer, lr_factor
from smat_dist.method.smat import SMAT
from smat_dist.method.sparse_pool import SparsePool
from smat_dist.utils.spans import span


class NonFiniteLoss(RuntimeError):
    pass


def _check_finite(res, ep, index: int) -> None:
    if not torch.isfinite(res.loss):
        bad = {k: v for k, v in res.metrics.items() if isinstance(v, float) and not math.isfinite(v)}
        raise NonFiniteLoss(f"non-finite loss at task {index} (source {getattr(ep, 'source', '?')}, "
                            f"episode {getattr(ep, 'index', '?')}): non-finite terms {bad or res.metrics}")


def smat_step(method: SMAT, pool: SparsePool, hyper: HyperOptimizer, episodes, first_index: int,
              tasks_seen: int) -> dict[str, float]:
    """Train on `episodes` (this rank's tasks, global indices first_index..); returns averaged metrics."""
    cfg = method.cfg
    factor = lr_factor(tasks_seen, cfg)
    k = len(episodes)
    with span("masks"):
        pool.begin_step(train=True)
    w_sum = torch.zeros(cfg.experts, device=pool.store.log_alpha.device)
    sums: dict[str, float] = {}
    for j, ep in enumerate(episodes):
        res = method.task(ep, pool, first_index + j, train=True)
        _check_finite(res, ep, first_index + j)
        with span("outer_backward"):
            hyper.backward(res.loss, k)
        w_sum += res.w
        for key, v in res.metrics.items():
            sums[key] = sums.get(key, 0.0) + v
    out = {key: v / k for key, v in sums.items()}
    out.update(pool.end_step(w_sum, k, factor))
    with span("optimisers"):
        out.update(hyper.step(factor))
        hyper.with_full_params(method.hypernet.power_iteration_)
    with torch.no_grad():
        method.hypernet.tasks_seen += k * pool.world
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
