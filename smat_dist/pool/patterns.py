"""Mask patterns (method.sparsity.pattern): how a pool's mask logits start and whether they ever move.

One strategy class per pattern, registered by its schema value: it owns its `frozen` flag (the logits never
take a gradient step), its initial logits and its per-step hook. Everything else asks the pattern, so a new
pattern is its enum value in the schema plus one class registered here. The config-level rules a pattern
needs (e.g. the clamp that makes +-clamp exact gates) live in smat_dist.config.checks; the pool trusts them.

  learned    SMAT: N(mean, std^2) logits (gates.init_mean), trained with the Lagrangian controller;
  random     each row of each expert fixed open with probability 1 - tau (+-clamp), from construction;
  magnitude  dense (+clamp) until pattern_share * total_tasks tasks (the controller's saved counter), then
             at the first training step at or after that point every expert's mask is fixed to the top
             1 - tau of |delta| over the whole space (`top_magnitude`).

`top_magnitude` finds those entries without any rank gathering delta: a bisection on the float32 bit pattern
of |delta| (non-negative floats order as their bits) finds the k-th largest value T from all-reduced counts
(`reduce` sums a tensor over ranks; 31 rounds of one number each), every entry above T is open, and ties at T
are broken by the global flat index (lowest first) with a second bisection on that index. The result depends
only on the global delta, so every world size and slicing selects the same entries; it runs once per run, so
its ~60 small all-reduces do not matter.
"""
from __future__ import annotations

import abc
from typing import Callable

import torch

from smat_dist.config.schema import SparsityConfig
from smat_dist.pool import gates
from smat_dist.pool.draws import chunked_normal, chunked_uniform, rows_of
from smat_dist.utils.spans import span

Reduce = Callable[[torch.Tensor], torch.Tensor]


def count_open(reduce: Reduce, mask: torch.Tensor) -> int:
    """The number of True entries of `mask` over all ranks (exact: float64 below 2^53)."""
    return int(reduce(mask.sum(dtype=torch.float64).reshape(1))[0])


@torch.no_grad()
def top_magnitude(delta: torch.Tensor, lo: int, n_valid: int, numel: int, keep: int, reduce: Reduce
                  ) -> torch.Tensor:
    """Bool [n] over this slice (entries lo .. lo + n of the flat vector of `numel` real entries; the slice's
    first n_valid are real, the rest padding): True where the entry is among the `keep` largest |delta| of the
    whole space, ties at the k-th value broken by the lowest global index. Every rank calls it together (the
    same number of `reduce` calls on each: keep and numel are global)."""
    out = torch.zeros(delta.shape[0], dtype=torch.bool, device=delta.device)
    if keep <= 0:
        return out
    if keep >= numel:
        out[:n_valid] = True
        return out
    # |delta| as float32 bits: non-negative floats (and NaN, above +inf) order as their int32 patterns
    bits = delta[:n_valid].detach().abs().float().contiguous().view(torch.int32)
    # T = the largest t with count(bits >= t) >= keep: count(>= a) >= keep > count(>= b) throughout
    a, b, count_a = 0, 1 << 31, numel
    while b - a > 1:
        mid = (a + b) // 2
        c = count_open(reduce, bits >= mid)
        if c >= keep:
            a, count_a = mid, c
        else:
            b = mid
    above, tied = bits > a, bits == a
    n_above = count_open(reduce, above)              # < keep <= count_a
    need, n_tied = keep - n_above, count_a - n_above   # 1 <= need <= n_tied: how many ties at T stay open
    if need < n_tied:
        # the `need` ties of lowest global index: smallest I with count(tied & index < I) >= need, where
        # count(< 0) = 0 < need <= count(< numel)
        index = torch.arange(lo, lo + n_valid, device=delta.device)
        i_lo, i_hi = 0, numel
        while i_hi - i_lo > 1:
            mid = (i_lo + i_hi) // 2
            if count_open(reduce, tied & (index < mid)) >= need:
                i_hi = mid
            else:
                i_lo = mid
        tied &= index < i_hi
    out[:n_valid] = above | tied
    return out



class MaskPattern(abc.ABC):
    """A mask pattern's strategy; one instance per pool shard. `masks_fixed`: whether the pattern's fixed
    masks are in place (part of the replicated state, so a resumed run neither repeats nor skips a switch)."""

    name = ""
    frozen = True       # the logits never take a gradient step: no mask gradient, no multiplier update

    def __init__(self, cfg: SparsityConfig):
        self.cfg = cfg
        self.masks_fixed = False

    @abc.abstractmethod
    def initial_logits(self, seed: int, lo: int, hi: int, ids: torch.Tensor | None, m: int) -> torch.Tensor:
        """Initial logits of rows [lo, hi) (unstructured) or of the gate groups `ids` (structured)."""

    def begin_step(self, pool, train: bool) -> None:
        """Called by the pool component at the start of every step (collectively, on every rank)."""

    def target_now(self) -> float:
        """The share of zeros a fixed pattern holds now (tau once its masks are fixed, else 0)."""
        return float(self.cfg.target) if self.masks_fixed else 0.0


PATTERNS: dict[str, type[MaskPattern]] = {}


def register(cls: type[MaskPattern]) -> type[MaskPattern]:
    PATTERNS[cls.name] = cls
    return cls


def make_pattern(cfg: SparsityConfig) -> MaskPattern:
    name = str(cfg.pattern)
    if name not in PATTERNS:
        raise ValueError(f"method.sparsity.pattern={name}: expected one of {', '.join(PATTERNS)}")
    return PATTERNS[name](cfg)


@register
class Learned(MaskPattern):
    name = "learned"
    frozen = False

    def initial_logits(self, seed, lo, hi, ids, m):
        mean = gates.init_mean(self.cfg)  # cfg.init_mean, or chosen from the target (method.sparsity.init)
        if ids is None:
            return chunked_normal(seed, lo, hi, m, mean, self.cfg.init_std)
        return rows_of(ids, m, lambda a, b: chunked_normal(seed, a, b, m, mean, self.cfg.init_std))


@register
class Random(MaskPattern):
    """Both gates exactly 1 / 0 from construction: logit +clamp where a U[0, 1) draw is >= tau, else -clamp."""
    name = "random"

    def __init__(self, cfg: SparsityConfig):
        super().__init__(cfg)
        self.masks_fixed = True

    def initial_logits(self, seed, lo, hi, ids, m):
        u = (chunked_uniform(seed, lo, hi, m) if ids is None
             else rows_of(ids, m, lambda a, b: chunked_uniform(seed, a, b, m)))
        c = float(self.cfg.clamp)
        return torch.where(u >= float(self.cfg.target), c, -c)


@register
class Magnitude(MaskPattern):
    """Dense until the switch, then the top 1 - tau of |delta| (the same mask for every expert: delta is shared)."""
    name = "magnitude"

    def initial_logits(self, seed, lo, hi, ids, m):
        n = hi - lo if ids is None else ids.numel()
        return torch.full((n, m), float(self.cfg.clamp))

    def begin_step(self, pool, train: bool) -> None:
        switch = float(self.cfg.pattern_share) * pool.cfg.total_tasks
        if train and not self.masks_fixed and float(pool.controller.tasks) >= switch:
            with span("magnitude_masks"):
                self.fix(pool.shard, pool.reduce)

    @torch.no_grad()
    def fix(self, shard, reduce: Reduce) -> None:
        """The switch (collective: every rank calls it in the same step): open exactly round((1 - tau) * numel)
        entries of largest |delta| over all ranks' slices, closed elsewhere."""
        keep = round((1.0 - float(self.cfg.target)) * shard.numel)
        keep_open = top_magnitude(shard.delta, shard.lo, shard.n_valid, shard.numel, keep, reduce)
        c = float(self.cfg.clamp)
        la = shard.log_alpha
        la.copy_(torch.where(keep_open, c, -c).to(la).unsqueeze(1).expand_as(la))
        self.masks_fixed = True
