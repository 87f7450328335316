"""The demo report states target vs reached sparsity and calls the run "SMAT at tau" only within 0.05."""
from __future__ import annotations

import math

from smat_dist.demo.report import _sparsity_verdict, sparsity_reached


def _row(train, ev, **extra):
    r = {f"sparsity/expert{i}": v for i, v in enumerate(train)}
    r.update({f"sparsity_eval/expert{i}": v for i, v in enumerate(ev)})
    r.update(extra)
    return r


def test_within_tolerance_in_both_gates_is_smat_at_tau():
    rows = [_row([0.1, 0.1], [0.0, 0.0], step=1), _row([0.91, 0.88], [0.90, 0.86], step=2), {"val/acc": 0.5}]
    sp = sparsity_reached(rows, 2, 0.9)        # the last row with counts, not the validation row after it
    assert sp["ok"] and sp["train"] == [0.91, 0.88] and sp["eval"] == [0.90, 0.86]
    assert math.isclose(sp["worst"], 0.04)
    assert _sparsity_verdict(sp).startswith("SMAT at τ=0.90")


def test_one_expert_off_in_the_eval_gate_is_refused():
    # the demo: training gate ~0.34, eval gate ~0.055 at tau 0.9
    sp = sparsity_reached([_row([0.90, 0.90], [0.90, 0.84])], 2, 0.9)
    assert not sp["ok"] and math.isclose(sp["worst"], 0.06)
    v = _sparsity_verdict(sp)
    assert v.startswith("**not SMAT at τ=0.90**") and "0.060" in v and "0.840-0.900" in v


def test_no_counts_is_not_called_smat_at_tau():
    sp = sparsity_reached([{"loss/task": 1.0}], 2, 0.9)
    assert not sp["ok"] and "not checked" in _sparsity_verdict(sp)
    assert not sparsity_reached([_row([0.9, float("nan")], [0.9, 0.9])], 2, 0.9)["ok"]
