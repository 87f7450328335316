"""Re-slicing a sharded checkpoint part to this rank's rows: read only the byte ranges of the shards that
overlap the new slice, straight into the part's own tensors.

Per-entry tensors (delta, its momentum) are indexed by a global entry range; structured mask logits by
sorted global gate-group ids, a group cut by a shard boundary being held by every rank that touches it
(any one of those rows will do). Rows beyond the real parameters (padding) keep their initial values.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from smat_dist.checkpoint.errors import CheckpointError
from smat_dist.checkpoint.parts import ShardedPart
from smat_dist.checkpoint.shard_file import ShardReader


def load_sharded(ck: Path, manifest: dict, pname: str, part: ShardedPart, counter: dict) -> None:
    """Re-slice a sharded part to this rank's rows, reading only the overlapping byte ranges."""
    entries = manifest.get("shards", {}).get(pname)
    if not entries:
        raise CheckpointError(f"checkpoint {ck} holds no shards of part {pname!r}")
    saved = entries[0]["tensors"]
    dest = part.sharded_tensors(loading=frozenset(saved))
    readers: dict[str, ShardReader] = {}

    def reader(entry) -> ShardReader:
        rel = entry["file"]
        if rel not in readers:
            if rel not in manifest["files"]:
                raise CheckpointError(f"checkpoint {ck}: shard {rel} is not in its manifest")
            if not (ck / rel).is_file():
                raise CheckpointError(f"checkpoint {ck} is missing {rel}")
            readers[rel] = ShardReader(ck / rel, manifest["files"][rel])
        return readers[rel]

    try:
        for tname, out in dest.items():
            if tname not in saved:
                continue
            index = part.row_index(tname)
            kind = saved[tname]["index"]
            if (kind == "ids") != (index[0] == "ids"):
                raise CheckpointError(
                    f"checkpoint {ck} has {'structured' if kind == 'ids' else 'unstructured'} masks, this run has "
                    f"method.sparsity.structured={index[0] == 'ids'}")
            if index[0] == "range":
                _read_range(ck, entries, tname, index, out, reader)
            else:
                _read_ids(ck, entries, tname, index, out, reader)
        first = None
        lo_hi = part.row_index("delta")
        for e in entries:   # replicated state: from a shard this rank opens anyway, else the first one
            rec = e["tensors"].get("delta", {})
            if rec.get("lo", 0) < lo_hi[2] and rec.get("hi", 0) > lo_hi[1]:
                first = e
                break
        r = reader(first or entries[0])
        rep: dict = json.loads(r.metadata.get("replicated", "{}"))
        for name in r.header:
            if name.startswith("_replicated."):
                rep[name[len("_replicated."):]] = r.read(name)
        part.load_replicated(rep)
    finally:
        for r in readers.values():
            counter["hashed"] += r.hashed
            r.close()


def _check_row_shape(ck, r: ShardReader, tname: str, out: torch.Tensor) -> None:
    shape = r.shape(tname)
    if list(shape[1:]) != list(out.shape[1:]):
        raise CheckpointError(f"checkpoint {ck}: {tname} rows have shape {shape[1:]} in {r.path.name}, this run "
                              f"has {list(out.shape[1:])} (a different number of experts?)")


def range_plan(records: list[dict], lo: int, hi: int, numel: int) -> tuple[list[tuple[int, int, int, int]], int]:
    """Which saved rows fill rows [lo, hi) of `numel` real entries: ([(shard i, its first row, its end row, the
    destination's first row)], rows covered), from the shards' records {"lo", "hi"} (Python ints throughout)."""
    want_hi = min(hi, numel)
    plan, covered = [], 0
    for i, rec in enumerate(records):
        a, b = max(lo, rec["lo"]), min(want_hi, rec["hi"])
        if a < b:
            plan.append((i, a - rec["lo"], b - rec["lo"], a - lo))
            covered += b - a
    return plan, covered


def _read_range(ck, entries, tname, index, out, reader) -> None:
    lo, hi, numel = index[1:]
    want_hi = min(hi, numel)
    plan, covered = range_plan([e["tensors"][tname] for e in entries], lo, hi, numel)
    for i, s0, s1, d0 in plan:
        r = reader(entries[i])
        _check_row_shape(ck, r, tname, out)
        r.read_rows_into(tname, s0, s1, out[d0:d0 + s1 - s0])
    if covered != max(0, want_hi - lo):
        raise CheckpointError(f"checkpoint {ck}: the shards of {tname} cover {covered} of entries [{lo}, {want_hi}) "
                              "(a different backbone layout?)")


def _read_ids(ck, entries, tname, index, out, reader) -> None:
    ids, total = index[1].cpu(), index[2]     # the store's group ids may live on the device
    want = ids < total                       # padding groups keep their initial rows
    found = torch.zeros(ids.numel(), dtype=torch.bool)
    if ids.numel() == 0:
        return
    lo_id, hi_id = int(ids[0]), int(ids[want].max()) if bool(want.any()) else -1
    for e in entries:
        rec = e["tensors"][tname]
        if rec["rows"] == 0 or rec["last"] < lo_id or rec["first"] > hi_id:
            continue
        r = reader(e)
        _check_row_shape(ck, r, tname, out)
        src_ids = r.read(f"{tname}.ids")
        pos = torch.searchsorted(src_ids, ids).clamp_max(src_ids.numel() - 1)
        hit = (src_ids[pos] == ids) & ~found & want
        dst = torch.nonzero(hit).flatten()
        if dst.numel() == 0:
            continue
        src = pos[dst]
        # contiguous runs in both source and destination rows: one read each
        brk = torch.nonzero((dst[1:] != dst[:-1] + 1) | (src[1:] != src[:-1] + 1)).flatten() + 1
        starts = [0] + brk.tolist()
        ends = brk.tolist() + [dst.numel()]
        for s, t in zip(starts, ends):
            d0, s0, n = int(dst[s]), int(src[s]), t - s
            r.read_rows_into(tname, s0, s0 + n, out[d0:d0 + n])
        found |= hit
    missing = want & ~found
    if bool(missing.any()):
        raise CheckpointError(f"checkpoint {ck} holds no mask row for gate group {int(ids[missing][0])} "
                              "(a different backbone layout?)")
