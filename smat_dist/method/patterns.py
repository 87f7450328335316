"""The magnitude mask pattern (method.sparsity.pattern=magnitude): top-k entries of the shared delta by |delta|.

The entries kept open are the k = round((1 - tau) * numel) largest |delta| over the WHOLE flat space, found
without any rank gathering delta: a bisection on the float32 bit pattern of |delta| (non-negative floats order
as their bits) finds the k-th largest value T from all-reduced counts (`reduce` sums a tensor over ranks; 31
rounds of one number each), every entry above T is open, and ties at T are broken by the global flat index
(lowest first) with a second bisection on that index. The result depends only on the global delta, so every
world size and every slicing selects the same entries. Once per run (SparsePool, at the switch point), so its
~60 small all-reduces do not matter.

Pure torch; the collectives are in `reduce` (smat_dist.distributed hands it in).
"""
from __future__ import annotations

from typing import Callable

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _count(reduce: Reduce, mask: torch.Tensor) -> int:
    """The number of True entries of `mask` over all ranks (exact: float64 below 2^53)."""
    return int(reduce(mask.sum(dtype=torch.float64).reshape(1))[0])


@torch.no_grad()
def top_magnitude(delta: torch.Tensor, lo: int, n_valid: int, numel: int, keep: int, reduce: Reduce
                  ) -> torch.Tensor:
    """Bool [n] over this slice (entries lo .. lo + n of the flat vector of `numel` real entries; the slice's
    first n_valid are real, the rest padding): True where the entry is among the `keep` largest |delta| of the
    whole space, ties at the k-th value broken by the lowest global index. Every rank calls it together (the
    same number of `reduce` calls on each: keep and numel are global)."""
    out = torch.zeros(delta.shape[0], dtype=torch.bool, device=delta.device)
    if keep <= 0:
        return out
    if keep >= numel:
        out[:n_valid] = True
        return out
    # |delta| as float32 bits: non-negative floats (and NaN, above +inf) order as their int32 patterns
    bits = delta[:n_valid].detach().abs().float().contiguous().view(torch.int32)
    # T = the largest t with count(bits >= t) >= keep: count(>= a) >= keep > count(>= b) throughout
    a, b, count_a = 0, 1 << 31, numel
    while b - a > 1:
        mid = (a + b) // 2
        c = _count(reduce, bits >= mid)
        if c >= keep:
            a, count_a = mid, c
        else:
            b = mid
    above, tied = bits > a, bits == a
    n_above = _count(reduce, above)              # < keep <= count_a
    need, n_tied = keep - n_above, count_a - n_above   # 1 <= need <= n_tied: how many ties at T stay open
    if need < n_tied:
        # the `need` ties of lowest global index: smallest I with count(tied & index < I) >= need, where
        # count(< 0) = 0 < need <= count(< numel)
        index = torch.arange(lo, lo + n_valid, device=delta.device)
        i_lo, i_hi = 0, numel
        while i_hi - i_lo > 1:
            mid = (i_lo + i_hi) // 2
            if _count(reduce, tied & (index < mid)) >= need:
                i_hi = mid
            else:
                i_lo = mid
        tied &= index < i_hi
    out[:n_valid] = above | tied
    return out
