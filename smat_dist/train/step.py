"""One optimiser step over this rank's tasks, the same code for one process, torchrun and submitit.

What differs between those settings is built in (smat_dist.distributed.build): the pool component's merge
strategy (local / sharded / gather) and its sum over ranks, and the replicated optimiser (plain torch, or a
DeepSpeed engine behind smat_dist.distributed).
"""
from __future__ import annotations

import torch

from smat_dist.method.optim import HyperOptimizer, lr_factor
from smat_dist.method.smat import SMAT
from smat_dist.method.sparse_pool import SparsePool
from smat_dist.utils.spans import span


class NonFiniteLoss(RuntimeError):
    pass


class _TaskMetrics:
    """Sums the tasks' metrics and finiteness on the device; one host sync per step (`result`), so a GPU is
    never stalled inside a task. The finiteness check runs before any optimiser update of the step."""

    def __init__(self):
        self.sums: dict = {}
        self.finite: list[torch.Tensor] = []
        self.tasks: list = []

    def add(self, res, ep, index: int) -> None:
        self.finite.append(torch.isfinite(res.loss.detach()).reshape(()))
        self.tasks.append((index, ep))
        for key, v in res.metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + v

    def check_finite(self) -> None:
        ok = torch.stack(self.finite).tolist()        # the step's one sync for the check
        if all(ok):
            return
        index, ep = self.tasks[ok.index(False)]
        raise NonFiniteLoss(f"non-finite loss at task {index} (source {getattr(ep, 'source', '?')}, "
                            f"episode {getattr(ep, 'index', '?')}); the step's summed terms: {self.result(1)}")

    def result(self, k: int) -> dict[str, float]:
        keys = list(self.sums)
        vals = [torch.as_tensor(self.sums[key], dtype=torch.float64).reshape(()).cpu() for key in keys]
        return {key: v / k for key, v in zip(keys, torch.stack(vals).tolist())} if keys else {}


def smat_step(method: SMAT, pool: SparsePool, hyper: HyperOptimizer, episodes, first_index: int,
              tasks_seen: int) -> dict[str, float]:
    """Train on `episodes` (this rank's tasks, global indices first_index..); returns averaged metrics."""
    cfg = method.cfg
    factor = lr_factor(tasks_seen, cfg)
    k = len(episodes)
    with span("masks"):
        pool.begin_step(train=True)
    w_sum = torch.zeros(cfg.experts, device=pool.store.log_alpha.device)
    acc = _TaskMetrics()
    for j, ep in enumerate(episodes):
        res = method.task(ep, pool, first_index + j, train=True)
        acc.add(res, ep, first_index + j)
        with span("outer_backward"):
            hyper.backward(res.loss, k)
        w_sum += res.w
    acc.check_finite()
    out = acc.result(k)
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
    acc = _TaskMetrics()
    for j, ep in enumerate(episodes):
        res = method.task(ep, None, first_index + j, train=True)
        acc.add(res, ep, first_index + j)
        hyper.backward(res.loss, k)
    acc.check_finite()
    out = acc.result(k)
    out.update(hyper.step(factor))
    out["lr_factor"] = factor
    return out
