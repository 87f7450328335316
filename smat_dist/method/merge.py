"""Per-task merge of the expert pool: theta_i = theta_pre + (sum_m w_im z_m) * delta.

The masks z do not depend on the task, so a step computes them once (`begin_step`, without an autograd
graph) and every task merges from them as a leaf whose gradient accumulates across the step's tasks;
`end_step` pushes that accumulated gradient through the gate into the mask logits in one fused pass,
together with the sparsity penalty's gradient. Per task, the merge and its
backward are then one [n, M] product each, the least an unfused merge can do.
"""
from __future__ import annotations

import torch

from smat_dist.method.pool import ExpertPool


class LocalMerger:
    """The whole pool lives in this process (single process, or every rank holding all of it)."""

    def __init__(self, pool: ExpertPool, padded: int):
        self.pool, self.padded = pool, padded
        self._z: torch.Tensor | None = None
        self._z_leaf: torch.Tensor | None = None

    def begin_step(self, train: bool = True) -> torch.Tensor:
        self.pool.clamp_()
        self._train = train
        z = self.pool.masks_inplace(train=train)
        self._z = z
        self._z_leaf = z.requires_grad_(train)  # no graph behind it: its gradient is applied by end_step
        return self._z_leaf

    @property
    def z(self) -> torch.Tensor:
        assert self._z_leaf is not None, "begin_step() first"
        return self._z_leaf

    def merge(self, w: torch.Tensor) -> torch.Tensor:
        d = self.pool.merge(self.z, w)
        if d.shape[0] != self.padded:  # the pool covers the whole space; pad only if the space is padded
            d = torch.nn.functional.pad(d, (0, self.padded - d.shape[0]))
        return d

    def end_step(self, penalty_coef: torch.Tensor | None = None) -> None:
        """Apply the step's accumulated mask gradient (and the sparsity penalty's) to the mask logits."""
        if self._z is not None and self._train:
            g = self._z_leaf.grad
            self._z_leaf.grad = None
            self.pool.apply_mask_grad_(self._z.detach(), g, penalty_coef, train=True)
        self._z = self._z_leaf = None
