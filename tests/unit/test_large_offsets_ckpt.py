"""64-bit arithmetic of the checkpoint at the real-size rehearsal's scale (ViT-L x 256 experts: 77.5e9 mask
logits), without allocating it: shard headers from `meta` tensors, the block indices of a byte range, the
re-slicing plans 2 -> 1 and 64 -> 3 ranks computed directly, and one re-slice read through sparse shard files
whose rows lie past 2^32 bytes (digests verified)."""
from __future__ import annotations

import hashlib
import json
import os
import struct

import torch

from smat_dist.checkpoint.checkpointer import _index_record
from smat_dist.checkpoint.reshard import _read_range, range_plan
from smat_dist.checkpoint.shard_file import ShardReader, block_span, digest_record, header_bytes
from smat_dist.model.flat import FlatSpace, ParamInfo

P = 302_807_040        # ViT-L/16's parameter count (FlatSpace.from_module of the meta-device build smat-bench uses)
M = 256                # experts
ROW = 4 * M            # bytes of one float32 logit row


def _space(world: int) -> FlatSpace:
    return FlatSpace([ParamInfo("w", (P,), 0, P, "other", -1)], pad_to=world)


def _records(world: int) -> list[dict]:
    """The manifest's row records of a checkpoint written at `world` ranks (as the checkpointer writes them)."""
    space = _space(world)
    return [_index_record(("range", *space.shard_range(r, world), P)) for r in range(world)]


def _pool_slice(n: int) -> dict[str, torch.Tensor]:
    return {"delta": torch.empty(n, device="meta"), "log_alpha": torch.empty(n, M, device="meta"),
            "delta_momentum": torch.empty(n, device="meta")}


def test_shard_header_offsets_of_a_rank_slice_past_2_32_bytes():
    for world in (64, 1):      # 4.85 GB of logits per rank at 64 ranks; 310 GB in one process
        n = _space(world).shard_range(0, world)[1]
        header = json.loads(header_bytes(_pool_slice(n), {"part": "pool"}))
        assert header["delta"]["data_offsets"] == [0, 4 * n]
        assert header["log_alpha"]["data_offsets"] == [4 * n, 4 * n + ROW * n]
        assert header["delta_momentum"]["data_offsets"] == [4 * n + ROW * n, 8 * n + ROW * n]
        assert header["log_alpha"]["shape"] == [n, M]
        assert ROW * n > 1 << 32


def test_a_row_past_256_gib_is_found_in_a_sparse_shard(tmp_path):
    """A one-rank slice of the whole pool (310 GB, sparse): the last momentum entry sits past 2^38 bytes."""
    tensors = _pool_slice(P)
    raw = header_bytes(tensors, {})
    base = 8 + len(raw)
    size = base + 8 * P + ROW * P
    path = tmp_path / "whole.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.seek(size - 8)
        f.write(torch.tensor([1.5, 2.5]).numpy().tobytes())
        f.truncate(size)
    with ShardReader(path, None) as r:
        assert r.row_start("delta_momentum", P - 2) == base + 4 * P + ROW * P + 4 * (P - 2) > 1 << 38
        assert r.row_start("log_alpha", P - 1) == base + 4 * P + ROW * (P - 1)
        out = torch.empty(2)
        r.read_rows_into("delta_momentum", P - 2, P, out)
        assert out.tolist() == [1.5, 2.5]


def test_block_indices_of_byte_ranges_past_2_32():
    block = 16 << 20
    start = (1 << 32) + 5
    assert list(block_span(start, start + 1, block)) == [(1 << 32) // block]
    assert list(block_span(start, start + 2 * block, block)) == [256, 257, 258]
    far = 5 * (1 << 40) + block - 1        # the last byte of a block at 5 TiB
    assert list(block_span(far, far + 1, block)) == [far // block] == [5 * (1 << 40) // block]
    assert list(block_span(far, far + 2, block)) == [far // block, far // block + 1]


def _check_plan(records: list[dict], new_world: int) -> None:
    space = _space(new_world)
    old_n = records[0]["hi"]
    total = 0
    for r in range(new_world):
        lo, hi = space.shard_range(r, new_world)
        plan, covered = range_plan(records, lo, hi, P)
        want_hi = min(hi, P)
        assert covered == want_hi - lo
        # the shards that hold rows [lo, want_hi), in order, each read from its own first row or from lo
        assert [i for i, *_ in plan] == list(range(lo // old_n, (want_hi - 1) // old_n + 1))
        dst = 0
        for i, s0, s1, d0 in plan:
            assert d0 == dst and records[i]["lo"] + s0 == lo + d0
            assert 0 <= s0 < s1 <= records[i]["hi"] - records[i]["lo"]
            dst += s1 - s0
        total += covered
    assert total * M == P * M > 77 * 10 ** 9


def test_reshard_plans_2_to_1_and_64_to_3_at_77_billion_entries():
    two = _records(2)
    plan, covered = range_plan(two, 0, P, P)
    n2 = P // 2
    assert plan == [(0, 0, n2, 0), (1, 0, P - n2, n2)] and covered == P
    assert n2 * ROW > 1 << 37                      # the second shard lands 155 GB into the one-rank slice
    _check_plan(two, 1)
    _check_plan(_records(64), 3)


def _digest(path, size: int, block: int = 1 << 20) -> dict:
    """digest_record of a sparse file: its data blocks hashed, every other block hashed as zeros."""
    blocks, zero = [], {}
    with open(path, "rb") as f:
        for k in range(-(-size // block)):
            n = min(block, size - k * block)
            try:     # SEEK_DATA tells a hole from data without reading it
                hole = os.lseek(f.fileno(), k * block, os.SEEK_DATA) >= k * block + n
            except OSError:
                hole = True          # no data after this offset
            if hole:
                if n not in zero:
                    zero[n] = hashlib.sha256(bytes(n)).hexdigest()
                blocks.append(zero[n])
            else:
                f.seek(k * block)
                blocks.append(hashlib.sha256(f.read(n)).hexdigest())
    return digest_record(size, block, blocks)


def test_reshard_64_to_3_reads_rows_past_4_gib_across_a_shard_boundary(tmp_path):
    """Rank 1 of 3 reads the rows around the boundary of shards 31 and 32 of 64: shard 31's last rows start
    4.8 GB into its file; the destination rows sit 50 million rows (52 GB of logits) into the new slice."""
    old_n = P // 64
    recs = _records(64)
    cut = 32 * old_n
    lo3, hi3 = _space(3).shard_range(1, 3)
    assert lo3 < cut - 4 and cut + 4 <= hi3 and (cut - lo3) * ROW > 1 << 35
    rows = torch.arange(8 * M, dtype=torch.float32).view(8, M) + 0.25       # global rows cut-4 .. cut+3
    deltas = torch.arange(8, dtype=torch.float32) - 3.5
    files = {}
    for k, part in ((31, slice(0, 4)), (32, slice(4, 8))):
        rel = f"pool-rank{k:05d}.safetensors"
        raw = header_bytes(_pool_slice(old_n), {})
        base = 8 + len(raw)
        size = base + 8 * old_n + ROW * old_n
        first = old_n - 4 if k == 31 else 0            # the file's first written row
        with open(tmp_path / rel, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.seek(base + 4 * first)
            f.write(deltas[part].numpy().tobytes())
            f.seek(base + 4 * old_n + ROW * first)
            f.write(rows[part].numpy().tobytes())
            f.truncate(size)
        if k == 31:
            assert base + 4 * old_n + ROW * first > 1 << 32
        files[rel] = _digest(tmp_path / rel, size)
    entries = [{"file": f"pool-rank{r:05d}.safetensors", "tensors": {"delta": recs[r], "log_alpha": recs[r]}}
               for r in range(64)]
    readers: dict[str, ShardReader] = {}

    def reader(entry):
        rel = entry["file"]
        if rel not in readers:
            readers[rel] = ShardReader(tmp_path / rel, files[rel])   # only shards 31 and 32 may be opened
        return readers[rel]

    out, dout = torch.full((8, M), -1.0), torch.full((8,), -1.0)
    _read_range(tmp_path, entries, "log_alpha", ("range", cut - 4, cut + 4, P), out, reader)
    _read_range(tmp_path, entries, "delta", ("range", cut - 4, cut + 4, P), dout, reader)
    assert torch.equal(out, rows) and torch.equal(dout, deltas)
    assert sorted(readers) == sorted(files)
    assert 0 < sum(r.hashed for r in readers.values()) <= 8 << 20    # a few verified 1 MB blocks, not 9.7 GB
    for r in readers.values():
        r.close()
