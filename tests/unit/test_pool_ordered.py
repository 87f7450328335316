"""The pool's sums that do not depend on the world size: a task's merged mask and its merge-weight gradient are
the same bits whether the sharded merger computes it alone or beside other tasks, and over two aligned slices
(placed per global chunk, added in order) the same bits as over the whole pool."""
from __future__ import annotations

import pytest
import torch

from smat_dist.config.schema import SparsityConfig
from smat_dist.distributed.comm import Comm
from smat_dist.pool import passes
from smat_dist.pool.sharded import ShardedMerger
from smat_dist.pool.ordered import ordered_sum
from smat_dist.pool.shard import PoolShard

M = 16


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(passes, "CHUNK", 256 * M)        # 256-row chunks: several per slice


def _merger(lo, hi, numel, lean=False, ordered=True):
    shard = PoolShard(lo, hi, numel, M, SparsityConfig(init_std=2.0, lean=lean), seed=1)
    shard.passes.ordered = ordered                         # what build.py sets under dist.aligned_slices
    merger = ShardedMerger(shard, numel, Comm(local=True))
    merger.begin_step(train=True)
    return merger


@pytest.mark.parametrize("lean", [False, True])
def test_a_tasks_row_does_not_depend_on_the_other_tasks(small_chunks, lean):
    mg = _merger(0, 1000, 1000, lean)
    g = torch.Generator().manual_seed(0)
    W, U = torch.rand(3, M, generator=g), torch.randn(3, 1000, generator=g)
    uz, wz = mg.tz_zw(U, W)
    for r in range(3):
        uz1, wz1 = mg.tz_zw(U[r:r + 1].clone(), W[r:r + 1].clone())
        assert torch.equal(uz[:, r], uz1[:, 0]) and torch.equal(wz[r], wz1[0])
        assert torch.equal(mg.zw(W)[r], mg.zw(W[r:r + 1].clone())[0])


def test_two_aligned_slices_sum_to_the_whole_pools_bits(small_chunks):
    numel = 1800                                           # 8 chunks, 7 with real rows; slices of 4 chunks
    whole = _merger(0, 2048, numel)
    U = torch.randn(2, 2048, generator=torch.Generator().manual_seed(3))
    U[:, numel:] = 0.0
    ref = ordered_sum(whole.tz_zw(U, None)[0])
    placed = [(_merger(lo, lo + 1024, numel), lo) for lo in (0, 1024)]
    parts = sum(m.tz_zw(U[:, lo:lo + 1024].contiguous(), None)[0] for m, lo in placed)   # the all-reduce
    assert parts.shape[0] == 8 and torch.equal(ordered_sum(parts), ref)
    stats = sum(m.stats for m, _ in placed)
    assert torch.equal(ordered_sum(stats.view(-1, 3 * M)), ordered_sum(whole.stats.view(-1, 3 * M)))


def test_unordered_sums_stay_one_partial_per_rank(small_chunks):
    """Without dist.aligned_slices the sums are one BLAS product over the slice: G = 1, so the all-reduce of w's
    gradient is R x M numbers whatever P x M is (the ordered partials grow with M^2)."""
    mg, og = _merger(0, 2048, 1800, ordered=False), _merger(0, 2048, 1800)
    U, W = torch.randn(2, 2048, generator=torch.Generator().manual_seed(4)), torch.rand(2, M)
    uz, wz = mg.tz_zw(U, W)
    assert uz.shape == (1, 2, M) and og.tz_zw(U, W)[0].shape == (8, 2, M)
    torch.testing.assert_close(uz[0], ordered_sum(og.tz_zw(U, W)[0]), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(wz, og.tz_zw(U, W)[1], rtol=1e-6, atol=1e-6)
    assert mg.stats.shape == (3 * M,)
