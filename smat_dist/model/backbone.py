"""Frozen timm backbones that run functionally on a flat parameter vector."""
from __future__ import annotations

import timm
import torch
from torch import nn

from smat_dist.config.schema import ModelConfig
from smat_dist.model.flat import FlatSpace
from smat_dist.model.weights import load_pretrained


def build_backbone(cfg: ModelConfig) -> nn.Module:
    """A timm feature extractor (no classifier), frozen, in eval mode.

    Eval mode is deliberate: BatchNorm in CNN backbones then uses its running statistics, so a task's
    features do not depend on which other images share its batch and the functional forward is pure.
    """
    kwargs = dict(cfg.kwargs)
    kwargs.setdefault("num_classes", 0)
    try:
        probe = timm.models.get_pretrained_cfg(cfg.name)
    except Exception:
        probe = None
    is_vit = "vit" in cfg.name or "deit" in cfg.name
    if is_vit:
        kwargs.setdefault("img_size", cfg.image_size)
        if cfg.patch_size:
            kwargs.setdefault("patch_size", cfg.patch_size)
        kwargs.setdefault("dynamic_img_size", False)
    try:
        model = timm.create_model(cfg.name, pretrained=False, **kwargs)
    except Exception as e:
        raise ValueError(f"model.name={cfg.name!r}: timm cannot build it ({e})") from e
    del probe
    if cfg.pretrained:
        load_pretrained(model, cfg.pretrained)
    if cfg.checkpoint_blocks and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class FunctionalBackbone:
    """Runs `model` with its parameters replaced by views into a flat vector theta (length space.padded)."""

    def __init__(self, model: nn.Module, pad_to: int = 1):
        self.model = model
        self.space = FlatSpace.from_module(model, pad_to=pad_to)
        self.buffers = dict(model.named_buffers())
        self.theta_pre = self.space.flatten({n: p.detach() for n, p in model.named_parameters()})
        with torch.no_grad():
            dummy = torch.zeros(1, 3, *self._input_hw())
            self.feature_dim = int(self.model(dummy).shape[-1])

    def to(self, device: torch.device) -> "FunctionalBackbone":
        self.model.to(device)
        self.buffers = dict(self.model.named_buffers())
        self.theta_pre = self.theta_pre.to(device)
        return self

    def _input_hw(self):
        pe = getattr(self.model, "patch_embed", None)
        if pe is not None and getattr(pe, "img_size", None):
            return tuple(pe.img_size)
        return (64, 64)

    def __call__(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        params = self.space.unflatten(theta)
        params.update(self.buffers)
        return torch.func.functional_call(self.model, params, (x,))
