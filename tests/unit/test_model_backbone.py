"""The functional backbone and its flat parameter space: the same function as the timm module, views whose
gradient lands in the one flat vector (also when padded), and layouts told apart."""
from __future__ import annotations

import pytest
import torch

from smat_dist.config.schema import ModelConfig
from smat_dist.model.backbone import FunctionalBackbone, build_backbone
from smat_dist.model.flat import FlatSpace

VIT = ModelConfig(name="vit_tiny_patch16_224", image_size=32, patch_size=8,
                  kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2})
CNN = ModelConfig(name="efficientnet_lite0", image_size=32, patch_size=None)


@pytest.mark.parametrize("cfg", [VIT, CNN], ids=["vit", "cnn"])
def test_functional_forward_equals_module_and_is_frozen(cfg):
    torch.manual_seed(0)
    fb = FunctionalBackbone(build_backbone(cfg), pad_to=7)
    assert fb.space.padded % 7 == 0 and fb.space.padded >= fb.space.numel
    assert not fb.model.training and all(not p.requires_grad for p in fb.model.parameters())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = fb.model(x)
        out = fb(fb.theta_pre, x)
    assert out.shape == (3, fb.feature_dim)
    assert torch.allclose(out, ref, atol=1e-5)
    # eval-mode BatchNorm: an image's features do not depend on its batch mates
    with torch.no_grad():
        assert torch.allclose(fb(fb.theta_pre, x[:1]), out[:1], atol=1e-5)


def test_flat_views_carry_gradient_into_the_vector_with_padding():
    torch.manual_seed(0)
    fb = FunctionalBackbone(build_backbone(VIT), pad_to=1000)
    sp = fb.space
    assert sp.padded > sp.numel  # padding present
    theta = fb.theta_pre.clone().requires_grad_(True)
    params = sp.unflatten(theta)
    for info in sp.infos:
        assert params[info.name].shape == info.shape
        assert torch.equal(params[info.name].detach().reshape(-1), fb.theta_pre[info.offset:info.offset + info.numel])
    # gradient of sum_k c_k * sum(param_k) is c_k on param k's entries and 0 on the padding
    loss = sum((k + 1) * params[i.name].sum() for k, i in enumerate(sp.infos))
    loss.backward()
    expect = torch.zeros(sp.padded)
    for k, i in enumerate(sp.infos):
        expect[i.offset:i.offset + i.numel] = k + 1
    assert torch.equal(theta.grad, expect)
    # and through a real forward: every parameter tensor gets a gradient, the padding none
    theta.grad = None
    fb(theta, torch.randn(2, 3, 32, 32)).pow(2).sum().backward()
    assert float(theta.grad[sp.numel:].abs().sum()) == 0.0
    assert all(float(theta.grad[i.offset:i.offset + i.numel].abs().sum()) > 0 for i in sp.infos)


def test_flatten_unflatten_round_trip_and_layout_signature():
    m = build_backbone(VIT)
    sp = FlatSpace.from_module(m, pad_to=4)
    flat = sp.flatten(dict(m.named_parameters()))
    back = sp.unflatten(flat)
    assert all(torch.equal(back[n], p) for n, p in m.named_parameters())
    assert sp.with_padding(8).signature() == sp.signature()
    other = FlatSpace.from_module(build_backbone(ModelConfig(name="vit_tiny_patch16_224", image_size=32, patch_size=8,
                                                             kwargs={"depth": 3, "embed_dim": 32, "num_heads": 2})))
    assert other.signature() != sp.signature()
    lo, hi = sp.shard_range(1, 4)
    assert hi - lo == sp.padded // 4
    world = next(w for w in range(3, 100) if sp.padded % w)
    with pytest.raises(ValueError, match=f"multiple of world size {world}"):
        sp.shard_range(0, world)
    kinds = {i.name: i.kind for i in sp.infos}
    assert kinds["blocks.0.attn.qkv.weight"] == "qkv" and kinds["pos_embed"] == "embed"
    assert kinds["blocks.1.mlp.fc2.weight"] == "mlp_out" and kinds["blocks.0.norm1.weight"] == "norm"


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="model.name='no_such_net'"):
        build_backbone(ModelConfig(name="no_such_net"))


@pytest.mark.parametrize("cfg", [VIT, CNN])
def test_frozen_backbone_is_held_once(cfg):
    """The module's weights are views into theta_pre (one copy of the backbone, not two); the module's own
    forward and the functional one on theta_pre agree, and a deep copy (LoRA's) does not write through."""
    import copy

    fb = FunctionalBackbone(build_backbone(cfg))
    base = fb.theta_pre.untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == base for p in fb.model.parameters())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fb.model(x), fb(fb.theta_pre, x), rtol=0, atol=0)
        before = fb.theta_pre.clone()
        for p in copy.deepcopy(fb.model).parameters():
            p.add_(1.0)
    assert torch.equal(fb.theta_pre, before)
