"""Gate groups of the structured-mask option: which mask-logit row controls each entry of a pool slice.

Upstream's structured option (smat_method.md section 2): a 2-D weight [out, in] gets one gate per input
column, shared by all its rows; a conv weight [out, ...] one gate per output channel; every other tensor
(biases, norms, embeddings of other ranks) one gate per entry. Groups are numbered globally in flat order,
tensor by tensor. In the flat vector a channel is contiguous but a column is strided, so the slice
[lo, hi) a rank owns touches a union of ranges of group ids, and a group cut by a shard boundary is touched
by several ranks. Each of them holds that group's logit row (same init, same update), adds its own
entries' gradient, and the rows of such shared groups are summed over ranks once per step; the merge
itself stays local. Only groups of the tensors that straddle a boundary can be shared, so that exchange
is at most (R-1) x (largest input width) rows per step, independent of the tasks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from smat_dist.model.flat import FlatSpace


@dataclass(frozen=True)
class _TensorGroups:
    offset: int     # flat offset of the tensor
    numel: int
    base: int       # global id of its first group
    kind: str       # "col" (2-D: group = column), "chan" (conv: group = output channel), "elem"
    width: int      # col: in-features; chan: entries per channel; elem: 1
    count: int      # number of groups


def tensor_groups(space: FlatSpace) -> tuple[list[_TensorGroups], int]:
    out, base = [], 0
    for i in space.infos:
        if len(i.shape) == 2:
            kind, width, count = "col", i.shape[1], i.shape[1]
        elif len(i.shape) == 4:
            kind, width, count = "chan", i.numel // i.shape[0], i.shape[0]
        else:
            kind, width, count = "elem", 1, i.numel
        out.append(_TensorGroups(i.offset, i.numel, base, kind, width, count))
        base += count
    return out, base


def _touched(t: _TensorGroups, a: int, b: int) -> list[tuple[int, int]]:
    """Global group-id ranges touched by the tensor's entries [a, b) (relative to the tensor)."""
    if t.kind == "elem":
        return [(t.base + a, t.base + b)]
    if t.kind == "chan":
        return [(t.base + a // t.width, t.base + (b - 1) // t.width + 1)]
    w = t.width
    if b - a >= w:
        return [(t.base, t.base + w)]
    ca, cb = a % w, (b - 1) % w
    if ca <= cb:
        return [(t.base + ca, t.base + cb + 1)]
    return [(t.base, t.base + cb + 1), (t.base + ca, t.base + w)]   # wraps into the next row


def touched_ranges(groups: list[_TensorGroups], lo: int, hi: int) -> list[tuple[int, int]]:
    """Sorted, merged global group-id ranges touched by the flat slice [lo, hi) (padding excluded)."""
    rs = []
    for t in groups:
        a, b = max(lo, t.offset), min(hi, t.offset + t.numel)
        if a < b:
            rs.extend(_touched(t, a - t.offset, b - t.offset))
    rs.sort()
    merged: list[list[int]] = []
    for s, e in rs:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [(s, e) for s, e in merged]


def entry_groups(groups: list[_TensorGroups], lo: int, hi: int, pad_id: int) -> torch.Tensor:
    """Global group id of every entry of [lo, hi); padding entries get `pad_id`."""
    out = torch.full((hi - lo,), pad_id, dtype=torch.int64)
    for t in groups:
        a, b = max(lo, t.offset), min(hi, t.offset + t.numel)
        if a >= b:
            continue
        rel = torch.arange(a - t.offset, b - t.offset, dtype=torch.int64)
        if t.kind == "col":
            rel = rel % t.width
        elif t.kind == "chan":
            rel = rel // t.width
        out[a - lo:b - lo] = rel + t.base
    return out


@dataclass
class GroupLayout:
    """The structured gates of one pool slice."""
    ids: torch.Tensor          # [G] sorted global ids of the groups the slice touches (the padding group last)
    index: torch.Tensor        # [n] row of `ids` for every entry of the slice
    sizes: torch.Tensor        # [G] float32: number of this slice's real entries in each group (0 for padding)
    total_groups: int          # groups of the whole backbone (the padding group's id)
    shared_rows: torch.Tensor  # rows of this slice whose group other ranks also touch
    shared_pos: torch.Tensor   # their positions in the step's exchange buffer (same order on every rank)
    num_shared: int            # length of that buffer (identical on every rank)
    owned: torch.Tensor        # [G] bool: this rank counts the row in global norms (lowest touching rank)

    @property
    def rows(self) -> int:
        return int(self.ids.numel())

    def to(self, device) -> "GroupLayout":
        f = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return GroupLayout(**f)


def _ids_of(ranges: list[tuple[int, int]]) -> torch.Tensor:
    if not ranges:
        return torch.empty(0, dtype=torch.int64)
    return torch.cat([torch.arange(s, e, dtype=torch.int64) for s, e in ranges])


def build_layout(space: FlatSpace, rank: int = 0, world: int = 1) -> GroupLayout:
    """The layout of rank `rank`'s slice of `space` split over `world` ranks (pure function of both)."""
    groups, total = tensor_groups(space)
    lo, hi = space.shard_range(rank, world)
    ranges = touched_ranges(groups, lo, hi)
    ids = _ids_of(ranges)
    if hi > space.numel:
        ids = torch.cat([ids, torch.tensor([total], dtype=torch.int64)])
    entries = entry_groups(groups, lo, hi, total)
    index = torch.searchsorted(ids, entries)
    valid = torch.arange(lo, hi) < space.numel
    # counted in int64: a float32 count stops at 2^24 entries per group (16777216 + 1 rounds back to 16777216)
    sizes = torch.zeros(ids.numel(), dtype=torch.int64).index_add_(0, index, valid.long()).float()

    # Which groups other ranks touch too, and which rank counts each: computed from the ranges alone,
    # identically on every rank (no communication).
    count = torch.zeros(total + 1, dtype=torch.int32)
    owner = torch.full((total + 1,), -1, dtype=torch.int32)
    for r in range(world - 1, -1, -1):
        for s, e in touched_ranges(groups, *space.shard_range(r, world)):
            count[s:e] += 1
            owner[s:e] = r          # the lowest touching rank writes last
    count[total] = 0                # the padding group is never exchanged
    shared_global = torch.nonzero(count >= 2).flatten()
    is_shared = count[ids] >= 2
    shared_rows = torch.nonzero(is_shared).flatten()
    shared_pos = torch.searchsorted(shared_global, ids[shared_rows])
    owned = (owner[ids] == rank) | (ids == total)
    return GroupLayout(ids=ids, index=index, sizes=sizes, total_groups=total, shared_rows=shared_rows,
                       shared_pos=shared_pos, num_shared=int(shared_global.numel()), owned=owned)
