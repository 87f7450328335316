"""method.sparsity.compile=true: the pool passes' fused torch.compile kernels give the eager passes' masks,
statistics and gradients, and training with them matches training without."""
from __future__ import annotations

import pytest
import torch

import smat_dist.pool.passes as passes
from smat_dist.config.schema import MethodConfig, SparsityConfig
from smat_dist.build import build_local
from smat_dist.pool.merge import LocalMerger
from smat_dist.pool.shard import PoolShard
from smat_dist.train.step import smat_step
from tests.unit.test_method_smat import VIT, episodes  # noqa: F401  (fixture)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # 1024-row chunks at M=4: many full chunks (fused kernels) and a tail with padding (eager path)
    monkeypatch.setattr(passes, "CHUNK", 4096)
    used = []
    real = passes.kernel

    def counting(name):
        used.append(name)
        return real(name)

    monkeypatch.setattr(passes, "kernel", counting)
    return used


@pytest.mark.parametrize("tasks", [1, 3])   # one factor (outer product kernel) / several (matmul kernel)
def test_fused_passes_equal_eager(tasks, small_chunks):
    n, numel, m = 5000, 4990, 4
    res = []
    for compiled in (False, True):
        p = PoolShard(0, n, numel, m, SparsityConfig(init_std=2.0, compile=compiled), seed=1)
        with torch.no_grad():
            p.delta.normal_(0, 1, generator=torch.Generator().manual_seed(2))
        mg = LocalMerger(p, n)
        mg.begin_step(train=True)
        tgt = torch.randn(n, generator=torch.Generator().manual_seed(4))
        for t in range(tasks):
            w = torch.softmax(torch.randn(m, generator=torch.Generator().manual_seed(10 + t)), 0)
            (mg.merge(w) * tgt).square().sum().backward()
        stats = mg.stats.clone()
        sq = mg.end_step(torch.tensor([1.0, -0.5, 0.0, 2.0]))
        res.append((stats, p.log_alpha.grad.clone(), sq.clone(), p.log_alpha.detach().clone()))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert res[1][1].abs().sum() > 0
    assert "masks_stats" in small_chunks and ("gate_grad_outer" if tasks == 1 else "gate_grad_mm") in small_chunks


def test_training_with_fused_passes_matches(episodes):  # noqa: F811
    outs = []
    for compiled in (False, True):
        cfg = MethodConfig(experts=4, warmup_tasks=0, total_tasks=100)
        cfg.sparsity.compile = compiled
        s = build_local(VIT, cfg, seed=0)
        steps = [smat_step(s.method, s.pool, s.hyper, [episodes[i]], i, i) for i in range(2)]
        outs.append(steps + [s.pool.shard.log_alpha.detach().clone()])
    for x, y in zip(outs[0][:2], outs[1][:2]):
        for k in ("loss/task", "sparsity/expert0", "density_l0/expert2", "grad_norm/log_alpha"):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), k
    torch.testing.assert_close(outs[0][2], outs[1][2], rtol=0, atol=1e-2)
