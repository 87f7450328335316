"""The pool: the one public component of the expert pool, what the step, the trainer and the checkpointer use.

It holds this rank's storage shard (shard.py), the merge strategy (merge.py), the Lagrangian controller and
the pool optimiser, and keeps the step's order in one place:

  begin_step(train, plan)  the mask pattern's per-step hook, then the masks of this step (once per step, not
                     per task) and this slice's sparsity counts; with `plan` (the step's merging weights, known
                     up front) released masks are not stored: every task's merged mask is formed in this pass;
  merge(w)           one task's merged delta (local, sharded or gathered: the merger decides what moves);
  end_step(...)      the sparsity terms (one all-reduce of G x 3M + M + 1 numbers), the task and penalty gradients into
                     the logits (one fused pass, which also gives a planned step's dL/dw: take_w_grads), the
                     multipliers' update and the optimiser step.

State: `sharded_tensors` / `row_index` (this slice, what the checkpoint shards), `replicated_state` /
`load_replicated` (identical on every rank), and `state_dict` / `load_state_dict` (both in one dict).
Pure torch: the merger and `reduce` (sum over ranks) are handed in, so the same component runs in one process
and across ranks. A frozen mask pattern (patterns.py) takes no mask gradient and no multiplier update (they
stay 0) while delta and the hypernetwork train; its sparsity statistics are still counted and logged.
"""
from __future__ import annotations

from typing import Callable

import torch

from smat_dist.config.schema import MethodConfig
from smat_dist.pool.controller import LagrangeController
from smat_dist.pool.merge import LocalMerger
from smat_dist.pool.optim import PoolOptimizer, clip_scale
from smat_dist.pool.ordered import ordered_sum
from smat_dist.pool.shard import PoolShard
from smat_dist.utils.device import fp32_math
from smat_dist.utils.spans import span

Reduce = Callable[[torch.Tensor], torch.Tensor]
# logging.mask_diagnostics: (shard, penalty coefficients, reduce) -> metrics, measured before the optimiser step
Diagnostics = Callable[[PoolShard, torch.Tensor | None, Reduce], dict]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class Pool:
    """This rank's slice of the expert pool and everything that updates it."""

    def __init__(self, shard: PoolShard, merger: LocalMerger, cfg: MethodConfig, reduce: Reduce | None = None,
                 world: int = 1):
        self.shard, self.merger, self.cfg = shard, merger, cfg
        self.reduce = reduce or _identity
        self.world = world
        sp = cfg.sparsity
        # lambda_lr_scale=numel: the lr is per million pool entries (shard.numel is the whole pool's)
        lam_lr = sp.lambda_lr * (shard.numel / 1e6 if str(sp.lambda_lr_scale) == "numel" else 1.0)
        self.controller = LagrangeController(cfg.experts, sp.target, lam_lr,
                                             schedule_tasks=sp.schedule_share * cfg.total_tasks)
        self.optimizer = PoolOptimizer(shard, cfg)
        self.pattern = shard.pattern
        # what limits mask learning, logged per step (read-only); the trainer sets it (logging.mask_diagnostics)
        self.diagnostics: Diagnostics | None = None

    @property
    def masks_fixed(self) -> bool:
        """Whether the pattern's fixed masks are in place (random: from construction; magnitude: after the switch)."""
        return self.pattern.masks_fixed

    @property
    def device(self) -> torch.device:
        return self.shard.log_alpha.device

    @property
    def numel(self) -> int:
        """The number of real (unpadded) entries of the whole pool's flat space."""
        return self.shard.numel

    # ---- the step ----
    @fp32_math
    def begin_step(self, train: bool = True, plan: torch.Tensor | None = None) -> None:
        """plan [K, M]: this rank's tasks' merging weights in task order, when the step knows them up front.
        The merger may then merge every task in the step's mask pass (see `defers_w_grad`)."""
        self.pattern.begin_step(self, train)
        self.merger.begin_step(train=train, plan=None if plan is None else plan.float())

    @property
    def defers_w_grad(self) -> bool:
        """Whether this step's merges give w no gradient: the tasks' dL/dw come from `take_w_grads()` after
        end_step (the merger computes them in its gate pass), for the caller to push through the hypernetwork."""
        return self.merger.planning

    def take_w_grads(self) -> torch.Tensor:
        """[K, M]: dL/dw of this rank's K tasks of a planned step, in task order (once, after end_step)."""
        g = self.merger.w_grads
        if g is None:
            raise RuntimeError("take_w_grads() needs a planned training step closed by end_step()")
        self.merger.w_grads = None
        return g

    @fp32_math
    def merge(self, w: torch.Tensor) -> torch.Tensor:
        """The task's merged delta over the whole (padded) flat space, differentiable w.r.t. w and the pool.
        fp32 whatever autocast the task runs under: the merge, its collectives and its backward are the
        pool's sums (a bf16 W @ z^T would round every merged mask and the all-reduced gradients of w)."""
        if self.merger.planning:
            # w's gradient comes from end_step (take_w_grads): no edge into the hypernetwork's graph, whose saved
            # tensors a backward would otherwise free while passing it nothing
            w = w.detach()
        return self.merger.merge(w.float())

    @fp32_math
    def end_eval(self) -> None:
        """Close an evaluation pass (begin_step(train=False)): drops the step's masks."""
        self.merger.end_step()

    @fp32_math
    def end_step(self, w_sum: torch.Tensor, n_tasks: int, lr_factor: float, update: bool = True
                 ) -> dict[str, float]:
        """Finish a training step over this rank's `n_tasks` tasks (w_sum: their merging weights summed)."""
        with span("pool_terms"):
            metrics, coef = self.sparsity_terms(w_sum, n_tasks, lr_factor, update)
        with span("mask_backward"):
            sq = self.merger.end_step(coef)
        diag = {}
        if self.diagnostics is not None:
            with span("mask_diagnostics"):   # before the step: the gradient the clip is about to scale
                diag = self.diagnostics(self.shard, coef, self.reduce)
        with span("optimisers"):
            metrics.update(self.optimizer.step(lr_factor, self.reduce, grad_sq=sq))
        if diag:
            diag["mask/clip_scale"] = clip_scale(metrics.get("grad_norm/log_alpha"), self.cfg.sparsity.mask_clip)
        metrics.update(diag)
        return metrics

    def sparsity_terms(self, w_sum: torch.Tensor, n_tasks: int, lr_factor: float, update: bool = True
                       ) -> tuple[dict[str, float], torch.Tensor]:
        """The step's sparsity terms from the counts of begin_step; one all-reduce of G x 3M + M + 1 numbers
        (the counts as per-chunk partials, pool/ordered.py).

        Returns the metrics and the per-expert coefficient of the penalty's gradient on the mask logits,
        coef_m = lambda_m * w_m / numel (dL_sp/dlog_alpha = coef_m * dP(z != 0)/dlog_alpha; w_m times M with
        expert_weight=relative), which the merger applies with the task gradient in one pass."""
        local = self.merger.stats
        if local is None:
            raise RuntimeError("end_step() without a training begin_step(): no sparsity counts for this step")
        M, numel = self.cfg.experts, self.numel
        stats = self.reduce(torch.cat([local, w_sum.double().to(local.device),
                                       torch.tensor([float(n_tasks)], dtype=torch.float64, device=local.device)]))
        # the counts come as per-chunk partials at their global chunks (ordered.py): added in global order,
        # the same bits at every world size
        counts = ordered_sum(stats[:local.numel()].view(-1, 3 * M))
        stats = torch.cat([counts, stats[local.numel():]])
        sparsity, density, eval_sparsity = stats[:M] / numel, stats[M:2 * M] / numel, stats[2 * M:3 * M] / numel
        w_mean = stats[3 * M:4 * M] / stats[4 * M].clamp_min(1)
        # the experts' weight in the controller's terms (method.sparsity.expert_weight); w_mean is logged as is
        weight = str(self.cfg.sparsity.expert_weight)
        w_ctl = (w_mean * M if weight == "relative" else torch.ones_like(w_mean) if weight == "uniform"
                 else w_mean)
        ctl = self.controller
        if self.pattern.frozen:   # no penalty, the multipliers stay 0, the counter advances
            coef = None
            out = {"loss/sparsity_penalty": 0.0, "loss/lagrangian": 0.0, "sparsity/target": self.pattern.target_now()}
            if update:
                ctl.advance(float(stats[4 * M]))
        else:
            ctl.reset_satisfied(sparsity)
            coef = (ctl.multipliers * w_ctl / numel).float()
            lag = ctl.lagrangian(sparsity, w_ctl)
            penalty = float(ctl.penalty(density, w_ctl))
            out = {"loss/sparsity_penalty": penalty, "loss/lagrangian": lag, "sparsity/target": ctl.current_target()}
            if update:
                ctl.update(sparsity, w_ctl, lr_factor, tasks=float(stats[4 * M]))
        values = torch.stack([sparsity, eval_sparsity, density, ctl.multipliers, w_mean]).cpu().tolist()
        for name, row in zip(("sparsity", "sparsity_eval", "density_l0", "lambda", "w_mean"), values):
            for i, v in enumerate(row):
                out[f"{name}/expert{i}"] = v
        return out, coef

    # ---- state ----
    def to(self, device) -> "Pool":
        self.shard.to(device)
        self.controller.to(device)
        return self

    def sharded_tensors(self, loading: set[str] | frozenset = frozenset()) -> dict[str, torch.Tensor]:
        """This slice's live tensors, each indexed along dim 0 by `row_index(name)`: what the checkpoint
        shards. The loader reads into them in place (no second copy of the slice); `loading` names the tensors
        a checkpoint holds, so a momentum buffer it brings is created here first."""
        delta = self.shard.delta
        state = self.optimizer.opt.state
        if "delta_momentum" in loading and state.get(delta, {}).get("momentum_buffer") is None:
            state[delta]["momentum_buffer"] = torch.zeros_like(delta)
        out = {"delta": delta.detach(), "log_alpha": self.shard.log_alpha.detach()}
        mom = state.get(delta, {}).get("momentum_buffer")
        if mom is not None:
            out["delta_momentum"] = mom
        return out

    def row_index(self, name: str):
        """How rows of a sharded tensor map to the global pool: ("range", lo, hi, numel) for per-entry tensors,
        ("ids", ids, total) for the structured logits (one row per gate group; sorted global group ids)."""
        s = self.shard
        if name == "log_alpha" and s.structured:
            return ("ids", s.group_ids, s.layout.total_groups)
        return ("range", s.lo, s.hi, s.numel)

    def replicated_state(self) -> dict:
        """State that is identical on every rank (the multipliers are updated from all-reduced counts)."""
        return {"multipliers": self.controller.multipliers.detach().clone(),
                "sparsity_tasks": self.controller.tasks.detach().clone(), "experts": self.cfg.experts,
                "structured": self.shard.structured, "numel": self.shard.numel,
                "pattern": self.pattern.name, "masks_fixed": bool(self.masks_fixed)}

    def load_replicated(self, replicated: dict) -> None:
        saved = str(replicated.get("pattern", "learned"))   # checkpoints before the patterns: learned masks
        if saved != self.pattern.name:
            raise ValueError(f"the checkpoint's pool has method.sparsity.pattern={saved}, this run has "
                             f"method.sparsity.pattern={self.pattern.name}")
        if "masks_fixed" in replicated:
            self.pattern.masks_fixed = bool(replicated["masks_fixed"])
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
