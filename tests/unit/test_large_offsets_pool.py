"""64-bit arithmetic of the expert pool at the real-size rehearsal's scale, without allocating it: the row
ranges of a rank's slice of ViT-L x 256 experts, a real (small) pool slice whose global rows lie past 2^31
(chunked init, padding, statistics), structured-gate group ids past 2^31, and the ZeRO-3 path's chunks."""
from __future__ import annotations

import torch

from smat_dist.config.schema import SparsityConfig
from smat_dist.distributed.zero3_pool import CHUNK_ELEMENTS, chunk_bounds
from smat_dist.model.flat import FlatSpace, ParamInfo
from smat_dist.pool import gates as hc
from smat_dist.pool.draws import INIT_CHUNK, chunked_normal
from smat_dist.pool.groups import build_layout, entry_groups, tensor_groups, touched_ranges
from smat_dist.pool.patterns import Learned
from smat_dist.pool.shard import PoolShard

P = 302_807_040        # ViT-L/16's parameter count (FlatSpace.from_module of the meta-device build smat-bench uses)
M = 256


def test_rank_slices_of_vit_l_x_256_tile_the_pool_at_64_ranks():
    space = FlatSpace([ParamInfo("w", (P,), 0, P, "other", -1)], pad_to=64)
    ranges = [space.shard_range(r, 64) for r in range(64)]
    assert ranges[0][0] == 0 and ranges[-1][1] == space.padded == P
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    n = ranges[0][1]
    assert {hi - lo for lo, hi in ranges} == {n} and n * 64 == P
    assert n * M * 4 > 1 << 32 and P * M > 77 * 10 ** 9    # a rank's logits: 4.85 GB; the pool: 77.5e9 entries


def test_a_space_past_2_31_entries_pads_its_last_slice_exactly():
    numel = 3_000_000_007
    space = FlatSpace([ParamInfo("w", (numel,), 0, numel, "other", -1)], pad_to=64)
    assert space.padded == 3_000_000_064
    lo, hi = space.shard_range(63, 64)
    assert (lo, hi) == (63 * 46_875_001, 3_000_000_064)
    assert int(space.valid_mask(hi - 100, hi).sum()) == numel - (hi - 100) == 43


def test_a_pool_slice_past_2_31_draws_and_pads_as_the_whole_pool_would():
    """Global rows [lo, lo + 1024) straddle an init chunk boundary past 2^31; the last 24 are padding."""
    c = (1 << 31) // INIT_CHUNK + 3
    lo = c * INIT_CHUNK - 512
    cfg = SparsityConfig()
    shard = PoolShard(lo, lo + 1024, lo + 1000, 4, cfg, seed=3)
    assert shard.n_valid == 1000 and int(shard.valid.sum()) == 1000
    # the same rows of a chunk-aligned draw of chunks c-1 and c (what one process holding them would draw)
    whole = chunked_normal(3, (c - 1) * INIT_CHUNK, (c + 1) * INIT_CHUNK, 4, hc.init_mean(cfg), cfg.init_std)
    start = lo - (c - 1) * INIT_CHUNK
    assert torch.equal(shard.log_alpha.detach()[:1000], whole[start:start + 1000])
    assert not torch.equal(whole[start:start + 8], whole[start + INIT_CHUNK:start + INIT_CHUNK + 8])
    assert bool((shard.log_alpha.detach()[1000:] == -cfg.clamp).all())
    z, stats = shard.passes.masks_inplace(train=True, clamp=True, with_stats=True)
    assert not z[1000:].any()
    # per-chunk partials at their global chunks (pool/ordered.py): the slice's rows lie in one chunk
    counts = stats.view(-1, 3, 4).sum(0)
    assert counts[0].tolist() == (z[:1000] == 0).sum(0).double().tolist()


def test_chunk_seeds_stay_distinct_and_in_range_far_past_2_31():
    far = (1 << 40) + 5                                      # chunk index 2^22: the seed mixes stay < 2^47
    a = chunked_normal(0, far, far + 4, 2, 0.0, 1.0)
    b = chunked_normal(0, far + INIT_CHUNK, far + INIT_CHUNK + 4, 2, 0.0, 1.0)
    assert a.shape == (4, 2) and not torch.equal(a, b)


BIG = 3_000_000_000     # a 1-D tensor of 3e9 entries: one gate group each, so the next groups' ids pass 2^31
FC = (1000, 3000)       # column groups
CONV = (64, 3, 16, 16)  # channel groups of 768 entries


def _space() -> FlatSpace:
    infos = [ParamInfo("big.bias", (BIG,), 0, BIG, "other", -1),
             ParamInfo("fc.weight", FC, BIG, FC[0] * FC[1], "other", -1),
             ParamInfo("conv.weight", CONV, BIG + FC[0] * FC[1], 64 * 768, "conv", -1)]
    return FlatSpace(infos)


def _group_by_hand(k: int, numel: int, total: int) -> int:
    if k < BIG:
        return k
    if k < BIG + FC[0] * FC[1]:
        return BIG + (k - BIG) % FC[1]
    if k < numel:
        return BIG + FC[1] + (k - BIG - FC[0] * FC[1]) // 768
    return total


def test_structured_group_ids_past_2_31_by_hand():
    space = _space()
    groups, total = tensor_groups(space)
    assert total == BIG + FC[1] + 64
    fc_end = BIG + FC[0] * FC[1]
    for lo, hi in [(BIG - 10, BIG + 6005), (BIG + 2990, BIG + 3010), (fc_end - 5, fc_end + 800),
                   (space.numel - 3, space.numel + 5)]:
        want = [_group_by_hand(k, space.numel, total) for k in range(lo, hi)]
        got = entry_groups(groups, lo, hi, total)
        assert got.dtype == torch.int64 and got.tolist() == want
        ids = sorted({g for g in want if g != total})
        runs = []
        for g in ids:
            if runs and runs[-1][1] == g:
                runs[-1][1] = g + 1
            else:
                runs.append([g, g + 1])
        assert touched_ranges(groups, lo, hi) == [tuple(r) for r in runs]
    # a slice inside the column-grouped weight that wraps into its next row: two id runs
    assert touched_ranges(groups, BIG + 2990, BIG + 3010) == [(BIG, BIG + 10), (BIG + 2990, BIG + 3000)]


def test_structured_initial_logits_past_2_31_are_the_groups_own_draws():
    cfg = SparsityConfig(structured=True)
    groups, total = tensor_groups(_space())
    ids = torch.tensor(sorted(set(entry_groups(groups, BIG + 2990, BIG + 3010, total).tolist())))
    la = Learned(cfg).initial_logits(5, 0, 0, ids, 3)
    c = BIG // INIT_CHUNK
    assert int(ids[-1]) // INIT_CHUNK == c                 # all 20 ids in one init chunk
    whole = chunked_normal(5, c * INIT_CHUNK, (c + 1) * INIT_CHUNK, 3, hc.init_mean(cfg), cfg.init_std)
    assert torch.equal(la, whole[ids - c * INIT_CHUNK])


def test_zero3_chunks_of_vit_l_x_256_at_64_ranks():
    bounds = chunk_bounds(P, M, 64)
    rows = (CHUNK_ELEMENTS // M) // 64 * 64
    assert len(bounds) == -(-P // rows) and bounds[0][0] == 0 and bounds[-1][1] == P
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert all((hi - lo) % 64 == 0 and (hi - lo) * M <= CHUNK_ELEMENTS for lo, hi in bounds)
    assert sum((hi - lo) * M for lo, hi in bounds) == P * M


def test_a_gate_group_of_more_than_2_24_entries_weighs_all_of_them():
    """One output channel of 2^24 + 8 entries: a float32 count stops at 2^24 (16777216 + 1 == 16777216)."""
    n = (1 << 24) + 8
    space = FlatSpace([ParamInfo("conv.weight", (1, n, 1, 1), 0, n, "conv", -1),
                       ParamInfo("norm.bias", (8,), n, 8, "norm", -1)])
    layout = build_layout(space)
    assert layout.ids.tolist() == list(range(9))
    assert layout.sizes.tolist() == [float(n)] + [1.0] * 8
