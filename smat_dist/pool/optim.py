"""The pool's optimiser: SGD over this rank's shard.

delta: SGD (momentum 0.9, wd 1e-4); mask logits: SGD lr 1e6, no momentum, global grad-norm clip 5 (one
all-reduce of the squared norm); the multipliers have their own update rule (controller.py). It only ever
touches this rank's slice, so its state is local and saved per rank (the momentum with the pool's tensors).
"""
from __future__ import annotations

import torch

from smat_dist.config.schema import MethodConfig
from smat_dist.pool.ordered import ordered_sum


def clip_scale(grad_norm: float | None, clip: float) -> float | None:
    """The factor the clip applies to the logits' step (PoolOptimizer.step's rule); None without a gradient."""
    if grad_norm is None:
        return None
    return clip / (grad_norm + 1e-12) if grad_norm > clip else 1.0


class PoolOptimizer:
    """SGD over one shard's delta and mask logits."""

    def __init__(self, shard, cfg: MethodConfig):
        self.shard, self.cfg = shard, cfg
        sp = cfg.sparsity
        self.opt = torch.optim.SGD([
            {"params": [shard.delta], "lr": cfg.delta_lr, "momentum": cfg.delta_momentum,
             "weight_decay": cfg.delta_weight_decay, "name": "delta", "base_lr": cfg.delta_lr},
            {"params": [shard.log_alpha], "lr": sp.mask_lr, "momentum": 0.0, "weight_decay": 0.0,
             "name": "log_alpha", "base_lr": sp.mask_lr},
        ])

    def step(self, factor: float, reduce=None, grad_sq: torch.Tensor | None = None) -> dict[str, float]:
        """`reduce` sums a tensor over ranks (the clip norm is global over the whole pool); `grad_sq` is this
        slice's squared gradient norm when the gate backward already computed it."""
        shard = self.shard
        if shard.pattern.frozen:           # a frozen mask pattern: the logits never step (drops the gather
            shard.log_alpha.grad = None    # path's autograd gradient; the other paths form none)
        g = shard.log_alpha.grad
        deferred = shard.passes.has_deferred
        out = {}
        scale = 1.0
        if g is not None or deferred:
            sq = grad_sq
            if sq is None:
                owned = shard.owned
                if owned is None:
                    # Chunked float64 accumulation: no [n, M] float64 copy (2.8 GB at ViT-Ti x 64 experts).
                    sq = sum(g[a:a + (1 << 15)].square().sum(dtype=torch.float64)
                             for a in range(0, g.shape[0], 1 << 15))
                else:  # a structured gate shared by several ranks counts once (on the lowest of them)
                    sq = (g.square().sum(1, dtype=torch.float64) * owned).sum()
            # per-chunk partials at their global chunks (ordered.py) or one number: added in global order
            sq = torch.as_tensor(sq, dtype=torch.float64, device=shard.log_alpha.device).reshape(-1)
            sq = reduce(sq) if reduce is not None else sq
            norm = float(ordered_sum(sq).sqrt())
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
            shard.passes.step_deferred_(self.opt.param_groups[1]["lr"])
        self.opt.zero_grad(set_to_none=True)
        return out

    def state_dict(self):
        return self.opt.state_dict()

    def load_state_dict(self, sd):
        self.opt.load_state_dict(sd)
