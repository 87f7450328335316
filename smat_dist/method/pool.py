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
# Rows per chunk of the fused pool passes: large enough to amortise kernel launches, small enough to
# keep the temporaries in cache and out of the allocator's way.
_ROWS = 1 << 15


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

    def _rows(self):
        n = self.log_alpha.shape[0]
        for a in range(0, n, _ROWS):
            yield a, min(n, a + _ROWS)

    @torch.no_grad()
    def masks_inplace(self, train: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """z [n, M] without an autograd graph, one allocation; its gradient is applied by `apply_mask_grad_`."""
        la = self.log_alpha
        beta = hc.BETA if train else 1.0
        eps = self.cfg.noise_eps if train else 0.0
        z = torch.empty_like(la)
        for a, b in self._rows():
            x = z[a:b]
            if eps > 0:
                x.uniform_(0.5 - eps, 0.5 + eps, generator=generator)
                x.logit_().add_(la[a:b])
            else:
                x.copy_(la[a:b])
            x.mul_(1.0 / beta).sigmoid_().mul_(hc.ZETA - hc.GAMMA).add_(hc.GAMMA).clamp_(0.0, 1.0)
        z[self.n_valid:] = 0.0  # padding rows sit at the end of the last slice
        return z

    @torch.no_grad()
    def apply_mask_grad_(self, z: torch.Tensor, g_z: torch.Tensor | None, penalty_coef: torch.Tensor | None,
                         train: bool = True) -> None:
        """log_alpha.grad += dz/dlog_alpha * g_z + coef_m * d P(z != 0)/dlog_alpha, chunk by chunk.

        dz/dlog_alpha is recovered from z itself: inside the gate's open interval s = (z - gamma)/(zeta - gamma)
        and dz/dlog_alpha = (zeta - gamma) s (1 - s) / beta (with or without the logistic noise); it is 0 where
        the gate is clamped. The penalty's gradient is coef_m * p (1 - p) with p = sigmoid(log_alpha + shift).
        g_z's storage becomes the gradient buffer when there is none yet (no extra [n, M] allocation)."""
        la = self.log_alpha
        if g_z is None and penalty_coef is None:
            return
        grad = la.grad
        if grad is None:
            grad = g_z if g_z is not None else torch.zeros_like(la)
            from_gz = g_z is not None
        else:
            from_gz = False
        beta = hc.BETA if train else 1.0
        span = hc.ZETA - hc.GAMMA
        for a, b in self._rows():
            gr = grad[a:b]
            if g_z is not None:
                d = z[a:b].sub(hc.GAMMA).div_(span).sub_(0.5).square_().neg_().add_(0.25).mul_(span / beta)
                d.mul_((z[a:b] > 0) & (z[a:b] < 1))
                if from_gz:
                    gr.mul_(d)
                else:
                    gr.addcmul_(g_z[a:b], d)
            if penalty_coef is not None:
                p = la[a:b].add(hc.L0_SHIFT).sigmoid_()
                p.mul_(1.0 - p)
                if self.sizes is not None:   # a structured gate's penalty counts every entry it controls
                    p.mul_(self.sizes[a:b].unsqueeze(1))
                gr.addcmul_(p, penalty_coef.to(p.dtype).unsqueeze(0))
        grad[self.n_valid:] = 0.0
        la.grad = grad

    @torch.no_grad()
    def stats(self, z: torch.Tensor) -> torch.Tensor:
        """[3M] per-expert sums over this slice's real entries: exact zeros of z, P(z != 0), and eval-gate zeros."""
        m, nv = self.experts, self.n_valid
        out = torch.zeros(3, m, dtype=torch.float64, device=z.device)
        thr = -hc.threshold(train=False)
        for a, b in self._rows():
            b = min(b, nv)
            if a >= b:
                break
            if self.sizes is None:
                # float32 partial sums per chunk (exact for counts below 2^24 rows), accumulated in float64
                out[0] += z[a:b].eq(0).float().sum(0)
                out[1] += self.log_alpha[a:b].add(hc.L0_SHIFT).sigmoid_().sum(0)
                out[2] += self.log_alpha[a:b].le(thr).float().sum(0)
            else:  # each row weighs the number of entries it gates in this slice
                sz = self.sizes[a:b].double()
                out[0] += sz @ z[a:b].eq(0).double()
                out[1] += sz @ self.log_alpha[a:b].add(hc.L0_SHIFT).sigmoid_().double()
                out[2] += sz @ self.log_alpha[a:b].le(thr).double()
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
