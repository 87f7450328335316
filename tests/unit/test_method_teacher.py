"""The blockwise dense teacher (method.teacher.blockwise): the same teacher as the default in-place path, for
a ViT and a CNN (blocks inside its stages), with and without checkpointed blocks; the same SMAT loss and
gradients; the frozen model untouched; at most one block of teacher weights formed (and alive) at a time;
a clear error without blocks; the planner's teacher memory lines."""
from __future__ import annotations

import weakref

import pytest
import torch

from smat_dist.build import build_local
from smat_dist.config.schema import MethodConfig, ModelConfig
from smat_dist.method.teacher import TeacherWeights, block_layout, park, teacher_features
from smat_dist.model.backbone import FunctionalBackbone, block_units, build_backbone
from smat_dist.train.step import smat_step
from tests.unit.test_method_smat import episodes  # noqa: F401  (fixture: the same real-image episodes)

VIT = ModelConfig(name="vit_tiny_patch16_224", image_size=32, patch_size=8,
                  kwargs={"depth": 3, "embed_dim": 32, "num_heads": 2})
VIT_CK = ModelConfig(name="vit_tiny_patch16_224", image_size=32, patch_size=8, checkpoint_blocks=True,
                     kwargs={"depth": 3, "embed_dim": 32, "num_heads": 2})
CNN = ModelConfig(name="efficientnet_lite0", image_size=32, patch_size=None, pretrained="package:efficientnet_lite0")
CNN_CK = ModelConfig(name="efficientnet_lite0", image_size=32, patch_size=None, checkpoint_blocks=True)
LR = 0.05


class CountingWeights(TeacherWeights):
    """The provider, instrumented: the numel of every block buffer it forms, and the most block numbers
    alive at once (tracked by weak-reference finalisers on the buffers, i.e. when they are really freed)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.formed: list[int] = []
        self.live = 0
        self.peak_live = 0
        self.rest_numel = 0

    def _gone(self, n):
        self.live -= n

    def rest(self):
        out = super().rest()
        self.rest_numel = sum(t.numel() for t in out.values())
        return out

    def block(self, key):
        out = super().block(key)
        bases = {id(t._base if t._base is not None else t): (t._base if t._base is not None else t)
                 for t in out.values()}
        n = sum(b.numel() for b in bases.values())
        self.formed.append(n)
        for b in bases.values():
            weakref.finalize(b, self._gone, b.numel())
        self.live += n
        self.peak_live = max(self.peak_live, self.live)
        return out


def _forwards(fb):
    """Each block's own forward override (None: the class's; checkpoint_blocks installs one per element)."""
    return {k: m.__dict__.get("forward") for k, m in fb.model.blocks.named_modules()}


def _fb(mc: ModelConfig) -> FunctionalBackbone:
    torch.manual_seed(0)
    return FunctionalBackbone(build_backbone(mc))


def _state(fb):
    return {k: v.detach().clone() for k, v in fb.model.state_dict().items()}


@pytest.mark.parametrize("mc", [VIT, VIT_CK, CNN, CNN_CK], ids=["vit", "vit-checkpointed", "cnn", "cnn-checkpointed"])
def test_blockwise_teacher_equals_dense_and_holds_one_block(mc):
    fb = _fb(mc)
    P = fb.space.numel
    gen = torch.Generator().manual_seed(1)
    theta = fb.theta_pre + 1e-2 * torch.randn(fb.space.padded, generator=gen)
    g = torch.randn(fb.space.padded, generator=gen)
    x = torch.randn(4, 3, 32, 32, generator=gen)
    before = _state(fb)
    forwards = _forwards(fb)
    g_before = g.clone()

    dense = fb(g.clone().mul_(-LR).add_(theta), x)     # the default path's arithmetic
    w = CountingWeights(fb, theta, park(g), LR)
    blockwise = teacher_features(fb, theta, park(g), LR, x, weights=w)
    torch.testing.assert_close(blockwise, dense, rtol=1e-6, atol=1e-6)
    assert float(dense.abs().max()) > 0

    layout = block_layout(fb)
    assert len(w.formed) == len(block_units(fb.model))  # every block asked for its weights exactly once
    assert max(w.formed) <= layout.largest_block < P  # no buffer larger than one block...
    assert w.peak_live <= layout.largest_block        # ...and never two blocks' weights alive together
    assert w.live == 0                                 # all released after the forward
    assert w.rest_numel + sum(w.formed) == P          # the non-block tensors + the blocks cover theta once
    # nothing of the real module changed: weights, buffers, and the block forwards (checkpointing ones too)
    after = _state(fb)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert _forwards(fb) == forwards
    assert torch.equal(g, g_before)                    # the (parked) gradient is read, not overwritten
    torch.testing.assert_close(fb(g.clone().mul_(-LR).add_(theta), x), dense, rtol=0, atol=0)  # plain path as before


def test_forwards_restored_when_the_provider_fails():
    fb = _fb(VIT_CK)
    forwards = _forwards(fb)
    assert all(forwards[k] is not None for k, _ in fb.model.blocks.named_children())  # checkpointing's

    class Failing(TeacherWeights):
        def block(self, key):
            if key == "1":
                raise RuntimeError("provider failed")
            return super().block(key)

    theta = fb.theta_pre.clone()
    with pytest.raises(RuntimeError, match="provider failed"):
        teacher_features(fb, theta, torch.zeros_like(theta), LR, torch.zeros(1, 3, 32, 32),
                         weights=Failing(fb, theta, torch.zeros_like(theta), LR))
    assert _forwards(fb) == forwards


def test_model_without_blocks_is_refused():
    fb = FunctionalBackbone(build_backbone(ModelConfig(name="resnet18", image_size=32, patch_size=None)))
    theta = fb.theta_pre
    with pytest.raises(ValueError, match=r"method\.teacher\.blockwise=true: ResNet has no 'blocks'"):
        teacher_features(fb, theta, torch.zeros_like(theta), LR, torch.zeros(1, 3, 32, 32))


def _train(mc: ModelConfig, blockwise: bool, episodes):
    cfg = MethodConfig(experts=2, warmup_tasks=0, total_tasks=10_000)
    cfg.teacher.blockwise = blockwise
    s = build_local(mc, cfg, seed=0)
    with torch.no_grad():
        s.pool.shard.delta.normal_(0, 1e-2, generator=torch.Generator().manual_seed(3))
    before = _state(s.fb)
    grads: dict[str, torch.Tensor] = {}

    def hook(o, args, kwargs):
        for grp in o.param_groups:
            for i, p in enumerate(grp["params"]):
                if p.grad is not None:
                    grads[f"{grp.get('name', 'group')}.{i}"] = p.grad.detach().clone()

    s.pool.optimizer.opt.register_step_pre_hook(hook)
    s.hyper.opt.register_step_pre_hook(hook)
    torch.manual_seed(123)
    out = smat_step(s.method, s.pool, s.hyper, episodes[:2], 0, 0)
    after = _state(s.fb)
    assert all(torch.equal(before[k], after[k]) for k in before)   # the frozen backbone is untouched
    return out, grads


@pytest.mark.parametrize("mc", [VIT, VIT_CK], ids=["vit", "vit-checkpointed"])
def test_smat_task_same_loss_and_gradients(mc, episodes):
    dense, g_dense = _train(mc, False, episodes)
    blockwise, g_block = _train(mc, True, episodes)
    assert dense["loss/kd_dense"] > 0
    for key in ("loss/task", "loss/kd_dense", "acc/teacher", "loss/query_ce"):
        assert blockwise[key] == pytest.approx(dense[key], rel=1e-6, abs=1e-7), key
    assert g_dense.keys() == g_block.keys() and len(g_dense) > 2
    for k in g_dense:
        torch.testing.assert_close(g_block[k], g_dense[k], rtol=1e-5, atol=1e-7, msg=k)
    assert any(float(g.abs().sum()) > 0 for g in g_dense.values())


def test_plan_counts_one_block_on_the_device_and_the_gradient_on_the_host():
    from smat_dist.bench.plan import parse_kv, plan

    kw = dict(experts=2, image_size=32, patch_size=8, kwargs={"depth": 3, "embed_dim": 32, "num_heads": 2})
    dense, block = plan(VIT.name, **kw), plan(VIT.name, teacher_blockwise=True, **kw)
    fb = _fb(VIT)
    layout = block_layout(fb)
    P, padded = fb.space.numel, dense["padded"]
    assert block["largest_block"] == layout.largest_block and not dense["teacher_blockwise"]
    assert dense["host_bytes"]["teacher_gradient"] == 0 and block["host_bytes"]["teacher_gradient"] == 4 * padded
    teacher_device = 4 * (layout.largest_block + sum(i.numel for i in layout.rest))
    assert dense["memory_bytes"]["task_weights"] - block["memory_bytes"]["task_weights"] == 4 * padded - teacher_device
    assert dense["memory_bytes"]["task_grads"] - block["memory_bytes"]["task_grads"] == 4 * padded
    assert block["peak_bytes"]["sharded"] < dense["peak_bytes"]["sharded"]
    assert P == dense["params"]
    assert parse_kv(["teacher_blockwise=true"]) == {"teacher_blockwise": True}
    with pytest.raises(ValueError, match="teacher_blockwise"):
        parse_kv(["teacher_blockwise=maybe"])
    with pytest.raises(ValueError, match=r"method\.teacher\.blockwise"):
        plan("resnet18", image_size=32, patch_size=None, teacher_blockwise=True)
