"""A `Tap(None)` forward makes each unit's parameter views just before the unit runs, so a backward hands each
unit's per-tensor gradients over right after that unit (the views made up front are the graph's oldest nodes,
which the engine reaches last). The same bits as the up-front views: features, per-tensor and flat gradients,
and three SMAT steps with the in-place teacher against main's up-front tap."""
from __future__ import annotations

import pytest
import torch

from smat_dist.build import build_local
from smat_dist.config.schema import MethodConfig, ModelConfig
from smat_dist.method.teacher import DenseTeacher
from smat_dist.model.backbone import FunctionalBackbone, Tap, block_units, build_backbone
from smat_dist.train.step import smat_step
from tests.unit.test_method_smat import VIT, episodes  # noqa: F401  (fixture)

VIT3 = ModelConfig(name="vit_tiny_patch16_224", image_size=32, patch_size=8,
                   kwargs={"depth": 3, "embed_dim": 32, "num_heads": 2})
VIT3_CK = ModelConfig(name="vit_tiny_patch16_224", image_size=32, patch_size=8, checkpoint_blocks=True,
                      kwargs={"depth": 3, "embed_dim": 32, "num_heads": 2})
CNN = ModelConfig(name="efficientnet_lite0", image_size=32, patch_size=None, pretrained="package:efficientnet_lite0")


def _fb(mc: ModelConfig) -> FunctionalBackbone:
    torch.manual_seed(0)
    return FunctionalBackbone(build_backbone(mc))


def _theta(fb: FunctionalBackbone) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return (fb.theta_pre + 1e-2 * torch.randn(fb.theta_pre.shape, generator=g)).requires_grad_(True)


def _x(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("mc", [VIT3, VIT3_CK, CNN], ids=["vit", "vit-checkpointed", "cnn"])
def test_by_unit_views_same_bits_as_up_front(mc):
    fb = _fb(mc)
    theta, x = _theta(fb), _x()
    out = {}
    for by_unit in (False, True):
        tap = Tap(None, by_unit=by_unit)
        f = fb(theta, x, tap=tap)
        loss = (f * torch.linspace(-1, 1, f.shape[-1])).square().sum()
        names = [i.name for i in fb.space.infos]
        assert set(names) <= set(tap.params)
        per_tensor = torch.autograd.grad(loss, [tap.params[n] for n in names], retain_graph=True)
        (flat,) = torch.autograd.grad(loss, [theta])
        out[by_unit] = (f.detach(), per_tensor, flat)
    (fa, ga, flat_a), (fb_, gb, flat_b) = out[False], out[True]
    assert torch.equal(fa, fb_)
    assert all(torch.equal(a, b) for a, b in zip(ga, gb))
    assert torch.equal(flat_a, flat_b) and float(flat_b.abs().sum()) > 0


def _handover_order(fb: FunctionalBackbone, by_unit: bool) -> tuple[int, int]:
    """(when the last unit's weight gradients are handed over, when the first unit's input gradient is
    formed), as positions in the order the backward's hooks ran."""
    theta, x = _theta(fb), _x()
    tap = Tap(None, by_unit=by_unit)
    first_key, first = block_units(fb.model)[0]
    last_key = block_units(fb.model)[-1][0]
    seen = {}
    handle = first.register_forward_pre_hook(lambda _m, args: seen.setdefault("input", args[0]))
    try:
        f = fb(theta, x, tap=tap)
    finally:
        handle.remove()
    events = []
    seen["input"].register_hook(lambda g: events.append("first unit's input"))
    last = [n for n in tap.params if n.startswith(f"blocks.{last_key}.") and tap.params[n].requires_grad]
    for n in last:
        tap.params[n].register_hook(lambda g: events.append("last unit's weights"))
    torch.autograd.grad(f.square().sum(), [tap.params[i.name] for i in fb.space.infos])   # the whole backward
    return events.index("last unit's weights"), events.index("first unit's input")


@pytest.mark.parametrize("mc", [VIT3, CNN], ids=["vit", "cnn"])
def test_each_units_gradients_are_handed_over_right_after_its_backward(mc):
    fb = _fb(mc)
    weights, first_input = _handover_order(fb, by_unit=True)
    assert weights < first_input           # before the backward went on through the units below
    weights, first_input = _handover_order(fb, by_unit=False)
    assert weights > first_input           # up front: held to the backward's end


class UpFrontTeacher(DenseTeacher):
    """main's in-place teacher: the student's query pass binds every view up front."""

    def tap(self) -> Tap:
        return Tap(None, by_unit=False)


def test_smat_steps_bitwise_equal_to_the_up_front_tap(episodes):  # noqa: F811
    runs = []
    for reference in (False, True):
        cfg = MethodConfig(experts=4, warmup_tasks=0, total_tasks=100)
        s = build_local(VIT, cfg, seed=0)
        if reference:
            s.method.teacher = UpFrontTeacher(s.fb, cfg.teacher, cfg.logit_scale)
        assert isinstance(s.method.teacher.tap(), Tap) and s.method.teacher.tap().by_unit is not reference
        outs = [smat_step(s.method, s.pool, s.hyper, [episodes[2 * i], episodes[2 * i + 1]], 2 * i, 2 * i)
                for i in range(3)]
        runs.append((s, outs))
    (a, oa), (b, ob) = runs
    assert oa == ob and oa[0]["loss/kd_dense"] > 0
    assert torch.equal(a.pool.shard.delta, b.pool.shard.delta)
    assert torch.equal(a.pool.shard.log_alpha, b.pool.shard.log_alpha)
    ha, hb = a.method.hypernet.state_dict(), b.method.hypernet.state_dict()
    assert ha.keys() == hb.keys() and all(torch.equal(ha[k], hb[k]) for k in ha)
    assert not torch.equal(a.pool.shard.delta, torch.zeros_like(a.pool.shard.delta))   # the steps did update
