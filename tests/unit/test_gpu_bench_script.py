"""scripts/gpu_bench.sh at toy sizes (SMOKE=1, CPU): a GPU session has minutes, so the script itself is
checked here: every part runs and writes parseable figures under $OUT, and nothing else."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # ~40 s


def test_gpu_bench_script_smoke(tmp_path):
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "out"
    env = dict(os.environ, SMOKE="1", OUT=str(out), PY=sys.executable)
    res = subprocess.run(["bash", "scripts/gpu_bench.sh"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "exited" not in res.stdout, res.stdout[-2000:]
    env_info = json.loads((out / "env.json").read_text())
    assert {"torch", "timm", "cuda"} <= set(env_info)
    step = [json.loads(x) for x in (out / "step.jsonl").read_text().splitlines()]
    assert step and step[0]["smat_over_pmf"] > 0 and step[0]["smat_passes"] == 7
    assert step[0]["smat_top_over_pmf"] > 0 and step[0]["teacher_top_fraction"] == 0.5
    scale = [json.loads(x) for x in (out / "scale.jsonl").read_text().splitlines()]
    assert {(r["path"], r["experts"], r["compile"]) for r in scale if r["bench"] == "scale"} == {
        (p, m, False) for p in ("sharded", "gather") for m in (4, 16)} | {("sharded", 4, True)}
    plan = [json.loads(x) for x in (out / "plan.jsonl").read_text().splitlines()]
    assert plan[0]["experts"] == 4 and plan[0]["peak_bytes"]["sharded"] > 0


def test_gpu_bench_script_ends_within_its_budget(tmp_path):
    """With the budget spent, the remaining parts are skipped (and say so) and the script still ends cleanly."""
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "out"
    env = dict(os.environ, SMOKE="1", OUT=str(out), PY=sys.executable, BUDGET_S="0")
    res = subprocess.run(["bash", "scripts/gpu_bench.sh"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "step skipped: the script's budget is spent" in res.stdout
    assert "plan skipped" in res.stdout and not (out / "step.jsonl").exists()


def test_gpu_bench_script_fails_when_a_part_fails(tmp_path):
    """A part that exits non-zero (here: no Python that can run it) fails the whole script, naming the part."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, SMOKE="1", OUT=str(tmp_path / "out"), PY="/bin/false")
    res = subprocess.run(["bash", "scripts/gpu_bench.sh"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 1 and "gpu_bench: failed parts:" in res.stderr and " step" in res.stderr
