"""Confidence-interval arithmetic and the results files."""
from __future__ import annotations

import json
import math

import pytest

from smat_dist.eval.report import markdown_table, write_results
from smat_dist.eval.stats import average, domain_summary, mean_ci


def test_ci_known_case():
    # mean 0.7; population variance ((.2^2)*2 + (.1^2)*2 + 0) / 5 = 0.02; half-width 1.96*sqrt(.02)/sqrt(5)
    mean, ci = mean_ci([0.5, 0.7, 0.9, 0.6, 0.8])
    assert mean == pytest.approx(0.7, abs=1e-12)
    assert ci == pytest.approx(1.96 * math.sqrt(0.02) / math.sqrt(5), abs=1e-12)
    assert ci == pytest.approx(0.123961, abs=1e-6)
    # two episodes, 0 and 1: std 0.5 -> 1.96 * 0.5 / sqrt(2)
    assert mean_ci([0.0, 1.0]) == pytest.approx((0.5, 0.692965), abs=1e-6)
    assert mean_ci([0.25]) == (0.25, 0.0)


def test_ci_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        mean_ci([])
    with pytest.raises(ValueError, match="non-finite"):
        mean_ci([0.5, float("nan")])


def test_summary_and_average():
    s = domain_summary([1.0, 0.0, 1.0, 0.0])
    assert s == {"mean": 0.5, "ci95": pytest.approx(1.96 * 0.5 / 2), "n": 4}
    assert average([0.2, 0.4]) == pytest.approx(0.3)
    assert average([]) is None


def test_results_files(tmp_path):
    results = {
        "meta": {"methods": ["smat", "pretrained"], "modes": ["zeroshot", "full"], "episodes": 2, "val_episodes": 1,
                 "finetune_steps": 3, "lr_grid": [1e-3],
                 "domains": [{"name": "a", "source": "x", "kind": "id"}, {"name": "b", "source": "y", "kind": "ood"}]},
        "results": {m: {mode: {"domains": {"a": {"mean": 0.5, "ci95": 0.1, "n": 2, "kind": "id",
                                                 **({"lr": 1e-3} if mode == "full" else {})},
                                           "b": {"mean": 0.25, "ci95": 0.05, "n": 2, "kind": "ood",
                                                 **({"lr": 1e-3} if mode == "full" else {})}},
                                "id_avg": 0.5, "ood_avg": 0.25} for mode in ("zeroshot", "full")}
                    for m in ("smat", "pretrained")}}
    paths = write_results(tmp_path, results, {"smat": {"zeroshot": {"a": [0.5, 0.5]}}})
    assert json.loads(open(paths["json"]).read()) == results
    md = open(paths["markdown"]).read()
    assert md == markdown_table(results)
    lines = md.splitlines()
    assert lines[0] == "| Domain | SMAT | Pre | SMAT+full | Pre+full |"
    assert "| a | 50.00 ± 10.00 | 50.00 ± 10.00 | 50.00 ± 10.00 (lr 0.001) |" in md
    assert "| **ID avg** | **50.00** |" in md and "| **OOD avg** | **25.00** |" in md
    assert not list(tmp_path.glob("*.tmp"))
