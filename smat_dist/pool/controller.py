"""Per-expert Lagrangian sparsity controller (one-sided, multipliers in the state_dict).

s_m is the hard fraction of zero entries of expert m, E_m its expected L0 density. Per step:
  - lambda_m <- 0 where s_m > tau (the expert already meets its target);
  - L_sp = sum_m (E_m - (1 - tau)) * sg(lambda_m) * w_m gives the mask logits their sparsity gradient;
  - lambda_m <- max(0, lambda_m + lr * (tau - s_m) * w_m): rises while the expert is below target.
w_m is the (detached) mean merging weight over the step's tasks, as upstream weights each task's terms by w.
We clamp lambda at 0 after the update (upstream lets it dip below 0 for one step after a reset).

Short runs (method.sparsity.schedule_share > 0): the target the three rules use is tau_t, ramped linearly
from 0 to tau over the first `schedule_tasks` tasks (counted in the `tasks` buffer, saved with the
multipliers), so the controller tracks a moving target instead of chasing tau from dense masks at once.
"""
from __future__ import annotations

import torch
from torch import nn


class LagrangeController(nn.Module):
    def __init__(self, experts: int, target: float, lr: float, schedule_tasks: float = 0.0):
        super().__init__()
        self.target, self.lr, self.schedule_tasks = target, lr, float(schedule_tasks)
        self.register_buffer("multipliers", torch.zeros(experts, dtype=torch.float64))
        self.register_buffer("tasks", torch.zeros((), dtype=torch.float64))

    def current_target(self) -> float:
        """tau_t: the target at this point of the schedule (tau itself without one)."""
        if self.schedule_tasks <= 0:
            return self.target
        return self.target * min(1.0, float(self.tasks) / self.schedule_tasks)

    def reset_satisfied(self, sparsity: torch.Tensor) -> None:
        self.multipliers[sparsity > self.current_target()] = 0.0

    def penalty(self, density: torch.Tensor, w_mean: torch.Tensor) -> torch.Tensor:
        """L_sp; density E_m is differentiable w.r.t. the mask logits."""
        lam = self.multipliers.to(density.dtype).detach()
        return ((density - (1.0 - self.current_target())) * lam * w_mean.detach().to(density.dtype)).sum()

    def lagrangian(self, sparsity: torch.Tensor, w_mean: torch.Tensor) -> float:
        """L_lag = sum_m (s_m - tau) lambda_m w_m (reported; its only gradient is the multiplier update)."""
        return float(((sparsity - self.current_target()) * self.multipliers * w_mean.double()).sum())

    @torch.no_grad()
    def update(self, sparsity: torch.Tensor, w_mean: torch.Tensor, lr_factor: float = 1.0,
               tasks: float = 0.0) -> None:
        """The multipliers' step; `tasks` (the step's global task count) advances the schedule."""
        step = self.lr * lr_factor * (self.current_target() - sparsity) * w_mean.double()
        self.multipliers.add_(step).clamp_(min=0.0)
        self.advance(tasks)

    @torch.no_grad()
    def advance(self, tasks: float) -> None:
        """Count the step's global tasks without touching the multipliers (fixed mask patterns: the counter
        still places the magnitude pattern's switch)."""
        self.tasks.add_(float(tasks))
