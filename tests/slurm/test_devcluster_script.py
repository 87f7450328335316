"""slurm/devcluster.sh from any folder (issue 29, item 4): `status` without a state folder finds the running
cluster from another directory, and `stop` of another (empty) state folder keeps the node names in /etc/hosts
that the running cluster needs."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm
SCRIPT = str(Path(__file__).resolve().parents[2] / "slurm" / "devcluster.sh")


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SMAT_SLURM_DIR", "SLURM_CONF")}
    return subprocess.run(["bash", SCRIPT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_status_from_another_folder_finds_the_running_cluster(slurm_cluster, tmp_path):
    p = _run("status", cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"export SLURM_CONF={slurm_cluster}" in p.stdout
    assert not (tmp_path / ".cache").exists()     # no state folder made under the current directory


def test_stop_of_another_state_folder_keeps_the_running_clusters_hosts(slurm_cluster, tmp_path):
    hosts_before = Path("/etc/hosts").read_text()
    assert "# smat devcluster" in hosts_before
    p = _run("stop", str(tmp_path / "other"), cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert Path("/etc/hosts").read_text() == hosts_before
    assert _run("status", cwd=tmp_path).returncode == 0   # the running cluster is untouched
