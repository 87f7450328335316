"""Per-task merge of the expert pool: theta_i = theta_pre + (sum_m w_im z_m) * delta.

The masks z do not depend on the task, so a step computes them once (`begin_step`) and every task merges
from a detached leaf copy whose gradient accumulates across the step's tasks; `end_step` pushes that
accumulated gradient through the gate into the mask logits in a single backward. Per task, the merge and its
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
        z = self.pool.masks(train=train)
        self._z = z
        self._z_leaf = z.detach().requires_grad_(train)
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

    def end_step(self) -> None:
        if self._z is not None and self._z_leaf is not None and self._z_leaf.grad is not None:
            self._z.backward(self._z_leaf.grad)
        self._z = self._z_leaf = None
