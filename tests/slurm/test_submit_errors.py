"""sbatch refusing a job (issue 29, item 3): one `smat-train: error:` line naming the cause, exit code 1, and
no run folder left behind. Needs SLURM's sbatch binary only (the missing configuration is the point, so no
cluster runs)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slurm


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="SLURM's sbatch is not installed (slurm/install.sh)")
def test_missing_slurm_configuration_is_one_line_and_no_run_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    cmd = [sys.executable, "-c", "from smat_dist.launch.cli import main; main(rank_fn='tests.slurm.toy_rank:train')",
           "launcher=slurm", "data.sources=[unused]", "logging.wandb_mode=disabled"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("smat-train: error:")]
    assert len(errors) == 1 and errors[0] == p.stderr.strip().splitlines()[-1], p.stderr
    assert "configuration" in errors[0] and "SLURM_CONF" in errors[0]
    # no sbatch chatter beside the one line (submitit echoes sbatch's stderr)
    assert "sbatch:" not in p.stderr.replace(errors[0], "")
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())
