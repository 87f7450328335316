"""Structured gates (method.sparsity.structured=true): upstream's grouping rule, layouts that partition the
flat space at any world size, and a merge / gradient / statistics identical to unstructured masks whose
logits are tied within each group."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from smat_dist.config.schema import SparsityConfig
from smat_dist.pool.groups import build_layout, entry_groups, tensor_groups
from smat_dist.pool.merge import LocalMerger
from smat_dist.pool.shard import PoolShard
from smat_dist.model.flat import FlatSpace


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)                 # weight [4, 3]: 3 column gates; bias: 4 entry gates
        self.conv = nn.Conv2d(2, 3, 2)             # weight [3, 2, 2, 2]: 3 channel gates; bias 3
        self.pos = nn.Parameter(torch.zeros(1, 2, 3))  # 3-D: per entry
        self.big = nn.Linear(7, 5, bias=False)     # [5, 7]: wide enough to straddle shard boundaries


def _space(pad_to=1):
    return FlatSpace.from_module(_Net(), pad_to=pad_to)


def test_groups_follow_upstream_rule():
    sp = _space()
    groups, total = tensor_groups(sp)
    g = entry_groups(groups, 0, sp.numel, total)
    info = {i.name: i for i in sp.infos}
    base = {i.name: t.base for i, t in zip(sp.infos, groups)}

    def at(name):
        i = info[name]
        return g[i.offset:i.offset + i.numel].view(i.shape) - base[name]

    lw = at("lin.weight")
    assert all(lw[r, c] == c for r in range(4) for c in range(3))       # one gate per input column
    cw = at("conv.weight")
    assert all(int(cw[o].min()) == int(cw[o].max()) == o for o in range(3))  # one gate per output channel
    assert at("lin.bias").tolist() == [0, 1, 2, 3]                      # 1-D: per entry
    assert at("pos").flatten().tolist() == list(range(6))
    assert total == 3 + 4 + 3 + 3 + 6 + 7
    assert int(g.max()) == total - 1


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_layouts_partition_the_space_at_any_world_size(world):
    sp = _space(pad_to=world)
    groups, total = tensor_groups(sp)
    full = entry_groups(groups, 0, sp.numel, total)
    sizes = torch.bincount(full, minlength=total).float()
    got = torch.zeros(total)
    touched = torch.zeros(total, dtype=torch.int64)
    owners = torch.zeros(total, dtype=torch.int64)
    num_shared = None
    for r in range(world):
        lay = build_layout(sp, r, world)
        lo, hi = sp.shard_range(r, world)
        real = lay.ids < total
        # every entry points at the row of its own group
        ent = lay.ids[lay.index]
        torch.testing.assert_close(ent[: max(0, min(hi, sp.numel) - lo)], full[lo:min(hi, sp.numel)])
        got.index_add_(0, lay.ids[real], lay.sizes[real])
        touched[lay.ids[real]] += 1
        owners[lay.ids[real & lay.owned]] += 1
        # the exchanged rows are exactly this rank's groups that another rank also touches
        num_shared = lay.num_shared if num_shared is None else num_shared
        assert lay.num_shared == num_shared
        assert lay.shared_rows.numel() == int((lay.sizes[real] < sizes[lay.ids[real]]).sum())
    torch.testing.assert_close(got, sizes)          # the slices' entry counts add up to each group's size
    assert bool((owners == 1).all())                # each group counted once in global norms
    assert num_shared == int((touched > 1).sum())
    if world > 1:
        assert num_shared > 0                        # this layout does cut some gate groups


def _pools(world_pad=1, experts=3, seed=5):
    sp = _space(pad_to=world_pad)
    cfg = SparsityConfig(structured=True, init_std=2.0)
    st = PoolShard.for_space(sp, 0, 1, experts, cfg, seed)
    un = PoolShard(0, sp.padded, sp.numel, experts, SparsityConfig(init_std=2.0), seed)
    with torch.no_grad():
        st.delta.normal_(0, 1, generator=torch.Generator().manual_seed(1))
        un.delta.copy_(st.delta)
        un.log_alpha.copy_(st.entry_log_alpha(0, sp.padded))
        un.log_alpha[sp.numel:] = -un.cfg.clamp
    return sp, st, un


def test_structured_pool_has_one_row_per_group_and_shares_logits_within_it():
    sp, st, _ = _pools()
    _, total = tensor_groups(sp)
    assert st.log_alpha.shape == (total, 3)
    la = st.entry_log_alpha(0, sp.numel)
    i = next(i for i in sp.infos if i.name == "big.weight")
    rows = la[i.offset:i.offset + i.numel].view(5, 7, 3)
    assert torch.equal(rows, rows[:1].expand_as(rows))   # all rows of a column share the column's logits


def test_structured_merge_gradients_and_stats_equal_tied_unstructured_masks():
    sp, st, un = _pools(world_pad=5)   # padded: the padding group is excluded everywhere
    assert sp.padded > sp.numel
    w1, w2 = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.1, 0.1, 0.8])
    target = torch.randn(sp.padded, generator=torch.Generator().manual_seed(9))
    coef = torch.tensor([0.3, -0.2, 0.7])
    res = {}
    for name, pool in (("st", st), ("un", un)):
        merger = LocalMerger(pool, sp.padded)
        z = merger.begin_step(train=True)
        d1, d2 = merger.merge(w1), merger.merge(w2)
        ((d1 * target).sum() + (d2 * target).square().sum()).backward()
        stats = pool.passes.stats(z.detach())
        merger.end_step(coef)
        res[name] = (d1.detach(), d2.detach(), stats, pool.delta.grad.clone(), pool.log_alpha.grad.clone())
    for a, b in zip(res["st"][:4], res["un"][:4]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # a group's logit gradient is the sum over the entries it gates (task gradient + penalty)
    g_rows = st.reduce_rows(res["un"][4].t()).t()
    g_rows[~st.valid] = 0
    torch.testing.assert_close(res["st"][4], g_rows, rtol=1e-4, atol=1e-5)
    assert res["st"][4].abs().sum() > 0


def test_structured_requires_a_layout_and_gather_path_refuses_it():
    with pytest.raises(ValueError, match="structured"):
        PoolShard(0, 8, 8, 2, SparsityConfig(structured=True))
    from smat_dist.distributed.comm import Comm
    from smat_dist.pool.sharded import build_merger
    _, st, _ = _pools()
    with pytest.raises(ValueError, match="dist.pool=gather"):
        build_merger("gather", st, st.hi, Comm())


def test_analyses_of_a_structured_pool_count_parameters():
    """smat-analyze's capacity and overlap read per-entry masks: a structured pool gives exactly what the tied
    unstructured pool gives."""
    from smat_dist.analysis.figures import capacity, mask_overlap

    sp, st, un = _pools(world_pad=5)
    a, b = capacity(sp, st), capacity(sp, un)
    assert a["overall"] == pytest.approx(b["overall"]) and a["by_kind"] == b["by_kind"]
    assert mask_overlap(sp, st) == pytest.approx(mask_overlap(sp, un))
