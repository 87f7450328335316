"""Resuming on another world size is bit-exact: a 2-rank run saved after one step and resumed on 1 rank (two
tasks per rank) ends with exactly the bits of the uninterrupted 2-rank run (delta, its momentum, the mask
logits, the multipliers and the hypernetwork), at one intra-op thread per rank (run_ranks pins it)."""
from __future__ import annotations

import pytest
import torch

from tests.data_fixture import make_dataset
from tests.distributed.helpers import run_ranks, tiny_config, train_rank

pytestmark = pytest.mark.dist
STEP = 2           # tasks per step: 2 ranks x 1 task or 1 rank x 2 tasks


def _cfg(data_dir, world):
    cfg = tiny_config(data_dir, tasks=2 * STEP, tasks_per_rank=STEP // world, experts=16)
    cfg.model.kwargs = {"depth": 1}
    cfg.data.ways, cfg.data.shots, cfg.data.queries = 2, 1, 1
    cfg.method.sparsity.lambda_lr = 5.0    # multipliers visibly non-zero after one step
    cfg.dist.aligned_slices = True         # slices on pool chunk boundaries (what makes the sums world-invariant)
    # 16 experts: pool chunks of 131072 rows, so each of the 2 ranks holds real rows of the ~0.5M-entry
    # backbone (with few experts one chunk would cover it all and rank 1 would hold only padding)
    return cfg


def _state(results) -> dict:
    """The whole pool (slices in order, padding dropped), the multipliers and the hypernetwork's tensors."""
    parts = sorted((r["pool"] for r in results if r["pool"]), key=lambda p: p["lo"])
    out = {k: torch.cat([p[k] for p in parts]) for k in ("delta", "delta_momentum", "log_alpha")}
    out["multipliers"] = parts[0]["multipliers"]
    rep = results[0]["replicated"]
    out.update({k: v for k, v in rep.items() if k.startswith("hypernet.") and v.is_floating_point()})
    return out


def test_saved_at_2_resumed_at_1_is_bit_exact(tmp_path):
    data_dir = str(make_dataset(tmp_path / "data", "toy"))
    ref = run_ranks(train_rank, 2, _cfg(data_dir, 2), str(tmp_path / "ref"))
    run_ranks(train_rank, 2, _cfg(data_dir, 2), str(tmp_path / "two"), 1)      # one step, then save and stop
    cfg = _cfg(data_dir, 1)
    cfg.resume = str(tmp_path / "two")
    res = run_ranks(train_rank, 1, cfg, str(tmp_path / "one"))
    assert res[0]["out"]["tasks"] == ref[0]["out"]["tasks"] == 2 * STEP
    want, got = _state(ref), _state(res)
    numel = min(want["delta"].numel(), got["delta"].numel())   # the padding differs with the world size
    lo1 = min(p["lo"] for r in ref for p in [r["pool"]] if p and p["lo"] > 0)
    assert lo1 < numel                                          # rank 1 of the 2-rank run holds real entries
    assert want["multipliers"].abs().sum() > 0 and want["delta_momentum"].abs().sum() > 0
    differ = {}
    for k, v in want.items():
        g = got[k]
        if k in ("delta", "delta_momentum", "log_alpha"):
            assert not g[numel:].any() and not v[numel:].any()
            v, g = v[:numel], g[:numel]
        if not torch.equal(g, v):
            differ[k] = float((g.double() - v.double()).abs().max())
    assert not differ, f"not bit-exact after resuming 2 -> 1 rank (max abs difference): {differ}"
