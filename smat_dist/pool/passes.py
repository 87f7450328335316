"""The expert pool's fused chunked passes over its [rows, M] logits, the training step's hot path.

The logits block is the largest state of a run (ViT-Ti x 64 experts: 1.4 GB per rank), so every pass goes
chunk by chunk through reused scratch buffers and never allocates a temporary of that size:
  - `masks_inplace`: clamp, gates and sparsity statistics in one pass;
  - `apply_mask_grad_`: the masks' gradient (dense or factored u w^T) through the gate, plus the penalty's,
    into the logits' gradient, with its squared norm for the clip;
  - the lean pool's `defer_mask_grad_` / `step_deferred_`: the same gradient recomputed chunk by chunk
    inside the update, so neither the masks nor their gradient are ever stored.
An object each PoolShard (shard.py) owns; the shard holds the state (log_alpha, n_valid, sizes, cfg,
experts), the passes their scratch buffers, the kept masks buffer and a lean pool's deferred gradient.
"""
from __future__ import annotations

import torch

from smat_dist.pool import gates as hc
from smat_dist.pool.kernels import kernel
from smat_dist.pool.ordered import ordered_sum

# Elements per chunk of the fused pool passes (8 MB of float32): large enough to amortise the per-chunk
# reductions and launches, small enough to bound the scratch buffers.
CHUNK = 1 << 21


def chunk_rows(experts: int) -> int:
    """Rows per chunk of M experts' logits: a function of M alone, so the chunks sit at the same global rows
    at every world size once each slice starts on a chunk boundary (build.py pads the flat space so)."""
    return max(256, CHUNK // max(1, experts))


class PoolPasses:
    """The chunked passes over one shard's logits."""

    def __init__(self, shard):
        self.shard = shard
        self.scratch_bufs = None
        self.kept: dict[str, torch.Tensor] = {}
        self.deferred = None                        # a lean pool's gradient, applied by step_deferred_
        # dist.aligned_slices (set by build.py): the sums over rows kept as per-chunk partials at their global
        # chunks and added in global order (ordered.py), the same bits at every world size; off: one partial
        # per rank (G = 1), the plain all-reduce of the sums, whose traffic does not grow with P x M
        self.ordered = False

    def chunk_rows(self) -> int:
        return chunk_rows(self.shard.log_alpha.shape[1])

    @property
    def global_chunks(self) -> int:
        """G: the chunks of the global pool that hold real rows (padding-only chunks have zero partials); 1
        unless `ordered`."""
        if not self.ordered:
            return 1
        rows = self.shard.layout.total_groups if self.shard.structured else self.shard.numel
        return -(-rows // self.chunk_rows())

    def chunk_index(self, a: int) -> int:
        """The global chunk index of the local chunk starting at row a (exact when the slice is aligned;
        otherwise two ranks may add into one index, still the right sum, not the same bits); 0 unless
        `ordered`."""
        if not self.ordered:
            return 0
        base = 0 if self.shard.structured else self.shard.lo // self.chunk_rows()
        return base + a // self.chunk_rows()

    def placed(self, *shape, dtype=torch.float64) -> torch.Tensor:
        """A zero [G, *shape] tensor for per-chunk partial sums (see ordered.py)."""
        la = self.shard.log_alpha
        return torch.zeros(self.global_chunks, *shape, dtype=dtype, device=la.device)

    def rows(self):
        n, step = self.shard.log_alpha.shape[0], self.chunk_rows()
        for a in range(0, n, step):
            yield a, min(n, a + step)

    def scratch(self, rows: int) -> tuple[torch.Tensor, ...]:
        """Four chunk buffers, allocated once and reused by every pass.

        Per-chunk temporaries of a few MB sit above glibc's mmap threshold, so each one would be a fresh
        mapping whose pages fault in on first touch, every chunk of every pass."""
        la = self.shard.log_alpha
        key = (la.device, la.dtype, la.shape[1])
        buf = self.scratch_bufs
        if buf is None or buf[0] != key:
            r = min(self.chunk_rows(), la.shape[0])
            buf = self.scratch_bufs = (key, [torch.empty(r, la.shape[1], device=la.device, dtype=la.dtype)
                                              for _ in range(4)])
        return tuple(t[:rows] for t in buf[1])

    def persistent(self, name: str) -> torch.Tensor:
        """An [rows, M] buffer kept across steps (the masks, then the logits' gradient written over them by
        `apply_mask_grad_`): allocating 1.4 GB afresh every step costs its page faults again every step."""
        t = self.kept.get(name)
        la = self.shard.log_alpha
        if t is None or t.shape != la.shape or t.device != la.device or t.dtype != la.dtype:
            t = self.kept[name] = torch.empty_like(la)
        return t

    @torch.no_grad()
    def masks_inplace(self, train: bool = True, generator: torch.Generator | None = None,
                      out: torch.Tensor | None = None, clamp: bool = False, with_stats: bool = False,
                      store: bool = True, each=None):
        """z [rows, M] without an autograd graph; its gradient is applied by `apply_mask_grad_`.

        One pass over the logits: optionally clamps them in place first and (with_stats) also returns this
        slice's `stats` while each chunk is in cache: (z, stats) instead of z. store=False (the lean pool, and
        the merges planned at the step's start) computes each chunk in a scratch buffer and returns None for z;
        `each(a, b, zc)` is called with every chunk's masks (after its statistics; it may use scratch buffer 2)."""
        la = self.shard.log_alpha
        beta = hc.BETA if train else hc.eval_beta(self.shard.cfg)
        eps = self.shard.cfg.noise_eps if train else 0.0
        if not store and eps > 0:
            raise ValueError("masks cannot be recomputed with the noisy gate (method.sparsity.noise_eps > 0)")
        z = None if not store else torch.empty_like(la) if out is None else out
        stats = self.placed(3, self.shard.experts) if with_stats else None
        fused = self.shard.cfg.compile and eps == 0 and clamp and stats is not None and self.shard.sizes is None
        for a, b in self.rows():
            x, lc = (z[a:b] if z is not None else self.scratch(b - a)[3]), la[a:b]
            if fused and b - a == self.chunk_rows() and b <= self.shard.n_valid:
                sums = kernel("masks_stats")(x, lc, 1.0 / beta, self.shard.cfg.clamp,
                                              -hc.threshold(train=False, eval_beta=hc.eval_beta(self.shard.cfg)))
                g = self.chunk_index(a)
                for i in range(3):
                    stats[g, i] += sums[i]
                if each is not None:
                    each(a, b, x)
                continue
            if clamp:
                lc.clamp_(-self.shard.cfg.clamp, self.shard.cfg.clamp)
            if eps > 0:
                x.uniform_(0.5 - eps, 0.5 + eps, generator=generator)
                self._gate_tail_(x.logit_().add_(lc).mul_(1.0 / beta), a, b)
            else:
                self.gate_rows(a, b, x, train)
            if stats is not None and a < self.shard.n_valid:
                self._stats_chunk(stats[self.chunk_index(a)], x, a, b)
            if each is not None:
                each(a, b, x)
        # [G * 3M]: per-chunk partials at their global chunks, summed in order after the all-reduce
        return (z, stats.reshape(-1)) if with_stats else z

    @torch.no_grad()
    def gate_rows(self, a: int, b: int, out: torch.Tensor, train: bool = True) -> torch.Tensor:
        """Deterministic-gate masks of rows [a, b) into `out`."""
        beta = hc.BETA if train else hc.eval_beta(self.shard.cfg)
        return self._gate_tail_(torch.mul(self.shard.log_alpha[a:b], 1.0 / beta, out=out), a, b)

    def _gate_tail_(self, x: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """x = (logit noise +) log_alpha / beta of rows [a, b) -> the stretched, clamped gate, in place;
        padding rows (at the end of the last slice) are 0."""
        x.sigmoid_().mul_(hc.ZETA - hc.GAMMA).add_(hc.GAMMA).clamp_(0.0, 1.0)
        if b > self.shard.n_valid:
            x[max(0, self.shard.n_valid - a):] = 0.0
        return x

    def _grad_chunk(self, a: int, b: int, zc, g_z, w_c, c: float, coef, f1, f2, f3) -> torch.Tensor:
        """dL/dlog_alpha of rows [a, b) into f1: dz/dlog_alpha * g_z + coef_m * dP(z != 0)/dlog_alpha.

        dz/dlog_alpha is recovered from z itself: inside the gate's open interval s = (z - gamma)/(zeta - gamma)
        and dz/dlog_alpha = (zeta - gamma) s (1 - s) / beta = (z - gamma)(zeta - z) * c (with or without the
        logistic noise); 0 where the gate is clamped. The penalty's is coef_m * p (1 - p), p = sigmoid(la + shift).
        g_z is dense [rows, M] or factored (U [rows, K], W [K, M]); w_c is W * c, formed once per pass."""
        if (self.shard.cfg.compile and g_z is not None and coef is not None and self.shard.sizes is None
                and b - a == self.chunk_rows() and b <= self.shard.n_valid):
            la = self.shard.log_alpha[a:b]
            if isinstance(g_z, tuple):
                u = g_z[0][a:b]
                kernel("gate_grad_outer" if u.shape[1] == 1 else "gate_grad_mm")(f1, zc, la, u, w_c, coef)
            else:
                kernel("gate_grad_dense")(f1, zc, la, g_z[a:b], c, coef)
            return f1
        if g_z is not None:
            # The same bits as the plain (z - gamma)(zeta - z) [z > 0] [z < 1] (w_c | c) in two ops fewer, and
            # f1 may be zc itself (the gradient written over the masks), read last by the third op:
            #  - 0 where the gate is clamped: z in [0, 1], so round(z) != z exactly inside (0, 1) (and for NaN,
            #    which stays NaN either way); multiplying by two 0/1 factors or by their product is the same;
            #  - -(z - gamma)(zeta - z) = (z - gamma)(z - zeta), times -w_c (or -c) below: IEEE products and
            #    round-to-nearest sums are symmetric under negation.
            torch.ne(zc, torch.round(zc, out=f3), out=f3)
            torch.sub(zc, hc.ZETA, out=f2)
            torch.sub(zc, hc.GAMMA, out=f1)
            f1.mul_(f2).mul_(f3)
            if isinstance(g_z, tuple):
                torch.matmul(g_z[0][a:b], w_c.neg(), out=f2)
                f1.mul_(f2)
            else:
                f1.mul_(g_z[a:b]).mul_(-c)
        else:
            f1.zero_()
        if coef is not None:
            torch.add(self.shard.log_alpha[a:b], hc.L0_SHIFT, out=f2).sigmoid_()
            torch.mul(f2, f2, out=f3)
            f2.sub_(f3)                      # p (1 - p)
            if self.shard.sizes is not None:   # a structured gate's penalty counts every entry it controls
                f2.mul_(self.shard.sizes[a:b].unsqueeze(1))
            f1.addcmul_(f2, coef)
        if b > self.shard.n_valid:
            f1[max(0, self.shard.n_valid - a):] = 0.0
        return f1

    def _grad_pass(self, g_z, penalty_coef, train: bool):
        beta = hc.BETA if train else hc.eval_beta(self.shard.cfg)
        c = 1.0 / ((hc.ZETA - hc.GAMMA) * beta)
        if train:
            # c carries only the task's term (dz/dlog_alpha = (z - gamma)(zeta - z) c), never the penalty's;
            # at the default 1 the product is exact, so the update is bit-identical
            c *= float(self.shard.cfg.task_grad_scale)
        w_c = g_z[1] * c if isinstance(g_z, tuple) else None
        coef = None if penalty_coef is None else penalty_coef.to(self.shard.log_alpha.dtype).unsqueeze(0)
        return w_c, c, coef

    @torch.no_grad()
    def apply_mask_grad_(self, z: torch.Tensor | None, g_z, penalty_coef: torch.Tensor | None,
                         train: bool = True, each=None) -> torch.Tensor | None:
        """log_alpha.grad += the masks' gradient pushed through the gate + the penalty's, chunk by chunk
        (`_grad_chunk`; a factored g_z is never materialised, each chunk is formed in cache). Where the logits
        have no gradient yet, it is written over `z` (consumed: the caller must not read it after). z None: the
        masks are not stored (the merges planned at the step's start): each chunk's gates are recomputed in a
        scratch buffer (deterministic gate, the same bits) and `each(a, b, zc)` is called with them before the
        chunk's gradient is formed. Returns the squared norm of the result over this slice's rows (unstructured
        pools; None for structured ones, whose shared rows are summed over ranks afterwards), so the
        optimiser's clip needs no extra pass."""
        la = self.shard.log_alpha
        if g_z is None and penalty_coef is None:
            return None
        grad = la.grad
        fresh = grad is None
        if fresh:
            # The gradient overwrites the masks, chunk by chunk once each chunk's z has been read: z is dead
            # after this pass, so the step holds two [rows, M] arrays (logits, masks-then-gradient), not three.
            grad = z if z is not None else torch.empty_like(la)
        w_c, c, coef = self._grad_pass(g_z, penalty_coef, train)
        sq = self.placed()
        # the eager chain computes a fresh gradient in place of the masks (no copy); the fused kernels write f1
        in_place = fresh and not self.shard.cfg.compile
        for a, b in self.rows():
            gr = grad[a:b]
            f1, f2, f3, f4 = self.scratch(b - a)
            f1 = gr if in_place else f1
            if z is not None:
                zc = z[a:b] if g_z is not None else None
            else:
                zc = self.gate_rows(a, b, f4, train)
                if each is not None:
                    each(a, b, zc)
            self._grad_chunk(a, b, zc, g_z, w_c, c, coef, f1, f2, f3)
            if fresh:
                if not in_place:
                    gr.copy_(f1)
            else:
                gr.add_(f1)
                if b > self.shard.n_valid:
                    gr[max(0, self.shard.n_valid - a):] = 0.0
            flat = gr.view(-1)
            if a < self.shard.n_valid:   # float32 within a chunk (sum(dtype=f64) is ~20x slower)
                sq[self.chunk_index(a)] += torch.dot(flat, flat)
        la.grad = grad
        return None if self.shard.sizes is not None else sq

    # ---- The lean pool (method.sparsity.lean): only the logits are kept. The masks and their gradient are
    # recomputed chunk by chunk where needed, so the [rows, M] state is 1 array instead of 3. ----

    def _deferred_chunks(self):
        """(a, b, gradient of rows [a, b)) of the deferred gradient, each chunk recomputed from the logits."""
        g_z, penalty_coef = self.deferred
        w_c, c, coef = self._grad_pass(g_z, penalty_coef, True)
        for a, b in self.rows():
            f1, f2, f3, f4 = self.scratch(b - a)
            zc = self.gate_rows(a, b, f4) if g_z is not None else None
            yield a, b, self._grad_chunk(a, b, zc, g_z, w_c, c, coef, f1, f2, f3)

    @torch.no_grad()
    def defer_mask_grad_(self, g_z, penalty_coef: torch.Tensor | None) -> torch.Tensor:
        """Lean end of step: keep the factored gradient for `step_deferred_`; returns its squared norm."""
        self.deferred = (g_z, penalty_coef)
        sq = self.placed()
        for a, _, g in self._deferred_chunks():
            if a < self.shard.n_valid:
                sq[self.chunk_index(a)] += torch.dot(g.view(-1), g.view(-1))
        return sq

    @torch.no_grad()
    def deferred_grad(self) -> torch.Tensor:
        """The deferred gradient materialised [rows, M] (diagnostics and tests; training never forms it)."""
        out = torch.empty_like(self.shard.log_alpha)
        for a, b, g in self._deferred_chunks():
            out[a:b] = g
        return out

    @property
    def has_deferred(self) -> bool:
        return self.deferred is not None

    @torch.no_grad()
    def step_deferred_(self, lr: float) -> None:
        """log_alpha -= lr * (the deferred gradient), each chunk's gradient recomputed just before its update."""
        for a, b, g in self._deferred_chunks():
            self.shard.log_alpha[a:b].add_(g, alpha=-lr)
        self.deferred = None

    def _stats_chunk(self, out: torch.Tensor, zc: torch.Tensor, a: int, b: int) -> None:
        b = min(b, self.shard.n_valid)
        if a >= b:
            return
        zc, la = zc[: b - a], self.shard.log_alpha[a:b]
        thr = -hc.threshold(train=False, eval_beta=hc.eval_beta(self.shard.cfg))
        f1 = self.scratch(b - a)[2]
        if self.shard.sizes is None:
            # comparisons written as 0/1 floats (a bool column sum is ~4x slower); float32 partial sums
            # per chunk are exact for counts below 2^24 rows, accumulated in float64
            out[0] += torch.eq(zc, 0.0, out=f1).sum(0)
            out[1] += torch.add(la, hc.L0_SHIFT, out=f1).sigmoid_().sum(0)
            out[2] += torch.le(la, thr, out=f1).sum(0)
        else:  # each row weighs the number of entries it gates in this slice
            sz = self.shard.sizes[a:b].double()
            out[0] += sz @ zc.eq(0).double()
            out[1] += sz @ la.add(hc.L0_SHIFT).sigmoid_().double()
            out[2] += sz @ la.le(thr).double()

    @torch.no_grad()
    def stats(self, z: torch.Tensor) -> torch.Tensor:
        """[3M] per-expert sums over this slice's real entries: exact zeros of z, P(z != 0), and eval-gate zeros."""
        out = self.placed(3, self.shard.experts)
        for a, b in self.rows():
            if a >= self.shard.n_valid:
                break
            self._stats_chunk(out[self.chunk_index(a)], z[a:b], a, b)
        return ordered_sum(out.view(out.shape[0], -1))
