"""One optimiser step over this rank's tasks, the same code for one process, torchrun and submitit.

What differs between those settings is built in (smat_dist.build): the pool component's merge
strategy (local / sharded / gather) and its sum over ranks, and the replicated optimiser (plain torch, or a
DeepSpeed engine behind smat_dist.distributed).

A SMAT step runs every task's frozen pass and hypernetwork first, hands the pool the step's merging weights,
then each task's passes and its backward through the backbone and the pool. Where the pool planned the merges
(Pool.defers_w_grad: released masks, the default) that backward stops at the merge, the pool's end_step gives
every task's dL/dw, and the hypernetwork's part of each task's loss (dL/dw and its regulariser) goes through
the replicated optimiser's backward then, one call per task as before: the same gradients, with the
engine's gradient-accumulation count unchanged.
"""
from __future__ import annotations

import contextlib

import torch

from smat_dist.method.optim import HyperOptimizer, lr_factor
from smat_dist.method.smat import SMAT
from smat_dist.pool.pool import Pool
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
            # float64 (as w_sum in smat_step): a rank's few float32 terms add exactly, so the logged mean is the
            # same bits whether one rank or the all-reduce across ranks adds them
            v = v.detach().double() if torch.is_tensor(v) else v
            self.sums[key] = self.sums.get(key, 0.0) + v

    def check_finite(self, comm=None) -> None:
        """Raise NonFiniteLoss on every rank if any rank's task was non-finite. With `comm` (R ranks) the
        flags are all-gathered first: a rank that raised alone would leave the others waiting in the next
        collective until the process-group timeout. Ranks hold the same number of tasks (train.tasks_per_rank),
        rank r's j-th task being global task first(r) + j."""
        ok = torch.stack(self.finite).float()
        rank = 0
        if comm is not None and comm.world > 1:
            ok, rank = comm.all_gather(ok), comm.rank
        flags = ok.reshape(-1, len(self.finite)).tolist()   # the step's one sync for the check
        bad = [(r, j) for r, row in enumerate(flags) for j, v in enumerate(row) if not v]
        if not bad:
            return
        r, j = bad[0]
        k = len(self.finite)
        index = self.tasks[0][0] + (r - rank) * k + j
        if r == rank:
            ep = self.tasks[j][1]
            where = f"rank {r}, source {getattr(ep, 'source', '?')}, episode {getattr(ep, 'index', '?')}"
            raise NonFiniteLoss(f"non-finite loss at task {index} ({where}); the step's summed terms: "
                                f"{self.result(1)}")
        raise NonFiniteLoss(f"non-finite loss at task {index} (rank {r}: its log names the source and episode); "
                            f"every rank stops at this step")

    def result(self, k: int) -> dict[str, float]:
        keys = list(self.sums)
        vals = [torch.as_tensor(self.sums[key], dtype=torch.float64).reshape(()).cpu() for key in keys]
        return {key: v / k for key, v in zip(keys, torch.stack(vals).tolist())} if keys else {}


def smat_step(method: SMAT, pool: Pool, hyper: HyperOptimizer, episodes, first_index: int,
              tasks_seen: int, autocast=None, comm=None) -> dict[str, float]:
    """Train on `episodes` (this rank's tasks, global indices first_index..); returns averaged metrics.

    `autocast` (bf16 on GPU) covers each task's forward only: backward runs outside it, so the gradients
    follow the dtypes their forward chose, and the pool's entry points turn autocast off for its own math.
    `comm`: the ranks that must agree on a non-finite loss (device flags: the trainer's step Comm)."""
    autocast = autocast or contextlib.nullcontext()
    cfg = method.cfg
    factor = lr_factor(tasks_seen, cfg)
    k = len(episodes)
    # Every task's frozen pass and merging weights first: the hypernetwork changes only at the step's end, so
    # they are what they would be task by task, and the pool can merge all of the step's tasks in its one
    # mask pass (with released masks it then never stores the [rows, M] masks: Pool.begin_step).
    preludes = []
    for j, ep in enumerate(episodes):
        with autocast:
            preludes.append(method.prelude(ep, first_index + j, train=True))
    with span("masks"):
        pool.begin_step(train=True, plan=torch.stack([p.w.detach() for p in preludes]))
    defer = pool.defers_w_grad
    # float64: the sum of a few float32 weights is exact, so it is the same whether this rank adds them or
    # the all-reduce of the sparsity counts adds them across ranks (a resume on another world size)
    w_sum = torch.zeros(cfg.experts, dtype=torch.float64, device=pool.device)
    acc = _TaskMetrics()
    hyper_terms = []
    for j, ep in enumerate(episodes):
        with autocast:
            res = method.task(ep, pool, first_index + j, train=True, prelude=preludes[j])
        preludes[j] = None
        acc.add(res, ep, first_index + j)
        with span("outer_backward"):
            if defer:
                # the backbone and the pool only (the merge gives w no gradient): no replicated parameter is
                # reached, so no engine is involved; the hypernetwork's part follows the pool's end_step
                (res.outer / k).backward()
                hyper_terms.append((res.w_live, res.reg))
            else:
                hyper.backward(res.loss, k)
        w_sum += res.w.detach().double()
        del res
    acc.check_finite(comm)
    out = acc.result(k)
    out.update(pool.end_step(w_sum, k, factor))
    if defer:
        g_w = pool.take_w_grads()
        with span("hyper_backward"):
            for j, (w, reg) in enumerate(hyper_terms):
                # dL/dw seeds w exactly (d/dw of sum(w * g) is g) and reg gets 1/k, as in (outer + reg) / k
                hyper.backward(reg / k + (w * g_w[j].to(w.dtype)).sum(), k, prescaled=True)
        del hyper_terms
    with span("optimisers"):
        out.update(hyper.step(factor))
        hyper.with_full_params(method.hypernet.power_iteration_)
    method.hypernet.advance(k * pool.world)
    out["temperature"] = method.hypernet.temperature()
    out["lr_factor"] = factor
    return out


def dense_step(method, hyper: HyperOptimizer, episodes, first_index: int, tasks_seen: int,
               autocast=None, comm=None) -> dict[str, float]:
    """P>M>F: dense meta-tuning step (autocast around each task's forward, and `comm`, as smat_step)."""
    autocast = autocast or contextlib.nullcontext()
    factor = lr_factor(tasks_seen, method.cfg)
    k = len(episodes)
    acc = _TaskMetrics()
    for j, ep in enumerate(episodes):
        with autocast:
            res = method.task(ep, None, first_index + j, train=True)
        acc.add(res, ep, first_index + j)
        hyper.backward(res.loss, k)
    acc.check_finite(comm)
    out = acc.result(k)
    out.update(hyper.step(factor))
    out["lr_factor"] = factor
    return out
