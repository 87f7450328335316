"""A failing rank in a real 2-rank training run under the local launcher (bench/fault.py injects the fault in
the trainer's own step): every rank stops together, the cause is named, and a transient failure comes back
by itself to the uninterrupted run's losses while a repeated one is not retried."""
from __future__ import annotations

import json
import pickle
import time

import pytest

from smat_dist.bench import fault
from smat_dist.bench.fault_run import FAULT_AT_TASKS, bench_config, losses_by_task
from smat_dist.launch import failure
from smat_dist.launch.env import LaunchError
from smat_dist.launch.local import launch_local

pytestmark = pytest.mark.dist
INJECT = "smat_dist.bench.fault:inject"


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    from smat_dist.bench.data import build_synthetic

    data = build_synthetic(str(tmp_path_factory.mktemp("data")), classes=10, images=12, size=32)
    return bench_config(data, "local", step_timeout_s=15.0, kill_grace_s=5.0)


@pytest.fixture(scope="module")
def reference(cfg, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref")
    launch_local(cfg, str(run))
    return losses_by_task(run)


def test_killed_rank_ends_the_job_within_the_grace_period_and_is_retried(cfg, reference, tmp_path):
    fault.write_spec(tmp_path, "kill", rank=1, at_tasks=FAULT_AT_TASKS)
    out = launch_local(cfg, str(tmp_path), rank_fn=INJECT, restarts=1)
    first = failure.read_history(tmp_path)[0]
    # SIGKILLed entering the step's all-to-all: rank 0 was in that collective and left within the grace period
    assert first["time"] - fault.read_stamp(tmp_path, fault.FIRED) < cfg.launcher.kill_grace_s
    assert first["message"].startswith(f"rank 1 of 2 was killed by SIGKILL (signal 9: possibly the out-of-memory "
                                       f"killer, or kill -9) after {FAULT_AT_TASKS} tasks on host")
    assert [v["rank"] for v in first["victims"]] == [0] and first["retry"]
    # back by itself from the checkpoint at 4 tasks, and every task's losses are the uninterrupted run's
    assert out["status"] == "done" and out["tasks"] == cfg.train.tasks
    assert losses_by_task(tmp_path) == reference


def test_nan_on_one_rank_stops_every_rank_and_a_repeated_one_is_not_retried(cfg, tmp_path):
    fault.write_spec(tmp_path, "nan", rank=1, at_tasks=FAULT_AT_TASKS, every_attempt=True)
    t0 = time.time()
    with pytest.raises(LaunchError) as e:
        launch_local(cfg, str(tmp_path), rank_fn=INJECT, restarts=1)
    # rank 1's first task of the step that starts at 6 tasks is global task 7; both ranks raised naming it
    for r in range(2):
        with open(tmp_path / "logs" / f"rank{r}.result.pkl", "rb") as f:
            outcome = pickle.load(f)
        assert outcome["error"].startswith("NonFiniteLoss: non-finite loss at task 7 (rank 1"), outcome["error"]
        assert outcome["tasks"] == FAULT_AT_TASKS
    history = failure.read_history(tmp_path)
    assert [h["retry"] for h in history] == [True, False]   # retried once, then recognised as deterministic
    msg = str(e.value)
    assert msg.startswith("rank 1 of 2 failed: NonFiniteLoss: non-finite loss at task 7 (rank 1, source"), msg
    assert "NonFiniteLoss" in msg and "same way at the same task" in msg and "failure.json" in msg
    assert json.loads((tmp_path / "failure.json").read_text())["retry"] is False
    assert time.time() - t0 < 120


def _late_rank(rank, world, dcfg):
    import torch
    import torch.distributed as dist

    from smat_dist.distributed.timeouts import shorten_after_first_step

    shorten_after_first_step(dcfg)
    if rank == 1:   # does not join the collective (as a hung rank would not), for longer than the short timeout
        time.sleep(dcfg.step_timeout_s + 6)
        return None
    t0 = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
    except Exception as e:  # noqa: BLE001 - the timeout's error is what is checked
        return time.monotonic() - t0, str(e)
    return None


def test_short_timeout_after_the_first_step_ends_a_wait_for_a_hung_rank():
    from tests.distributed.helpers import run_ranks
    from smat_dist.config.schema import DistConfig

    waited, err = run_ranks(_late_rank, 2, DistConfig(step_timeout_s=2.0))[0]
    assert 1.5 < waited < 6, waited          # the group started with gloo's 30 minutes
    assert failure.is_peer_error(err), err   # the waiting rank is reported as a victim, not the cause


def test_a_run_stopped_by_a_second_ctrl_c_is_not_retried(tmp_path):
    """Two SIGINTs to smat-train: the ranks are killed as the user asked, reported, and not started again."""
    import signal
    import subprocess
    import sys

    toy = "tests.slurm.toy_rank:train"
    cmd = [sys.executable, "-c", f"from smat_dist.launch.cli import main; main(rank_fn={toy!r})",
           "data.sources=[unused]", "train.tasks=200", "+model.kwargs.toy_step_s=0.5", "logging.wandb_mode=disabled",
           f"run_dir={tmp_path}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "was killed by the launcher (a second Ctrl-C)" in err and "launched 2 rank(s)" in err
    assert err.count("launched 2 rank(s)") == 1 and not (tmp_path / "failures.jsonl").exists()
