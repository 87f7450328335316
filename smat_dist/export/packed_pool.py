"""An exported SMAT pool for evaluation: packed eval masks, delta and the fractional entries in memory,
merged chunk by chunk into one task's merged delta.

It stands where a Pool (smat_dist.pool) stands in evaluation (begin_step(train=False), merge(w), end_eval()). A merge is
the checkpoint pool's exact computation ((w @ z^T) * delta, rows in chunks: each output entry is the same
length-M dot product, so the chunking does not change a bit on CPU), with z unpacked one chunk at a time:
the pool's memory is the packed masks, delta and one merged delta, never the [P, M] float masks.
"""
from __future__ import annotations

import torch

from smat_dist.export.masks import bit_range, unpack


class PackedPool:
    def __init__(self, tensors: dict[str, torch.Tensor], experts: int, padded: int, chunk_rows: int):
        self.t = tensors
        self.experts, self.numel, self.padded, self.chunk_rows = experts, tensors["delta"].numel(), padded, chunk_rows
        self.frac_start = tensors["chunk_frac"].tolist()
        self.dense_at: dict[int, int] = {}          # dense chunk -> its first row in dense_masks
        row = 0
        for c in tensors["dense_chunks"].tolist():
            self.dense_at[c] = row
            row += min(chunk_rows, self.numel - c * chunk_rows)
        self._scratch: torch.Tensor | None = None

    @property
    def delta(self) -> torch.Tensor:
        return self.t["delta"]

    def to(self, device) -> "PackedPool":
        self.t = {k: v.to(device) for k, v in self.t.items()}
        self._scratch = None
        return self

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.t.values())

    def begin_step(self, train: bool = False) -> None:
        if train:
            raise ValueError("an exported SMAT model holds eval masks only: it cannot be trained (resume the run's "
                             "checkpoint with smat-train instead)")

    def end_eval(self) -> None:
        self._scratch = None

    def masks(self, c: int) -> torch.Tensor:
        """Eval masks of chunk c as [rows, M] float32 (a view of the dense masks or of a scratch buffer)."""
        m, a = self.experts, c * self.chunk_rows
        b = min(self.numel, a + self.chunk_rows)
        if c in self.dense_at:
            r = self.dense_at[c]
            return self.t["dense_masks"][r:r + b - a]
        if self._scratch is None:
            self._scratch = torch.empty(min(self.chunk_rows, self.numel), m, device=self.delta.device)
        lo, hi = self.frac_start[c], self.frac_start[c + 1]
        start, end = bit_range(a, b, m)
        return unpack(self.t["mask_bits"][start:end], b - a, m, self.t["frac_pos"][lo:hi],
                      self.t["frac_val"][lo:hi], out=self._scratch[: b - a])

    @torch.no_grad()
    def merge(self, w: torch.Tensor) -> torch.Tensor:
        """The task's merged delta (sum_m w_m z_m) * delta over the (padded) flat space."""
        w = w.detach().to(self.delta).unsqueeze(0)
        out = torch.zeros(self.padded, device=self.delta.device)
        for c, a in enumerate(range(0, self.numel, self.chunk_rows)):
            b = min(self.numel, a + self.chunk_rows)
            out[a:b] = (w @ self.masks(c).t())[0] * self.delta[a:b]
        return out
