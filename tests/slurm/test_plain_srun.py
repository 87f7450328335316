"""Plain `srun` without torchrun (one task per rank, as in an sbatch script): SLURM sets SLURM_PROCID and friends
but none of torch's variables. `export_slurm_env` (what smat_dist.launch.rank_main runs there) must give every
task RANK/WORLD_SIZE and the same MASTER_ADDR/MASTER_PORT, so a gloo group forms across the job's nodes."""
from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slurm

CODE = """
import os
assert "RANK" not in os.environ and "MASTER_ADDR" not in os.environ
from smat_dist.launch.env import export_slurm_env
export_slurm_env()
import torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print("RESULT", os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"],
      int(t.item()), flush=True)
dist.destroy_process_group()
"""


def test_plain_srun_forms_a_process_group_across_nodes(slurm_cluster, tmp_path):
    out = tmp_path / "job.out"
    script = tmp_path / "rank.py"
    script.write_text(CODE)
    r = subprocess.run(["sbatch", "--wait", "--nodes=2", "--ntasks-per-node=1", "--time=5", f"--output={out}",
                        f"--chdir={tmp_path}", "--wrap", f"srun {sys.executable} {script}"],
                       capture_output=True, text=True, timeout=300)
    text = out.read_text() if out.exists() else ""
    assert r.returncode == 0, (r.stdout, r.stderr, text)
    rows = sorted(line.split()[1:] for line in text.splitlines() if line.startswith("RESULT"))
    assert [row[0] for row in rows] == ["0", "1"], text
    assert {row[1] for row in rows} == {"2"} and {row[4] for row in rows} == {"3"}   # 1 + 2 summed over both
    assert len({(row[2], row[3]) for row in rows}) == 1   # the same master address and port on every task
    assert 20000 <= int(rows[0][3]) < 32768    # the job's port, below the ephemeral range (launch/env.py)
