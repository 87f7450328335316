"""Shard files and the checkpointer in one process: the safetensors layout, block checksums, byte-range
reads that verify only what they read, atomic async saves, a dict of Stateful parts."""
from __future__ import annotations

import json

import pytest
import torch

from smat_dist.build import build_local
from smat_dist.checkpoint import Checkpointer, CheckpointError, find_latest, read_manifest
from smat_dist.checkpoint.shard_file import ShardError, ShardReader, write_shard
from smat_dist.config.schema import MethodConfig, ModelConfig
from smat_dist.distributed.comm import Comm
from smat_dist.train.state import RngState, TrainState

TINY = ModelConfig(image_size=32, patch_size=8, kwargs={"depth": 1})


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"small": torch.arange(5, dtype=torch.float64), "a": torch.randn(1000, 7, generator=g),
            "b": torch.randn(3000, generator=g), "ids": torch.arange(10, 20), "flags": torch.tensor([True, False])}


def test_shard_file_is_safetensors_and_reads_row_ranges(tmp_path):
    from safetensors import safe_open

    t = _tensors()
    rec = write_shard(tmp_path / "s.safetensors", t, {"note": "x"}, block=4096)
    assert rec["size"] == (tmp_path / "s.safetensors").stat().st_size and len(rec["blocks"]) > 3
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:   # the reference reader agrees
        assert f.metadata() == {"note": "x"}
        for k, v in t.items():
            assert torch.equal(f.get_tensor(k), v)
    with ShardReader(tmp_path / "s.safetensors", rec) as r:
        out = torch.empty(30, 7)
        r.read_rows_into("a", 500, 530, out)
        assert torch.equal(out, t["a"][500:530])
        # only the blocks holding the header and rows 500..530 were read and hashed
        assert r.hashed <= 3 * 4096
        assert torch.equal(r.read("flags"), t["flags"])


def test_a_flipped_byte_is_named_by_the_reader_that_reads_it(tmp_path):
    t = _tensors()
    p = tmp_path / "s.safetensors"
    rec = write_shard(p, t, {}, block=4096)
    raw = bytearray(p.read_bytes())
    off = len(raw) - 100          # inside "flags"/"ids"/"b": the last block
    raw[off] ^= 0x01
    p.write_bytes(bytes(raw))
    with ShardReader(p, rec) as r:
        r.read_rows_into("a", 0, 10, torch.empty(10, 7))          # untouched blocks still verify
        with pytest.raises(ShardError, match=r"s\.safetensors is corrupt: sha256 mismatch in bytes"):
            r.read("ids")
    p.write_bytes(bytes(raw[:-50]))
    with pytest.raises(ShardError, match="truncated"):
        ShardReader(p, rec)


def _smat(seed=0, **kw):
    return build_local(TINY, MethodConfig(name="smat", experts=3, **kw), seed=seed)


def _parts(s, state):
    return {"pool": s.pool, "train": state, "rng": RngState()}


@pytest.mark.parametrize("async_save", [False, True])
def test_checkpointer_round_trip_of_parts(tmp_path, async_save):
    a = _smat()
    with torch.no_grad():
        a.pool.shard.delta.normal_(0, 1, generator=torch.Generator().manual_seed(1))
        a.pool.shard.log_alpha.normal_(0, 3, generator=torch.Generator().manual_seed(2))
        a.pool.controller.multipliers.copy_(torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64))
    a.pool.optimizer.opt.state[a.pool.shard.delta]["momentum_buffer"] = torch.full_like(a.pool.shard.delta, 0.25)
    ck = Checkpointer(tmp_path / "checkpoints", Comm(), keep=2, async_save=async_save)
    st = TrainState(tasks=8, cursor=8, wandb_run_id="abc12345")
    ck.save(8, _parts(a, st), {"method": "smat", "experts": 3}, texts={"config.yaml": "x: 1\n"})
    final = ck.wait()
    assert find_latest(tmp_path) == final and not list((tmp_path / "checkpoints").glob("*.tmp"))
    m = read_manifest(final)
    assert {"pool-rank00000.safetensors", "train.pt", "rng-rank00000.pt", "config.yaml"} <= set(m["files"])
    assert m["shards"]["pool"][0]["tensors"]["delta"] == {"index": "range", "lo": 0, "hi": a.pool.shard.numel}

    b, st2 = _smat(seed=5), TrainState()
    assert not torch.equal(b.pool.shard.log_alpha, a.pool.shard.log_alpha)
    Checkpointer(tmp_path / "checkpoints", Comm()).load(final, _parts(b, st2), expect={"experts": 3})
    for k, v in a.pool.state_dict()["tensors"].items():
        assert torch.equal(b.pool.state_dict()["tensors"][k], v), k
    assert torch.equal(b.pool.controller.multipliers, a.pool.controller.multipliers)
    assert (st2.tasks, st2.cursor, st2.wandb_run_id) == (8, 8, "abc12345")
    with pytest.raises(CheckpointError, match="experts=3.*experts=4"):
        Checkpointer(tmp_path / "checkpoints", Comm()).load(final, _parts(b, st2), expect={"experts": 4})


def test_keep_last_k_and_a_corrupt_small_file_is_named(tmp_path):
    a = _smat()
    ck = Checkpointer(tmp_path, Comm(), keep=2)
    for t in (2, 4, 6):
        ck.save(t, _parts(a, TrainState(tasks=t)), {})
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000000004", "step-000000006"]
    final = find_latest(tmp_path)
    (final / "train.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"train\.pt is corrupt"):
        ck.load(final, _parts(_smat(), TrainState()))
    (final / "pool-rank00000.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing pool-rank00000.safetensors"):
        ck.load(final, {"pool": _smat().pool})


def test_manifest_records_each_rank_file_digest_written_by_its_writer(tmp_path):
    a = _smat()
    ck = Checkpointer(tmp_path, Comm(), async_save=True)
    ck.save(2, _parts(a, TrainState(tasks=2)), {})
    ck.wait()
    m = json.loads((find_latest(tmp_path) / "manifest.json").read_text())
    rec = m["files"]["pool-rank00000.safetensors"]
    assert rec["size"] == (find_latest(tmp_path) / "pool-rank00000.safetensors").stat().st_size
    assert ck.stats["hashed"] == ck.stats["written"]     # every byte hashed once, while written
