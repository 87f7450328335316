"""pool.safetensors, written by streaming a sharded checkpoint chunk by chunk.

Tensors (chunks of `chunk_rows` rows, the last one shorter; every offset 4-byte aligned):
  chunk_frac    I64 [chunks + 1]  chunk c's sparse fractional entries are [chunk_frac[c], chunk_frac[c+1])
  delta         F32 [numel]
  mask_bits     U8  [ceil(numel*M/8), padded to 4]  masks.py's packed bits (0 in dense chunks)
  frac_pos      I32 [K]  position within its chunk's [rows, M] block, row-major
  frac_val      F32 [K]  the exact mask value there
  dense_masks   F32 [rows of the dense chunks, M]  their masks, in chunk order
  dense_chunks  I32 [D]  which chunks are dense, ascending
The header (shapes and offsets) must precede the data, but K and D are known only at the end. So the header
gets a fixed reserved space (padded with spaces, which the safetensors format allows), the sized tensors go to
their final offsets as the chunks arrive, the others to side files, and `close` appends those and writes the
real header. Memory: one chunk.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

from smat_dist.export.masks import MAX_CHUNK_ENTRIES, bit_range, dense_is_smaller, pack

_HEADER = 4096 - 8          # reserved header bytes (the JSON of seven tensors is well under 2 KB)
_SIDE = ("frac_pos", "frac_val", "dense_masks")


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


class PoolFileWriter:
    """`write(c, delta, z)` for every chunk c (any order), then `close()`."""

    def __init__(self, path: Path, numel: int, experts: int, chunk_rows: int, metadata: dict[str, str]):
        if chunk_rows % 8:
            raise ValueError(f"chunk_rows={chunk_rows} is not a multiple of 8 (packed bits need whole bytes)")
        if chunk_rows * experts > MAX_CHUNK_ENTRIES:
            raise ValueError(f"chunk_rows={chunk_rows} x {experts} experts exceeds {MAX_CHUNK_ENTRIES} entries per "
                             "chunk: frac_pos is int32 (masks.fit_chunk_rows picks fewer rows)")
        self.path, self.numel, self.experts, self.chunk_rows = Path(path), numel, experts, chunk_rows
        self.metadata = dict(metadata, chunk_rows=str(chunk_rows))
        self.chunks = -(-numel // chunk_rows)
        self.bits_bytes = -(-numel * experts // 8)
        self.bits_bytes += -self.bits_bytes % 4
        self.off = {"chunk_frac": 0, "delta": 8 * (self.chunks + 1)}
        self.off["mask_bits"] = self.off["delta"] + 4 * numel
        self.end_sized = self.off["mask_bits"] + self.bits_bytes
        self.f = open(self.path, "wb")
        self.f.write(b"\0" * (8 + _HEADER))
        self.f.truncate(8 + _HEADER + self.end_sized)
        self.base = 8 + _HEADER
        self.side = {k: open(self.path.with_name(f"{self.path.name}.{k}"), "wb") for k in _SIDE}
        self.frac_counts = [0] * self.chunks
        self.dense: list[int] = []
        self.fractional = 0          # entries neither 0 nor 1, sparse or dense

    def write(self, c: int, delta: torch.Tensor, z: torch.Tensor) -> None:
        """Chunk c: rows [c * chunk_rows, ...) of delta [rows] and eval masks z [rows, M]."""
        a = c * self.chunk_rows
        self.f.seek(self.base + self.off["delta"] + 4 * a)
        self.f.write(_raw(delta.float()))
        bits, pos, val = pack(z)
        self.fractional += pos.numel()
        if dense_is_smaller(pos.numel(), z.numel()):
            self.dense.append(c)
            self.side["dense_masks"].write(_raw(z.float()))
            bits.zero_()
        else:
            self.side["frac_pos"].write(_raw(pos))
            self.side["frac_val"].write(_raw(val))
            self.frac_counts[c] = pos.numel()
        self.f.seek(self.base + self.off["mask_bits"] + bit_range(a, a, self.experts)[0])
        self.f.write(_raw(bits))

    def close(self) -> dict:
        """Writes the header; returns the counts (fractional entries, sparse ones, dense chunks)."""
        for s in self.side.values():
            s.close()
        k, m = sum(self.frac_counts), self.experts
        self.dense.sort()
        dense_rows = sum(min(self.chunk_rows, self.numel - c * self.chunk_rows) for c in self.dense)
        shapes = {"chunk_frac": ("I64", [self.chunks + 1]), "delta": ("F32", [self.numel]),
                  "mask_bits": ("U8", [self.bits_bytes]), "frac_pos": ("I32", [k]), "frac_val": ("F32", [k]),
                  "dense_masks": ("F32", [dense_rows, m]), "dense_chunks": ("I32", [len(self.dense)])}
        header, off = {}, 0
        for name, (dt, shape) in shapes.items():
            n = 1
            for d in shape:
                n *= d
            size = n * (1 if dt == "U8" else 8 if dt == "I64" else 4)
            header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + size]}
            off += size
        header["__metadata__"] = self.metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        if len(raw) > _HEADER:
            raise ValueError(f"{self.path}: header of {len(raw)} bytes exceeds the reserved {_HEADER}")
        starts = torch.tensor([0] + self.frac_counts, dtype=torch.int64).cumsum(0)
        self.f.seek(self.base + self.off["chunk_frac"])
        self.f.write(_raw(starts))
        self.f.seek(self.base + self.end_sized)
        for name in _SIDE:
            with open(self.side[name].name, "rb") as src:
                shutil.copyfileobj(src, self.f, 8 << 20)
            os.unlink(self.side[name].name)
        self.f.write(_raw(torch.tensor(self.dense, dtype=torch.int32)))
        self.f.seek(0)
        self.f.write(struct.pack("<Q", _HEADER) + raw + b" " * (_HEADER - len(raw)))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return {"fractional": self.fractional, "sparse_fractional": k, "dense_chunks": len(self.dense),
                "chunks": self.chunks, "fractional_bytes": 8 * k + 4 * dense_rows * m}
