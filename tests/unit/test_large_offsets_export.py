"""64-bit arithmetic of the export's packed pool at the real-size rehearsal's scale (ViT-L x 256 experts: 9.7 GB
of packed bits), without allocating it: the byte ranges of every chunk's bits, a pool.safetensors whose last
chunk lies past 2^33 bytes (a sparse file, read back through the checkpoint's byte-range reader), and the int32
positions of fractional entries, which bound the entries of one chunk."""
from __future__ import annotations

import pytest
import torch

from smat_dist.checkpoint.shard_file import ShardReader
from smat_dist.export.masks import CHUNK_ROWS, MAX_CHUNK_ENTRIES, bit_range, fit_chunk_rows, pack, unpack
from smat_dist.export.pool_file import PoolFileWriter

P = 302_807_040        # ViT-L/16's parameter count (FlatSpace.from_module of the meta-device build smat-bench uses)
M = 256


def test_packed_bit_ranges_of_every_chunk_tile_9_7_gb_exactly():
    ranges = [bit_range(a, min(P, a + CHUNK_ROWS), M) for a in range(0, P, CHUNK_ROWS)]
    assert ranges[0][0] == 0 and ranges[-1][1] == P * M // 8 > 1 << 33
    assert all(r[1] == s[0] for r, s in zip(ranges, ranges[1:]))
    assert ranges[-1][0] == (P - P % CHUNK_ROWS) * M // 8
    assert bit_range(8, 9, 3) == (3, 4)       # 27 bits: rows past a byte boundary round up


def test_the_export_chunk_fits_int32_positions_at_any_expert_count():
    assert fit_chunk_rows(CHUNK_ROWS, M) == CHUNK_ROWS
    for experts in (32768, 40000, 1_000_003):
        rows = fit_chunk_rows(CHUNK_ROWS, experts)
        assert rows % 8 == 0 and rows * experts <= MAX_CHUNK_ENTRIES < (rows + 8) * experts


def test_a_chunk_whose_positions_would_wrap_int32_is_refused(tmp_path):
    # 65536 rows x 40000 experts = 2.6e9 (entry, expert) pairs: positions past 2^31 would wrap in frac_pos
    with pytest.raises(ValueError, match="frac_pos is int32"):
        PoolFileWriter(tmp_path / "pool.safetensors", 1000, 40000, CHUNK_ROWS, {})
    with pytest.raises(ValueError, match="int32 positions"):
        pack(torch.empty(CHUNK_ROWS, 40000, device="meta"))


def test_pool_file_offsets_past_2_33_bytes_read_back_exactly(tmp_path):
    """A pool.safetensors of the whole ViT-L x 256 pool (10.9 GB, sparse): only its last chunk is written."""
    path = tmp_path / "pool.safetensors"
    w = PoolFileWriter(path, P, M, CHUNK_ROWS, {})
    c = (P - 1) // CHUNK_ROWS
    a = c * CHUNK_ROWS
    rows = P - a
    g = torch.Generator().manual_seed(0)
    z = (torch.rand(rows, M, generator=g) > 0.5).float()
    z[3, 7], z[rows - 1, M - 1] = 0.25, 0.75                # two fractional entries, at the chunk's ends
    delta = torch.randn(rows, generator=g)
    w.write(c, delta, z)
    counts = w.close()
    assert counts["sparse_fractional"] == 2 and counts["dense_chunks"] == 0
    with ShardReader(path, None) as r:
        assert r.shape("mask_bits") == [P * M // 8]
        start, end = bit_range(a, P, M)
        assert r.row_start("mask_bits", start) > 1 << 33
        bits = torch.empty(end - start, dtype=torch.uint8)
        r.read_rows_into("mask_bits", start, end, bits)
        frac_start = r.read("chunk_frac")
        assert frac_start[c].item() == 0 and frac_start[c + 1].item() == 2
        pos, val = r.read("frac_pos"), r.read("frac_val")
        assert r.row_start("frac_pos", 0) > 1 << 33
        assert pos.tolist() == [3 * M + 7, rows * M - 1]
        got = torch.empty(rows)
        r.read_rows_into("delta", a, P, got)
    assert torch.equal(unpack(bits, rows, M, pos, val), z)
    assert torch.equal(got, delta)
