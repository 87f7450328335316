"""The sharded expert pool's merge: per-task communication independent of the number of experts M.

Rank r owns the flat slice [r*n, (r+1)*n) of delta and of all M experts' mask logits. For one round of
tasks (one task per rank):
  forward : all-gather the R tasks' merging weights (R x M numbers); merge the local slice for every task,
            D[t] = (W[t] @ z_local^T) * delta_local (the same total work as one unsharded merge); an all-to-all
            hands each rank its own task's full merged delta (P numbers in and out per rank, whatever M is).
  backward: an all-to-all returns each task's gradient slice to the owner; local gradients for delta and
            the masks; per-task partial sums for w combined by an all-reduce of R x M numbers.
The gather-all path (what plain ZeRO-3 wrapping would do) all-gathers every expert's mask logits per task
and reduce-scatters their gradients: M x P per task. It is kept only as the measured comparison.

Gradient scale: each rank's loss is its own tasks' mean; pool gradients arrive summed over the R tasks of
the round, so they are divided by R (the pool is never averaged by the data-parallel engine), while the
gradient for w stays per task (the engine averages the hypernetwork's gradients over ranks).
"""
from __future__ import annotations

import torch

from smat_dist.utils.device import fp32_math

from smat_dist.distributed.comm import Comm
from smat_dist.method import hard_concrete as hc
from smat_dist.method.merge import LocalMerger
from smat_dist.method.pool import ExpertPool


class _ShardedMerge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, delta, merger: "ShardedMerger"):
        comm, pool = merger.comm, merger.pool
        W = comm.all_gather(w.detach())                  # [R, M]
        D = pool.expand(merger.zw(W)) * delta            # [R, n]: my slice of every task's merged delta
        full = comm.all_to_all(D)                        # [R, n]: every slice of my task's merged delta
        ctx.merger = merger
        ctx.save_for_backward(W, delta)
        return full.reshape(-1)

    @staticmethod
    @fp32_math
    def backward(ctx, g):
        merger: ShardedMerger = ctx.merger
        comm, pool = merger.comm, merger.pool
        W, delta = ctx.saved_tensors
        R = comm.world
        G = comm.all_to_all(g.reshape(R, -1).contiguous())  # [R, n]: every task's gradient for my slice
        Gd = pool.reduce_rows(G * delta.unsqueeze(0))       # [R, rows]: summed over the entries a gate controls
        Gz, Wz = merger.tz_zw(Gd, W)
        g_W = comm.all_reduce(Gz)                            # [R, M], summed over slices
        g_w = g_W[comm.rank]
        merger.record(Gd.t() / R, W)                         # dL/dz = (Gd^T / R) @ W, applied at end_step
        g_delta = (G * pool.expand(Wz)).sum(0) / R if ctx.needs_input_grad[1] else None
        return g_w, g_delta, None


class ShardedMerger(LocalMerger):
    """Merges where the shard lives; `merge(w)` returns this rank's task's full merged delta [P_pad]."""

    def __init__(self, pool: ExpertPool, padded: int, comm: Comm):
        super().__init__(pool, padded)
        self.comm = comm

    def merge(self, w: torch.Tensor) -> torch.Tensor:
        return _ShardedMerge.apply(w, self.pool.delta, self)

    def end_step(self, penalty_coef: torch.Tensor | None = None) -> torch.Tensor | None:
        train = self._active and self._train
        sq = super().end_step(penalty_coef)
        pool = self.pool
        if train and pool.structured and pool.layout.num_shared and not pool.frozen:  # frozen: no mask gradient
            # Gate groups cut by a shard boundary: every rank touching one holds its row and has added the
            # gradient of its own entries; the sum over those ranks is the row's gradient (one exchange of
            # at most x (widest input) rows per step, independent of the tasks).
            grad = pool.log_alpha.grad
            buf = grad.new_zeros(pool.layout.num_shared, grad.shape[1])
            buf[pool.shared_pos] = grad[pool.shared_rows]
            buf = self.comm.all_reduce(buf)
            grad[pool.shared_rows] = buf[pool.shared_pos]
        return sq


class _GatherMerge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, log_alpha, delta, valid, comm: Comm, train: bool):
        LA = comm.all_gather(log_alpha.detach()).flatten(0, 1)   # [P, M]: every expert's full mask logits
        DL = comm.all_gather(delta.detach()).flatten()
        V = comm.all_gather(valid).flatten()
        ctx.comm, ctx.train = comm, train
        ctx.save_for_backward(w.detach(), LA, DL, V)
        z = hc.gate(LA, train=train) * V.unsqueeze(1)
        return (z @ w) * DL

    @staticmethod
    @fp32_math
    def backward(ctx, g):
        comm: Comm = ctx.comm
        w, LA, DL, V = ctx.saved_tensors
        with torch.enable_grad():
            la = LA.detach().requires_grad_(True)
            dl = DL.detach().requires_grad_(True)
            wl = w.detach().requires_grad_(True)
            d = ((hc.gate(la, train=ctx.train) * V.unsqueeze(1)) @ wl) * dl
            g_w, g_la, g_dl = torch.autograd.grad(d, [wl, la, dl], g)
        R = comm.world
        g_la = comm.reduce_scatter(g_la) / R
        g_dl = comm.reduce_scatter(g_dl) / R
        return g_w, g_la, g_dl, None, None, None


class GatherMerger(LocalMerger):
    """Comparison path: gathers all M masks per task (M x P bytes per task per rank)."""

    def __init__(self, pool: ExpertPool, padded: int, comm: Comm):
        super().__init__(pool, padded)
        self.comm = comm
        self._train = True

    def begin_step(self, train: bool = True) -> torch.Tensor:
        self._train = train
        return super().begin_step(train)

    def merge(self, w: torch.Tensor) -> torch.Tensor:
        return _GatherMerge.apply(w, self.pool.log_alpha, self.pool.delta, self.pool.valid, self.comm, self._train)


def build_merger(kind: str, pool: ExpertPool, padded: int, comm: Comm) -> LocalMerger:
    if kind == "gather" and pool.cfg.lean:
        raise ValueError("dist.pool=gather keeps its own gathered masks: it cannot run a lean pool "
                         "(method.sparsity.lean=true); use dist.pool=sharded")
    if kind == "gather" and pool.structured:
        raise ValueError("dist.pool=gather compares against unstructured masks only; use dist.pool=sharded "
                         "with method.sparsity.structured=true")
    if kind == "sharded":
        return ShardedMerger(pool, padded, comm)
    if kind == "gather":
        return GatherMerger(pool, padded, comm)
    raise ValueError(f"dist.pool={kind!r}: expected 'sharded' or 'gather'")
