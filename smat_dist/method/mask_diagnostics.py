"""What limits mask learning, measured once per step (logging.mask_diagnostics): read-only, after the step's
mask gradient is formed and before the pool optimiser's norm-5 clip.

The logits' gradient is the task's (through the gate) plus the sparsity penalty's, coef_m * p (1 - p) with
p = sigmoid(log_alpha + L0_SHIFT) (smat_dist.pool.passes). When the penalty's part dominates the norm, the
clip scales the whole step down by the penalty's size and the task's reordering of the logits is what is left
of 5 / norm; a logit at the clamp gets no task gradient at all (its gate is saturated at 0 or 1). So per step:

  mask/penalty_grad_norm, mask/task_grad_norm   the two parts' global norms (the task's is total - penalty,
                                                so times method.sparsity.task_grad_scale, as the step sees it;
                                                a lean pool defers its gradient, so only the penalty's there)
  mask/penalty_share    ||pen|| / (||pen|| + ||task||): 1 = the penalty alone moves the logits
  mask/clip_scale       min(1, clip / ||total||): the factor the norm-5 clip applies to this step
  mask/at_clamp_low, mask/at_clamp_high   fraction of (valid) logits at -clamp / +clamp

One chunked pass over this rank's slice (no [rows, M] temporary beyond a chunk) and one all-reduce of 4
numbers. Unstructured learned pools only: structured gates share rows across ranks, fixed patterns have no
mask gradient.
"""
from __future__ import annotations

import math

import torch

from smat_dist.pool import gates as hc


@torch.no_grad()
def mask_diagnostics(shard, coef: torch.Tensor | None, reduce) -> dict[str, float]:
    """The metrics above for `shard` (a PoolShard) and the step's penalty coefficients [M]; collective
    (every rank calls it in the same step). {} for pools it does not apply to."""
    if shard.structured or shard.pattern.frozen or coef is None:
        return {}
    la, grad = shard.log_alpha, shard.log_alpha.grad
    c = float(shard.cfg.clamp)
    coef = coef.to(la.dtype).unsqueeze(0)
    acc = torch.zeros(4, dtype=torch.float64, device=la.device)   # pen^2, task^2, at -c, at +c
    for a, b in shard.passes.rows():
        b = min(b, shard.n_valid)
        if a >= b:
            break
        lc = la[a:b]
        f1, f2, f3, _ = shard.passes.scratch(b - a)    # the pool's chunk buffers: no allocation per chunk
        torch.add(lc, hc.L0_SHIFT, out=f1).sigmoid_()
        f1.sub_(torch.mul(f1, f1, out=f2)).mul_(coef)            # the penalty's gradient: coef p (1 - p)
        pen = f1.view(-1)
        acc[0] += torch.dot(pen, pen)                            # float32 within a chunk, as the clip's norm
        if grad is not None:
            task = torch.sub(grad[a:b], f1, out=f2).view(-1)
            acc[1] += torch.dot(task, task)
        acc[2] += torch.le(lc, -c, out=f3).sum()                 # 0/1 floats: a bool sum is several times slower
        acc[3] += torch.ge(lc, c, out=f3).sum()
    pen_sq, task_sq, low, high = reduce(acc).tolist()
    n = float(shard.numel) * shard.experts
    pen_n = math.sqrt(pen_sq)
    out = {"mask/penalty_grad_norm": pen_n, "mask/at_clamp_low": low / n, "mask/at_clamp_high": high / n}
    if grad is not None:
        task_n = math.sqrt(task_sq)
        out["mask/task_grad_norm"] = task_n
        out["mask/penalty_share"] = pen_n / (pen_n + task_n) if pen_n + task_n > 0 else float("nan")
    return out
