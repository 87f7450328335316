"""The pool's merge in one process: theta_i = theta_pre + (sum_m w_im z_m) * delta, per task.

The masks z do not depend on the task, so a step computes them once (`begin_step`: one pass that also
clamps the logits and counts the sparsity statistics). A task's merge is one [rows, M] x [M] product; its
backward needs, for the masks, dL/dz = u w^T with u = (dL/dd * delta) summed per gate row, a rank-one
matrix. A merger records the factors (u, w) instead of forming and accumulating [rows, M] gradients, and
`end_step` pushes sum_t u_t w_t^T through the gate into the logits in one fused chunked pass, together with
the sparsity penalty's gradient. A lean pool (method.sparsity.lean) stores no z at all: every use recomputes
the gates chunk by chunk from the logits. A frozen mask pattern (patterns.py) records no factors and skips
the gate backward altogether; the merge's gradients for w and delta are unchanged.

Planned steps (the training step's default, released masks): the step hands `begin_step` every task's
merging weights W [K, M] before its first task (the hypernetwork changes only at the step's end). The mask
pass then merges every task's mask while each chunk of gates is in cache, and stores no z; the merges give w
no gradient, and end_step's gate pass, which recomputes the gates for the logits' gradient anyway, also
gives every task's dL/dw = u^T z (`w_grads`), for the step to push through the hypernetwork. Two gate passes
per step instead of one per task plus one, and no [rows, M] array while a task's graph is alive.

LocalMerger is the whole pool in this process; the strategies across ranks (dist.pool) extend it in
sharded.py.
"""
from __future__ import annotations

import torch

from smat_dist.pool.shard import PoolShard
from smat_dist.utils.device import fp32_math


class _LocalMerge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, delta, merger: "LocalMerger"):
        ctx.merger = merger
        ctx.planned = merger.planning
        if ctx.planned:   # merged at the step's start; dL/dw is the pool's at end_step (see begin_step)
            W, m = merger.next_planned()
            ctx.save_for_backward(W[0], m[0] if ctx.needs_input_grad[1] else None)
            return merger.shard.expand(m[0]) * delta
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
        g_w = None
        if ctx.needs_input_grad[0] and not ctx.planned:
            g_w = merger.tz_zw(u.unsqueeze(0), None)[0][0]
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
        # the step's planned merges (begin_step(plan=...)): each round's weights [R, M] and merged masks [R, rows]
        self._plan: list | None = None
        self._plan_w: torch.Tensor | None = None
        self._group = 1
        self._next = 0
        self.w_grads: torch.Tensor | None = None

    @property
    def planning(self) -> bool:
        """Whether this step's merges were planned at begin_step: merge() then takes the next planned merged
        mask and gives w no gradient; end_step computes every task's dL/dw (`w_grads`) in its gate pass."""
        return self._plan is not None

    def begin_step(self, train: bool = True, plan: torch.Tensor | None = None) -> torch.Tensor | None:
        """Masks for this step (no autograd graph); in training also this slice's sparsity statistics.
        Returns z [rows, M], or None for a lean pool (recomputed chunk by chunk where used).

        plan [K, M]: this rank's K tasks' merging weights, known before the step's first task (the
        hypernetwork changes only at the step's end). With released masks (the default) the masks are then
        never stored: this pass merges every task's mask chunk by chunk while the chunk is in cache, and
        end_step recomputes the gates once more for the logits' gradient and every task's dL/dw. Against
        recomputing the masks in every task's backward, that is 2 gate passes per step instead of K + 1,
        no [rows, M] array while a task runs, and no separate products over the masks. Other pools (kept,
        lean, noisy or structured masks, a frozen pattern) merge each task as it comes (plan ignored)."""
        self._train, self._active = train, True
        self._factors = []
        self._released = False
        self._plan, self._plan_w, self._next, self.w_grads = None, None, 0, None
        if plan is not None and train and self.release and not self.shard.pattern.frozen:
            self._begin_planned(plan)
            return None
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

    def _gather_plan(self, plan: torch.Tensor) -> torch.Tensor:
        """[R, K, M]: every rank's planned weights (one process: R = 1)."""
        return plan.unsqueeze(0)

    @torch.no_grad()
    def _begin_planned(self, plan: torch.Tensor) -> None:
        W = self._gather_plan(plan.detach())                       # [R, K, M]
        R, K, M = W.shape
        # Rounds merged per gate pass: a pass's merged masks (R x rows numbers per round) never take more memory
        # than the masks they replace (M x rows), so at K <= M / R (one process: K <= M) one pass serves the
        # step, and more rounds per rank take more passes, never more memory.
        self._group = max(1, M // R)
        self._plan_w, self._plan = W, [None] * K
        first = self._new_outs(0)
        self.stats = self.shard.passes.masks_inplace(train=True, clamp=True, with_stats=True, store=False,
                                                     each=lambda a, b, zc: self._merge_chunk(first, a, b, zc))[1]
        # the masks are not stored; anything that asks for z (nothing in a planned step) recomputes them
        self._z, self._released = None, True

    def _new_outs(self, j0: int) -> list:
        """Buffers for the merged masks of rounds j0 .. j0 + group (registered in the plan)."""
        W, rows = self._plan_w, self.shard.log_alpha.shape[0]
        out = []
        for j in range(j0, min(j0 + self._group, W.shape[1])):
            self._plan[j] = (W[:, j], W.new_empty(W.shape[0], rows))
            out.append(self._plan[j])
        return out

    def _merge_chunk(self, group: list, a: int, b: int, zc: torch.Tensor) -> None:
        for Wj, out in group:
            self._merge_rows(Wj, out, a, b, zc)

    @torch.no_grad()
    def _merge_group(self, j0: int) -> None:
        """One more gate pass for the next rounds' merged masks (the deterministic gate: the same z bits)."""
        group, passes = self._new_outs(j0), self.shard.passes
        for a, b in passes.rows():
            self._merge_chunk(group, a, b, passes.gate_rows(a, b, passes.scratch(b - a)[3], True))

    def _merge_rows(self, W: torch.Tensor, out: torch.Tensor, a: int, b: int, zc: torch.Tensor) -> None:
        """out[:, a:b] = W @ zc^T for W [R, M] (R tasks' weights) and the masks zc of rows [a, b)."""
        out[:, a:b] = W @ zc.t()

    def next_planned(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next round's (weights [R, M], merged masks [R, rows]); the merger lets go of the masks (the
        task's graph holds them until its backward)."""
        if self._plan is None or self._next >= len(self._plan):
            raise RuntimeError(f"merge() called more often than the {0 if self._plan is None else len(self._plan)} "
                               f"tasks planned at begin_step")
        if self._plan[self._next] is None:
            self._merge_group(self._next)
        item = self._plan[self._next]
        self._plan[self._next] = None
        self._next += 1
        return item

    def _w_grad_acc(self, cols: int) -> torch.Tensor:
        la = self.shard.log_alpha
        return torch.zeros(cols, self.shard.experts, dtype=la.dtype, device=la.device)

    def _w_grad_chunk(self, U: torch.Tensor, acc: torch.Tensor, a: int, b: int, zc: torch.Tensor) -> None:
        acc.addmm_(U[a:b].t(), zc)

    def _w_grads_done(self, acc: torch.Tensor) -> torch.Tensor:
        return acc

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
            self._merge_rows(W, out, a, b, zc)
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
        if self._active and self._train and self._plan is not None:
            sq = self._end_planned(penalty_coef)
        elif self._active and self._train and not self.shard.pattern.frozen:
            if self.lean:
                sq = self.shard.passes.defer_mask_grad_(self.mask_grad(), penalty_coef)
            else:
                sq = self.shard.passes.apply_mask_grad_(self.z, self.mask_grad(), penalty_coef, train=True)
        self._z, self._factors, self._active, self._released = None, [], False, False
        self._plan = self._plan_w = None
        return sq

    @torch.no_grad()
    def _end_planned(self, penalty_coef: torch.Tensor | None) -> torch.Tensor | None:
        """A planned step's gate pass: every task's dL/dw = u_t^T z (the recorded factors' columns) and the
        logits' gradient, from one recomputation of each chunk's gates."""
        if self._next != len(self._plan):
            raise RuntimeError(f"end_step() after {self._next} of the {len(self._plan)} merges planned at "
                               f"begin_step")
        U = torch.cat([u for u, _ in self._factors], 1)             # [rows, tasks]
        acc = self._w_grad_acc(U.shape[1])
        sq = self.shard.passes.apply_mask_grad_(
            None, self.mask_grad(), penalty_coef, train=True,
            each=lambda a, b, zc: self._w_grad_chunk(U, acc, a, b, zc))
        self.w_grads = self._w_grads_done(acc)
        return sq
