"""The pool's merge across ranks (dist.pool): the sharded strategy, and the gather-all one it is measured against.

  ShardedMerger  rank r owns the flat slice [r*n, (r+1)*n) of delta and of all M experts' logits. Per round
                 of tasks (one per rank) the forward all-gathers the R tasks' merging weights (R x M numbers),
                 merges the local slice for every task and an all-to-all hands each rank its own task's full
                 merged delta (P numbers in and out per rank, whatever M is); the backward returns each task's
                 gradient slice to its owner by an all-to-all and combines the per-task partial sums for w by
                 an all-reduce of G x R x M numbers (per-chunk partial sums added in global chunk order,
                 G = P x M / 2^21 chunks: the same bits at every world size, pool/ordered.py). A planned step
                 (merge.py) gathers the step's K x M weights once at begin_step, merges max(1, M // R) rounds
                 per gate pass (never more memory than the slice's masks), and all-reduces every task's
                 partial sums for w once, at end_step (G x K x R x M numbers);
  GatherMerger   what plain ZeRO-3 wrapping would do (all-gather every expert's logits per task, reduce-scatter
                 their gradients: M x P per task), kept only as the measured comparison (dist.pool=zero3 runs the
                 pool under a real DeepSpeed ZeRO-3 engine instead: smat_dist/pool/zero3.py, not a merger).
Across ranks, each rank's loss is its own tasks' mean; pool gradients arrive summed over the R tasks of the
round, so they are divided by R (the pool is never averaged by the data-parallel engine), while the gradient
for w stays per task (the engine averages the hypernetwork's gradients over ranks). The collectives are a
`Comm` (smat_dist.distributed.comm) handed in.
"""
from __future__ import annotations

import torch

from smat_dist.distributed.comm import Comm
from smat_dist.pool import gates as hc
from smat_dist.pool.merge import LocalMerger
from smat_dist.pool.ordered import ordered_sum
from smat_dist.pool.shard import PoolShard
from smat_dist.utils.device import fp32_math


class _ShardedMerge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, delta, merger: "ShardedMerger"):
        comm, shard = merger.comm, merger.shard
        ctx.merger = merger
        ctx.planned = merger.planning
        if ctx.planned:   # the round's weights gathered and its masks merged at the step's start
            W, m = merger.next_planned()                 # [R, M], [R, rows]
            ctx.save_for_backward(W, delta, m)
            return comm.all_to_all(shard.expand(m) * delta).reshape(-1)
        W = comm.all_gather(w.detach())                  # [R, M]
        D = shard.expand(merger.zw(W)) * delta            # [R, n]: my slice of every task's merged delta
        full = comm.all_to_all(D)                        # [R, n]: every slice of my task's merged delta
        ctx.save_for_backward(W, delta)
        return full.reshape(-1)

    @staticmethod
    @fp32_math
    def backward(ctx, g):
        merger: ShardedMerger = ctx.merger
        comm, shard = merger.comm, merger.shard
        W, delta = ctx.saved_tensors[:2]
        R = comm.world
        G = comm.all_to_all(g.reshape(R, -1).contiguous())  # [R, n]: every task's gradient for my slice
        Gd = shard.reduce_rows(G * delta.unsqueeze(0))       # [R, rows]: summed over the entries a gate controls
        if ctx.planned:
            # dL/dz = Gd^T (W / R); Gd itself is what end_step's u^T z needs for every task's dL/dw
            merger.record(Gd.t(), W / R)
            g_delta = (G * shard.expand(ctx.saved_tensors[2])).sum(0) / R if ctx.needs_input_grad[1] else None
            return None, g_delta, None
        Gz, Wz = merger.tz_zw(Gd, W)                         # Gz [G, R, M]: per-chunk partial sums
        g_W = ordered_sum(comm.all_reduce(Gz))               # [R, M], summed over chunks in global order
        g_w = g_W[comm.rank]
        merger.record(Gd.t() / R, W)                         # dL/dz = (Gd^T / R) @ W, applied at end_step
        g_delta = (G * shard.expand(Wz)).sum(0) / R if ctx.needs_input_grad[1] else None
        return g_w, g_delta, None


class ShardedMerger(LocalMerger):
    """Merges where the shard lives; `merge(w)` returns this rank's task's full merged delta [P_pad]."""

    def __init__(self, shard: PoolShard, padded: int, comm: Comm):
        super().__init__(shard, padded)
        self.comm = comm

    def merge(self, w: torch.Tensor) -> torch.Tensor:
        return _ShardedMerge.apply(w, self.shard.delta, self)

    def _gather_plan(self, plan: torch.Tensor) -> torch.Tensor:
        # one all-gather of K x M numbers per rank for the step, instead of one of M per round of tasks
        return self.comm.all_gather(plan.contiguous())

    def _merge_rows(self, W: torch.Tensor, out: torch.Tensor, a: int, b: int, zc: torch.Tensor) -> None:
        if not self.shard.passes.ordered:
            return super()._merge_rows(W, out, a, b, zc)
        tmp = self.shard.passes.scratch(b - a)[2]      # each task's row on its own: the same bits at any R
        for r in range(W.shape[0]):
            torch.sum(torch.mul(zc, W[r], out=tmp), 1, out=out[r, a:b])

    def _w_grad_acc(self, cols: int) -> torch.Tensor:
        return self.shard.passes.placed(cols, self.shard.experts, dtype=self.shard.log_alpha.dtype)

    def _w_grad_chunk(self, U: torch.Tensor, acc: torch.Tensor, a: int, b: int, zc: torch.Tensor) -> None:
        passes = self.shard.passes
        if not passes.ordered:
            acc[0].addmm_(U[a:b].t(), zc)
            return
        g = passes.chunk_index(a)
        if g >= acc.shape[0]:                           # a padding-only chunk: zero partials
            return
        tmp = passes.scratch(b - a)[2]
        for r in range(U.shape[1]):                     # per-chunk partials at their global chunk
            torch.sum(torch.mul(zc, U[a:b, r:r + 1], out=tmp), 0, out=acc[g, r])

    def _w_grads_done(self, acc: torch.Tensor) -> torch.Tensor:
        """[K, M]: this rank's tasks' dL/dw, from every rank's partials (round-major columns: (round, rank))."""
        g_all = ordered_sum(self.comm.all_reduce(acc))   # [K * R, M], summed over chunks in global order
        return g_all.view(-1, self.comm.world, g_all.shape[-1])[:, self.comm.rank]

    # The sharded merge's products with the masks give the same bits for a task whatever the world size
    # (a resume on another one continues bit-exactly): each task's row on its own (a [R, M] x [M, n] product
    # rounds a row differently with R) as elementwise products and torch sums (BLAS kernels round with the
    # slice's length and alignment), and the sum over rows per global chunk (ordered.py).
    @torch.no_grad()
    def zw(self, W: torch.Tensor) -> torch.Tensor:
        assert self._active, "begin_step() first"
        if not self.shard.passes.ordered:       # BLAS: ~4x faster, rounds a task's row with R
            return super().zw(W)
        out = W.new_empty(W.shape[0], self.shard.log_alpha.shape[0])
        for a, b, zc in self._mask_chunks():
            self._merge_rows(W, out, a, b, zc)
        self._release()
        return out

    @torch.no_grad()
    def tz_zw(self, U: torch.Tensor, W: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(U @ z as per-chunk partials [G, K, M] at their global chunks, W @ z^T [K', rows]); G = 1 (one BLAS
        product over the slice) unless the pool's sums are ordered (dist.aligned_slices)."""
        passes = self.shard.passes
        if not passes.ordered:
            uz, wz = super().tz_zw(U, W)
            return uz.unsqueeze(0), wz
        uz = passes.placed(U.shape[0], self.shard.experts, dtype=U.dtype)
        wz = None if W is None else W.new_empty(W.shape[0], self.shard.log_alpha.shape[0])
        for a, b, zc in self._mask_chunks():
            self._w_grad_chunk(U.t(), uz, a, b, zc)
            if wz is not None:
                self._merge_rows(W, wz, a, b, zc)
        return uz, wz

    def end_step(self, penalty_coef: torch.Tensor | None = None) -> torch.Tensor | None:
        train = self._active and self._train
        sq = super().end_step(penalty_coef)
        shard = self.shard
        if train and shard.structured and shard.layout.num_shared and not shard.pattern.frozen:
            # Gate groups cut by a shard boundary: every rank touching one holds its row and has added the
            # gradient of its own entries; the sum over those ranks is the row's gradient (one exchange of
            # at most x (widest input) rows per step, independent of the tasks).
            grad = shard.log_alpha.grad
            buf = grad.new_zeros(shard.layout.num_shared, grad.shape[1])
            buf[shard.shared_pos] = grad[shard.shared_rows]
            buf = self.comm.all_reduce(buf)
            grad[shard.shared_rows] = buf[shard.shared_pos]
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

    def __init__(self, shard: PoolShard, padded: int, comm: Comm):
        super().__init__(shard, padded)
        self.comm = comm
        self._train = True

    def begin_step(self, train: bool = True, plan: torch.Tensor | None = None) -> torch.Tensor:
        self._train = train
        return super().begin_step(train)   # gathers every mask per task: nothing to plan

    def merge(self, w: torch.Tensor) -> torch.Tensor:
        return _GatherMerge.apply(w, self.shard.log_alpha, self.shard.delta, self.shard.valid, self.comm, self._train)


def build_merger(kind: str, shard: PoolShard, padded: int, comm: Comm) -> LocalMerger:
    if kind == "gather" and shard.cfg.lean:
        raise ValueError("dist.pool=gather keeps its own gathered masks: it cannot run a lean pool "
                         "(method.sparsity.lean=true); use dist.pool=sharded")
    if kind == "gather" and shard.structured:
        raise ValueError("dist.pool=gather compares against unstructured masks only; use dist.pool=sharded "
                         "with method.sparsity.structured=true")
    if kind == "sharded":
        return ShardedMerger(shard, padded, comm)
    if kind == "gather":
        return GatherMerger(shard, padded, comm)
    raise ValueError(f"dist.pool={kind!r}: expected 'sharded' or 'gather'")
