"""The pool's storage shard: one slice of the flat parameter space.

A shard owns entries [lo, hi) of the flat vector: delta (the shared dense delta, zero init) and the mask
logits of all M experts as an [n, M] block (row = parameter entry), so the merge of one task is one
matrix-vector product over the slice: m = z @ w, d = m * delta. Single-process training is the special case
lo = 0, hi = P. With structured gates (groups.py) the block has one row per gate group instead of per
entry. Its mask pattern (patterns.py) sets the initial logits and whether they train; its chunked passes
(passes.py) are the hot path over the block. Pure torch: collectives are handed in by the merge strategies.
"""
from __future__ import annotations

import torch
from torch import nn

from smat_dist.config.schema import SparsityConfig
from smat_dist.pool import gates as hc
from smat_dist.pool.groups import GroupLayout, build_layout
from smat_dist.pool.passes import PoolPasses
from smat_dist.pool.patterns import make_pattern


class PoolShard(nn.Module):
    """Delta for entries [lo, hi), the mask logits that gate them, their pattern and their passes.

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
                             "with PoolShard.for_space(space, rank, world, ...)")
        self.lo, self.hi, self.numel, self.experts, self.cfg = lo, hi, numel, experts, cfg
        self.layout = layout
        self.delta = nn.Parameter(torch.zeros(hi - lo))
        # the config's pattern (validated by smat_dist.config.checks): initial logits, frozen or trained
        self.pattern = make_pattern(cfg)
        trains = not self.pattern.frozen
        if layout is None:
            self.log_alpha = nn.Parameter(self.pattern.initial_logits(seed, lo, hi, None, experts),
                                          requires_grad=trains)
            # Padding entries beyond the real parameters must never count towards sparsity nor move.
            self.register_buffer("valid", (torch.arange(lo, hi) < numel), persistent=False)
            self.index = self.sizes = self.owned = None
        else:
            if layout.index.numel() != hi - lo:
                raise ValueError(f"group layout covers {layout.index.numel()} entries, the slice {hi - lo}")
            self.log_alpha = nn.Parameter(self.pattern.initial_logits(seed, lo, hi, layout.ids, experts),
                                          requires_grad=trains)
            self.register_buffer("valid", layout.ids < layout.total_groups, persistent=False)
            self.register_buffer("index", layout.index, persistent=False)
            self.register_buffer("sizes", layout.sizes, persistent=False)
            self.register_buffer("owned", layout.owned, persistent=False)
            self.register_buffer("shared_rows", layout.shared_rows, persistent=False)
            self.register_buffer("shared_pos", layout.shared_pos, persistent=False)
        self.n_valid = int(self.valid.sum())
        self.passes = PoolPasses(self)                 # the chunked passes over the [rows, M] block
        with torch.no_grad():
            self.log_alpha[~self.valid] = -cfg.clamp

    @classmethod
    def for_space(cls, space, rank: int, world: int, experts: int, cfg: SparsityConfig, seed: int = 0
                  ) -> "PoolShard":
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
