"""Optimisers and the warmup-cosine schedule on the global task counter.

hypernetwork: AdamW lr 1e-4, wd 1e-2, clip 1 (the pool's own optimiser is smat_dist.pool.optim's).
"""
from __future__ import annotations

import math
from typing import Protocol

import torch

from smat_dist.config.schema import MethodConfig


def lr_factor(tasks: int, cfg: MethodConfig) -> float:
    if cfg.warmup_tasks > 0 and tasks < cfg.warmup_tasks:
        return (tasks + 1) / cfg.warmup_tasks
    span = max(1, cfg.total_tasks - cfg.warmup_tasks)
    progress = min(1.0, (tasks - cfg.warmup_tasks) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def hypernet_optimizer(params, cfg: MethodConfig) -> torch.optim.Optimizer:
    h = cfg.hypernet
    return torch.optim.AdamW([{"params": list(params), "lr": h.lr, "weight_decay": h.weight_decay,
                               "name": "hypernet", "base_lr": h.lr}])


class HyperOptimizer(Protocol):
    # one call per task (tasks_per_step per step); prescaled: the loss already carries the 1/tasks_per_step
    def backward(self, loss: torch.Tensor, tasks_per_step: int, prescaled: bool = False) -> None: ...
    def step(self, factor: float) -> dict[str, float]: ...
    def with_full_params(self, fn) -> None: ...  # run fn with every replicated parameter whole (ZeRO-3 gathers)


class TorchHyperOptimizer:
    """Single-process optimiser for the replicated trainables (hypernetwork, or P>M>F's dense weights)."""

    def __init__(self, optimizer: torch.optim.Optimizer, clip: float | None):
        self.opt, self.clip = optimizer, clip

    def backward(self, loss: torch.Tensor, tasks_per_step: int, prescaled: bool = False) -> None:
        (loss if prescaled else loss / tasks_per_step).backward()

    def step(self, factor: float) -> dict[str, float]:
        params = [p for g in self.opt.param_groups for p in g["params"]]
        out = {}
        if self.clip:
            out["grad_norm/hypernet"] = float(torch.nn.utils.clip_grad_norm_(params, self.clip))
        for g in self.opt.param_groups:
            g["lr"] = g.get("base_lr", g["lr"]) * factor
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return out

    def with_full_params(self, fn) -> None:
        fn()

    def state_dict(self):
        return self.opt.state_dict()

    def load_state_dict(self, sd):
        self.opt.load_state_dict(sd)
