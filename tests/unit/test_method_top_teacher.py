"""The top teacher (method.teacher.top_fraction < 1): its logits are those of the dense SGD step with every
tensor below its first block held still, for a ViT and a CNN (blocks inside stages), with and without
checkpointed blocks; its gradient never reaches below that block; the layout rounds up and names the top;
bad settings are refused; SMAT trains with it and the bench counts its shorter passes."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from smat_dist.build import build_local
from smat_dist.config.schema import MethodConfig, ModelConfig, TeacherConfig
from smat_dist.method.protonet import cosine_logits
from smat_dist.method.teacher import DenseTeacher, top_layout
from smat_dist.model.backbone import FunctionalBackbone, block_units, build_backbone
from smat_dist.train.step import smat_step
from tests.unit.test_method_smat import episodes  # noqa: F401  (fixture: the same real-image episodes)
from tests.unit.test_method_teacher import CNN, CNN_CK, VIT, VIT_CK, _forwards, _state

LR = 0.05


def _fb(mc: ModelConfig) -> FunctionalBackbone:
    torch.manual_seed(0)
    return FunctionalBackbone(build_backbone(mc))


@pytest.mark.parametrize("mc", [VIT, VIT_CK, CNN, CNN_CK], ids=["vit", "vit-checkpointed", "cnn", "cnn-checkpointed"])
def test_top_teacher_is_the_dense_step_with_the_bottom_held(mc):
    fb = _fb(mc)
    gen = torch.Generator().manual_seed(1)
    theta1 = (fb.theta_pre + 1e-2 * torch.randn(fb.space.padded, generator=gen)).requires_grad_(True)
    ways = 3
    p1 = torch.randn(ways, fb.feature_dim, generator=gen).requires_grad_(True)
    xq = torch.randn(6, 3, 32, 32, generator=gen)
    yq = torch.arange(ways).repeat(2)
    before, forwards = _state(fb), _forwards(fb)

    teacher = DenseTeacher(fb, TeacherConfig(lr=LR, top_fraction=0.5), logit_scale=10.0)
    layout = teacher.layout
    units = [k for k, _ in block_units(fb.model)]
    assert layout.unit == units[len(units) - math.ceil(len(units) / 2)]
    tap = teacher.tap()
    fq = fb(theta1, xq, tap=tap)
    assert tap.activation is not None and tap.activation.requires_grad
    ce = F.cross_entropy(cosine_logits(fq, p1, 10.0), yq)
    reached = []
    tap.activation.register_hook(lambda g: reached.append(1))
    grads = teacher.gradient(ce, theta1, p1, tap)
    assert reached == []                      # the teacher's backward stopped at its first block

    g_full, g_head = torch.autograd.grad(ce, [theta1, p1], retain_graph=True)
    assert reached == [1]                     # ...which a whole backward does go through
    mask = torch.zeros_like(theta1)
    adapted = set(layout.names)
    for info in fb.space.infos:
        if info.name in adapted:
            mask[info.offset:info.offset + info.numel] = 1
    for name, g in zip(layout.names, grads[0]):
        info = next(i for i in fb.space.infos if i.name == name)
        torch.testing.assert_close(g.reshape(-1), g_full[info.offset:info.offset + info.numel], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[1], g_head, rtol=1e-5, atol=1e-7)

    top = teacher.logits(grads, theta1, p1, xq, tap)
    with torch.no_grad():
        ref = cosine_logits(fb(theta1.detach() - LR * g_full * mask, xq), p1.detach() - LR * g_head, 10.0)
        whole = cosine_logits(fb(theta1.detach() - LR * g_full, xq), p1.detach() - LR * g_head, 10.0)
    torch.testing.assert_close(top, ref, rtol=1e-5, atol=1e-5)
    assert float((whole - ref).abs().max()) > 1e-5   # the held bottom matters: not the whole-model teacher
    after = _state(fb)
    assert all(torch.equal(before[k], after[k]) for k in before) and _forwards(fb) == forwards


def test_layout_rounds_up_and_names_the_top():
    fb = _fb(VIT)   # 3 blocks
    assert top_layout(fb, 1 / 3).unit == "2" and top_layout(fb, 0.34).unit == "1"
    assert top_layout(fb, 0.01).unit == "2" and top_layout(fb, 1.0).unit == "0"
    names = top_layout(fb, 1 / 3).names
    assert {"norm.weight", "norm.bias", "blocks.2.mlp.fc2.weight"} <= set(names)
    assert not any(n.startswith(("blocks.0.", "blocks.1.", "patch_embed.")) or n in ("cls_token", "pos_embed")
                   for n in names)
    cnn = top_layout(_fb(CNN), 0.25).names
    assert {"conv_head.weight", "bn2.weight"} <= set(cnn) and not any(n.startswith(("conv_stem", "bn1.")) for n in cnn)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"method\.teacher\.top_fraction"):
            top_layout(fb, bad)


def test_bad_settings_are_refused():
    fb = _fb(VIT)
    with pytest.raises(ValueError, match=r"blockwise=true and method\.teacher\.top_fraction=0\.5: choose one"):
        DenseTeacher(fb, TeacherConfig(blockwise=True, top_fraction=0.5), 10.0)
    resnet = FunctionalBackbone(build_backbone(ModelConfig(name="resnet18", image_size=32, patch_size=None)))
    with pytest.raises(ValueError, match=r"top_fraction=0\.5.*ResNet has no 'blocks'"):
        DenseTeacher(resnet, TeacherConfig(top_fraction=0.5), 10.0)
    assert DenseTeacher(resnet, TeacherConfig(), 10.0).layout is None   # the default teacher needs no blocks
    t = DenseTeacher(fb, TeacherConfig(top_fraction=0.5), 10.0)
    with pytest.raises(RuntimeError, match="without the teacher's tap"):
        t.gradient(torch.zeros(()), fb.theta_pre, torch.zeros(2, 2), None)


def test_smat_trains_with_the_top_teacher(episodes):
    def run(top):
        cfg = MethodConfig(experts=2, warmup_tasks=0, total_tasks=10_000)
        cfg.teacher.top_fraction = top
        s = build_local(VIT, cfg, seed=0)
        with torch.no_grad():
            s.pool.shard.delta.normal_(0, 1e-2, generator=torch.Generator().manual_seed(3))
        torch.manual_seed(123)
        outs = [smat_step(s.method, s.pool, s.hyper, episodes[i:i + 1], i, i) for i in range(3)]
        return outs, s

    whole, _ = run(1.0)
    top, s = run(0.5)
    # the student's own pass is unchanged; only the teacher (and so the KD term) differs
    assert top[0]["loss/query_ce"] == pytest.approx(whole[0]["loss/query_ce"], rel=1e-6)
    assert top[0]["loss/kd_dense"] > 0 and top[0]["loss/kd_dense"] != pytest.approx(whole[0]["loss/kd_dense"])
    assert all(math.isfinite(o["loss/task"]) for o in top)
    moved, _ = run(0.5)
    assert [o["loss/task"] for o in moved] == [o["loss/task"] for o in top]   # deterministic
    assert top[2]["loss/task"] != pytest.approx(whole[2]["loss/task"])        # the teacher steered training
