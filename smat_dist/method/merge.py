"""Per-task merge of the expert pool: theta_i = theta_pre + (sum_m w_im z_m) * delta.

The masks z do not depend on the task, so a step computes them once (`begin_step`: one pass that also
clamps the logits and counts the sparsity statistics). A task's merge is one [rows, M] x [M] product; its
backward needs, for the masks, dL/dz = u w^T with u = (dL/dd * delta) summed per gate row, a rank-one
matrix. The merger records the factors (u, w) instead of forming and accumulating [rows, M] gradients,
and `end_step` pushes sum_t u_t w_t^T through the gate into the logits in one fused chunked pass,
together with the sparsity penalty's gradient. A lean pool (method.sparsity.lean) stores no z at all: every
use recomputes the gates chunk by chunk from the logits. A fixed mask pattern (method.sparsity.pattern random /
magnitude: frozen logits) records no factors and skips the gate backward altogether; the merge's gradients
for w and delta are unchanged.
"""
from __future__ import annotations

import torch

from smat_dist.utils.device import fp32_math

from smat_dist.method.pool import ExpertPool


class _LocalMerge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, delta, merger: "LocalMerger"):
        ctx.merger = merger
        ctx.save_for_backward(w.detach())
        return merger.pool.expand(merger.zw(w.detach().unsqueeze(0))[0]) * delta

    @staticmethod
    @fp32_math
    def backward(ctx, g):
        merger: LocalMerger = ctx.merger
        pool = merger.pool
        (w,) = ctx.saved_tensors
        u = pool.reduce_rows(g * pool.delta.detach())      # [rows]: dL/dm summed over the entries a gate controls
        merger.record(u.unsqueeze(1), w.unsqueeze(0))
        uz, wz = merger.tz_zw(u.unsqueeze(0), w.unsqueeze(0))
        g_w = uz[0] if ctx.needs_input_grad[0] else None
        g_delta = g * pool.expand(wz[0]) if ctx.needs_input_grad[1] else None
        return g_w, g_delta, None


class LocalMerger:
    """The whole pool lives in this process (single process, or every rank holding all of it)."""

    def __init__(self, pool: ExpertPool, padded: int):
        self.pool, self.padded = pool, padded
        self.lean = bool(pool.cfg.lean)
        # method.sparsity.release_masks: the deterministic gate recomputes bitwise the same z (noisy gates
        # would draw again; structured z is small)
        self.release = (bool(getattr(pool.cfg, "release_masks", False)) and not self.lean
                        and pool.cfg.noise_eps == 0 and not pool.structured)
        self._released = False
        self.frozen = bool(getattr(pool, "frozen", False))   # fixed mask pattern: no mask gradient at all
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
            self.stats = self.pool.masks_inplace(train=train, clamp=True, with_stats=True, store=False)[1]
        elif train and self.release:
            # its own buffer, freed when released (a buffer kept across steps would keep it resident)
            z, self.stats = self.pool.masks_inplace(train=True, clamp=True, with_stats=True)
        elif train:
            # The training masks live in a buffer kept across steps: the step ends with end_step.
            z, self.stats = self.pool.masks_inplace(train=True, out=self.pool._persistent("_z_buf"), clamp=True,
                                                    with_stats=True)
        else:
            z, self.stats = self.pool.masks_inplace(train=False, clamp=True), None
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
        fused = bool(self.pool.cfg.compile)
        out = self.pool.masks_inplace(train=True, clamp=fused, with_stats=fused)
        self._z = out[0] if fused else out
        self._released = False

    def _release(self) -> None:
        if self.release and self._train and self._z is not None:
            self._z, self._released = None, True

    @torch.no_grad()
    def zw(self, W: torch.Tensor) -> torch.Tensor:
        """W @ z^T: [K, M] -> [K, rows] (each task's merged mask over the gate rows). In training with
        release_masks the masks are dropped after it: the task's forward passes run without them."""
        assert self._active, "begin_step() first"
        if not self.lean:
            out = W @ self.z.t()
            self._release()
            return out
        pool = self.pool
        out = W.new_empty(W.shape[0], pool.log_alpha.shape[0])
        for a, b in pool._rows():
            out[:, a:b] = W @ pool.gate_rows(a, b, pool._scratch(b - a)[3], self._train).t()
        return out

    @torch.no_grad()
    def tz_zw(self, U: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(U @ z, W @ z^T) for U [K, rows], W [K', M]: one pass over the masks for both (released masks are
        recomputed here, in the merge's backward, and kept until the next merge or the step's end)."""
        if not self.lean:
            z = self.z
            return U @ z, W @ z.t()
        pool = self.pool
        uz = U.new_zeros(U.shape[0], pool.experts)
        wz = W.new_empty(W.shape[0], pool.log_alpha.shape[0])
        for a, b in pool._rows():
            zc = pool.gate_rows(a, b, pool._scratch(b - a)[3], self._train)
            uz += U[:, a:b] @ zc
            wz[:, a:b] = W @ zc.t()
        return uz, wz

    def record(self, u: torch.Tensor, w: torch.Tensor) -> None:
        """One merge's mask gradient, dL/dz = u @ w (u [rows, K], w [K, M]), summed at end_step."""
        if self._train and not self.frozen:
            self._factors.append((u, w))

    def merge(self, w: torch.Tensor) -> torch.Tensor:
        d = _LocalMerge.apply(w, self.pool.delta, self)
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
        if self._active and self._train and not self.frozen:
            if self.lean:
                sq = self.pool.defer_mask_grad_(self.mask_grad(), penalty_coef)
            else:
                sq = self.pool.apply_mask_grad_(self.z, self.mask_grad(), penalty_coef, train=True)
        self._z, self._factors, self._active, self._released = None, [], False, False
        return sq
