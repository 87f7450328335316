"""Optimisers and the warmup-cosine schedule on the global task counter.

delta: SGD (momentum 0.9, wd 1e-4); mask logits: SGD lr 1e6, no momentum, global grad-norm clip 5;
multipliers: their own update rule (controller.py); hypernetwork: AdamW lr 1e-4, wd 1e-2, clip 1.
The pool optimiser only ever touches this rank's slice, so its state is local and saved per rank.
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


class PoolOptimizer:
    def __init__(self, pool, cfg: MethodConfig):
        self.pool, self.cfg = pool, cfg
        sp = cfg.sparsity
        self.opt = torch.optim.SGD([
            {"params": [pool.delta], "lr": cfg.delta_lr, "momentum": cfg.delta_momentum,
             "weight_decay": cfg.delta_weight_decay, "name": "delta", "base_lr": cfg.delta_lr},
            {"params": [pool.log_alpha], "lr": sp.mask_lr, "momentum": 0.0, "weight_decay": 0.0,
             "name": "log_alpha", "base_lr": sp.mask_lr},
        ])

    def step(self, factor: float, reduce=None, grad_sq: torch.Tensor | None = None) -> dict[str, float]:
        """`reduce` sums a tensor over ranks (the clip norm is global over the whole pool); `grad_sq` is this
        slice's squared gradient norm when the gate backward already computed it."""
        pool = self.pool
        if getattr(pool, "frozen", False):   # a fixed mask pattern: the logits never step (drops the gather
            pool.log_alpha.grad = None       # path's autograd gradient; the other paths form none)
        g = pool.log_alpha.grad
        deferred = pool.has_deferred
        out = {}
        scale = 1.0
        if g is not None or deferred:
            sq = grad_sq
            if sq is None:
                owned = pool.owned
                if owned is None:
                    # Chunked float64 accumulation: no [n, M] float64 copy (2.8 GB at ViT-Ti x 64 experts).
                    sq = sum(g[a:a + (1 << 15)].square().sum(dtype=torch.float64)
                             for a in range(0, g.shape[0], 1 << 15))
                else:  # a structured gate shared by several ranks counts once (on the lowest of them)
                    sq = (g.square().sum(1, dtype=torch.float64) * owned).sum()
            sq = torch.as_tensor(sq, dtype=torch.float64, device=pool.log_alpha.device).reshape(1)
            sq = reduce(sq) if reduce is not None else sq
            norm = float(sq.sqrt())
            clip = self.cfg.sparsity.mask_clip
            if norm > clip:
                # Plain SGD without momentum or decay: scaling the step is scaling the gradient, without a
                # pass over the [n, M] gradient.
                scale = clip / (norm + 1e-12)
            out["grad_norm/log_alpha"] = norm
        for grp in self.opt.param_groups:
            grp["lr"] = grp["base_lr"] * factor * (scale if grp["name"] == "log_alpha" else 1.0)
        self.opt.step()
        if deferred:  # the lean pool's logits: gradient recomputed chunk by chunk inside the update
            pool.step_deferred_(self.opt.param_groups[1]["lr"])
        self.opt.zero_grad(set_to_none=True)
        return out

    def state_dict(self):
        return self.opt.state_dict()

    def load_state_dict(self, sd):
        self.opt.load_state_dict(sd)


def hypernet_optimizer(params, cfg: MethodConfig) -> torch.optim.Optimizer:
    h = cfg.hypernet
    return torch.optim.AdamW([{"params": list(params), "lr": h.lr, "weight_decay": h.weight_decay,
                               "name": "hypernet", "base_lr": h.lr}])


class HyperOptimizer(Protocol):
    def backward(self, loss: torch.Tensor, tasks_per_step: int) -> None: ...
    def step(self, factor: float) -> dict[str, float]: ...
    def with_full_params(self, fn) -> None: ...  # run fn with every replicated parameter whole (ZeRO-3 gathers)


class TorchHyperOptimizer:
    """Single-process optimiser for the replicated trainables (hypernetwork, or P>M>F's dense weights)."""

    def __init__(self, optimizer: torch.optim.Optimizer, clip: float | None):
        self.opt, self.clip = optimizer, clip

    def backward(self, loss: torch.Tensor, tasks_per_step: int) -> None:
        (loss / tasks_per_step).backward()

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
