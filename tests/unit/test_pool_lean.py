"""The lean pool (method.sparsity.lean=true) keeps only the mask logits: the masks and their gradient are
recomputed chunk by chunk. It must train exactly like the stored pool, hold no [rows, M] tensor besides the
logits, and refuse the settings it cannot recompute."""
from __future__ import annotations

import pytest
import torch

from smat_dist.build import build_local
from smat_dist.config.schema import MethodConfig, SparsityConfig
from smat_dist.build import build_local
from smat_dist.pool.merge import LocalMerger
from smat_dist.pool.shard import PoolShard
from smat_dist.train.step import smat_step
from tests.unit.test_method_smat import VIT, episodes  # noqa: F401  (fixture)


def _setup(lean: bool):
    cfg = MethodConfig(experts=4, warmup_tasks=0, total_tasks=100)
    cfg.sparsity.lean = lean
    cfg.sparsity.init_std = 2.0      # some gates clamped at 0 / 1, some inside: every branch of the gate
    cfg.delta_lr = 1e-2
    return build_local(VIT, cfg, seed=0)


def test_lean_pool_trains_like_the_stored_pool(episodes):  # noqa: F811
    runs = {}
    for lean in (False, True):
        s = _setup(lean)
        with torch.no_grad():
            s.pool.shard.delta.normal_(0, 1e-2, generator=torch.Generator().manual_seed(3))
        outs = [smat_step(s.method, s.pool, s.hyper, [episodes[i], episodes[i + 1]], 2 * i, 2 * i) for i in range(3)]
        runs[lean] = (s, outs)
    (a, oa), (b, ob) = runs[False], runs[True]
    for x, y in zip(oa, ob):
        for k in ("loss/task", "loss/query_ce", "sparsity/expert0", "density_l0/expert1", "grad_norm/log_alpha"):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), k
    torch.testing.assert_close(a.pool.shard.delta, b.pool.shard.delta, rtol=1e-5, atol=1e-7)
    # mask lr 1e6: rounding-order differences of the chunked products show at ~1e-3 in the logits
    torch.testing.assert_close(a.pool.shard.log_alpha, b.pool.shard.log_alpha, rtol=0, atol=1e-2)
    assert (a.pool.shard.log_alpha - _setup(False).pool.shard.log_alpha).abs().max() > 0.1   # the logits did move
    # nothing of size [rows, M] besides the logits: no z buffer, no gradient buffer, no .grad
    assert b.pool.shard.passes.kept == {}
    assert b.pool.shard.log_alpha.grad is None


def test_lean_merge_and_deferred_gradient_equal_the_stored_ones():
    n, m = 1000, 5
    pools = []
    for lean in (False, True):
        p = PoolShard(0, n, n - 3, m, SparsityConfig(init_std=2.0, lean=lean), seed=1)
        with torch.no_grad():
            p.delta.normal_(0, 1, generator=torch.Generator().manual_seed(2))
        pools.append(p)
    w1, w2 = torch.tensor([0.1, 0.2, 0.3, 0.2, 0.2]), torch.tensor([0.5, 0.0, 0.0, 0.25, 0.25])
    tgt = torch.randn(n, generator=torch.Generator().manual_seed(4))
    coef = torch.tensor([1.0, -0.5, 0.0, 2.0, 0.3])
    res = []
    for p in pools:
        mg = LocalMerger(p, n)
        mg.begin_step(train=True)
        ws = [w.clone().requires_grad_(True) for w in (w1, w2)]
        d = [mg.merge(w) for w in ws]
        ((d[0] * tgt).square().sum() + (d[1] * tgt).sum()).backward()
        stats = mg.stats.clone()
        mg.end_step(coef)
        g = p.log_alpha.grad if p.log_alpha.grad is not None else p.passes.deferred_grad()
        res.append((d[0].detach(), d[1].detach(), ws[0].grad, ws[1].grad, p.delta.grad, stats, g.clone()))
        mg.begin_step(train=False)
        res[-1] = res[-1] + (mg.merge(w1).detach(),)
        mg.end_step()
    for x, y in zip(*res):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_lean_refuses_what_it_cannot_recompute():
    with pytest.raises(ValueError, match="lean"):
        PoolShard(0, 8, 8, 2, SparsityConfig(lean=True, noise_eps=1e-6))
    with pytest.raises(ValueError, match="lean"):
        PoolShard(0, 8, 8, 2, SparsityConfig(lean=True, structured=True))
    from smat_dist.distributed.comm import Comm
    from smat_dist.pool.sharded import build_merger
    with pytest.raises(ValueError, match="lean"):
        build_merger("gather", PoolShard(0, 8, 8, 2, SparsityConfig(lean=True)), 8, Comm())
