"""method.sparsity.task_grad_scale: the task's term of the mask logits' gradient times s, the penalty's term
unchanged, before the optimiser's norm clip; at the default 1 the paper's update, bit for bit."""
from __future__ import annotations

import pytest
import torch

from smat_dist.config.hydra import ConfigError, compose
from smat_dist.config.schema import MethodConfig, SparsityConfig
from smat_dist.pool import gates as hc
from smat_dist.pool.merge import LocalMerger
from smat_dist.pool.optim import PoolOptimizer
from smat_dist.pool.shard import PoolShard

N, M = 1000, 4
COEF = torch.tensor([1e-3, -5e-4, 0.0, 2e-3])
W = torch.tensor([0.1, 0.2, 0.3, 0.4])


def _shard(scale: float | None = None, lean: bool = False) -> PoolShard:
    cfg = SparsityConfig(init_std=2.0, lean=lean)
    if scale is not None:
        cfg.task_grad_scale = scale
    p = PoolShard(0, N, N - 3, M, cfg, seed=1)
    with torch.no_grad():
        p.delta.normal_(0, 1, generator=torch.Generator().manual_seed(2))
    return p


def _grad(p: PoolShard, task: bool = True, coef=COEF) -> torch.Tensor:
    """One training step's logit gradient through the production pass (task's if `task`, + the penalty's)."""
    mg = LocalMerger(p, N)
    mg.begin_step(train=True)
    if task:
        tgt = torch.randn(N, generator=torch.Generator().manual_seed(4))
        (mg.merge(W) * tgt).sum().backward()
    mg.end_step(coef)
    g = p.log_alpha.grad if p.log_alpha.grad is not None else p.passes.deferred_grad()
    return g[: N - 3].clone()


def _autograd_task_grad() -> torch.Tensor:
    """The task's logit gradient from autograd through the gate: d/dla sum((gate(la) @ w) * delta * tgt)."""
    p = _shard()
    la = p.log_alpha.detach()[: N - 3].clone().requires_grad_(True)
    tgt = torch.randn(N, generator=torch.Generator().manual_seed(4))[: N - 3]
    ((hc.gate(la, train=True) @ W) * p.delta.detach()[: N - 3] * tgt).sum().backward()
    return la.grad


def test_default_is_the_papers_gradient_bit_for_bit():
    assert SparsityConfig().task_grad_scale == 1.0
    default, explicit = _grad(_shard()), _grad(_shard(scale=1.0))
    assert torch.equal(default, explicit)
    pen = _grad(_shard(), task=False)
    # the task's part is the gate's own derivative (the same as autograd's through hc.gate)
    torch.testing.assert_close(default - pen, _autograd_task_grad(), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("lean", [False, True])
def test_scale_multiplies_the_task_term_only(lean):
    s = 8.0
    base, scaled = _grad(_shard(lean=lean)), _grad(_shard(scale=s, lean=lean))
    pen, pen_s = _grad(_shard(lean=lean), task=False), _grad(_shard(scale=s, lean=lean), task=False)
    assert torch.equal(pen, pen_s)                       # the penalty's gradient is untouched
    task, task_s = base - pen, scaled - pen_s
    assert float(task.abs().max()) > 0
    torch.testing.assert_close(task_s, s * task, rtol=1e-5, atol=1e-10)
    assert not torch.allclose(scaled, base)


def test_the_step_is_the_scaled_gradient_under_the_clip():
    """logits -= mask_lr * min(1, clip / ||s task + pen||) * (s task + pen): the clip sees the scaled gradient."""
    for s in (1.0, 3.0e4):     # a scale large enough that the clip acts
        cfg = MethodConfig(experts=M)
        cfg.sparsity.init_std, cfg.sparsity.task_grad_scale = 2.0, s
        p = PoolShard(0, N, N - 3, M, cfg.sparsity, seed=1)
        with torch.no_grad():
            p.delta.normal_(0, 1, generator=torch.Generator().manual_seed(2))
        g = _grad(p)
        before = p.log_alpha.detach().clone()   # after the step's clamp (begin_step)
        expect_g = _grad(_shard(scale=s))
        assert torch.equal(g, expect_g)
        norm = float(g.double().norm())
        out = PoolOptimizer(p, cfg).step(1.0)
        assert out["grad_norm/log_alpha"] == pytest.approx(norm, rel=1e-5)
        scale = min(1.0, cfg.sparsity.mask_clip / norm)
        assert (scale < 1.0) == (s > 1.0)
        lr = cfg.sparsity.mask_lr * scale
        torch.testing.assert_close(p.log_alpha.detach()[: N - 3], before[: N - 3] - lr * g, rtol=1e-5, atol=1e-4)


def test_the_autograd_paths_refuse_it():
    assert compose("demo", ["method.sparsity.task_grad_scale=8"]).method.sparsity.task_grad_scale == 8.0
    for pool in ("gather", "zero3"):
        with pytest.raises(ConfigError, match="task_grad_scale"):
            compose("demo", ["method.sparsity.task_grad_scale=8", f"dist.pool={pool}"])
    with pytest.raises(ConfigError, match="task_grad_scale"):
        compose("demo", ["method.sparsity.task_grad_scale=0"])
