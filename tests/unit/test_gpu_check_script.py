"""scripts/gpu_check.sh in its CPU smoke mode (SMOKE=1): the GPU acceptance check is itself checked in CI, so a
GPU session spends its minutes on the GPU, not on the script. It must train through DeepSpeed, stop on
SIGTERM with a checkpoint, resume to the uninterrupted run's exact losses, evaluate on 2 sharded ranks and
bench, and it must fail (exit 1, the part named) when a part fails."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path, **env):
    out = tmp_path / "out"
    e = dict(os.environ, SMOKE="1", OUT=str(out), PY=sys.executable, **env)
    p = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)
    return p, out


def test_gpu_check_smoke_trains_saves_resumes_exactly_and_evaluates(tmp_path):
    p, out = _run(tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads((out / "gpu_check.json").read_text())
    assert rep["failed"] == [] and rep["ranks"] == 2 and rep["precision"] == "fp32"
    assert rep["parts"]["train_interrupted"]["status"] == "stopped"
    r = rep["resume"]
    assert r["same_as_uninterrupted"] and r["max_abs_loss_diff"] == 0.0 and 0 < r["stopped_at"] < r["tasks"][0]
    assert set(rep["eval"]) == {"smat/zeroshot", "pretrained/zeroshot"}
    assert rep["step"][0]["smat_over_pmf"] > 0 and rep["plan"][0]["peak_bytes"]["sharded"] > 0


def test_gpu_check_fails_loudly_when_a_part_fails(tmp_path):
    p, out = _run(tmp_path, BUDGET_S="0")    # nothing can run: every part is a failure, not a silent skip
    assert p.returncode == 1
    rep = json.loads((out / "gpu_check.json").read_text())
    assert "train_uninterrupted" in rep["failed"] and "resume" in rep["failed"]
