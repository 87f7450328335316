"""Hand-designed mask patterns, the baselines for SMAT's learned masks (method.sparsity.pattern):
random (fixed at construction, per expert, the same slice at any world size) and magnitude (dense, then the
top 1 - tau of |delta| over all ranks, found from all-reduced counts); both keep their logits frozen while
delta and the hypernetwork train, and the magnitude switch survives a state round trip."""
from __future__ import annotations

import json
import re
import threading
import time

import pytest
import torch

import smat_dist.pool.draws as draws
from smat_dist.bench.step import synthetic_episode
from smat_dist.config.checks import check_pattern
from smat_dist.config.hydra import ConfigError, compose
from smat_dist.config.schema import MethodConfig, SparsityConfig, SparsityPattern
from smat_dist.build import build_local
from smat_dist.model.flat import FlatSpace
from smat_dist.pool import gates as hc
from smat_dist.pool.merge import LocalMerger
from smat_dist.pool.passes import PoolPasses
from smat_dist.pool.patterns import top_magnitude
from smat_dist.pool.pool import Pool
from smat_dist.pool.shard import PoolShard
from smat_dist.train.step import smat_step
from tests.unit.test_method_smat import VIT
from tests.unit.test_pool_structured import _Net

EXPERTS = 4


def _cfg(pattern: str, target: float = 0.9, total: int = 16, eval_gate: str = "upstream") -> MethodConfig:
    cfg = MethodConfig(experts=EXPERTS, warmup_tasks=0, total_tasks=total, delta_lr=1e-2)
    cfg.sparsity.pattern, cfg.sparsity.target, cfg.sparsity.eval_gate = pattern, target, eval_gate
    cfg.sparsity.schedule_share = 0.5          # configs/method/smat.yaml's ramp: irrelevant to a fixed pattern
    return cfg


EPISODES = [synthetic_episode(3, 2, 2, 32, 0, i) for i in range(4)]


def _step(s, i: int) -> dict:
    return smat_step(s.method, s.pool, s.hyper, [EPISODES[(2 * i) % 4], EPISODES[(2 * i + 1) % 4]], 2 * i, 2 * i)


def _hard(pool: PoolShard, train: bool) -> torch.Tensor:
    """Per-expert share of exactly-zero real entries in the training or eval gate."""
    z = pool.masks(train=train)
    return pool.zero_counts(z) / pool.numel


# ---- random ----

@pytest.mark.parametrize("target,eval_gate", [(0.5, "upstream"), (0.9, "train")])
def test_random_pattern_is_fixed_at_tau_in_both_gates_and_frozen_while_delta_trains(target, eval_gate):
    t0 = time.time()
    s = build_local(VIT, _cfg("random", target, eval_gate=eval_gate), seed=0)
    store = s.pool.shard
    la0 = store.log_alpha.detach().clone()
    real = la0[: store.n_valid]
    assert bool((real.abs() == store.cfg.clamp).all())            # every logit at +-clamp
    for train in (True, False):                                     # exact 0 / 1 masks in both gates
        z = store.masks(train=train)[: store.n_valid]
        assert bool(((z == 0) | (z == 1)).all())
        assert torch.equal(z == 1, real > 0)
        got = _hard(store, train).tolist()
        assert all(abs(v - target) <= 0.01 for v in got), (train, got)
    zt = store.masks(train=True)[: store.n_valid] > 0
    overlap = (zt[:, 0] & zt[:, 1]).double().mean()                 # independent per expert: ~(1 - tau)^2
    assert float(overlap) == pytest.approx((1 - target) ** 2, abs=0.01)
    assert not torch.equal(zt[:, 0], zt[:, 1])
    outs = [_step(s, i) for i in range(3)]
    for out in outs:                                                # logged from step 0 on, unchanged
        for gate in ("sparsity", "sparsity_eval"):
            got = [out[f"{gate}/expert{m}"] for m in range(EXPERTS)]
            assert got == pytest.approx(_hard(store, gate == "sparsity").tolist(), abs=1e-12)
            assert all(abs(v - target) <= 0.01 for v in got), (gate, got)
        assert out["sparsity/target"] == target and out["loss/sparsity_penalty"] == 0.0
        assert "grad_norm/log_alpha" not in out                     # no mask gradient pass
    assert torch.equal(store.log_alpha.detach(), la0)               # the logits did not move
    assert store.log_alpha.grad is None and not store.log_alpha.requires_grad
    assert float(store.delta.detach().abs().max()) > 0              # delta trains
    assert s.pool.controller.multipliers.tolist() == [0.0] * EXPERTS
    assert float(s.pool.controller.tasks) == 6.0                    # the task counter advances
    assert time.time() - t0 < 60


def test_fixed_pattern_skips_the_mask_backward(monkeypatch):
    """No factors are recorded and the gate backward (apply_mask_grad_) never runs; w and delta get gradients."""
    n, m = 300, 3
    cfg = SparsityConfig(pattern=SparsityPattern.random, target=0.5)
    p = PoolShard(0, n, n - 5, m, cfg, seed=1)
    with torch.no_grad():
        p.delta.normal_(0, 1, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(PoolPasses, "apply_mask_grad_", lambda *a, **k: pytest.fail("mask backward ran"))
    monkeypatch.setattr(PoolPasses, "defer_mask_grad_", lambda *a, **k: pytest.fail("mask backward ran"))
    mg = LocalMerger(p, n)
    mg.begin_step(train=True)
    w = torch.tensor([0.2, 0.3, 0.5], requires_grad=True)
    (mg.merge(w) * torch.randn(n, generator=torch.Generator().manual_seed(3))).sum().backward()
    assert mg._factors == []
    assert mg.end_step(torch.ones(m)) is None
    assert p.log_alpha.grad is None and p.delta.grad.abs().sum() > 0 and w.grad.abs().sum() > 0


@pytest.mark.parametrize("structured", [False, True])
def test_random_pattern_slice_at_world_two_equals_the_single_process_slice(structured, monkeypatch):
    monkeypatch.setattr(draws, "INIT_CHUNK", 16)      # several init chunks, boundaries inside the slices
    space = FlatSpace.from_module(_Net(), pad_to=2)
    cfg = SparsityConfig(pattern=SparsityPattern.random, target=0.6, structured=structured)
    one = PoolShard.for_space(space, 0, 1, EXPERTS, cfg, seed=7)
    ranks = [PoolShard.for_space(space, r, 2, EXPERTS, cfg, seed=7) for r in range(2)]
    full = one.entry_log_alpha(0, space.padded)
    for r, p in enumerate(ranks):
        lo, hi = space.shard_range(r, 2)
        assert torch.equal(p.entry_log_alpha(0, hi - lo), full[lo:hi]), r
    assert bool((full[: space.numel].abs() == cfg.clamp).all())
    assert 0 < float((full[: space.numel] > 0).double().mean()) < 1
    if structured:   # one logit per gate group: a column of big.weight shares its logits
        i = next(i for i in space.infos if i.name == "big.weight")
        rows = full[i.offset:i.offset + i.numel].view(5, 7, EXPERTS)
        assert torch.equal(rows, rows[:1].expand_as(rows))


def test_learned_pattern_draws_the_upstream_logits_bit_for_bit():
    """pattern=learned (the default) keeps the pre-pattern initialisation: N(mean, std^2) per fixed chunk."""
    p = PoolShard(5, 700, 690, 3, SparsityConfig(), seed=4)
    g = torch.Generator().manual_seed((4 * 1_000_003 + 0 * 7919 + 17) & 0x7FFFFFFFFFFF)
    ref = torch.empty(draws.INIT_CHUNK, 3).normal_(0.0, 0.5, generator=g)[5:700]
    ref[685:] = -p.cfg.clamp
    assert torch.equal(p.log_alpha.detach(), ref) and p.log_alpha.requires_grad and not p.pattern.frozen


# ---- magnitude ----

def _reference_top(delta: torch.Tensor, numel: int, keep: int) -> torch.Tensor:
    """The top `keep` |delta| of the real entries, ties to the lowest index (a full sort: what ranks avoid)."""
    order = torch.sort(-delta[:numel].abs().float(), stable=True).indices[:keep]   # stable: ties by index
    out = torch.zeros(delta.shape[0], dtype=torch.bool)
    out[order] = True
    return out


def test_magnitude_pattern_is_dense_then_fixed_to_the_top_delta_entries():
    tau = 0.8
    s = build_local(VIT, _cfg("magnitude", tau, total=16), seed=0)      # switch at 0.5 * 16 = 8 tasks
    store, numel = s.pool.shard, s.pool.shard.numel
    for i in range(4):                                                  # tasks 0..7: dense
        out = _step(s, i)
        assert [out[f"sparsity/expert{m}"] for m in range(EXPERTS)] == [0.0] * EXPERTS
        assert [out[f"sparsity_eval/expert{m}"] for m in range(EXPERTS)] == [0.0] * EXPERTS
        assert out["sparsity/target"] == 0.0 and not s.pool.masks_fixed
    assert bool((store.log_alpha.detach()[:numel] == store.cfg.clamp).all())
    delta = store.delta.detach().clone()                              # what the switch ranks
    assert float(s.pool.controller.tasks) == 8.0
    out = _step(s, 4)                                                 # first step at the switch point
    assert s.pool.masks_fixed and out["sparsity/target"] == tau
    keep = round((1 - tau) * numel)
    for gate in ("sparsity", "sparsity_eval"):
        got = [out[f"{gate}/expert{m}"] for m in range(EXPERTS)]
        assert all(abs(v - tau) <= 1.0 / numel for v in got), (gate, got)
    la = store.log_alpha.detach()
    opened = la[:, 0] > 0
    assert all(torch.equal(la[:, m], la[:, 0]) for m in range(EXPERTS))   # delta is shared: one mask for all
    assert int(opened[:numel].sum()) == keep
    assert torch.equal(opened, _reference_top(delta, numel, keep))
    assert float(delta[:numel][opened[:numel]].abs().min()) >= float(delta[:numel][~opened[:numel]].abs().max())
    la1, d1 = la.clone(), store.delta.detach().clone()
    for i in range(5, 7):
        _step(s, i)
    assert torch.equal(store.log_alpha.detach(), la1)                 # frozen after the switch ...
    assert not torch.equal(store.delta.detach(), d1)                  # ... while delta keeps training
    assert s.pool.controller.multipliers.tolist() == [0.0] * EXPERTS


class _TwoRanks:
    """Two "ranks" in two threads of one process: reduce sums both ranks' tensors (an all-reduce)."""

    def __init__(self):
        self.barrier, self.slots, self.sizes = threading.Barrier(2), [None, None], []

    def reduce(self, rank: int):
        def fn(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t.clone()
            self.sizes.append(t.numel())
            self.barrier.wait()
            out = self.slots[0] + self.slots[1]
            self.barrier.wait()
            return out
        return fn


def _magnitude_pool(lo, hi, numel, padded, delta, reduce=None):
    cfg = MethodConfig(experts=3, total_tasks=10)
    cfg.sparsity.pattern, cfg.sparsity.target, cfg.sparsity.pattern_share = "magnitude", 0.7, 0.5
    store = PoolShard(lo, hi, numel, 3, cfg.sparsity, seed=0)
    with torch.no_grad():
        store.delta.copy_(delta[lo:hi])
    pool = Pool(store, LocalMerger(store, padded), cfg, reduce=reduce, world=2 if reduce else 1)
    pool.controller.tasks.fill_(5.0)                 # at the switch point (0.5 * 10)
    return pool


@pytest.mark.parametrize("numel", [1001, 997])
def test_magnitude_masks_of_two_slices_with_a_summing_reduce_equal_one_pool(numel):
    padded = numel + (numel % 2)
    g = torch.Generator().manual_seed(numel)
    # few distinct magnitudes (and signs): ties at the k-th value straddle the slice boundary
    delta = (torch.randn(padded, generator=g) * 3).round() / 4
    delta[numel:] = 0.0
    one = _magnitude_pool(0, padded, numel, padded, delta)
    one.begin_step(train=True)
    comm = _TwoRanks()
    pools = [_magnitude_pool(r * padded // 2, (r + 1) * padded // 2, numel, padded, delta, comm.reduce(r))
             for r in range(2)]
    threads = [threading.Thread(target=p.begin_step, kwargs={"train": True}) for p in pools]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(p.masks_fixed for p in pools) and one.masks_fixed
    sliced = torch.cat([p.shard.log_alpha.detach() for p in pools])
    assert torch.equal(sliced, one.shard.log_alpha.detach())
    keep = round(0.3 * numel)
    assert torch.equal(sliced[:, 0] > 0, _reference_top(delta, numel, keep))
    a = delta[:numel].abs()
    kth = a.sort(descending=True).values[keep - 1]
    assert int((a > kth).sum()) < keep < int((a >= kth).sum())       # the case needs a tie-break
    assert set(comm.sizes) == {1} and len(comm.sizes) <= 2 * (31 + 1 + 11)   # only counts cross ranks


def test_top_magnitude_edge_cases():
    d = torch.tensor([0.0, -2.0, 1.0, 2.0, 0.0, 5.0])
    ident = lambda t: t  # noqa: E731
    assert top_magnitude(d, 0, 5, 5, 0, ident).tolist() == [False] * 6
    assert top_magnitude(d, 0, 5, 5, 5, ident).tolist() == [True] * 5 + [False]      # padding never opens
    assert top_magnitude(d, 0, 5, 5, 1, ident).tolist() == [False, True, False, False, False, False]
    assert top_magnitude(d, 0, 5, 5, 4, ident).tolist() == [True, True, True, True, False, False]


def test_magnitude_switch_survives_a_state_round_trip():
    numel = padded = 400
    delta = torch.randn(padded, generator=torch.Generator().manual_seed(1))
    a = _magnitude_pool(0, padded, numel, padded, delta)
    a.controller.tasks.fill_(2.0)
    a.begin_step(train=True)                        # before the switch: dense
    a.end_eval()
    assert not a.masks_fixed and bool((a.shard.log_alpha.detach() > 0).all())
    before = json.loads(json.dumps({k: v for k, v in a.state_dict()["replicated"].items()
                                    if not isinstance(v, torch.Tensor)}))   # the checkpoint keeps these as JSON
    assert before["masks_fixed"] is False and before["pattern"] == "magnitude"
    pre = a.state_dict()
    a.controller.tasks.fill_(5.0)
    a.begin_step(train=True)                        # the switch
    a.end_eval()
    post = a.state_dict()
    assert post["replicated"]["masks_fixed"] is True
    # resumed after the switch: the masks are the checkpoint's and are not recomputed from a later delta
    b = _magnitude_pool(0, padded, numel, padded, torch.randn(padded))
    b.load_state_dict(post)
    assert b.masks_fixed and torch.equal(b.shard.log_alpha, a.shard.log_alpha)
    with torch.no_grad():
        b.shard.delta.mul_(-3).add_(1)
    b.begin_step(train=True)
    b.end_eval()
    assert torch.equal(b.shard.log_alpha, a.shard.log_alpha)
    # resumed before the switch: dense, and switches at the saved counter's point to the same masks
    c = _magnitude_pool(0, padded, numel, padded, torch.zeros(padded))
    c.controller.tasks.fill_(0.0)
    c.load_state_dict(pre)
    assert not c.masks_fixed and float(c.controller.tasks) == 2.0 and bool((c.shard.log_alpha > 0).all())
    c.controller.tasks.fill_(5.0)
    c.begin_step(train=True)
    c.end_eval()
    assert c.masks_fixed and torch.equal(c.shard.log_alpha, a.shard.log_alpha)


def test_replicated_state_of_other_patterns():
    """A checkpoint from before the patterns (no keys) loads as learned; a pattern mismatch is refused."""
    cfg = MethodConfig(experts=3)
    store = PoolShard(0, 50, 50, 3, cfg.sparsity)
    learned = Pool(store, LocalMerger(store, 50), cfg)
    old = {k: v for k, v in learned.replicated_state().items() if k not in ("pattern", "masks_fixed")}
    learned.load_replicated(old)
    assert not learned.masks_fixed
    with pytest.raises(ValueError, match="pattern=learned"):
        _magnitude_pool(0, 50, 50, 50, torch.zeros(50)).load_replicated(old)


# ---- config ----

SRC = ["data.sources=[shards/a]"]


def test_pattern_configs_compose_as_smat():
    for option, pattern in (("smat", "learned"), ("smat_random_masks", "random"),
                            ("smat_magnitude_masks", "magnitude")):
        cfg = compose("train", SRC + [f"method={option}", "train.tasks=77"])
        assert cfg.method.name == "smat" and cfg.method.sparsity.pattern == pattern
        base = compose("train", SRC + ["method=smat", "train.tasks=77"])
        cfg.method.sparsity.pattern = base.method.sparsity.pattern
        assert cfg.method == base.method                      # otherwise smat.yaml's settings
    structured = compose("train", SRC + ["method=smat_structured", "method.sparsity.pattern=random"])
    assert structured.method.sparsity.structured and structured.method.sparsity.pattern == "random"


@pytest.mark.parametrize("override,expected", [
    (["method.sparsity.pattern=randm"], "'method.sparsity.pattern'"),
    (["method=smat_magnitude_masks", "method.sparsity.pattern_share=0"],
     "method.sparsity.pattern_share=0.0: must be > 0 and < 1"),
    (["method=smat_magnitude_masks", "method.sparsity.pattern_share=1"],
     "method.sparsity.pattern_share=1.0: must be > 0 and < 1"),
    (["method=smat_magnitude_masks", "method.sparsity.structured=true"],
     "method.sparsity.pattern=magnitude: allowed only with method.sparsity.structured=false"),
    (["method=smat_random_masks", "method.sparsity.eval_gate=upstream", "method.sparsity.clamp=2.0"],
     "method.sparsity.clamp=2.0: must be > 2.3979"),
])
def test_bad_pattern_settings_name_the_key(override, expected):
    with pytest.raises(ConfigError) as e:
        compose("train", SRC + override)
    assert re.search(re.escape(expected), str(e.value)) and "\n" not in str(e.value), str(e.value)


def test_pattern_enum_and_threshold():
    assert [p.value for p in SparsityPattern] == ["learned", "random", "magnitude"]
    assert MethodConfig().sparsity.pattern == "learned" and MethodConfig().sparsity.pattern_share == 0.5
    assert SparsityConfig().clamp > hc.threshold(train=False) > hc.threshold(train=True)
    with pytest.raises(ValueError, match="clamp"):         # the one check (the pool trusts the validated config)
        check_pattern(SparsityConfig(pattern=SparsityPattern.random, clamp=2.0))
    with pytest.raises(ValueError, match="structured=false"):
        check_pattern(SparsityConfig(pattern=SparsityPattern.magnitude, structured=True))
