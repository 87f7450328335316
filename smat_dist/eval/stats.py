"""Accuracy summaries: mean and 95% confidence interval over test episodes, ID/OOD averages.

The interval is 1.96 * std / sqrt(n) with the population std (numpy's default ddof=0), the formula of the
official SMAT and P>M>F test scripts, so our intervals are comparable with the published ones.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

Z95 = 1.96


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """(mean, 95% half-width) of per-episode accuracies; a single episode has a zero-width interval."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        raise ValueError("mean_ci needs at least one episode accuracy")
    bad = [v for v in vals if not math.isfinite(v)]
    if bad:
        raise ValueError(f"non-finite episode accuracies {bad[:3]}")
    mean = math.fsum(vals) / n
    var = math.fsum((v - mean) ** 2 for v in vals) / n
    return mean, Z95 * math.sqrt(var) / math.sqrt(n)


def domain_summary(accs: Sequence[float]) -> dict:
    mean, ci = mean_ci(accs)
    return {"mean": mean, "ci95": ci, "n": len(accs)}


def average(means: Iterable[float]) -> float | None:
    """Unweighted mean over domains (the paper's ID/OOD average); None when there are no domains."""
    ms = list(means)
    return math.fsum(ms) / len(ms) if ms else None
