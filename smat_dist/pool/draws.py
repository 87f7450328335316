"""Seeded draws of the pool's initial values, chunk by chunk of the flat vector.

Each fixed chunk of the flat vector has its own seeded generator, so the slice (or the set of gate groups) a
rank initialises equals the same part of a single-process init at any world size. The mask patterns
(patterns.py) draw their initial logits here; smat-analyze's pattern origin redraws them to compare.
"""
from __future__ import annotations

import torch

INIT_CHUNK = 1 << 18


def chunked(seed: int, lo: int, hi: int, m: int, draw, salt: int = 17) -> torch.Tensor:
    """Rows [lo, hi) of a [*, m] array drawn chunk by chunk: `draw(block, generator)` fills each whole chunk."""
    out = torch.empty(hi - lo, m)
    c0, c1 = lo // INIT_CHUNK, (hi - 1) // INIT_CHUNK
    for c in range(c0, c1 + 1):
        g = torch.Generator().manual_seed((seed * 1_000_003 + c * 7919 + salt) & 0x7FFFFFFFFFFF)
        block = draw(torch.empty(INIT_CHUNK, m), g)
        a, b = max(lo, c * INIT_CHUNK), min(hi, (c + 1) * INIT_CHUNK)
        out[a - lo:b - lo] = block[a - c * INIT_CHUNK:b - c * INIT_CHUNK]
    return out


def chunked_normal(seed: int, lo: int, hi: int, m: int, mean: float, std: float) -> torch.Tensor:
    return chunked(seed, lo, hi, m, lambda t, g: t.normal_(mean, std, generator=g))


def chunked_uniform(seed: int, lo: int, hi: int, m: int) -> torch.Tensor:
    """U[0, 1) draws (the random mask pattern's; their own generators: salt 101)."""
    return chunked(seed, lo, hi, m, lambda t, g: t.uniform_(0.0, 1.0, generator=g), salt=101)


def rows_of(ids: torch.Tensor, m: int, draw_range) -> torch.Tensor:
    """Rows with global ids `ids` (sorted): each contiguous run drawn by `draw_range(lo, hi)`."""
    out = torch.empty(ids.numel(), m)
    if ids.numel() == 0:
        return out
    breaks = (torch.nonzero(ids[1:] != ids[:-1] + 1).flatten() + 1).tolist()
    for a, b in zip([0] + breaks, breaks + [ids.numel()]):
        s = int(ids[a])
        out[a:b] = draw_range(s, s + (b - a))
    return out
