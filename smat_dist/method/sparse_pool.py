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

Hand-designed mask patterns (method.sparsity.pattern, the baselines for the learned masks): `random` is fixed
when the store is built; `magnitude` is dense until pattern_share * total_tasks tasks (the controller's saved
counter), and at the first training step at or after that point begin_step fixes every expert's mask to the
top 1 - tau of |delta| (patterns.py). Either way the logits stay frozen: no mask gradient, no multiplier update
(they stay 0), while delta and the hypernetwork train; the sparsity statistics are still counted and logged.
"""
from __future__ import annotations

from typing import Callable

import torch

from smat_dist.config.schema import MethodConfig
from smat_dist.method.controller import LagrangeController
from smat_dist.method.mask_diagnostics import clip_scale, mask_diagnostics
from smat_dist.method.merge import LocalMerger
from smat_dist.method.optim import PoolOptimizer
from smat_dist.method.patterns import top_magnitude
from smat_dist.method.pool import ExpertPool
from smat_dist.utils.device import fp32_math
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
        self.pattern = str(sp.pattern)
        if self.pattern == "magnitude" and store.structured:
            raise ValueError("method.sparsity.pattern=magnitude is per entry: it needs structured=false")
        # whether the pattern's masks are in place (random: from construction; magnitude: after the switch);
        # part of the replicated state, so a resumed run neither repeats nor skips the switch
        self.masks_fixed = self.pattern == "random"
        self.switch_tasks = float(sp.pattern_share) * cfg.total_tasks
        # logging.mask_diagnostics (set by the trainer): what limits mask learning, logged per step (read-only)
        self.diagnose = False

    # ---- the step ----
    @fp32_math
    def begin_step(self, train: bool = True) -> None:
        self._train = train
        if (train and self.pattern == "magnitude" and not self.masks_fixed
                and float(self.controller.tasks) >= self.switch_tasks):
            with span("magnitude_masks"):
                self.fix_magnitude_masks()
        self.merger.begin_step(train=train)

    @torch.no_grad()
    def fix_magnitude_masks(self) -> None:
        """The magnitude pattern's switch (collective: every rank calls it in the same step): open exactly the
        round((1 - tau) * numel) entries of largest |delta| over all ranks' slices, closed elsewhere. delta is
        shared by the experts, so every expert gets this same mask."""
        s = self.store
        keep = round((1.0 - float(self.cfg.sparsity.target)) * s.numel)
        keep_open = top_magnitude(s.delta, s.lo, s.n_valid, s.numel, keep, self.reduce)
        c = float(s.cfg.clamp)
        s.log_alpha.copy_(torch.where(keep_open, c, -c).to(s.log_alpha).unsqueeze(1).expand_as(s.log_alpha))
        self.masks_fixed = True

    def pattern_target(self) -> float:
        """The share of zeros a fixed pattern holds now (tau; 0 for the magnitude pattern before its switch)."""
        return float(self.cfg.sparsity.target) if self.masks_fixed else 0.0

    @fp32_math
    def merge(self, w: torch.Tensor) -> torch.Tensor:
        """The task's merged delta over the whole (padded) flat space, differentiable w.r.t. w and the pool.
        fp32 whatever autocast the task runs under: the merge, its collectives and its backward are the
        pool's sums (a bf16 W @ z^T would round every merged mask and the all-reduced gradients of w)."""
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
        if self.diagnose:
            with span("mask_diagnostics"):   # before the step: the gradient the clip is about to scale
                diag = mask_diagnostics(self.store, coef, self.reduce)
        with span("optimisers"):
            metrics.update(self.optimizer.step(lr_factor, self.reduce, grad_sq=sq))
        if diag:
            diag["mask/clip_scale"] = clip_scale(metrics.get("grad_norm/log_alpha"), self.cfg.sparsity.mask_clip)
        metrics.update(diag)
        return metrics

    def sparsity_terms(self, w_sum: torch.Tensor, n_tasks: int, lr_factor: float, update: bool = True
                       ) -> tuple[dict[str, float], torch.Tensor]:
        """The step's sparsity terms from the counts of begin_step; one all-reduce of 4M+1 numbers.

        Returns the metrics and the per-expert coefficient of the penalty's gradient on the mask logits,
        coef_m = lambda_m * w_m / numel (dL_sp/dlog_alpha = coef_m * dP(z != 0)/dlog_alpha; w_m times M with
        expert_weight=relative), which the merger applies with the task gradient in one pass."""
        local = self.merger.stats
        if local is None:
            raise RuntimeError("end_step() without a training begin_step(): no sparsity counts for this step")
        M, numel = self.cfg.experts, self.store.numel
        stats = self.reduce(torch.cat([local, w_sum.double().to(local.device),
                                       torch.tensor([float(n_tasks)], dtype=torch.float64, device=local.device)]))
        sparsity, density, eval_sparsity = stats[:M] / numel, stats[M:2 * M] / numel, stats[2 * M:3 * M] / numel
        w_mean = stats[3 * M:4 * M] / stats[4 * M].clamp_min(1)
        # the experts' weight in the controller's terms (method.sparsity.expert_weight); w_mean is logged as is
        weight = str(self.cfg.sparsity.expert_weight)
        w_ctl = (w_mean * M if weight == "relative" else torch.ones_like(w_mean) if weight == "uniform"
                 else w_mean)
        ctl = self.controller
        if self.store.frozen:     # a fixed pattern: no penalty, the multipliers stay 0, the counter advances
            coef = None
            out = {"loss/sparsity_penalty": 0.0, "loss/lagrangian": 0.0, "sparsity/target": self.pattern_target()}
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
                "structured": self.store.structured, "numel": self.store.numel,
                "pattern": self.pattern, "masks_fixed": bool(self.masks_fixed)}

    def load_replicated(self, replicated: dict) -> None:
        saved = str(replicated.get("pattern", "learned"))   # checkpoints before the patterns: learned masks
        if saved != self.pattern:
            raise ValueError(f"the checkpoint's pool has method.sparsity.pattern={saved}, this run has "
                             f"method.sparsity.pattern={self.pattern}")
        if "masks_fixed" in replicated:
            self.masks_fixed = bool(replicated["masks_fixed"])
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
