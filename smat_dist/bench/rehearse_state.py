"""`smat-bench rehearse`: does a run resumed at another world size end in the same state as the uninterrupted
run? Compares two checkpoints tensor by tensor, streaming the pool shards in row blocks (a real-size pool is
several GB per run: neither is held in memory whole), and the replicated part (the hypernetwork) whole.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from smat_dist.checkpoint.shard_file import TORCH_DTYPE, ShardReader

ROWS_BYTES = 64 << 20      # bytes of one run's rows compared at a time


def _pool_files(ck: Path) -> list[Path]:
    """The checkpoint's pool shards in the order of their slices (rank order)."""
    manifest = json.loads((ck / "manifest.json").read_text())
    return [ck / e["file"] for e in sorted(manifest["shards"]["pool"], key=lambda e: e["rank"])]


# Across world sizes the continuation is not bit-exact either: global norms (the clips) and the w gradient are
# sums of per-slice partial sums, rounded differently at another slice count; the mask learning rate of 1e6
# turns 1e-9 in a logit's gradient into ~1e-3. The distributed tests' tolerances
# (tests/distributed/test_checkpoint_scale.py): (rtol, atol) per tensor.
POOL_TOL = {"log_alpha": (0.0, 1e-2)}
POOL_TOL_DEFAULT = (1e-5, 1e-6)


def _close(name: str, a: torch.Tensor, b: torch.Tensor) -> bool:
    if not a.is_floating_point():
        return torch.equal(a, b)
    rtol, atol = POOL_TOL.get(name, POOL_TOL_DEFAULT)
    return bool(torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol))


def _diff(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, float]:
    same = torch.equal(a, b)
    if same or not a.is_floating_point():
        return same, 0.0 if same else float("inf")
    return False, float((a.double() - b.double()).abs().max())


def compare_pools(ck_a: Path, ck_b: Path) -> dict[str, dict]:
    """Per pool tensor: {"equal": bit-exact, "max_abs_diff", "close": within POOL_TOL} between two checkpoints
    of any world sizes (the slices are rows of one global tensor: a's rows, in slice order, are read against the
    same rows of b)."""
    fa, fb = _pool_files(ck_a), _pool_files(ck_b)
    out: dict[str, dict] = {}
    readers_b = [ShardReader(f, None) for f in fb]
    try:
        spans_b = [json.loads(r.metadata["tensors"]) for r in readers_b]
        for i, f in enumerate(fa):
            with ShardReader(f, None) as ra:
                rec_a = json.loads(ra.metadata["tensors"])
                for name in ra.header:
                    if name.endswith(".ids"):
                        continue
                    res = out.setdefault(name, {"equal": True, "max_abs_diff": 0.0, "close": True})
                    if name.startswith("_replicated."):
                        if i == 0:   # the same on every rank: rank 0's copy against b's first
                            x, y = ra.read(name), readers_b[0].read(name)
                            same, d = _diff(x, y)
                            res["equal"], res["max_abs_diff"], res["close"] = same, d, _close(name, x, y)
                        continue
                    if rec_a[name]["index"] != "range":
                        raise ValueError(f"{f}: {name} is stored by ids; the rehearsal compares range slices")
                    _compare_rows(ra, name, rec_a[name]["lo"], rec_a[name]["hi"], readers_b, spans_b, res)
    finally:
        for r in readers_b:
            r.close()
    return out


def checkpoint_digests(ck: Path) -> dict[str, str]:
    """sha256 of each pool tensor of a checkpoint as one global tensor: its shards' rows in slice order, read
    in blocks (the digest `rehearse_rank.slice_digests` takes of a one-rank slice)."""
    digests: dict = {}
    for f in _pool_files(ck):
        with ShardReader(f, None) as r:
            rec = json.loads(r.metadata["tensors"])
            for name, index in rec.items():
                if index["index"] != "range":
                    continue
                h = digests.setdefault(name, hashlib.sha256())
                info = r.info(name)
                rows = index["hi"] - index["lo"]
                row_bytes = max(1, (info["data_offsets"][1] - info["data_offsets"][0]) // max(1, rows))
                step = max(1, ROWS_BYTES // row_bytes)
                for a in range(0, rows, step):
                    t = _rows(r, name, a, min(rows, a + step))
                    h.update(memoryview(t.view(-1).view(torch.uint8).numpy()))
    return {k: h.hexdigest() for k, h in digests.items()}


def _compare_rows(ra: ShardReader, name: str, lo: int, hi: int, readers_b, spans_b, res: dict) -> None:
    info = ra.info(name)
    shape = info["shape"]
    row_bytes = max(1, (info["data_offsets"][1] - info["data_offsets"][0]) // max(1, shape[0]))
    step = max(1, ROWS_BYTES // row_bytes)
    for a in range(lo, hi, step):
        b = min(hi, a + step)
        x = _rows(ra, name, a - lo, b - lo)
        parts = []
        for rb, span in zip(readers_b, spans_b):
            s = span[name]
            u, v = max(a, s["lo"]), min(b, s["hi"])
            if u < v:
                parts.append(_rows(rb, name, u - s["lo"], v - s["lo"]))
        y = torch.cat(parts) if parts else x.new_empty((0, *x.shape[1:]))
        if y.shape != x.shape:
            res["equal"], res["max_abs_diff"], res["close"] = False, float("inf"), False
            return
        same, d = _diff(x, y)
        res["equal"] = res["equal"] and same
        res["close"] = res["close"] and (same or _close(name, x, y))
        res["max_abs_diff"] = max(res["max_abs_diff"], d)


def _rows(reader: ShardReader, name: str, a: int, b: int) -> torch.Tensor:
    info = reader.info(name)
    t = torch.empty((b - a, *info["shape"][1:]), dtype=TORCH_DTYPE[info["dtype"]])
    reader.read_rows_into(name, a, b, t)
    return t


# The replicated hypernetwork cannot be bit-exact across world sizes: the gradient of the expert weights w is a
# sum over the pool's entries, taken per slice and all-reduced, so its rounding depends on how many slices
# there are; AdamW then moves a near-zero gradient's parameter by up to a learning rate (1e-4) on either
# side. The tolerance of the distributed tests' cross-world-size comparison (tests/distributed/test_training.py).
REPLICATED_RTOL, REPLICATED_ATOL = 1e-3, 3e-4


def compare_replicated(ck_a: Path, ck_b: Path) -> dict[str, dict]:
    """The replicated part (hypernetwork and its optimiser's saved tensors) of two checkpoints, per tensor:
    bit-exact or not, the largest difference, and whether it is within REPLICATED_RTOL / REPLICATED_ATOL."""
    sa = torch.load(ck_a / "replicated.pt", map_location="cpu", weights_only=True)
    sb = torch.load(ck_b / "replicated.pt", map_location="cpu", weights_only=True)
    out = {}
    for k in sorted(set(sa) | set(sb)):
        if k not in sa or k not in sb or not isinstance(sa[k], torch.Tensor):
            same = k in sa and k in sb and sa[k] == sb[k]
            out[k] = {"equal": same, "max_abs_diff": 0.0, "close": same}
            continue
        if sa[k].shape != sb[k].shape:
            out[k] = {"equal": False, "max_abs_diff": float("inf"), "close": False}
            continue
        same, d = _diff(sa[k], sb[k])
        close = same or bool(torch.allclose(sa[k].double(), sb[k].double(), rtol=REPLICATED_RTOL,
                                            atol=REPLICATED_ATOL))
        out[k] = {"equal": same, "max_abs_diff": d, "close": close}
    return out


def summary(ck_a: Path, ck_b: Path) -> dict:
    """What the rehearsal's row reports of the comparison."""
    pool = compare_pools(ck_a, ck_b)
    rep = compare_replicated(ck_a, ck_b)
    return {"pool_bit_exact": all(v["equal"] for v in pool.values()),
            "pool_close": all(v["close"] for v in pool.values()),
            "pool_max_abs_diff": {k: v["max_abs_diff"] for k, v in pool.items()},
            "replicated_bit_exact": all(v["equal"] for v in rep.values()),
            "replicated_close": all(v["close"] for v in rep.values()),
            "replicated_max_abs_diff": max((v["max_abs_diff"] for v in rep.values()), default=0.0)}
