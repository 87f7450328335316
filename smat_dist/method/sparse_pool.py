"""The expert pool as one component: its slice of the state, the merge strategy, the Lagrangian controller
and the pool optimiser, behind `begin_step`, `merge(w)`, `end_step(...) -> metrics`.

Before, a step threaded the pool's per-step state through five objects (the merger's statistics, SMAT's
sparsity terms, the penalty coefficient handed back to the merger, a squared norm left on the pool for its
optimiser). Here the step's order lives in one place:

  begin_step(train)  masks of this step (once per step, not per task) and this slice's sparsity counts;
  merge(w)           one task's merged delta (local, sharded or gathered: the merger decides what moves);
  end_step(...)      the sparsity terms (one all-reduce of 4M+1 numbers), the task and penalty gradients
                     into the logits (one fused pass), the multipliers' update and the optimiser step.

Pure torch: the merger and `reduce` (sum over ranks) are handed in, so the same component runs in one
process and across ranks (smat_dist.distributed.build builds it for every command).
"""
from __future__ import annotations

from typing import Callable

import torch

from smat_dist.config.schema import MethodConfig
from smat_dist.method.controller import LagrangeController
from smat_dist.method.merge import LocalMerger
from smat_dist.method.optim import PoolOptimizer
from smat_dist.method.pool import ExpertPool
from smat_dist.utils.spans import span

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class SparsePool:
    """This rank's slice of the expert pool and everything that updates it."""

    def __init__(self, store: ExpertPool, merger: LocalMerger, cfg: MethodConfig, reduce: Reduce | None = None,
                 world: int = 1):
        self.store, self.merger, self.cfg = store, merger, cfg
        self.reduce = reduce or _identity
        self.world = world
        sp = cfg.sparsity
        # lambda_lr_scale=numel: the lr is per million pool entries (store.numel is the whole pool's)
        lam_lr = sp.lambda_lr * (store.numel / 1e6 if str(sp.lambda_lr_scale) == "numel" else 1.0)
        self.controller = LagrangeController(cfg.experts, sp.target, lam_lr,
                                             schedule_tasks=sp.schedule_share * cfg.total_tasks)
        self.optimizer = PoolOptimizer(store, cfg)
        self._train = False

    # ---- the step ----
    def begin_step(self, train: bool = True) -> None:
        self._train = train
        self.merger.begin_step(train=train)

    def merge(self, w: torch.Tensor) -> torch.Tensor:
        """The task's merged delta over the whole (padded) flat space, differentiable w.r.t. w and the pool."""
        return self.merger.merge(w)

    def end_eval(self) -> None:
        """Close an evaluation pass (begin_step(train=False)): drops the step's masks."""
        self.merger.end_step()

    def end_step(self, w_sum: torch.Tensor, n_tasks: int, lr_factor: float, update: bool = True
                 ) -> dict[str, float]:
        """Finish a training step over this rank's `n_tasks` tasks (w_sum: their merging weights summed)."""
        with span("pool_terms"):
            metrics, coef = self.sparsity_terms(w_sum, n_tasks, lr_factor, update)
        with span("mask_backward"):
            sq = self.merger.end_step(coef)
        with span("optimisers"):
            metrics.update(self.optimizer.step(lr_factor, self.reduce, grad_sq=sq))
        return metrics

    def sparsity_terms(self, w_sum: torch.Tensor, n_tasks: int, lr_factor: float, update: bool = True
                       ) -> tuple[dict[str, float], torch.Tensor]:
        """The step's sparsity terms from the counts of begin_step; one all-reduce of 4M+1 numbers.

        Returns the metrics and the per-expert coefficient of the penalty's gradient on the mask logits,
        coef_m = lambda_m * w_m / numel (dL_sp/dlog_alpha = coef_m * dP(z != 0)/dlog_alpha), which the merger
        applies with the task gradient in one pass."""
        local = self.merger.stats
        if local is None:
            raise RuntimeError("end_step() without a training begin_step(): no sparsity counts for this step")
        M, numel = self.cfg.experts, self.store.numel
        stats = self.reduce(torch.cat([local, w_sum.double().to(local.device),
                                       torch.tensor([float(n_tasks)], dtype=torch.float64, device=local.device)]))
        sparsity, density, eval_sparsity = stats[:M] / numel, stats[M:2 * M] / numel, stats[2 * M:3 * M] / numel
        w_mean = stats[3 * M:4 * M] / stats[4 * M].clamp_min(1)
        ctl = self.controller
        ctl.reset_satisfied(sparsity)
        coef = (ctl.multipliers * w_mean / numel).float()
        lag = ctl.lagrangian(sparsity, w_mean)
        penalty = float(ctl.penalty(density, w_mean))
        out = {"loss/sparsity_penalty": penalty, "loss/lagrangian": lag, "sparsity/target": ctl.current_target()}
        if update:
            ctl.update(sparsity, w_mean, lr_factor, tasks=float(stats[4 * M]))
        values = torch.stack([sparsity, eval_sparsity, density, ctl.multipliers, w_mean]).cpu().tolist()
        for name, row in zip(("sparsity", "sparsity_eval", "density_l0", "lambda", "w_mean"), values):
            for i, v in enumerate(row):
                out[f"{name}/expert{i}"] = v
        return out, coef

    # ---- state ----
    def to(self, device) -> "SparsePool":
        self.store.to(device)
        self.controller.to(device)
        return self

    def sharded_tensors(self, loading: set[str] | frozenset = frozenset()) -> dict[str, torch.Tensor]:
        """This slice's live tensors, each indexed along dim 0 by `row_index(name)`: what the checkpoint
        shards. The loader reads into them in place (no second copy of the slice); `loading` names the tensors
        a checkpoint holds, so a momentum buffer it brings is created here first."""
        delta = self.store.delta
        state = self.optimizer.opt.state
        if "delta_momentum" in loading and state.get(delta, {}).get("momentum_buffer") is None:
            state[delta]["momentum_buffer"] = torch.zeros_like(delta)
        out = {"delta": delta.detach(), "log_alpha": self.store.log_alpha.detach()}
        mom = state.get(delta, {}).get("momentum_buffer")
        if mom is not None:
            out["delta_momentum"] = mom
        return out

    def row_index(self, name: str):
        """How rows of a sharded tensor map to the global pool: ("range", lo, hi, numel) for per-entry tensors,
        ("ids", ids, total) for the structured logits (one row per gate group; sorted global group ids)."""
        s = self.store
        if name == "log_alpha" and s.structured:
            return ("ids", s.group_ids, s.layout.total_groups)
        return ("range", s.lo, s.hi, s.numel)

    def replicated_state(self) -> dict:
        """State that is identical on every rank (the multipliers are updated from all-reduced counts)."""
        return {"multipliers": self.controller.multipliers.detach().clone(),
                "sparsity_tasks": self.controller.tasks.detach().clone(), "experts": self.cfg.experts,
                "structured": self.store.structured, "numel": self.store.numel}

    def load_replicated(self, replicated: dict) -> None:
        with torch.no_grad():
            self.controller.multipliers.copy_(replicated["multipliers"].to(self.controller.multipliers))
            if "sparsity_tasks" in replicated:  # checkpoints before the sparsity schedule have none
                self.controller.tasks.copy_(replicated["sparsity_tasks"].to(self.controller.tasks))

    def state_dict(self) -> dict:
        """The whole local state in one dict (single process, tests; checkpoints go through sharded_tensors)."""
        return {"tensors": {k: v.clone() for k, v in self.sharded_tensors().items()},
                "replicated": self.replicated_state()}

    def load_state_dict(self, sd: dict) -> None:
        dest = self.sharded_tensors(loading=frozenset(sd["tensors"]))
        with torch.no_grad():
            for name, t in sd["tensors"].items():
                dest[name].copy_(t)
        self.load_replicated(sd["replicated"])
