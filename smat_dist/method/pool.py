"""The sparse interpolated expert pool, stored as one slice of the flat parameter space.

A pool object owns entries [lo, hi) of the flat vector: delta (the shared dense delta, zero init) and the
mask logits of all M experts as an [n, M] block (row = parameter entry), so the merge of one task is one
matrix-vector product over the slice: m = z @ w, d = m * delta. Single-process training is the special case
lo = 0, hi = P. With structured gates (groups.py) the block has one row per gate group instead of per
entry. The code here is pure torch: collectives live in smat_dist.distributed.
"""
from __future__ import annotations

import torch
from torch import nn

from smat_dist.config.schema import SparsityConfig
from smat_dist.method import hard_concrete as hc
from smat_dist.method.groups import GroupLayout, build_layout
from smat_dist.method.pool_passes import FusedPoolPasses

# Initial values are generated in fixed chunks of the flat vector, each from its own seeded generator,
# so the slice a rank initialises equals the same slice of a single-process init at any world size.
_INIT_CHUNK = 1 << 18


def _chunked(seed: int, lo: int, hi: int, m: int, draw, salt: int = 17) -> torch.Tensor:
    """Rows [lo, hi) of a [*, m] array drawn chunk by chunk: `draw(block, generator)` fills each whole chunk."""
    out = torch.empty(hi - lo, m)
    c0, c1 = lo // _INIT_CHUNK, (hi - 1) // _INIT_CHUNK
    for c in range(c0, c1 + 1):
        g = torch.Generator().manual_seed((seed * 1_000_003 + c * 7919 + salt) & 0x7FFFFFFFFFFF)
        block = draw(torch.empty(_INIT_CHUNK, m), g)
        a, b = max(lo, c * _INIT_CHUNK), min(hi, (c + 1) * _INIT_CHUNK)
        out[a - lo:b - lo] = block[a - c * _INIT_CHUNK:b - c * _INIT_CHUNK]
    return out


def _chunked_normal(seed: int, lo: int, hi: int, m: int, mean: float, std: float) -> torch.Tensor:
    return _chunked(seed, lo, hi, m, lambda t, g: t.normal_(mean, std, generator=g))


def _chunked_uniform(seed: int, lo: int, hi: int, m: int) -> torch.Tensor:
    """U[0, 1) draws for the random mask pattern (their own generators: salt 101)."""
    return _chunked(seed, lo, hi, m, lambda t, g: t.uniform_(0.0, 1.0, generator=g), salt=101)


def _rows(ids: torch.Tensor, m: int, chunked) -> torch.Tensor:
    """Rows with global ids `ids` (sorted): each contiguous run drawn by `chunked(lo, hi)`."""
    out = torch.empty(ids.numel(), m)
    if ids.numel() == 0:
        return out
    breaks = (torch.nonzero(ids[1:] != ids[:-1] + 1).flatten() + 1).tolist()
    for a, b in zip([0] + breaks, breaks + [ids.numel()]):
        s = int(ids[a])
        out[a:b] = chunked(s, s + (b - a))
    return out


def _rows_normal(seed: int, ids: torch.Tensor, m: int, mean: float, std: float) -> torch.Tensor:
    """Initial logits of the rows with global ids `ids` (sorted): each contiguous run drawn by `_chunked_normal`."""
    return _rows(ids, m, lambda lo, hi: _chunked_normal(seed, lo, hi, m, mean, std))


def _initial_logits(seed: int, lo: int, hi: int, ids: torch.Tensor | None, m: int, cfg: SparsityConfig
                    ) -> torch.Tensor:
    """Initial logits of rows [lo, hi) (unstructured) or of the gate groups `ids` (structured), by
    method.sparsity.pattern: learned draws N(mean, std^2); random opens each row of each expert independently
    with probability 1 - tau (logit +clamp, else -clamp: both gates exactly 1 / 0); magnitude starts dense
    (+clamp everywhere) until SparsePool fixes it (patterns.py)."""
    pattern = str(getattr(cfg, "pattern", "learned"))
    if pattern == "learned":
        mean = hc.init_mean(cfg)  # cfg.init_mean, or chosen from the target (method.sparsity.init)
        if ids is None:
            return _chunked_normal(seed, lo, hi, m, mean, cfg.init_std)
        return _rows_normal(seed, ids, m, mean, cfg.init_std)
    n = hi - lo if ids is None else ids.numel()
    if pattern == "magnitude":
        return torch.full((n, m), float(cfg.clamp))
    if pattern != "random":
        raise ValueError(f"method.sparsity.pattern={pattern}: expected one of learned, random, magnitude")
    u = (_chunked_uniform(seed, lo, hi, m) if ids is None
         else _rows(ids, m, lambda a, b: _chunked_uniform(seed, a, b, m)))
    c = float(cfg.clamp)
    return torch.where(u >= float(cfg.target), c, -c)


def _check_exact_gates(cfg: SparsityConfig, structured: bool) -> None:
    """A fixed pattern's logits +-clamp must give exactly 1 / 0 in the training and the eval gate."""
    if str(cfg.pattern) == "magnitude" and structured:
        raise ValueError("method.sparsity.pattern=magnitude is per entry: it needs structured=false")
    need = max(hc.threshold(train=True), hc.threshold(train=False, eval_beta=hc.eval_beta(cfg)))
    if cfg.clamp <= need:
        raise ValueError(f"method.sparsity.pattern={cfg.pattern} needs method.sparsity.clamp > {need:.4f}, "
                         f"got {cfg.clamp}")


class ExpertPool(FusedPoolPasses, nn.Module):
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
        # random / magnitude: hand-designed masks, the logits never take a gradient step (frozen)
        self.frozen = str(getattr(cfg, "pattern", "learned")) != "learned"
        if self.frozen:
            _check_exact_gates(cfg, layout is not None)
        if layout is None:
            self.log_alpha = nn.Parameter(_initial_logits(seed, lo, hi, None, experts, cfg),
                                          requires_grad=not self.frozen)
            # Padding entries beyond the real parameters must never count towards sparsity nor move.
            self.register_buffer("valid", (torch.arange(lo, hi) < numel), persistent=False)
            self.index = self.sizes = self.owned = None
        else:
            if layout.index.numel() != hi - lo:
                raise ValueError(f"group layout covers {layout.index.numel()} entries, the slice {hi - lo}")
            self.log_alpha = nn.Parameter(_initial_logits(seed, lo, hi, layout.ids, experts, cfg),
                                          requires_grad=not self.frozen)
            self.register_buffer("valid", layout.ids < layout.total_groups, persistent=False)
            self.register_buffer("index", layout.index, persistent=False)
            self.register_buffer("sizes", layout.sizes, persistent=False)
            self.register_buffer("owned", layout.owned, persistent=False)
            self.register_buffer("shared_rows", layout.shared_rows, persistent=False)
            self.register_buffer("shared_pos", layout.shared_pos, persistent=False)
        self.n_valid = int(self.valid.sum())
        self._deferred = None                          # a lean pool's gradient, applied by step_deferred_
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
        """Per-row values [..., G] -> per-entry values [..., n] along the last dim (identity when unstructured)."""
        return rows if self.index is None else rows.index_select(rows.dim() - 1, self.index)

    def reduce_rows(self, per_entry: torch.Tensor) -> torch.Tensor:
        """Per-entry values [..., n] -> per-row sums [..., G] along the last dim (identity when unstructured)."""
        if self.index is None:
            return per_entry
        out = per_entry.new_zeros(*per_entry.shape[:-1], self.log_alpha.shape[0])
        return out.index_add_(per_entry.dim() - 1, self.index, per_entry)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.log_alpha.clamp_(-self.cfg.clamp, self.cfg.clamp)

    def masks(self, train: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """z [n, M]; computed once per optimiser step (the masks do not depend on the task)."""
        z = hc.gate(self.log_alpha, train=train, eps=self.cfg.noise_eps if train else 0.0, generator=generator,
                    eval_beta=hc.eval_beta(self.cfg))
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
        return self.expand(w @ z.t()) * self.delta
