"""64-bit arithmetic where the pool and its checkpoint get large, proven without allocating the sizes: a shard
file past 4 GiB is a sparse file (a header, a hole, a few real rows at the end), read back through the same
byte-range reader that resumes a pool, with and without block digests, into host and device (`meta`) memory."""
from __future__ import annotations

import hashlib
import json
import struct

import torch

from smat_dist.checkpoint.shard_file import ShardReader, digest_record

ROWS = (1 << 31) // 8 + 1000    # [ROWS, 4] float32: 4 GiB + 16 KB of data, past 2^31 and 2^32 bytes
COLS = 4


def _sparse_shard(path, tail: torch.Tensor, block: int = 1 << 20):
    """A safetensors shard of one [ROWS, COLS] float32 tensor whose last rows are `tail` and the rest a hole;
    returns its digest record, computed from the blocks that hold data (the hole's blocks hash as zeros)."""
    header = {"big": {"dtype": "F32", "shape": [ROWS, COLS], "data_offsets": [0, ROWS * COLS * 4]},
              "__metadata__": {}}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    base = 8 + len(raw)
    size = base + ROWS * COLS * 4
    tail_at = base + (ROWS - tail.shape[0]) * COLS * 4
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.seek(tail_at)
        f.write(tail.numpy().tobytes())
        f.truncate(size)
    data_blocks = {0} | set(range(tail_at // block, (size - 1) // block + 1))
    blocks, zero = [], {}
    with open(path, "rb") as f:
        for k in range(-(-size // block)):
            n = min(block, size - k * block)
            if k in data_blocks:
                f.seek(k * block)
                blocks.append(hashlib.sha256(f.read(n)).hexdigest())
            else:
                if n not in zero:
                    zero[n] = hashlib.sha256(bytes(n)).hexdigest()
                blocks.append(zero[n])
    return digest_record(size, block, blocks), base


def test_row_ranges_past_4_gib_read_back_exactly(tmp_path):
    tail = torch.arange(64 * COLS, dtype=torch.float32).view(64, COLS) + 0.5
    rec, base = _sparse_shard(tmp_path / "big.safetensors", tail)
    assert rec["size"] > 1 << 32
    for digest in (None, rec):
        with ShardReader(tmp_path / "big.safetensors", digest) as r:
            assert r.row_start("big", ROWS - 64) == base + (ROWS - 64) * COLS * 4 > 1 << 32
            out = torch.empty(64, COLS)
            r.read_rows_into("big", ROWS - 64, ROWS, out)
            assert torch.equal(out, tail)
            hole = torch.full((10, COLS), 7.0)
            r.read_rows_into("big", ROWS // 2 + 3, ROWS // 2 + 13, hole)     # 2 GiB into the hole
            assert not hole.any()
            dev = torch.empty(64, COLS, device="meta")                   # staged reads past 2^32 too
            r.read_rows_into("big", ROWS - 64, ROWS, dev)
            if digest is not None:
                assert r.hashed <= 4 * rec["block"]      # only the touched blocks were read and verified


def test_a_flipped_byte_past_4_gib_is_named(tmp_path):
    import pytest

    from smat_dist.checkpoint.shard_file import ShardError

    p = tmp_path / "big.safetensors"     # pytest's tmp_path: the 4 GiB (sparse) file is cleaned up
    tail = torch.ones(64, COLS)
    rec, _ = _sparse_shard(p, tail)
    with open(p, "r+b") as f:
        f.seek(rec["size"] - 10)
        b = f.read(1)
        f.seek(rec["size"] - 10)
        f.write(bytes([b[0] ^ 1]))
    with ShardReader(p, rec) as r, pytest.raises(ShardError, match=r"corrupt: sha256 mismatch in bytes \[42"):
        r.read_rows_into("big", ROWS - 64, ROWS, torch.empty(64, COLS))


def test_the_planner_counts_past_2_31_exactly():
    from smat_dist.bench.plan import plan

    p = plan(model="vit_large_patch16_224", experts=256, ranks=64, image_size=224)
    assert p["mask_logits_total"] == p["params"] * 256 > 1 << 36
    n = -(-p["params"] // 64)
    assert p["memory_bytes"]["pool_params"] == 4 * n * 257 > 1 << 32
    assert p["checkpoint"]["bytes_per_rank"] > 1 << 32
