"""The mask-learning diagnostics (method/mask_diagnostics.py) against the production gradient pass, and the
checkpoints a curve keeps (checkpoint.keep_every)."""
from __future__ import annotations

import pytest
import torch

from smat_dist.config.schema import MethodConfig, SparsityConfig
from smat_dist.method.mask_diagnostics import mask_diagnostics
from smat_dist.pool.merge import LocalMerger
from smat_dist.pool.optim import clip_scale
from smat_dist.pool.pool import Pool
from smat_dist.pool.shard import PoolShard

N, M = 1000, 4
COEF = torch.tensor([1e-3, -5e-4, 0.0, 2e-3])


def _pool(lean: bool = False) -> PoolShard:
    p = PoolShard(0, N, N - 3, M, SparsityConfig(init_std=2.0, lean=lean), seed=1)
    with torch.no_grad():
        p.delta.normal_(0, 1, generator=torch.Generator().manual_seed(2))
    return p


def _step(p: PoolShard, task: bool):
    """One training step's mask gradient through the production pass: the task's (if `task`) + the penalty's."""
    mg = LocalMerger(p, N)
    mg.begin_step(train=True)
    if task:
        w = torch.tensor([0.1, 0.2, 0.3, 0.4])
        tgt = torch.randn(N, generator=torch.Generator().manual_seed(4))
        (mg.merge(w) * tgt).sum().backward()
    mg.end_step(COEF)
    return mg


def _grad(p: PoolShard) -> torch.Tensor:
    return (p.log_alpha.grad if p.log_alpha.grad is not None else p.passes.deferred_grad()).clone()


def test_norms_split_the_gradient_the_optimiser_sees():
    pen_only, full = _pool(), _pool()
    _step(pen_only, task=False)
    _step(full, task=True)
    g_pen, g_all = _grad(pen_only)[: N - 3], _grad(full)[: N - 3]
    d = mask_diagnostics(full, COEF, lambda t: t)
    assert d["mask/penalty_grad_norm"] == pytest.approx(float(g_pen.norm()), rel=1e-5)
    assert d["mask/task_grad_norm"] == pytest.approx(float((g_all - g_pen).norm()), rel=1e-5)
    assert d["mask/task_grad_norm"] > 0 and d["mask/penalty_grad_norm"] > 0
    pn, tn = d["mask/penalty_grad_norm"], d["mask/task_grad_norm"]
    assert d["mask/penalty_share"] == pytest.approx(pn / (pn + tn))
    # the penalty alone: its share is 1
    assert mask_diagnostics(pen_only, COEF, lambda t: t)["mask/penalty_share"] == pytest.approx(1.0)


def test_lean_pool_reports_the_penalty_norm_only():
    p = _pool(lean=True)
    _step(p, task=True)
    d = mask_diagnostics(p, COEF, lambda t: t)
    ref = _pool()
    _step(ref, task=True)
    assert d["mask/penalty_grad_norm"] == pytest.approx(mask_diagnostics(ref, COEF, lambda t: t)[
        "mask/penalty_grad_norm"], rel=1e-6)
    assert "mask/task_grad_norm" not in d and "mask/penalty_share" not in d


def test_clamp_fractions_count_valid_logits_only():
    p = _pool()
    c = p.cfg.clamp
    with torch.no_grad():
        p.log_alpha[:100, 0] = -c
        p.log_alpha[100:130, 1] = c
        p.log_alpha[N - 3:] = c           # padding rows: never counted
    d = mask_diagnostics(p, COEF, lambda t: t)
    valid = (N - 3) * M
    below = int((p.log_alpha[: N - 3] <= -c).sum())
    above = int((p.log_alpha[: N - 3] >= c).sum())
    assert below >= 100 and above >= 30
    assert d["mask/at_clamp_low"] == pytest.approx(below / valid)
    assert d["mask/at_clamp_high"] == pytest.approx(above / valid)


def test_reduce_sums_the_slices():
    """Two slices and a summing reduce give the whole pool's numbers (what 2 ranks log)."""
    whole = _pool()
    _step(whole, task=False)
    ref = mask_diagnostics(whole, COEF, lambda t: t)
    parts = []
    for lo, hi in ((0, N // 2), (N // 2, N)):
        s = PoolShard(lo, hi, N - 3, M, SparsityConfig(init_std=2.0), seed=1)
        mg = LocalMerger(s, N)
        mg.begin_step(train=True)
        mg.end_step(COEF)
        parts.append(s)
    sums = []

    def first(t):            # collect each slice's local sums, answer with the total once both are in
        sums.append(t.clone())
        return t

    for s in parts:
        mask_diagnostics(s, COEF, first)
    total = sums[0] + sums[1]
    got = mask_diagnostics(parts[0], COEF, lambda t: total)
    for k in ("mask/penalty_grad_norm", "mask/at_clamp_low", "mask/at_clamp_high"):
        assert got[k] == pytest.approx(ref[k], rel=1e-6), k


def test_the_pool_logs_them_with_the_clip_factor():
    cfg = MethodConfig(experts=M)
    cfg.sparsity.init_std, cfg.sparsity.schedule_share = 2.0, 0.0   # tau from the start: the multipliers stay
    for diagnose in (False, True):
        store = PoolShard(0, N, N - 3, M, cfg.sparsity, seed=1)
        with torch.no_grad():
            store.delta.normal_(0, 1, generator=torch.Generator().manual_seed(2))
        pool = Pool(store, LocalMerger(store, N), cfg)
        pool.controller.multipliers.fill_(5000.0)    # a penalty large enough to meet the clip
        pool.diagnostics = mask_diagnostics if diagnose else None
        pool.begin_step(train=True)
        w = torch.full((M,), 1.0 / M, requires_grad=True)
        (pool.merge(w) * torch.randn(N, generator=torch.Generator().manual_seed(1))).sum().backward()
        out = pool.end_step(w.detach(), 1, 1.0)
        assert ("mask/penalty_share" in out) == diagnose
    norm = out["grad_norm/log_alpha"]
    assert out["mask/clip_scale"] == pytest.approx(min(1.0, cfg.sparsity.mask_clip / norm))
    assert out["mask/clip_scale"] < 1.0
    assert out["mask/penalty_share"] > 0.5       # the large multipliers: the penalty dominates the norm
    assert clip_scale(None, 5.0) is None and clip_scale(2.0, 5.0) == 1.0


def test_fixed_patterns_have_nothing_to_report():
    p = PoolShard(0, 50, 50, 2, SparsityConfig(pattern="random"))
    assert mask_diagnostics(p, COEF[:2], lambda t: t) == {}


def test_keep_every_keeps_the_curve_points(tmp_path):
    from smat_dist.checkpoint import Checkpointer, checkpoint_tasks
    from smat_dist.distributed.comm import Comm
    from smat_dist.train.state import TrainState

    ck = Checkpointer(tmp_path, Comm(), keep=2, keep_every=40)
    for tasks in range(10, 130, 10):
        st = TrainState()
        st.tasks = tasks
        ck.save(tasks, {"train": st}, {})
    kept = sorted(checkpoint_tasks(p) for p in tmp_path.glob("step-*"))
    assert kept == [40, 80, 110, 120]
    with pytest.raises(Exception, match="not a checkpoint folder name"):
        checkpoint_tasks(tmp_path / "latest")
