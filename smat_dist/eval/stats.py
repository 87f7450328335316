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


def paired(a: Sequence[float], b: Sequence[float]) -> dict:
    """a - b on the same episodes: the mean per-episode difference, its 95% half-width (Student t on the
    differences, ddof=1) and the paired t-test's two-sided p-value. Both methods ran on the same fixed
    episodes, so pairing removes the episodes' shared difficulty from the interval."""
    import scipy.stats

    if len(a) != len(b) or not a:
        raise ValueError(f"paired comparison needs the same non-zero number of episodes, got {len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(d)
    mean = math.fsum(d) / n
    if n == 1:
        return {"diff": mean, "ci95": float("inf"), "p": float("nan"), "n": 1}
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in d) / (n - 1))
    half = float(scipy.stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    p = 1.0 if sd == 0 and mean == 0 else (0.0 if sd == 0 else float(scipy.stats.ttest_rel(a, b).pvalue))
    return {"diff": mean, "ci95": half, "p": p, "n": n}


def paired_average(per_domain: Sequence[dict]) -> dict:
    """The unweighted average over domains of paired differences; the half-widths combine as independent
    per-domain estimates (sqrt of the sum of squares, over the number of domains)."""
    if not per_domain:
        return {"diff": None, "ci95": None, "domains": 0}
    k = len(per_domain)
    return {"diff": math.fsum(p["diff"] for p in per_domain) / k,
            "ci95": math.sqrt(math.fsum(p["ci95"] ** 2 for p in per_domain)) / k, "domains": k}


def paired_comparisons(results: dict, per_episode: dict, mode: str = "zeroshot") -> dict:
    """{"A - B": {"id": avg, "ood": avg, "domains": {name: paired}}} for every ordered pair of methods
    evaluated in `mode` on the same episodes (results.json + episodes.json of one evaluation)."""
    kinds = {d["name"]: d["kind"] for d in results["meta"]["domains"]}
    methods = [m for m in results["meta"]["methods"] if mode in per_episode.get(m, {})]
    out = {}
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            doms = {name: paired(per_episode[a][mode][name], per_episode[b][mode][name])
                    for name in kinds if name in per_episode[a][mode] and name in per_episode[b][mode]}
            out[f"{a} - {b}"] = {
                "domains": doms,
                **{kind: paired_average([p for n, p in doms.items() if kinds[n] == kind]) for kind in ("id", "ood")}}
    return out
