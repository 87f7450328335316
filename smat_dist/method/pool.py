"""The sparse interpolated expert pool, stored as one slice of the flat parameter space.

A pool object owns entries [lo, hi) of the flat vector: delta (the shared dense delta, zero init) and the
mask logits of all M experts as an [n, M] block (row = parameter entry), so the merge of one task is one
matrix-vector product over the slice: m = z @ w, d = m * delta. Single-process training is the special case
lo = 0, hi = P. The code here is pure torch: collectives live in smat_dist.dist.
"""
from __future__ import annotations

import torch
from torch import nn

from smat_dist.config.schema import SparsityConfig
from smat_dist.method import hard_concrete as hc

# Initial values are generated in fixed chunks of the flat vector, each from its own seeded generator,
# so the slice a rank initialises equals the same slice of a single-process init at any world size.
_INIT_CHUNK = 1 << 18


def _chunked_normal(seed: int, lo: int, hi: int, m: int, mean: float, std: float) -> torch.Tensor:
    out = torch.empty(hi - lo, m)
    c0, c1 = lo // _INIT_CHUNK, (hi - 1) // _INIT_CHUNK
    for c in range(c0, c1 + 1):
        g = torch.Generator().manual_seed((seed * 1_000_003 + c * 7919 + 17) & 0x7FFFFFFFFFFF)
        block = torch.empty(_INIT_CHUNK, m).normal_(mean, std, generator=g)
        a, b = max(lo, c * _INIT_CHUNK), min(hi, (c + 1) * _INIT_CHUNK)
        out[a - lo:b - lo] = block[a - c * _INIT_CHUNK:b - c * _INIT_CHUNK]
    return out


class ExpertPool(nn.Module):
    def __init__(self, lo: int, hi: int, numel: int, experts: int, cfg: SparsityConfig, seed: int = 0):
        super().__init__()
        self.lo, self.hi, self.numel, self.experts, self.cfg = lo, hi, numel, experts, cfg
        self.delta = nn.Parameter(torch.zeros(hi - lo))
        self.log_alpha = nn.Parameter(_chunked_normal(seed, lo, hi, experts, cfg.init_mean, cfg.init_std))
        # Padding entries beyond the real parameters must never count towards sparsity nor move.
        self.register_buffer("valid", (torch.arange(lo, hi) < numel), persistent=False)
        self.n_valid = int(self.valid.sum())
        with torch.no_grad():
            self.log_alpha[~self.valid] = -cfg.clamp

    @torch.no_grad()
    def clamp_(self) -> None:
        self.log_alpha.clamp_(-self.cfg.clamp, self.cfg.clamp)

    def masks(self, train: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """z [n, M]; computed once per optimiser step (the masks do not depend on the task)."""
        z = hc.gate(self.log_alpha, train=train, eps=self.cfg.noise_eps if train else 0.0, generator=generator)
        return z * self.valid.unsqueeze(1)

    @torch.no_grad()
    def zero_counts(self, z: torch.Tensor) -> torch.Tensor:
        """Per-expert number of exactly-zero real entries in this slice (sum over ranks -> hard sparsity)."""
        return ((z == 0) & self.valid.unsqueeze(1)).sum(0).double()

    def l0_sum(self) -> torch.Tensor:
        """Per-expert sum over this slice of P(z != 0), differentiable w.r.t. log_alpha."""
        return (hc.prob_nonzero(self.log_alpha) * self.valid.unsqueeze(1)).sum(0)

    def merge(self, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Merged delta slice for one task (w [M]) or several (w [T, M] -> [T, n])."""
        if w.dim() == 1:
            return (z @ w) * self.delta
        return (w @ z.t()) * self.delta.unsqueeze(0)
