"""The stored pool's merge backward and gate backward give the same bits as their plain formulation (the op
sequence of the release before issue 26's step-time work): each task's merged mask is kept from the forward
instead of recomputing W @ z^T, and the gate backward's chain is shorter (one sign folded into the factor, the
clamp indicator as round(z) != z, a fresh gradient written in place of the masks)."""
from __future__ import annotations

import pytest
import torch

import smat_dist.pool.passes as passes
from smat_dist.config.schema import SparsityConfig
from smat_dist.pool.ordered import ordered_sum
from smat_dist.pool import gates as hc
from smat_dist.pool.merge import LocalMerger
from smat_dist.pool.shard import PoolShard


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # 1024-row chunks at M=4: several chunks and a last one with padding rows
    monkeypatch.setattr(passes, "CHUNK", 4096)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)   # -0.0 and +0.0 differ here, unlike torch.equal


def _reference_grad(shard: PoolShard, z: torch.Tensor, U: torch.Tensor, W: torch.Tensor, coef: torch.Tensor):
    """The gate backward as the plain chain computed it: dz/dla from z, times u w^T, plus the penalty's."""
    c = 1.0 / ((hc.ZETA - hc.GAMMA) * hc.BETA)
    w_c = W * c
    grad = torch.empty_like(z)
    sq = torch.zeros((), dtype=torch.float64)
    for a, b in shard.passes.rows():
        zc, la = z[a:b], shard.log_alpha.detach()[a:b]
        f1 = zc - hc.GAMMA
        f1.mul_(torch.neg(zc).add_(hc.ZETA))
        f1.mul_(torch.gt(zc, 0.0).float()).mul_(torch.lt(zc, 1.0).float())
        f1.mul_(U[a:b] @ w_c)
        p = torch.add(la, hc.L0_SHIFT).sigmoid_()
        p.sub_(p * p)
        f1.addcmul_(p, coef.unsqueeze(0))
        if b > shard.n_valid:
            f1[max(0, shard.n_valid - a):] = 0.0
        grad[a:b] = f1
        sq += torch.dot(f1.view(-1), f1.view(-1))
    return grad, sq


@pytest.mark.parametrize("release", [True, False])
@pytest.mark.parametrize("tasks", [1, 3])   # one factor (outer product) / several (a K = 3 product)
def test_merge_and_gate_backward_give_the_plain_chains_bits(release, tasks):
    n, numel, m = 5000, 4990, 4
    shard = PoolShard(0, n, numel, m, SparsityConfig(init_std=2.0, release_masks=release), seed=1)
    with torch.no_grad():
        shard.delta.normal_(0, 1, generator=torch.Generator().manual_seed(2))
    merger = LocalMerger(shard, n)
    z = merger.begin_step(train=True).clone()     # the step's masks (released ones are recomputed bitwise)
    assert ((z == 0) | (z == 1)).any() and ((z > 0) & (z < 1)).any()   # every branch of the gate
    Us, Ws = [], []
    for t in range(tasks):
        w = torch.softmax(torch.randn(m, generator=torch.Generator().manual_seed(10 + t)), 0).requires_grad_(True)
        tgt = torch.randn(n, generator=torch.Generator().manual_seed(20 + t))
        shard.delta.grad = None
        d = merger.merge(w)
        g = 2 * (d.detach() * tgt) * tgt                       # dL/dd of L = sum (d * tgt)^2
        (d * tgt).square().sum().backward()
        # the plain backward: dL/dw = u @ z and dL/ddelta = g * (w @ z^T) with u = g * delta
        u = g * shard.delta.detach()
        assert torch.equal(_bits(w.grad), _bits((u.unsqueeze(0) @ z)[0]))
        assert torch.equal(_bits(shard.delta.grad), _bits(g * (w.detach().unsqueeze(0) @ z.t())[0]))
        Us.append(u.unsqueeze(1))
        Ws.append(w.detach().unsqueeze(0))
    coef = torch.tensor([1e-3, -5e-4, 0.0, 2e-3])
    sq = merger.end_step(coef)
    ref, ref_sq = _reference_grad(shard, z, torch.cat(Us, 1), torch.cat(Ws, 0), coef)
    assert torch.equal(_bits(shard.log_alpha.grad), _bits(ref))
    assert torch.equal(ordered_sum(sq), ref_sq)     # per-chunk partials, added in order (pool/ordered.py)
    assert shard.log_alpha.grad.abs().sum() > 0


def test_the_merge_backward_reads_the_masks_once():
    """Kept masks: the backward's only pass over the [rows, M] masks is dL/dw = u @ z (W @ z^T comes from the
    forward), counted at the dispatcher."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    n, m = 5000, 4
    shard = PoolShard(0, n, n, m, SparsityConfig(init_std=2.0, release_masks=False), seed=1)
    merger = LocalMerger(shard, n)
    merger.begin_step(train=True)
    w = torch.softmax(torch.randn(m), 0).requires_grad_(True)
    loss = merger.merge(w).square().sum()
    seen = []

    class Passes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            flat = tree_flatten((args, kwargs, out))[0]
            if any(isinstance(t, torch.Tensor) and t.numel() == n * m for t in flat) and not func.is_view:
                seen.append(func.overloadpacket.__name__)
            return out

    with Passes():
        loss.backward()
    assert seen == ["mm"]
    assert w.grad is not None and shard.delta.grad is not None


def _gate_passes(monkeypatch) -> list:
    """Counts the passes that compute the deterministic gate over the block (their first chunk's call)."""
    calls = []
    real = passes.PoolPasses.gate_rows

    def counting(self, a, b, out, train=True):
        if a == 0:
            calls.append(a)
        return real(self, a, b, out, train)

    monkeypatch.setattr(passes.PoolPasses, "gate_rows", counting)
    return calls


@pytest.mark.parametrize("tasks", [1, 3, 6])   # 6 > M = 4: two merge passes before the end pass
def test_planned_merges_give_the_stored_masks_bits(tasks, monkeypatch):
    """A step whose tasks' weights are known up front (begin_step(plan=W)) merges them in the mask pass and
    recomputes the gates once more at end_step: the same merged deltas and gradients as the stored masks,
    ceil(K / M) + 1 gate passes instead of K + 1, and no [rows, M] masks while the tasks run."""
    n, numel, m = 5000, 4990, 4
    W = torch.softmax(torch.randn(tasks, m, generator=torch.Generator().manual_seed(7)), 1)
    coef = torch.tensor([1.0, -0.5, 0.0, 2.0])
    runs = {}
    for planned in (False, True):
        calls = _gate_passes(monkeypatch)
        shard = PoolShard(0, n, numel, m, SparsityConfig(init_std=2.0), seed=1)   # released masks (default)
        with torch.no_grad():
            shard.delta.normal_(0, 1, generator=torch.Generator().manual_seed(2))
        merger = LocalMerger(shard, n)
        merger.begin_step(train=True, plan=W if planned else None)
        assert merger.planning == planned
        ds, gws = [], []
        for t in range(tasks):
            w = W[t].clone().requires_grad_(True)
            d = merger.merge(w)
            if planned:
                assert merger._z is None
            tgt = torch.randn(n, generator=torch.Generator().manual_seed(20 + t))
            ((d * tgt).square().sum() / tasks).backward()
            ds.append(d.detach())
            gws.append(None if w.grad is None else w.grad.clone())
        sq = merger.end_step(coef)
        gw = merger.w_grads if planned else torch.stack(gws)
        if planned:
            assert all(g is None for g in gws)     # w's gradient comes from end_step, not the merge
        runs[planned] = (ds, gw, shard.delta.grad.clone(), shard.log_alpha.grad.clone(), sq.clone(), len(calls))
    (d0, gw0, gd0, gla0, sq0, n0), (d1, gw1, gd1, gla1, sq1, n1) = runs[False], runs[True]
    for a, b in zip(d0, d1):
        assert torch.equal(_bits(a), _bits(b))
    assert torch.equal(_bits(gd0), _bits(gd1))
    assert torch.equal(_bits(gla0), _bits(gla1)) and torch.equal(sq0, sq1)
    # u^T z summed chunk by chunk against one product over all rows: the same sum, maybe not the same bits
    torch.testing.assert_close(gw1, gw0, rtol=1e-6, atol=1e-9)
    assert gw1.abs().sum() > 0 and gla1.abs().sum() > 0
    assert n0 == tasks + 1                       # the begin pass, then one recomputation per task
    assert n1 == -(-tasks // m) + 1              # the merge passes (M tasks each), then the end pass
