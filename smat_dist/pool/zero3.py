"""dist.pool=zero3: the pool component over a ZeRO-3 store (a benchmark comparison path, not for training runs).

The store (smat_dist.distributed.zero3_pool.Zero3PoolStore, built by smat_dist.build; this package never
imports DeepSpeed) holds delta and the mask logits as per-chunk parameters partitioned by DeepSpeed ZeRO-3.
The merge is plain autograd on the gathered chunks: z = gate(log_alpha) * valid, d = (z @ w) * delta, so
DeepSpeed gathers every expert's logits per task (M x P numbers) and reduce-scatters their gradients; the
gradients of delta and of the logits are averaged over ranks by DeepSpeed, as the sharded path's are.

What stays the pool's own (same rules as Pool / PoolOptimizer): the clamp of the logits at begin_step (on
this rank's partitions, both DeepSpeed's fp32 master and its working copy), the sparsity counts (per row, on
the partitions), the Lagrangian controller, the penalty's gradient (added to this rank's gradient partitions
through DeepSpeed's safe_set_local_grad before the step) and the clip of the logits' global gradient norm at
method.sparsity.mask_clip, applied as the sharded path applies it, by scaling the logits' learning rate (their
SGD has no momentum nor decay), because one DeepSpeed engine has one clip value and delta is not clipped.
What differs: the gate's gradient is autograd's (torch.clamp / sigmoid backward) where the sharded path
recovers it from z, and the summation orders differ, so the two paths agree to fp32 rounding, not bitwise.

Not supported (refused by the config check): structured gates, the lean pool, noisy gates, fixed mask
patterns, fused kernels, mask diagnostics, checkpoints and resume.
"""
from __future__ import annotations

import warnings

import torch

from smat_dist.config.schema import MethodConfig
from smat_dist.pool import gates as hc
from smat_dist.pool.controller import LagrangeController
from smat_dist.pool.draws import chunked_normal
from smat_dist.pool.pool import Pool, Reduce
from smat_dist.pool.patterns import make_pattern
from smat_dist.utils.device import fp32_math

COMPARISON = ("dist.pool=zero3 is a benchmark comparison path (the pool under DeepSpeed ZeRO-3: M x P numbers "
              "moved per task); checkpoint.*/resume not supported")


def zero3_init(cfg: MethodConfig, numel: int, seed: int):
    """init(lo, hi) -> (delta, log_alpha) of rows [lo, hi): the learned pattern's draws (the same chunked
    generators as PoolShard's), padding rows at -clamp."""
    sp = cfg.sparsity

    def init(lo: int, hi: int):
        la = chunked_normal(seed, lo, hi, cfg.experts, hc.init_mean(sp), sp.init_std)
        if hi > numel:
            la[max(0, numel - lo):] = -sp.clamp
        return torch.zeros(hi - lo), la
    return init


class _Merger:
    """What Pool.sparsity_terms reads (`stats`)."""

    stats: torch.Tensor | None = None


class Zero3Pool(Pool):
    """The Pool component's protocol (begin_step / merge / end_step / end_eval) over a ZeRO-3 store."""

    def __init__(self, store, cfg: MethodConfig, numel: int, reduce: Reduce, world: int):
        warnings.warn(COMPARISON, stacklevel=2)
        self.store, self.cfg, self.reduce, self.world = store, cfg, reduce, world
        self._numel = numel
        sp = cfg.sparsity
        lam_lr = sp.lambda_lr * (numel / 1e6 if str(sp.lambda_lr_scale) == "numel" else 1.0)
        self.controller = LagrangeController(cfg.experts, sp.target, lam_lr,
                                             schedule_tasks=sp.schedule_share * cfg.total_tasks)
        self.pattern = make_pattern(sp)
        if self.pattern.frozen:
            raise ValueError("dist.pool=zero3: method.sparsity.pattern=learned only")
        self.merger = _Merger()
        self.diagnostics = None
        self.shard = None
        self._train = False

    @property
    def numel(self) -> int:
        return self._numel

    @property
    def device(self) -> torch.device:
        return self.store.device

    def _valid_rows(self, part) -> int:
        return max(0, min(part.rows, self._numel - part.row_lo))

    @fp32_math
    @torch.no_grad()
    def begin_step(self, train: bool = True, plan: torch.Tensor | None = None) -> None:
        """Clamp this rank's logit partitions; in training count this rank's rows' sparsity statistics. (`plan`
        is not used: DeepSpeed gathers the logits per merge, and w's gradient comes from the merge.)"""
        self._train = train
        sp = self.cfg.sparsity
        M = self.cfg.experts
        thr = -hc.threshold(train=False, eval_beta=hc.eval_beta(sp))
        stats = torch.zeros(3, M, dtype=torch.float64, device=self.device)
        for part in self.store.parts:
            part.clamp_(sp.clamp)
            if not train:
                continue
            n = self._valid_rows(part)
            la = part.logits()[:n]
            z = hc.gate(la, train=True)
            stats[0] += torch.eq(z, 0.0).float().sum(0)
            stats[1] += torch.sigmoid(la + hc.L0_SHIFT).sum(0)
            stats[2] += torch.le(la, thr).float().sum(0)
        self.merger.stats = stats.reshape(-1) if train else None

    def _merge_fn(self):
        train, numel = self._train, self._numel
        eval_beta = hc.eval_beta(self.cfg.sparsity)

        def fn(lo, hi, delta, log_alpha, w):
            z = hc.gate(log_alpha, train=train, eval_beta=eval_beta)
            if hi > numel:
                z = z * (torch.arange(lo, hi, device=z.device) < numel).unsqueeze(1)
            return (z @ w) * delta
        return fn

    @fp32_math
    def merge(self, w: torch.Tensor) -> torch.Tensor:
        return self.store.forward(w.float(), self._merge_fn())

    @property
    def defers_w_grad(self) -> bool:
        return False

    def end_eval(self) -> None:
        self.merger.stats = None

    @fp32_math
    def end_step(self, w_sum: torch.Tensor, n_tasks: int, lr_factor: float, update: bool = True
                 ) -> dict[str, float]:
        metrics, coef = self.sparsity_terms(w_sum, n_tasks, lr_factor, update)
        sq = torch.zeros(1, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for part in self.store.parts:
                g = part.logit_grad()
                n = self._valid_rows(part)
                if coef is not None and n:
                    p = torch.sigmoid(part.logits()[:n] + hc.L0_SHIFT)
                    g = g.clone()
                    g[:n] += p * (1 - p) * coef.to(g).unsqueeze(0)
                    part.set_logit_grad(g)
                sq += g.double().square().sum()
        norm = float(self.reduce(sq).sqrt())
        clip = self.cfg.sparsity.mask_clip
        scale = clip / (norm + 1e-12) if norm > clip else 1.0
        self.store.step({"delta": self.cfg.delta_lr * lr_factor,
                         "log_alpha": self.cfg.sparsity.mask_lr * lr_factor * scale})
        metrics["grad_norm/log_alpha"] = norm
        self.merger.stats = None
        return metrics

    # ---- state: not supported on this path ----
    def to(self, device) -> "Zero3Pool":
        self.controller.to(device)
        return self

    def _refuse(self, *a, **k):
        # the config check refuses checkpoints on this path; this is reached only by a pool built in code
        raise RuntimeError(COMPARISON)

    sharded_tensors = row_index = state_dict = load_state_dict = load_replicated = _refuse

    def pool_bytes_per_rank(self) -> int:
        return self.store.partition_bytes()

