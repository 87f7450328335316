"""Accuracy over meta-training end to end: a SMAT and a P>M>F run trained through the real trainer (1 gloo
rank, DeepSpeed) with checkpoint.keep_every, then `smat-analyze --curve` evaluates both at every kept point on
the same fixed episodes and writes the table and the figure; a rerun evaluates nothing again."""
from __future__ import annotations

import json

import pytest

from smat_dist.analysis.cli import main as analyze_main
from tests.data_fixture import make_dataset
from tests.distributed.helpers import run_ranks, tiny_config

# ~75 s on the shared 2-core machine under load (two trainings, DeepSpeed set-up, five evaluations)
pytestmark = [pytest.mark.dist, pytest.mark.slow]


def _train_both(rank: int, world: int, data: str, root: str):
    from smat_dist.train import trainer

    for method in ("smat", "pmf"):
        cfg = tiny_config(data, tasks=4, method=method, every=1)
        cfg.checkpoint.keep, cfg.checkpoint.keep_every = 1, 2
        cfg.logging.mask_diagnostics = True
        trainer.train(cfg, f"{root}/{method}")
    return None


def test_curve_of_two_runs(tmp_path, capsys):
    data = str(make_dataset(tmp_path / "d", "toy"))
    ood = str(make_dataset(tmp_path / "d", "other", splits={"test": 6}))
    run_ranks(_train_both, 1, data, str(tmp_path))
    smat, pmf = tmp_path / "smat", tmp_path / "pmf"
    # keep=1 keeps the last (4); keep_every=2 keeps 2 for good; 1 and 3 were purged
    for run in (smat, pmf):
        assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000000002", "step-000000004"]
    out = tmp_path / "curve"
    argv = [str(smat), "--curve", "--against", str(pmf), "--out", str(out), f"data.eval_sources=[{ood}]",
            "eval.episodes=3"]
    assert analyze_main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed["files"]) == {"json", "markdown", "figure"}
    curve = json.loads((out / "curve.json").read_text())
    assert [p["tasks"] for p in curve["points"]] == [2, 4]
    for p in curve["points"]:
        for m in ("smat", "pmf"):
            assert 0.0 <= p[m]["id"] <= 1.0 and 0.0 <= p[m]["ood"] <= 1.0
        d = p["smat_minus_pmf"]["ood"]
        assert d["domains"] == 1 and d["ci95"] >= 0
        masks = p["masks"]
        assert 0.0 <= masks["sparsity"] <= 1.0 and 0.0 <= masks["kept_from_init"] <= 1.0
        assert 0.0 <= masks["mask/penalty_share"] <= 1.0 and 0.0 < masks["mask/clip_scale"] <= 1.0
    assert curve["pretrained"] is not None                        # evaluated once, at the first point
    first = json.loads((out / "points" / "tasks-000000002" / "results.json").read_text())
    later = json.loads((out / "points" / "tasks-000000004" / "results.json").read_text())
    assert "pretrained" in first["results"] and "pretrained" not in later["results"]
    assert curve["steps"]["tasks"] == [1, 2, 3, 4] and len(curve["steps"]["mask/penalty_share"]) == 4
    md = (out / "curve.md").read_text()
    assert md.count("\n| 2 |") == 1 and md.count("\n| 4 |") == 1
    assert (out / "curve.png").stat().st_size > 10_000
    # a rerun keeps the finished points (their stamps match) and rewrites the same table
    stamp = (out / "points" / "tasks-000000004" / "results.json").stat().st_mtime_ns
    assert analyze_main(argv) == 0
    assert (out / "points" / "tasks-000000004" / "results.json").stat().st_mtime_ns == stamp
    assert (out / "curve.md").read_text() == md
    # a point without a checkpoint is refused by name
    assert analyze_main(argv + ["--points", "3"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
