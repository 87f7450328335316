"""The sparse interpolated expert pool, stored as one slice of the flat parameter space.

A pool object owns entries [lo, hi) of the flat vector: delta (the shared dense delta, zero init) and the
mask logits of all M experts as an [n, M] block (row = parameter entry), so the merge of one task is one
matrix-vector product over the slice: m = z @ w, d = m * delta. Single-process training is the special case
lo = 0, hi = P. With structured gates (groups.py) the block has one row per gate group instead of per
entry. The code here is pure torch: collectives live in smat_dist.dist.
"""
from __future__ import annotations

import torch
from torch import nn

from smat_dist.config.schema import SparsityConfig
from smat_dist.method import hard_concrete as hc
from smat_dist.method.groups import GroupLayout, build_layout

# Initial values are generated in fixed chunks of the flat vector, each from its own seeded generator,
# so the slice a rank initialises equals the same slice of a single-process init at any world size.
_INIT_CHUNK = 1 << 18
# Elements per chunk of the fused pool passes (8 MB of float32): large enough to amortise the per-chunk
# reductions and launches (measured: 1 MB chunks made the statistics 1.5x slower), small enough to bound
# the scratch buffers.
_CHUNK = 1 << 21


def _chunked_normal(seed: int, lo: int, hi: int, m: int, mean: float, std: float) -> torch.Tensor:
    out = torch.empty(hi - lo, m)
    c0, c1 = lo // _INIT_CHUNK, (hi - 1) // _INIT_CHUNK
    for c in range(c0, c1 + 1):
        g = torch.Generator().manual_seed((seed * 1_000_003 + c * 7919 + 17) & 0x7FFFFFFFFFFF)
        block = torch.empty(_INIT_CHUNK, m).normal_(mean, std, generator=g)
        a, b = max(lo, c * _INIT_CHUNK), min(hi, (c + 1) * _INIT_CHUNK)
        out[a - lo:b - lo] = block[a - c * _INIT_CHUNK:b - c * _INIT_CHUNK]
    return out


def _rows_normal(seed: int, ids: torch.Tensor, m: int, mean: float, std: float) -> torch.Tensor:
    """Initial logits of the rows with global ids `ids` (sorted): each contiguous run drawn by `_chunked_normal`."""
    out = torch.empty(ids.numel(), m)
    if ids.numel() == 0:
        return out
    breaks = (torch.nonzero(ids[1:] != ids[:-1] + 1).flatten() + 1).tolist()
    for a, b in zip([0] + breaks, breaks + [ids.numel()]):
        s = int(ids[a])
        out[a:b] = _chunked_normal(seed, s, s + (b - a), m, mean, std)
    return out


class ExpertPool(nn.Module):
    """Delta for entries [lo, hi) and the mask logits that gate them.

    Unstructured (default): one logit row per entry. Structured (`layout` given): one row per gate group the
    slice touches (see groups.py); `index` maps each entry to its row, and sizes count the entries a row
    gates here, so that sparsity, expected L0 and the penalty stay fractions of parameters."""

    def __init__(self, lo: int, hi: int, numel: int, experts: int, cfg: SparsityConfig, seed: int = 0,
                 layout: GroupLayout | None = None):
        super().__init__()
        if cfg.lean and (cfg.structured or cfg.noise_eps > 0):
            raise ValueError("method.sparsity.lean=true recomputes the masks from the logits: it needs "
                             "structured=false and noise_eps=0 (the deterministic gate)")
        if cfg.structured and layout is None:
            raise ValueError("method.sparsity.structured=true needs the backbone's gate groups: build the pool "
                             "with ExpertPool.for_space(space, rank, world, ...)")
        self.lo, self.hi, self.numel, self.experts, self.cfg = lo, hi, numel, experts, cfg
        self.layout = layout
        self.delta = nn.Parameter(torch.zeros(hi - lo))
        if layout is None:
            self.log_alpha = nn.Parameter(_chunked_normal(seed, lo, hi, experts, cfg.init_mean, cfg.init_std))
            # Padding entries beyond the real parameters must never count towards sparsity nor move.
            self.register_buffer("valid", (torch.arange(lo, hi) < numel), persistent=False)
            self.index = self.sizes = self.owned = None
        else:
            if layout.index.numel() != hi - lo:
                raise ValueError(f"group layout covers {layout.index.numel()} entries, the slice {hi - lo}")
            self.log_alpha = nn.Parameter(_rows_normal(seed, layout.ids, experts, cfg.init_mean, cfg.init_std))
            self.register_buffer("valid", layout.ids < layout.total_groups, persistent=False)
            self.register_buffer("index", layout.index, persistent=False)
            self.register_buffer("sizes", layout.sizes, persistent=False)
            self.register_buffer("owned", layout.owned, persistent=False)
            self.register_buffer("shared_rows", layout.shared_rows, persistent=False)
            self.register_buffer("shared_pos", layout.shared_pos, persistent=False)
        self.n_valid = int(self.valid.sum())
        with torch.no_grad():
            self.log_alpha[~self.valid] = -cfg.clamp

    @classmethod
    def for_space(cls, space, rank: int, world: int, experts: int, cfg: SparsityConfig, seed: int = 0
                  ) -> "ExpertPool":
        """This rank's pool over `space` split across `world` ranks (structured or not, as cfg says)."""
        lo, hi = space.shard_range(rank, world)
        layout = build_layout(space, rank, world) if cfg.structured else None
        return cls(lo, hi, space.numel, experts, cfg, seed, layout=layout)

    @property
    def structured(self) -> bool:
        return self.layout is not None

    @property
    def group_ids(self) -> torch.Tensor | None:
        return None if self.layout is None else self.layout.ids

    def entry_log_alpha(self, a: int, b: int) -> torch.Tensor:
        """Logits gating entries [lo + a, lo + b) of the flat vector, one row per entry (for analyses)."""
        if self.index is None:
            return self.log_alpha[a:b]
        return self.log_alpha.index_select(0, self.index[a:b])

    def expand(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-row values [G, ...] -> per-entry values [n, ...] (identity when unstructured)."""
        return rows if self.index is None else rows.index_select(0, self.index)

    def reduce_rows(self, per_entry: torch.Tensor) -> torch.Tensor:
        """Per-entry values [..., n] -> per-row sums [..., G] along the last dim (identity when unstructured)."""
        if self.index is None:
            return per_entry
        out = per_entry.new_zeros(*per_entry.shape[:-1], self.log_alpha.shape[0])
        return out.index_add_(per_entry.dim() - 1, self.index, per_entry)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.log_alpha.clamp_(-self.cfg.clamp, self.cfg.clamp)

    # ---- The fused, allocation-light path the training step uses (the [n, M] block is the largest state of
    # the run: at M=64 a ViT-Ti slice is 1.4 GB, so every temporary of that size costs seconds). ----

    def _chunk_rows(self) -> int:
        return max(256, _CHUNK // max(1, self.log_alpha.shape[1]))

    def _rows(self):
        n, step = self.log_alpha.shape[0], self._chunk_rows()
        for a in range(0, n, step):
            yield a, min(n, a + step)

    def _scratch(self, rows: int) -> tuple[torch.Tensor, ...]:
        """Four chunk buffers, allocated once and reused by every pass.

        Per-chunk temporaries of a few MB sit above glibc's mmap threshold, so each one is a fresh mapping
        whose pages fault in on first touch: measured on this CPU at M=64, that made the gate's backward
        20-30x slower (5-6 s instead of 0.2 s per step) until the allocator's threshold adapted."""
        la = self.log_alpha
        key = (la.device, la.dtype, la.shape[1])
        buf = getattr(self, "_scratch_bufs", None)
        if buf is None or buf[0] != key:
            r = min(self._chunk_rows(), la.shape[0])
            buf = self._scratch_bufs = (key, [torch.empty(r, la.shape[1], device=la.device, dtype=la.dtype)
                                              for _ in range(4)])
        return tuple(t[:rows] for t in buf[1])

    def _persistent(self, name: str) -> torch.Tensor:
        """An [rows, M] buffer kept across steps (masks, mask gradient): allocating 1.4 GB afresh every step
        costs its page faults again every step."""
        t = getattr(self, name, None)
        la = self.log_alpha
        if t is None or t.shape != la.shape or t.device != la.device or t.dtype != la.dtype:
            t = torch.empty_like(la)
            setattr(self, name, t)
        return t

    @torch.no_grad()
    def masks_inplace(self, train: bool = True, generator: torch.Generator | None = None,
                      out: torch.Tensor | None = None, clamp: bool = False, with_stats: bool = False,
                      store: bool = True):
        """z [rows, M] without an autograd graph; its gradient is applied by `apply_mask_grad_`.

        One pass over the logits: optionally clamps them in place first and (with_stats) also returns this
        slice's `stats` while each chunk is in cache: (z, stats) instead of z. store=False (the lean pool)
        computes each chunk in a scratch buffer for the statistics only and returns None for z."""
        la = self.log_alpha
        beta = hc.BETA if train else 1.0
        eps = self.cfg.noise_eps if train else 0.0
        if not store and eps > 0:
            raise ValueError("masks cannot be recomputed with the noisy gate (method.sparsity.noise_eps > 0)")
        z = None if not store else torch.empty_like(la) if out is None else out
        stats = self._stats_acc() if with_stats else None
        for a, b in self._rows():
            x, lc = (z[a:b] if z is not None else self._scratch(b - a)[3]), la[a:b]
            if clamp:
                lc.clamp_(-self.cfg.clamp, self.cfg.clamp)
            if eps > 0:
                x.uniform_(0.5 - eps, 0.5 + eps, generator=generator)
                x.logit_().add_(lc)
            else:
                x.copy_(lc)
            x.mul_(1.0 / beta).sigmoid_().mul_(hc.ZETA - hc.GAMMA).add_(hc.GAMMA).clamp_(0.0, 1.0)
            if b > self.n_valid:
                x[max(0, self.n_valid - a):] = 0.0  # padding rows sit at the end of the last slice
            if stats is not None:
                self._stats_chunk(stats, x, a, b)
        return (z, stats.reshape(-1)) if with_stats else z

    @torch.no_grad()
    def gate_rows(self, a: int, b: int, out: torch.Tensor, train: bool = True) -> torch.Tensor:
        """Deterministic-gate masks of rows [a, b) into `out` (the lean pool's recomputation)."""
        beta = hc.BETA if train else 1.0
        torch.mul(self.log_alpha[a:b], 1.0 / beta, out=out)
        out.sigmoid_().mul_(hc.ZETA - hc.GAMMA).add_(hc.GAMMA).clamp_(0.0, 1.0)
        if b > self.n_valid:
            out[max(0, self.n_valid - a):] = 0.0
        return out

    def _grad_chunk(self, a: int, b: int, zc, g_z, w_c, c: float, coef, f1, f2, f3) -> torch.Tensor:
        """dL/dlog_alpha of rows [a, b) into f1: dz/dlog_alpha * g_z + coef_m * dP(z != 0)/dlog_alpha.

        dz/dlog_alpha is recovered from z itself: inside the gate's open interval s = (z - gamma)/(zeta - gamma)
        and dz/dlog_alpha = (zeta - gamma) s (1 - s) / beta = (z - gamma)(zeta - z) * c (with or without the
        logistic noise); 0 where the gate is clamped. The penalty's is coef_m * p (1 - p), p = sigmoid(la + shift).
        g_z is dense [rows, M] or factored (U [rows, K], W [K, M]); w_c is W * c, formed once per pass."""
        if g_z is not None:
            torch.sub(zc, hc.GAMMA, out=f1)
            f1.mul_(torch.neg(zc, out=f2).add_(hc.ZETA))
            f1.mul_(torch.gt(zc, 0.0, out=f2)).mul_(torch.lt(zc, 1.0, out=f2))  # 0 where clamped
            if isinstance(g_z, tuple):
                torch.matmul(g_z[0][a:b], w_c, out=f2)
                f1.mul_(f2)
            else:
                f1.mul_(g_z[a:b]).mul_(c)
        else:
            f1.zero_()
        if coef is not None:
            torch.add(self.log_alpha[a:b], hc.L0_SHIFT, out=f2).sigmoid_()
            torch.mul(f2, f2, out=f3)
            f2.sub_(f3)                      # p (1 - p)
            if self.sizes is not None:   # a structured gate's penalty counts every entry it controls
                f2.mul_(self.sizes[a:b].unsqueeze(1))
            f1.addcmul_(f2, coef)
        if b > self.n_valid:
            f1[max(0, self.n_valid - a):] = 0.0
        return f1

    def _grad_pass(self, g_z, penalty_coef, train: bool):
        beta = hc.BETA if train else 1.0
        c = 1.0 / ((hc.ZETA - hc.GAMMA) * beta)
        w_c = g_z[1] * c if isinstance(g_z, tuple) else None
        coef = None if penalty_coef is None else penalty_coef.to(self.log_alpha.dtype).unsqueeze(0)
        return w_c, c, coef

    @torch.no_grad()
    def apply_mask_grad_(self, z: torch.Tensor, g_z, penalty_coef: torch.Tensor | None,
                         train: bool = True) -> None:
        """log_alpha.grad += the masks' gradient pushed through the gate + the penalty's, chunk by chunk
        (`_grad_chunk`; a factored g_z is never materialised, each chunk is formed in cache). Also leaves the
        squared norm of the result over this slice's rows in `grad_sq` (unstructured pools; the optimiser's
        clip then needs no extra pass)."""
        la = self.log_alpha
        if g_z is None and penalty_coef is None:
            return
        grad = la.grad
        fresh = grad is None
        if fresh:
            grad = self._persistent("_grad_buf")
        w_c, c, coef = self._grad_pass(g_z, penalty_coef, train)
        sq = torch.zeros((), dtype=torch.float64, device=la.device)
        for a, b in self._rows():
            gr = grad[a:b]
            f1, f2, f3, _ = self._scratch(b - a)
            self._grad_chunk(a, b, z[a:b] if g_z is not None else None, g_z, w_c, c, coef, f1, f2, f3)
            if fresh:
                gr.copy_(f1)
            else:
                gr.add_(f1)
                if b > self.n_valid:
                    gr[max(0, self.n_valid - a):] = 0.0
            sq += torch.mul(gr, gr, out=f3).sum()   # float32 within a chunk (sum(dtype=f64) is ~20x slower)
        la.grad = grad
        self.grad_sq = None if self.sizes is not None else sq

    # ---- The lean pool (method.sparsity.lean): only the logits are kept. The masks and their gradient are
    # recomputed chunk by chunk where needed, so the [rows, M] state is 1 array instead of 3. ----

    @torch.no_grad()
    def defer_mask_grad_(self, g_z, penalty_coef: torch.Tensor | None) -> None:
        """Lean end of step: keep the factored gradient for `step_deferred_`, leave its squared norm in grad_sq."""
        w_c, c, coef = self._grad_pass(g_z, penalty_coef, True)
        sq = torch.zeros((), dtype=torch.float64, device=self.log_alpha.device)
        for a, b in self._rows():
            f1, f2, f3, f4 = self._scratch(b - a)
            zc = self.gate_rows(a, b, f4) if g_z is not None else None
            sq += self._grad_chunk(a, b, zc, g_z, w_c, c, coef, f1, f2, f3).square_().sum()
        self.grad_sq = sq
        self._deferred = (g_z, penalty_coef)

    @torch.no_grad()
    def deferred_grad(self) -> torch.Tensor:
        """The deferred gradient materialised [rows, M] (diagnostics and tests; training never forms it)."""
        g_z, penalty_coef = self._deferred
        w_c, c, coef = self._grad_pass(g_z, penalty_coef, True)
        out = torch.empty_like(self.log_alpha)
        for a, b in self._rows():
            f1, f2, f3, f4 = self._scratch(b - a)
            zc = self.gate_rows(a, b, f4) if g_z is not None else None
            out[a:b] = self._grad_chunk(a, b, zc, g_z, w_c, c, coef, f1, f2, f3)
        return out

    @property
    def has_deferred(self) -> bool:
        return getattr(self, "_deferred", None) is not None

    @torch.no_grad()
    def step_deferred_(self, lr: float) -> None:
        """log_alpha -= lr * (the deferred gradient), each chunk's gradient recomputed just before its update."""
        g_z, penalty_coef = self._deferred
        self._deferred = None
        w_c, c, coef = self._grad_pass(g_z, penalty_coef, True)
        for a, b in self._rows():
            f1, f2, f3, f4 = self._scratch(b - a)
            zc = self.gate_rows(a, b, f4) if g_z is not None else None
            self.log_alpha[a:b].add_(self._grad_chunk(a, b, zc, g_z, w_c, c, coef, f1, f2, f3), alpha=-lr)

    def _stats_acc(self) -> torch.Tensor:
        return torch.zeros(3, self.experts, dtype=torch.float64, device=self.log_alpha.device)

    def _stats_chunk(self, out: torch.Tensor, zc: torch.Tensor, a: int, b: int) -> None:
        b = min(b, self.n_valid)
        if a >= b:
            return
        zc, la = zc[: b - a], self.log_alpha[a:b]
        thr = -hc.threshold(train=False)
        f1 = self._scratch(b - a)[2]
        if self.sizes is None:
            # comparisons written as 0/1 floats (a bool column sum is ~4x slower); float32 partial sums
            # per chunk are exact for counts below 2^24 rows, accumulated in float64
            out[0] += torch.eq(zc, 0.0, out=f1).sum(0)
            out[1] += torch.add(la, hc.L0_SHIFT, out=f1).sigmoid_().sum(0)
            out[2] += torch.le(la, thr, out=f1).sum(0)
        else:  # each row weighs the number of entries it gates in this slice
            sz = self.sizes[a:b].double()
            out[0] += sz @ zc.eq(0).double()
            out[1] += sz @ la.add(hc.L0_SHIFT).sigmoid_().double()
            out[2] += sz @ la.le(thr).double()

    @torch.no_grad()
    def stats(self, z: torch.Tensor) -> torch.Tensor:
        """[3M] per-expert sums over this slice's real entries: exact zeros of z, P(z != 0), and eval-gate zeros."""
        out = self._stats_acc()
        for a, b in self._rows():
            if a >= self.n_valid:
                break
            self._stats_chunk(out, z[a:b], a, b)
        return out.reshape(-1)

    def masks(self, train: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """z [n, M]; computed once per optimiser step (the masks do not depend on the task)."""
        z = hc.gate(self.log_alpha, train=train, eps=self.cfg.noise_eps if train else 0.0, generator=generator)
        return z * self.valid.unsqueeze(1)

    @torch.no_grad()
    def zero_counts(self, z: torch.Tensor) -> torch.Tensor:
        """Per-expert number of exactly-zero real entries in this slice (sum over ranks -> hard sparsity)."""
        if self.sizes is not None:
            return self.sizes.double() @ (z == 0).double()
        return ((z == 0) & self.valid.unsqueeze(1)).sum(0).double()

    def l0_sum(self) -> torch.Tensor:
        """Per-expert sum over this slice of P(z != 0), differentiable w.r.t. log_alpha."""
        weight = self.sizes if self.sizes is not None else self.valid.float()
        return weight @ hc.prob_nonzero(self.log_alpha)

    def merge(self, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Merged delta slice for one task (w [M]) or several (w [T, M] -> [T, n])."""
        if w.dim() == 1:
            return self.expand(z @ w) * self.delta
        m = w @ z.t()
        if self.index is not None:
            m = m.index_select(1, self.index)
        return m * self.delta.unsqueeze(0)
