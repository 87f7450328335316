"""smat-eval through its console entry point: a SMAT checkpoint trained on 2 ranks evaluates on 1 rank (in
the process) and on 2 local ranks (eval.ranks=2: each rank loads only its half of the pool), with the same
per-episode accuracies; a missing checkpoint is one error line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.data_fixture import make_dataset
from tests.distributed.helpers import run_ranks, tiny_config, train_rank

pytestmark = [pytest.mark.e2e, pytest.mark.dist]


def _smat_eval(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smat_dist.eval.cli", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    data = make_dataset(root, "toy")
    cfg = tiny_config(str(data), tasks=4, experts=3)
    cfg.model.kwargs = {"depth": 2}
    run_ranks(train_rank, 2, cfg, str(root / "run"))
    return root, data


def test_eval_on_two_ranks_equals_one_rank(trained):
    root, data = trained
    common = [f"eval.checkpoint={root / 'run'}", f"data.sources=[{data}]", "eval.methods=[smat]",
              "eval.episodes=5", "data.mode=fixed", "data.ways=3", "data.shots=2", "data.queries=2",
              "data.workers=0", "model.name=vit_tiny_patch16_224", "model.image_size=32", "model.patch_size=8",
              "logging.wandb_mode=disabled"]
    one = _smat_eval(*common, f"run_dir={root / 'e1'}")
    assert one.returncode == 0, one.stderr[-2000:]
    two = _smat_eval(*common, f"run_dir={root / 'e2'}", "eval.ranks=2")
    assert two.returncode == 0, two.stderr[-2000:]
    s1, s2 = json.loads(one.stdout.strip().splitlines()[-1]), json.loads(two.stdout.strip().splitlines()[-1])
    assert s1["averages"] == s2["averages"]
    r1 = json.loads((root / "e1" / "results.json").read_text())
    r2 = json.loads((root / "e2" / "results.json").read_text())
    assert r1["results"] == r2["results"] and r2["meta"]["world_size"] == 2
    # each rank held half of the pool: its log names its slice
    logs = [(root / "e2" / "logs" / f"rank{r}.log").read_text() for r in range(2)]
    slices = [line.split("pool slice ")[1].split(" of ")[0] for text in logs for line in text.splitlines()
              if "pool slice [" in line]
    assert len(set(slices)) == 2


def test_missing_checkpoint_is_one_line(tmp_path):
    res = _smat_eval(f"eval.checkpoint={tmp_path / 'nope'}", f"run_dir={tmp_path / 'e'}")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("smat-eval: error:")
    assert "Traceback" not in res.stderr
