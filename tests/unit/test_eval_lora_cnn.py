"""LoRA at meta-test for CNN backbones (peft's Conv2d LoRA on the dense convs): starts at the task model,
fits the support set, restores per task, leaves the caller's backbone alone; no adaptable layer: one error."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from smat_dist.config.schema import ModelConfig
from smat_dist.eval.finetune import LoraRunner, _predict, lora_targets, support_loss
from smat_dist.model.backbone import FunctionalBackbone, build_backbone
from tests.unit.test_eval_protocol import pattern_episode


def test_lora_on_a_cnn_fits_the_support_set():
    torch.manual_seed(0)
    fb = FunctionalBackbone(build_backbone(ModelConfig(name="resnet18", image_size=32, patch_size=None)))
    targets, kind = lora_targets(fb.model)
    assert kind == "conv" and "conv1" in targets and "layer1.0.conv1" in targets
    ep = pattern_episode()
    theta = fb.theta_pre
    embed0 = lambda x: fb(theta, x)  # noqa: E731
    runner = LoraRunner(fb, rank=4, alpha=8)
    assert runner.kind == "conv" and len(runner.lora_params) == 2 * len(targets)
    before = {k: v.clone() for k, v in fb.model.state_dict().items()}
    torch.manual_seed(0)
    zero = runner.adapt(theta, ep, lr=1e-3, steps=0)
    assert torch.allclose(zero.logits, _predict(embed0, ep, 10.0), atol=1e-4)  # B = 0: the task model itself
    assert zero.support_loss_before == pytest.approx(support_loss(embed0, ep), rel=1e-5)
    torch.manual_seed(0)
    fit = runner.adapt(theta, ep, lr=1e-3, steps=8)
    assert fit.support_loss_after < 0.8 * fit.support_loss_before, fit
    torch.manual_seed(0)
    again = runner.adapt(theta, ep, lr=1e-3, steps=8)
    assert torch.equal(again.logits, fit.logits)
    assert all(torch.equal(v, fb.model.state_dict()[k]) for k, v in before.items())
    # BatchNorm keeps its running statistics: no batch statistics leak between the images of a task
    assert all(not m.training for m in runner.model.modules() if isinstance(m, nn.BatchNorm2d))


def test_lora_skips_depthwise_convs_of_an_efficientnet():
    fb = FunctionalBackbone(build_backbone(ModelConfig(name="efficientnet_lite0", image_size=32, patch_size=None)))
    targets, kind = lora_targets(fb.model)
    mods = dict(fb.model.named_modules())
    assert kind == "conv" and targets and all(mods[t].groups == 1 for t in targets)
    assert any(m.groups > 1 for m in mods.values() if isinstance(m, nn.Conv2d))  # depthwise ones exist, left out


def test_lora_without_attention_or_convs_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 8))
    with pytest.raises(ValueError, match="qkv/proj.*dense Conv2d.*Sequential has neither"):
        LoraRunner(FunctionalBackbone(model))
