"""method.sparsity.release_masks (default): the step's masks are dropped between a task's merge and its backward
(where the whole student graph is alive) and recomputed for the merge's backward. Same bits as keeping them."""
from __future__ import annotations

import torch

from smat_dist.build import build_local
from smat_dist.config.schema import MethodConfig
from smat_dist.train.step import smat_step
from tests.unit.test_method_smat import VIT, episodes  # noqa: F401  (fixture)


def _setup(release: bool):
    cfg = MethodConfig(experts=4, warmup_tasks=0, total_tasks=100)
    cfg.sparsity.release_masks = release
    cfg.sparsity.init_std = 2.0      # gates clamped at 0 / 1 and inside: every branch of the gate
    return build_local(VIT, cfg, seed=0)


def test_released_masks_train_bitwise_like_kept_ones(episodes):  # noqa: F811
    runs = {}
    for release in (False, True):
        s = _setup(release)
        outs = [smat_step(s.method, s.pool, s.hyper, [episodes[i], episodes[i + 1]], 2 * i, 2 * i) for i in range(2)]
        runs[release] = (s, outs)
    (a, oa), (b, ob) = runs[False], runs[True]
    assert oa == ob
    assert torch.equal(a.pool.shard.delta, b.pool.shard.delta)
    assert torch.equal(a.pool.shard.log_alpha, b.pool.shard.log_alpha)
    # kept: a buffer across steps; released: none left between steps
    assert "z" in a.pool.shard.passes.kept and "z" not in b.pool.shard.passes.kept


def test_no_masks_alive_between_the_merge_and_the_backward(episodes):  # noqa: F811
    s = _setup(True)
    merger = s.pool.merger
    s.pool.begin_step(train=True)
    assert merger._z is not None
    res = s.method.task(episodes[0], s.pool, 0, train=True)
    assert merger._z is None                  # the task's forward passes (and the teacher) ran without z
    res.loss.backward()
    assert merger._z is not None              # recomputed by the merge's backward, for the gate's backward
    s.pool.end_step(res.w.detach(), 1, 1.0)
    assert merger._z is None and s.pool.shard.log_alpha.grad is None


def test_a_planned_step_holds_no_masks_and_gives_w_its_gradient_at_the_end(episodes):  # noqa: F811
    """smat_step's order: every task's prelude first, then begin_step(plan=W); no [rows, M] masks while the
    tasks run, and the tasks' dL/dw from end_step."""
    s = _setup(True)
    merger = s.pool.merger
    with torch.no_grad():    # delta starts at 0, where dL/dw = u^T z is 0 (u sums dL/dd * delta)
        s.pool.shard.delta.normal_(0, 1e-3, generator=torch.Generator().manual_seed(0))
    pre = [s.method.prelude(episodes[j], j) for j in range(2)]
    s.pool.begin_step(train=True, plan=torch.stack([p.w.detach() for p in pre]))
    assert s.pool.defers_w_grad and merger._z is None
    res = [s.method.task(episodes[j], s.pool, j, train=True, prelude=pre[j]) for j in range(2)]
    for r in res:
        (r.outer / 2).backward()
        assert merger._z is None
    # the outer losses reached neither the hypernetwork nor its graph (the merge took w detached)
    assert all(p.grad is None for p in s.method.hypernet.parameters())
    s.pool.end_step(torch.stack([r.w for r in res]).sum(0).double(), 2, 1.0)
    g_w = s.pool.take_w_grads()
    assert g_w.shape == (2, 4) and g_w.abs().sum() > 0 and not s.pool.defers_w_grad
    for j, r in enumerate(res):    # the hypernetwork's graph is intact: its part of the loss goes through now
        (r.reg / 2 + (r.w_live * g_w[j]).sum()).backward()
    assert all(p.grad is not None for p in s.method.hypernet.parameters() if p.requires_grad)
