"""Hard-concrete gates, expected L0 and the per-task merge against hand computations (pure Python floats)."""
from __future__ import annotations

import math

import pytest
import torch

from smat_dist.config.schema import SparsityConfig
from smat_dist.pool import gates as hc
from smat_dist.pool.merge import LocalMerger
from smat_dist.pool.shard import PoolShard


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _gate_by_hand(la: float, train: bool) -> float:
    beta = 2.0 / 3.0 if train else 1.0
    return min(1.0, max(0.0, _sigmoid(la / beta) * (1.1 - (-0.1)) + (-0.1)))


def _pool(la: torch.Tensor, delta: torch.Tensor, numel: int | None = None) -> PoolShard:
    n, m = la.shape
    pool = PoolShard(0, n, numel if numel is not None else n, m, SparsityConfig(), seed=0)
    with torch.no_grad():
        pool.log_alpha.copy_(la)
        pool.delta.copy_(delta)
    return pool


def test_thresholds_are_the_documented_constants():
    assert hc.threshold(train=True) == pytest.approx(2.0 / 3.0 * math.log(11.0), abs=1e-12)
    assert hc.threshold(train=True) == pytest.approx(1.599, abs=1e-3)
    assert hc.threshold(train=False) == pytest.approx(2.398, abs=1e-3)
    assert hc.L0_SHIFT == pytest.approx(1.5986, abs=1e-4)


@pytest.mark.parametrize("train,thr", [(True, 1.599), (False, 2.398)])
def test_masks_exactly_binary_beyond_threshold_fractional_inside(train, thr):
    outside = torch.tensor([-4.605, -3.0, -(thr + 1e-3), thr + 1e-3, 3.0, 4.605], dtype=torch.float32)
    z = hc.gate(outside, train=train)
    assert z.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]  # exact, not approximately
    inside = torch.linspace(-(thr - 1e-2), thr - 1e-2, 41)
    zi = hc.gate(inside, train=train)
    assert bool(((zi > 0) & (zi < 1)).all()), zi
    for la, got in zip(inside.tolist(), zi.tolist()):
        assert got == pytest.approx(_gate_by_hand(la, train), abs=1e-6)
    # The train gate is sharper (beta 2/3): an entry between the two thresholds is binary in training only.
    mid = torch.tensor([-2.0, 2.0])
    assert hc.gate(mid, train=True).tolist() == [0.0, 1.0]
    assert bool(((hc.gate(mid, train=False) > 0) & (hc.gate(mid, train=False) < 1)).all())


def test_pool_masks_with_upstream_noise_stay_binary_and_padding_is_zero():
    # noise_eps 1e-6 (upstream) perturbs the logit by ~4e-6: far from moving an entry across a 1e-3 margin.
    la = torch.tensor([[-1.61, 1.61], [0.0, -4.0], [2.5, 0.3], [0.7, 0.7]])
    pool = _pool(la, torch.zeros(4), numel=3)  # the 4th entry is padding
    torch.manual_seed(0)
    z = pool.masks(train=True)
    assert z[0].tolist() == [0.0, 1.0]
    assert z[1, 1].item() == 0.0 and z[2, 0].item() == 1.0
    assert 0 < z[1, 0].item() < 1 and z[1, 0].item() == pytest.approx(_gate_by_hand(0.0, True), abs=1e-5)
    assert z[3].tolist() == [0.0, 0.0]  # padding never contributes to the merge
    # zero counts: real entries only (padding's zeros are not sparsity)
    assert pool.zero_counts(z).tolist() == [1.0, 1.0]


def test_expected_l0_matches_hand_computation_per_expert():
    g = torch.Generator().manual_seed(3)
    la = torch.randn(7, 3, generator=g) * 3
    pool = _pool(la, torch.zeros(7), numel=6)  # last row is padding, excluded from E_m
    got = (pool.l0_sum() / pool.numel).tolist()
    for m in range(3):
        hand = sum(_sigmoid(la[j, m].item() + 1.5986) for j in range(6)) / 6
        assert got[m] == pytest.approx(hand, abs=1e-4)
    # the floor of E_m at the lower clamp: P(z != 0) = sigmoid(-4.605 + 1.5986) ~ 0.047
    assert hc.prob_nonzero(torch.tensor(-4.605170185988092)).item() == pytest.approx(0.0471, abs=1e-3)
    # differentiable w.r.t. the logits with the sigmoid's derivative
    pool.l0_sum().sum().backward()
    p = torch.sigmoid(la + hc.L0_SHIFT)
    expect = p * (1 - p)
    expect[6] = 0.0
    assert torch.allclose(pool.log_alpha.grad, expect, atol=1e-6)


def test_merge_formula_element_by_element():
    g = torch.Generator().manual_seed(1)
    n, m = 6, 3
    la = torch.tensor([[-3.0, 0.2, 2.0], [1.0, -1.0, 0.0], [4.0, 4.0, 4.0],
                       [-4.0, -4.0, -4.0], [0.5, -0.5, 1.5], [-1.2, 3.3, -0.1]])
    delta = torch.randn(n, generator=g)
    theta_pre = torch.randn(n + 2, generator=g)  # the flat space is padded by 2 beyond the pool's entries
    w = torch.tensor([0.5, 0.3, 0.2])
    pool = _pool(la, delta)
    merger = LocalMerger(pool, n + 2)
    for train in (True, False):
        merger.begin_step(train=train)
        theta = theta_pre + merger.merge(w)
        assert theta.shape == (n + 2,)
        for i in range(n):
            mi = sum(w[k].item() * _gate_by_hand(la[i, k].item(), train) for k in range(m))
            hand = theta_pre[i].item() + mi * delta[i].item()
            assert theta[i].item() == pytest.approx(hand, abs=1e-5), (train, i)
        assert theta[n:].tolist() == theta_pre[n:].tolist()
        merger.end_step()
    # several tasks at once: w [T, M] gives one merged delta per task
    ws = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    z = pool.masks(train=True)
    both = pool.merge(z, ws)
    assert torch.allclose(both[0], pool.merge(z, ws[0])) and torch.allclose(both[1], pool.merge(z, ws[1]))


def test_merge_gradient_reaches_logits_through_end_step():
    """dL/dlog_alpha accumulated over a step's tasks equals autograd through the un-split computation."""
    g = torch.Generator().manual_seed(2)
    la = torch.randn(5, 2, generator=g)
    delta = torch.randn(5, generator=g)
    pool = _pool(la, delta)
    merger = LocalMerger(pool, 5)
    merger.begin_step(train=True)
    w1, w2 = torch.tensor([0.7, 0.3]), torch.tensor([0.1, 0.9])
    ((merger.merge(w1) ** 2).sum() + (merger.merge(w2) * 3).sum()).backward()
    merger.end_step()
    la_ref = la.clone().requires_grad_(True)
    z = hc.gate(la_ref, train=True)
    (((z @ w1) * delta) ** 2).sum().add(((z @ w2) * delta * 3).sum()).backward()
    assert torch.allclose(pool.log_alpha.grad, la_ref.grad, atol=1e-5)
    assert pool.log_alpha.grad.abs().sum() > 0


def test_the_config_checks_torch_free_exact_gate_logit_equals_the_gates():
    from smat_dist.config.checks import exact_gate_logit
    for eval_gate in ("upstream", "train"):
        sp = SparsityConfig(eval_gate=eval_gate)
        want = max(hc.threshold(train=True), hc.threshold(train=False, eval_beta=hc.eval_beta(sp)))
        assert exact_gate_logit(sp) == pytest.approx(want, rel=1e-12)
