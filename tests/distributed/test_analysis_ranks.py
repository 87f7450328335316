"""smat-analyze from slices: on 2 ranks (--nproc 2) every rank holds half of the pool, the counts are summed
over ranks, and capacity and overlap equal the single-process analysis of the same checkpoint."""
from __future__ import annotations

import json

import pytest

from smat_dist.analysis.cli import main as analyze_main
from tests.data_fixture import make_dataset
from tests.distributed.helpers import run_ranks, tiny_config, train_rank

pytestmark = pytest.mark.dist


def test_analysis_on_two_ranks_equals_one(tmp_path):
    data = make_dataset(tmp_path, "toy")
    cfg = tiny_config(str(data), tasks=4, experts=3)
    cfg.model.kwargs = {"depth": 2}
    cfg.method.sparsity.init_std = 2.0     # a pool with both zero and non-zero eval masks
    run_ranks(train_rank, 2, cfg, str(tmp_path / "run"))
    assert analyze_main([str(tmp_path / "run"), "--episodes", "0", "--out", str(tmp_path / "a1")]) == 0
    assert analyze_main([str(tmp_path / "run"), "--episodes", "0", "--out", str(tmp_path / "a2"),
                         "--nproc", "2"]) == 0
    one = json.loads((tmp_path / "a1" / "analysis.json").read_text())
    two = json.loads((tmp_path / "a2" / "analysis.json").read_text())
    assert one["capacity"] == two["capacity"] and one["overlap"] == two["overlap"]
    assert 0 < min(one["capacity"]["overall"]) and max(one["capacity"]["overall"]) < 1
    assert (tmp_path / "a2" / "capacity.png").read_bytes()[:4] == b"\x89PNG"
