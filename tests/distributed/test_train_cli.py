"""smat-train end to end with the local launcher (2 gloo ranks of the toy rank function): the resolved
config in the run folder, resume=RUN_DIR, Ctrl-C/SIGTERM -> checkpoint -> resume to the same final
state, and a failing rank reported with its log path."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smat_dist.config.hydra import load_yaml

pytestmark = pytest.mark.dist
TOY = "tests.slurm.toy_rank:train"
BASE = ["data.sources=[shards/a]", "checkpoint.every_tasks=4", "logging.wandb_mode=disabled"]


def smat_train(*args: str, cwd: Path, background: bool = False):
    cmd = [sys.executable, "-c", f"from smat_dist.launch.cli import main; main(rank_fn={TOY!r})", *args]
    if background:
        return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=240)


def result_of(proc_stdout: str) -> dict:
    return json.loads(proc_stdout.strip().splitlines()[-1])


def test_run_saves_config_and_resume_continues(tmp_path):
    run = tmp_path / "run"
    p = smat_train(*BASE, "train.tasks=8", "method.experts=3", f"run_dir={run}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    r = result_of(p.stdout)
    assert (r["status"], r["tasks"], r["run_dir"]) == ("done", 8, str(run))
    saved = load_yaml(run / "config.yaml")
    assert (saved.method.experts, saved.train.tasks, saved.run_dir) == (3, 8, str(run))
    assert {"rank0.log", "rank1.log"} <= set(os.listdir(run / "logs"))

    # the same run_dir with a different config is refused (it would resume someone else's checkpoint)
    p = smat_train(*BASE, "train.tasks=9", f"run_dir={run}", cwd=tmp_path)
    assert p.returncode == 2 and "resume=" in p.stderr

    # resume by hand, longer: continues from the checkpoint at task 8 with the saved config
    p = smat_train(f"resume={run}", "train.tasks=12", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    r = result_of(p.stdout)
    assert (r["status"], r["tasks"], r["resumed_from"]) == ("done", 12, 8)
    assert load_yaml(run / "config.yaml").method.experts == 3
    assert list(run.glob("config.*.yaml")), "the previous config is kept"


def test_stop_signal_checkpoints_and_resume_matches_uninterrupted(tmp_path):
    args = [*BASE, "train.tasks=24", "+model.kwargs.toy_step_s=0.25"]
    ref = smat_train(*args, f"run_dir={tmp_path / 'ref'}", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr

    run = tmp_path / "run"
    proc = smat_train(*args, f"run_dir={run}", cwd=tmp_path, background=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 6):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)   # forwarded to the ranks as a stop request
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    stopped = result_of(out)
    assert stopped["status"] == "stopped" and 6 <= stopped["tasks"] < 24

    p = smat_train(f"resume={run}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    r = result_of(p.stdout)
    assert r["resumed_from"] == stopped["tasks"]
    assert r["digest"] == result_of(ref.stdout)["digest"]
    last = lambda d: json.loads((d / "metrics.jsonl").read_text().splitlines()[-1])  # noqa: E731
    assert last(run) == last(tmp_path / "ref")


def test_failing_rank_is_reported_with_its_log(tmp_path):
    run = tmp_path / "run"
    p = smat_train(*BASE, "train.tasks=8", "+model.kwargs.toy_fail_at=2", f"run_dir={run}", cwd=tmp_path)
    assert p.returncode == 1
    assert "rank 1 of 2 failed: ValueError: toy failure at task 2 on rank 1" in p.stderr
    log = run / "logs" / "rank1.log"
    assert f"log: {log}" in p.stderr
    assert "ValueError: toy failure" in log.read_text()


def test_killed_rank_is_named_with_its_signal_not_the_peer_error(tmp_path):
    run = tmp_path / "run"
    p = smat_train(*BASE, "train.tasks=8", "+model.kwargs.toy_kill_at=2", f"run_dir={run}", cwd=tmp_path)
    assert p.returncode == 1
    err = [x for x in p.stderr.splitlines() if x.startswith("smat-train: error:")]
    assert len(err) == 1, p.stderr
    assert err[0].startswith("smat-train: error: rank 1 of 2 was killed by SIGKILL (signal 9: possibly the "
                             "out-of-memory killer, or kill -9)"), err
    assert f"log: {run / 'logs' / 'rank1.log'}" in err[0]


def test_config_error_names_the_key(tmp_path):
    p = smat_train(*BASE, "method.sparsity.targte=0.5", cwd=tmp_path)
    assert p.returncode != 0 and "targte" in p.stderr
    p = smat_train("train.tasks=4", cwd=tmp_path)
    assert p.returncode == 2 and "data.sources" in p.stderr
