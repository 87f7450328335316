"""The sharded merge equals the gather-all merge and the single-process merge, in values and gradients,
and its bytes per task do not depend on the number of experts."""
import pytest
import torch

from tests.distributed.helpers import run_ranks
from smat_dist.config.schema import SparsityConfig
from smat_dist.distributed.comm import Comm
from smat_dist.pool.sharded import GatherMerger, ShardedMerger
from smat_dist.pool.merge import LocalMerger
from smat_dist.pool.shard import PoolShard

pytestmark = pytest.mark.dist

P, PAD, M = 37, 38, 5  # an odd size exercises the padding


def _weights(t: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + t)
    w = torch.rand(M, generator=g)
    return w / w.sum()


def _target(t: int) -> torch.Tensor:
    return torch.randn(PAD, generator=torch.Generator().manual_seed(200 + t))


def _pool(lo, hi, lean=False):
    pool = PoolShard(lo, hi, P, M, SparsityConfig(init_std=1.0, lean=lean), seed=3)
    with torch.no_grad():
        pool.delta.copy_(torch.linspace(-1, 1, PAD)[lo:hi])
    return pool


def _run(rank, world, kind):
    comm = Comm()
    lo, hi = rank * PAD // world, (rank + 1) * PAD // world
    pool = _pool(lo, hi, lean=kind == "lean")
    merger = (GatherMerger if kind == "gather" else ShardedMerger)(pool, PAD, comm)
    merger.begin_step(train=True)
    w = _weights(rank).requires_grad_(True)
    d = merger.merge(w)
    loss = (d * _target(rank)).sum()
    loss.backward()
    merger.end_step()
    gla = pool.passes.deferred_grad() if kind == "lean" else pool.log_alpha.grad.clone()   # lean: never materialised
    return dict(d=d.detach(), gw=w.grad.clone(), gdelta=pool.delta.grad.clone(), gla=gla,
                bytes=comm.sent_bytes)


def _reference():
    """One process merging both tasks; loss = mean over the 2 tasks (what 2 ranks with 1 task each optimise)."""
    pool = _pool(0, PAD)
    merger = LocalMerger(pool, PAD)
    merger.begin_step(train=True)
    outs = []
    for t in range(2):
        w = _weights(t).requires_grad_(True)
        d = merger.merge(w)
        ((d * _target(t)).sum() / 2).backward()
        outs.append((d.detach(), w.grad.clone() * 2))  # per-task gradient of w (engine averages over ranks)
    merger.end_step()
    return outs, pool.delta.grad.clone(), pool.log_alpha.grad.clone()


@pytest.mark.parametrize("kind", ["sharded", "gather", "lean"])
def test_two_rank_merge_matches_single_process(kind):
    res = run_ranks(_run, 2, kind)
    outs, gdelta, gla = _reference()
    for r in range(2):
        torch.testing.assert_close(res[r]["d"], outs[r][0])
        torch.testing.assert_close(res[r]["gw"], outs[r][1])
    torch.testing.assert_close(torch.cat([res[0]["gdelta"], res[1]["gdelta"]]), gdelta)
    torch.testing.assert_close(torch.cat([res[0]["gla"], res[1]["gla"]]), gla)
    assert gla.abs().sum() > 0 and gdelta.abs().sum() > 0


K = 3   # tasks per rank of a planned step: at M = 5 on 2 ranks, 2 rounds per merge pass, so 2 merge passes


def _run_planned(rank, world, ordered):
    """A planned step (Pool.begin_step(plan=...)): rank r's K tasks are global tasks r*K .. r*K + K - 1, its loss
    their mean; the merges give w no gradient, end_step gives every task's dL/dw."""
    comm = Comm()
    lo, hi = rank * PAD // world, (rank + 1) * PAD // world
    pool = _pool(lo, hi)
    pool.passes.ordered = ordered     # per-chunk partials summed in global chunk order (dist.aligned_slices)
    merger = ShardedMerger(pool, PAD, comm)
    W = torch.stack([_weights(rank * K + j) for j in range(K)])
    merger.begin_step(train=True, plan=W)
    assert merger.planning and merger._z is None and merger._group == M // world
    ds = []
    for j in range(K):
        d = merger.merge(W[j])
        ((d * _target(rank * K + j)).sum() / K).backward()
        ds.append(d.detach())
        assert merger._z is None      # no [rows, M] masks while the tasks run
    merger.end_step()
    return dict(d=ds, gw=merger.w_grads.clone(), gdelta=pool.delta.grad.clone(), gla=pool.log_alpha.grad.clone())


@pytest.mark.parametrize("ordered", [False, True])
def test_planned_two_rank_step_matches_single_process(ordered):
    res = run_ranks(_run_planned, 2, ordered)
    pool = _pool(0, PAD)
    merger = LocalMerger(pool, PAD)
    merger.begin_step(train=True, plan=None)    # the reference merges task by task, its w through autograd
    n = 2 * K
    ref = []
    for t in range(n):
        w = _weights(t).requires_grad_(True)
        d = merger.merge(w)
        ((d * _target(t)).sum() / n).backward()
        ref.append((d.detach(), w.grad.clone() * 2))   # a rank's loss is the mean of its K tasks, not of all 2K
    merger.end_step()
    for r in range(2):
        for j in range(K):
            torch.testing.assert_close(res[r]["d"][j], ref[r * K + j][0])
            torch.testing.assert_close(res[r]["gw"][j], ref[r * K + j][1])
    torch.testing.assert_close(torch.cat([res[0]["gdelta"], res[1]["gdelta"]]), pool.delta.grad)
    torch.testing.assert_close(torch.cat([res[0]["gla"], res[1]["gla"]]), pool.log_alpha.grad)
    assert pool.log_alpha.grad.abs().sum() > 0 and res[0]["gw"].abs().sum() > 0
