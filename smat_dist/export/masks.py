"""The eval masks of a trained pool in their compact form: one bit per (entry, expert) where the mask is
exactly 0 or 1, and the exact float32 value beside it where it is not (its int32 position within its chunk of
rows and the value: 8 bytes). A chunk with so many fractional entries that this costs more than its float32
masks (more than half of them) is stored dense instead, so an export never costs much more than fp32 masks.

Bits are packed row-major over the [numel, M] mask block (bit k = entry k // M, expert k % M; little bit
order within a byte), so rows [a, b) with a and b multiples of 8 are the whole bytes [a*M/8, b*M/8) and a
chunk of rows packs and unpacks on its own. The gate here repeats, op for op, the pool's eval-mode pass
(PoolPasses.masks_inplace(train=False, clamp=True): clamp, multiply by 1/beta, the stretched sigmoid): the
same float32 values, so a merge from the packed masks equals the checkpoint's bit for bit
(tests/unit/test_export.py compares them).
"""
from __future__ import annotations

import torch

from smat_dist.pool import gates as hc

# Rows per streamed chunk: a multiple of 8 (whole bytes of packed bits at any M); 2^16 rows x 256 experts of
# float32 masks is 64 MB of scratch.
CHUNK_ROWS = 1 << 16
# A fractional entry's position within its chunk is stored as int32 (pool_file.py's frac_pos): a chunk holds
# at most this many (entry, expert) pairs.
MAX_CHUNK_ENTRIES = 1 << 31
_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def fit_chunk_rows(rows: int, experts: int) -> int:
    """`rows`, or fewer (a multiple of 8, at least 8) where rows x experts would exceed MAX_CHUNK_ENTRIES."""
    return max(8, min(rows, MAX_CHUNK_ENTRIES // max(1, experts)) // 8 * 8)


def bit_range(a: int, b: int, experts: int) -> tuple[int, int]:
    """The bytes [start, end) of the packed bits that hold rows [a, b) (a a multiple of 8): Python ints, exact
    past 2^32 bytes."""
    return a * experts // 8, -(-b * experts // 8)


def eval_gate(log_alpha: torch.Tensor, clamp: float, beta: float) -> torch.Tensor:
    """Eval-mode masks of a [rows, M] chunk of logits (a new tensor; the input is not modified)."""
    x = torch.mul(log_alpha.clamp(-clamp, clamp), 1.0 / beta)
    return x.sigmoid_().mul_(hc.ZETA - hc.GAMMA).add_(hc.GAMMA).clamp_(0.0, 1.0)


def dense_is_smaller(fractional: int, entries: int) -> bool:
    """Whether a chunk's masks cost less as float32 (4 bytes per entry) than as fractional entries (8 each)."""
    return 2 * fractional > entries


def pack(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[rows, M] masks -> (bits uint8 [ceil(rows*M/8)], fractional flat positions int32, their values float32).

    A fractional entry's bit is 0; its value is restored by `unpack`."""
    if z.numel() > MAX_CHUNK_ENTRIES:
        raise ValueError(f"a chunk of {tuple(z.shape)} masks has {z.numel()} entries: its int32 positions hold at "
                         f"most {MAX_CHUNK_ENTRIES} (fewer rows per chunk: fit_chunk_rows)")
    flat = z.reshape(-1)
    frac = torch.nonzero((flat != 0) & (flat != 1)).flatten()
    ones = (flat == 1).to(torch.uint8)
    pad = -ones.numel() % 8
    if pad:
        ones = torch.cat([ones, ones.new_zeros(pad)])
    bits = (ones.view(-1, 8) * _WEIGHTS).sum(1, dtype=torch.uint8)
    return bits, frac.to(torch.int32), flat[frac].to(torch.float32)


def unpack(bits: torch.Tensor, rows: int, experts: int, frac_pos: torch.Tensor, frac_val: torch.Tensor,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of `pack`: [rows, M] float32 masks (into `out` when given)."""
    n = rows * experts
    ones = bits.unsqueeze(1).bitwise_and(_WEIGHTS.to(bits.device)).ne(0).view(-1)[:n]
    z = out if out is not None else torch.empty(rows, experts, dtype=torch.float32, device=bits.device)
    flat = z.view(-1)
    flat.copy_(ones)
    if frac_pos.numel():
        flat[frac_pos.long()] = frac_val.to(flat)
    return z
