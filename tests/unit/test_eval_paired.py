"""Paired statistics of two methods on the same episodes, against a hand computation."""
from __future__ import annotations

import math

import pytest

from smat_dist.eval.report import paired_table
from smat_dist.eval.stats import paired, paired_average, paired_comparisons


def test_paired_difference_against_a_hand_computation():
    a = [0.8, 0.6, 0.9, 0.7, 1.0]
    b = [0.6, 0.6, 0.7, 0.4, 0.9]
    # d = [0.2, 0.0, 0.2, 0.3, 0.1]: mean 0.16, sample sd sqrt(0.052 / 4) = 0.114018, t(0.975, 4) = 2.776445
    r = paired(a, b)
    assert r["diff"] == pytest.approx(0.16)
    assert r["ci95"] == pytest.approx(2.776445 * math.sqrt(0.052 / 4) / math.sqrt(5), rel=1e-5)
    # t = 0.16 / (0.114018 / sqrt(5)) = 3.1379, two-sided p with 4 dof
    assert r["p"] == pytest.approx(0.03483, abs=2e-4)
    # pairing removes the shared episode difficulty: narrower than the two unpaired intervals combined
    assert r["ci95"] < math.hypot(2.776445 * 0.158114 / math.sqrt(5), 2.776445 * 0.187083 / math.sqrt(5))
    assert paired([0.5, 0.5], [0.5, 0.5]) == {"diff": 0.0, "ci95": 0.0, "p": 1.0, "n": 2}
    with pytest.raises(ValueError, match="same non-zero number of episodes"):
        paired([0.1], [0.1, 0.2])


def test_average_and_table_over_domains():
    avg = paired_average([{"diff": 0.1, "ci95": 0.03}, {"diff": 0.3, "ci95": 0.04}])
    assert avg["diff"] == pytest.approx(0.2) and avg["ci95"] == pytest.approx(0.025)
    results = {"meta": {"methods": ["smat", "pmf"], "modes": ["zeroshot"],
                        "domains": [{"name": "x", "kind": "id"}, {"name": "y", "kind": "ood"}]}}
    per = {"smat": {"zeroshot": {"x": [1.0, 0.5, 0.75], "y": [0.5, 0.5, 1.0]}},
           "pmf": {"zeroshot": {"x": [0.5, 0.5, 0.5], "y": [0.5, 0.25, 1.0]}}}
    c = paired_comparisons(results, per)["smat - pmf"]
    assert c["id"]["diff"] == pytest.approx(0.25) and c["ood"]["diff"] == pytest.approx(0.25 / 3)
    md = paired_table(results, per)
    assert "| smat - pmf | x | +25.00 ±" in md and "| smat - pmf | OOD average | +8.33 ±" in md
