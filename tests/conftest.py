"""Shared fixtures: the repo on the path of every process the tests start, and the dev SLURM cluster."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
# spawned ranks, CLI subprocesses and SLURM jobs import `tests.*` rank functions by name
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

SLURM_BINARIES = ("sbatch", "sacct", "scontrol", "slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd")


def _missing_slurm() -> str | None:
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin"
    missing = [b for b in SLURM_BINARIES if shutil.which(b, path=path) is None]
    if missing:
        return f"SLURM dev cluster binaries not installed ({', '.join(missing)}): run slurm/install.sh as root"
    if os.geteuid() != 0:
        return "the SLURM dev cluster runs its daemons as root; run the slurm tier as root"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start slurm/devcluster.sh once per session (state in $SMAT_SLURM_DIR or .cache/slurm); stop it at
    the end unless it was already running. Yields the SLURM_CONF path (also exported)."""
    reason = _missing_slurm()
    if reason:
        pytest.skip(reason)
    state = os.environ.get("SMAT_SLURM_DIR", str(REPO / ".cache" / "slurm"))
    script = str(REPO / "slurm" / "devcluster.sh")
    was_up = subprocess.run(["bash", script, "status", state], capture_output=True).returncode == 0
    if not was_up:
        r = subprocess.run(["bash", script, "start", state], capture_output=True, text=True, timeout=180)
        if r.returncode != 0:
            pytest.fail(f"slurm/devcluster.sh start failed:\n{r.stdout}\n{r.stderr}")
    conf = str(Path(state).resolve() / "etc" / "slurm.conf")
    os.environ["SLURM_CONF"] = conf
    yield conf
    if not was_up:
        subprocess.run(["bash", script, "stop", state], capture_output=True, timeout=120)
