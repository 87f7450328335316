"""Baselines in the same code: the pre-trained ProtoNet and P>M>F (dense meta-tuning of every weight).

P>M>F trains theta = theta_pre + delta densely with one forward of support+query and one backward per task,
a ProtoNet head with a learnable scale (init 10) and bias, SGD with momentum. The pre-trained baseline is
the same head on theta_pre with no training.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smat_dist.config.schema import MethodConfig
from smat_dist.method.protonet import accuracy_t, cosine_logits, prototypes
from smat_dist.method.smat import TaskResult, _episode_tensors
from smat_dist.model.backbone import FunctionalBackbone


class PMF(nn.Module):
    def __init__(self, backbone: FunctionalBackbone, cfg: MethodConfig):
        super().__init__()
        self.fb, self.cfg = backbone, cfg
        self.delta = nn.Parameter(torch.zeros(backbone.space.padded))
        # Shape [1], not 0-dim: DeepSpeed's broadcast and clipping do not handle 0-dim parameters.
        self.scale = nn.Parameter(torch.full((1,), cfg.logit_scale))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fb(self.fb.theta_pre + self.delta, x)

    def logits(self, fq, protos):
        return cosine_logits(fq, protos, 1.0) * self.scale + self.bias

    def task(self, ep, pool=None, task_index: int = 0, train: bool = True) -> TaskResult:
        xs, ys, xq, yq, ways = _episode_tensors(ep)
        f = self(torch.cat([xs, xq]))
        logits = self.logits(f[len(xs):], prototypes(f[: len(xs)], ys, ways))
        ce = F.cross_entropy(logits, yq)
        return TaskResult(loss=ce, w=torch.zeros(0), metrics={
            "loss/query_ce": ce.detach(), "loss/task": ce.detach(), "acc/query": accuracy_t(logits, yq),
            "episode/ways": float(ways), "episode/support": float(len(xs)), "episode/query": float(len(xq))})

    @torch.no_grad()
    @torch.no_grad()
    def task_theta(self, ep, pool=None) -> torch.Tensor:
        """The dense weights fine-tuning at meta-test starts from (the same for every task)."""
        return self.fb.theta_pre + self.delta.detach()

    def predict(self, ep, pool=None) -> torch.Tensor:
        xs, ys, xq, _, ways = _episode_tensors(ep)
        f = self(torch.cat([xs, xq]))
        return self.logits(f[len(xs):], prototypes(f[: len(xs)], ys, ways))


class Pretrained(nn.Module):
    """No meta-tuning: the frozen backbone's ProtoNet with SMAT's cosine head."""

    def __init__(self, backbone: FunctionalBackbone, cfg: MethodConfig):
        super().__init__()
        self.fb, self.cfg = backbone, cfg

    @torch.no_grad()
    def task_theta(self, ep, pool=None) -> torch.Tensor:
        return self.fb.theta_pre

    def predict(self, ep, pool=None) -> torch.Tensor:
        xs, ys, xq, _, ways = _episode_tensors(ep)
        f = self.fb(self.fb.theta_pre, torch.cat([xs, xq]))
        return cosine_logits(f[len(xs):], prototypes(f[: len(xs)], ys, ways), self.cfg.logit_scale)
