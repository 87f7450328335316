"""The pool's merge strategies: theta_i = theta_pre + (sum_m w_im z_m) * delta, per task.

The masks z do not depend on the task, so a step computes them once (`begin_step`: one pass that also
clamps the logits and counts the sparsity statistics). A task's merge is one [rows, M] x [M] product; its
backward needs, for the masks, dL/dz = u w^T with u = (dL/dd * delta) summed per gate row, a rank-one
matrix. A merger records the factors (u, w) instead of forming and accumulating [rows, M] gradients, and
`end_step` pushes sum_t u_t w_t^T through the gate into the logits in one fused chunked pass, together with
the sparsity penalty's gradient. A lean pool (method.sparsity.lean) stores no z at all: every use recomputes
the gates chunk by chunk from the logits. A frozen mask pattern (patterns.py) records no factors and skips
the gate backward altogether; the merge's gradients for w and delta are unchanged.

Strategies (dist.pool picks the one across ranks):
  LocalMerger    the whole pool in this process;
  ShardedMerger  rank r owns the flat slice [r*n, (r+1)*n) of delta and of all M experts' logits. Per round
                 of tasks (one per rank) the forward all-gathers the R tasks' merging weights (R x M numbers),
                 merges the local slice for every task and an all-to-all hands each rank its own task's full
                 merged delta (P numbers in and out per rank, whatever M is); the backward returns each task's
                 gradient slice to its owner by an all-to-all and combines the per-task partial sums for w by
                 an all-reduce of G x R x M numbers (per-chunk partial sums added in global chunk order,
                 G = P x M / 2^21 chunks: the same bits at every world size, pool/ordered.py);
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
from smat_dist.pool.ordered import ordered_sum
from smat_dist.pool.shard import PoolShard
from smat_dist.utils.device import fp32_math

class _LocalMerge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, delta, merger: "LocalMerger"):
        ctx.merger = merger
        m = merger.zw(w.detach().unsqueeze(0))[0]              # [rows]: the task's merged mask
        # kept for delta's gradient: the backward's W @ z^T would be this same product again (a pass over
        # the [rows, M] masks per task), at the cost of one [rows] vector (1/M of the masks) while the task's
        # graph is alive. (The sharded merge recomputes it: there it is R tasks' masks, R/M of the masks.)
        ctx.save_for_backward(w.detach(), m if ctx.needs_input_grad[1] else None)
        return merger.shard.expand(m) * delta

    @staticmethod
    @fp32_math
    def backward(ctx, g):
        merger: LocalMerger = ctx.merger
        shard = merger.shard
        w, m = ctx.saved_tensors
        u = shard.reduce_rows(g * shard.delta.detach())      # [rows]: dL/dm summed over the entries a gate controls
        merger.record(u.unsqueeze(1), w.unsqueeze(0))
        g_w = merger.tz_zw(u.unsqueeze(0), None)[0][0] if ctx.needs_input_grad[0] else None
        g_delta = g * shard.expand(m) if ctx.needs_input_grad[1] else None
        return g_w, g_delta, None


class LocalMerger:
    """The whole pool lives in this process (single process, or every rank holding all of it)."""

    def __init__(self, shard: PoolShard, padded: int):
        self.shard, self.padded = shard, padded
        self.lean = bool(shard.cfg.lean)
        # method.sparsity.release_masks: the deterministic gate recomputes bitwise the same z (noisy gates
        # would draw again; structured z is small)
        self.release = (bool(shard.cfg.release_masks) and not self.lean
                        and shard.cfg.noise_eps == 0 and not shard.structured)
        self._released = False
        self._z: torch.Tensor | None = None
        self._active = False
        self._train = False
        self._factors: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.stats: torch.Tensor | None = None

    def begin_step(self, train: bool = True) -> torch.Tensor | None:
        """Masks for this step (no autograd graph); in training also this slice's sparsity statistics.
        Returns z [rows, M], or None for a lean pool (recomputed chunk by chunk where used)."""
        self._train, self._active = train, True
        self._factors = []
        self._released = False
        if self.lean:
            z = None
            self.stats = self.shard.passes.masks_inplace(train=train, clamp=True, with_stats=True, store=False)[1]
        elif train and self.release:
            # its own buffer, freed when released (a buffer kept across steps would keep it resident)
            z, self.stats = self.shard.passes.masks_inplace(train=True, clamp=True, with_stats=True)
        elif train:
            # The training masks live in a buffer kept across steps: the step ends with end_step.
            passes = self.shard.passes
            z, self.stats = passes.masks_inplace(train=True, out=passes.persistent("z"), clamp=True, with_stats=True)
        else:
            z, self.stats = self.shard.passes.masks_inplace(train=False, clamp=True), None
        self._z = z
        return z

    @property
    def z(self) -> torch.Tensor:
        if self._z is None and self._released:
            self._recompute()
        assert self._z is not None, "begin_step() first (a lean pool keeps no z: use zw / tz_zw)"
        return self._z

    @torch.no_grad()
    def _recompute(self) -> None:
        """The released masks again: the same gate on the logits begin_step clamped, so the same bits. Without
        fused kernels that is the gate alone (no second clamp, no statistics); the fused kernel computes z
        within its clamp-gate-statistics pass, so it is called as begin_step called it (statistics dropped)."""
        fused = bool(self.shard.cfg.compile)
        out = self.shard.passes.masks_inplace(train=True, clamp=fused, with_stats=fused)
        self._z = out[0] if fused else out
        self._released = False

    def _release(self) -> None:
        if self.release and self._train and self._z is not None:
            self._z, self._released = None, True

    def _mask_chunks(self):
        """(a, b, z of rows [a, b)): the kept masks, or a lean pool's recomputed into a scratch buffer."""
        passes = self.shard.passes
        for a, b in passes.rows():
            yield a, b, (self.z[a:b] if not self.lean else passes.gate_rows(a, b, passes.scratch(b - a)[3],
                                                                            self._train))

    @torch.no_grad()
    def zw(self, W: torch.Tensor) -> torch.Tensor:
        """W @ z^T: [K, M] -> [K, rows] (each task's merged mask over the gate rows). In training with
        release_masks the masks are dropped after it: the task's forward passes run without them."""
        assert self._active, "begin_step() first"
        if not self.lean:
            out = W @ self.z.t()
            self._release()
            return out
        out = W.new_empty(W.shape[0], self.shard.log_alpha.shape[0])
        for a, b, zc in self._mask_chunks():
            out[:, a:b] = W @ zc.t()
        return out

    @torch.no_grad()
    def tz_zw(self, U: torch.Tensor, W: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(U @ z, W @ z^T) for U [K, rows], W [K', M]: one pass over the masks for both (released masks are
        recomputed here, in the merge's backward, and kept until the next merge or the step's end). W None:
        U @ z alone (the local merge keeps W @ z^T from its forward)."""
        if not self.lean:
            z = self.z
            return U @ z, None if W is None else W @ z.t()
        uz = U.new_zeros(U.shape[0], self.shard.experts)
        wz = None if W is None else W.new_empty(W.shape[0], self.shard.log_alpha.shape[0])
        for a, b, zc in self._mask_chunks():
            uz += U[:, a:b] @ zc
            if wz is not None:
                wz[:, a:b] = W @ zc.t()
        return uz, wz

    def record(self, u: torch.Tensor, w: torch.Tensor) -> None:
        """One merge's mask gradient, dL/dz = u @ w (u [rows, K], w [K, M]), summed at end_step."""
        if self._train and not self.shard.pattern.frozen:
            self._factors.append((u, w))

    def merge(self, w: torch.Tensor) -> torch.Tensor:
        d = _LocalMerge.apply(w, self.shard.delta, self)
        if d.shape[0] != self.padded:  # the pool covers the whole space; pad only if the space is padded
            d = torch.nn.functional.pad(d, (0, self.padded - d.shape[0]))
        return d

    def mask_grad(self):
        """The step's accumulated dL/dz: factored (U, W) while that is smaller than the dense [rows, M]."""
        if not self._factors:
            return None
        U = torch.cat([u for u, _ in self._factors], 1)
        W = torch.cat([w for _, w in self._factors], 0)
        if U.shape[1] < W.shape[1]:
            return U, W
        return U @ W

    def end_step(self, penalty_coef: torch.Tensor | None = None) -> torch.Tensor | None:
        """Apply the step's accumulated mask gradient (and the sparsity penalty's) to the mask logits; a lean
        pool defers it to the optimiser step, which recomputes it chunk by chunk. Returns the squared norm of
        this slice's logit gradient when the pass computed it (None: the optimiser computes it)."""
        sq = None
        if self._active and self._train and not self.shard.pattern.frozen:
            if self.lean:
                sq = self.shard.passes.defer_mask_grad_(self.mask_grad(), penalty_coef)
            else:
                sq = self.shard.passes.apply_mask_grad_(self.z, self.mask_grad(), penalty_coef, train=True)
        self._z, self._factors, self._active, self._released = None, [], False, False
        return sq


class _ShardedMerge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, delta, merger: "ShardedMerger"):
        comm, shard = merger.comm, merger.shard
        W = comm.all_gather(w.detach())                  # [R, M]
        D = shard.expand(merger.zw(W)) * delta            # [R, n]: my slice of every task's merged delta
        full = comm.all_to_all(D)                        # [R, n]: every slice of my task's merged delta
        ctx.merger = merger
        ctx.save_for_backward(W, delta)
        return full.reshape(-1)

    @staticmethod
    @fp32_math
    def backward(ctx, g):
        merger: ShardedMerger = ctx.merger
        comm, shard = merger.comm, merger.shard
        W, delta = ctx.saved_tensors
        R = comm.world
        G = comm.all_to_all(g.reshape(R, -1).contiguous())  # [R, n]: every task's gradient for my slice
        Gd = shard.reduce_rows(G * delta.unsqueeze(0))       # [R, rows]: summed over the entries a gate controls
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
            tmp = self.shard.passes.scratch(b - a)[2]
            for r in range(W.shape[0]):
                torch.sum(torch.mul(zc, W[r], out=tmp), 1, out=out[r, a:b])
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
            tmp, g = passes.scratch(b - a)[2], passes.chunk_index(a)
            for r in range(U.shape[0] if g < uz.shape[0] else 0):   # padding-only chunks: zero partials
                torch.sum(torch.mul(zc, U[r, a:b].unsqueeze(1), out=tmp), 0, out=uz[g, r])
            for r in range(0 if wz is None else W.shape[0]):
                torch.sum(torch.mul(zc, W[r], out=tmp), 1, out=wz[r, a:b])
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

    def begin_step(self, train: bool = True) -> torch.Tensor:
        self._train = train
        return super().begin_step(train)

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
