"""Plain `smat-train` with 2 local ranks through the real trainer (tiny ViT, 6 tasks): rank 0's progress reaches
the console (done/total, rate, ETA), not only logs/rank0.log; the run leaves no empty cli.log."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data_fixture import make_dataset

pytestmark = [pytest.mark.e2e, pytest.mark.dist]
REPO = Path(__file__).resolve().parents[2]


def test_smat_train_shows_rank0_progress_on_the_console(tmp_path):
    data = make_dataset(tmp_path / "data", "toy")
    run = tmp_path / "run"
    args = [f"data.sources=[{data}]", "model.image_size=32", "model.patch_size=8", "method.experts=2",
            "data.mode=fixed", "data.ways=3", "data.shots=2", "data.queries=2", "data.workers=0", "train.tasks=6",
            "checkpoint.every_tasks=0", "logging.wandb_mode=disabled", "launcher.nproc=2", f"run_dir={run}"]
    p = subprocess.run([sys.executable, "-c", "from smat_dist.launch.cli import main; main()", *args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["status"] == "done"
    # not a terminal: plain lines, the last one at 6/6; each with a rate and an ETA
    lines = [x for x in p.stderr.splitlines() if re.search(r"train: \d+/6 tasks", x)]
    assert lines, p.stderr[-3000:]
    assert re.search(r"train: 6/6 tasks \(100%\), [\d.e+]+ tasks/s, ETA 0s \| loss [\d.]+ acc [\d.]+", lines[-1]), lines
    first = re.search(r"train: (\d+)/6 tasks \(\d+%\), ([\d.e+]+) tasks/s, ETA (\S+)", lines[0])
    assert first and int(first.group(1)) < 6 and float(first.group(2)) > 0 and first.group(3) != "?", lines
    assert "tasks 6/6" in (run / "logs" / "rank0.log").read_text()
    assert not list(run.rglob("cli.log")) and not list(tmp_path.rglob("cli.log"))
