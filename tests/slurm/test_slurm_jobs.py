"""The real SLURM tier (slurm/devcluster.sh, started once per session by tests/conftest.py).

Every test runs against the trainer contract `fn(cfg, run_dir, should_stop) -> dict`, with two rank
functions: the toy (tests/slurm/toy_rank.py) and the real trainer (`smat_dist.train.trainer:train`,
skipped until that module exists). Run: `pytest tests/slurm -m slurm` (the requeue tests are also `slow`).
The dev cluster has two nodes (smat-node1, smat-node2): 2-task jobs run on one node, `launcher.nodes=2` jobs
span both.
"""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smat_dist.config.hydra import compose
from smat_dist.launch.env import LaunchError
from smat_dist.launch.slurm import submit, wait
from smat_dist.utils.log import setup_logging

pytestmark = pytest.mark.slurm

TOY = "tests.slurm.toy_rank:train"
TRAINER = "smat_dist.train.trainer:train"
JOB = ["launcher=slurm", "launcher.tasks_per_node=2", "launcher.cpus_per_task=1", "launcher.mem_gb=1",
       "launcher.timeout_min=10", "logging.wandb_mode=disabled"]
# Timings, memory and paths differ between any two runs; the losses, accuracies, sparsity, multipliers,
# temperature and counters must not.
VOLATILE = ("time", "sec", "wall", "rate", "throughput", "elapsed", "resumed", "_s", "per_s", "peak_mem",
            "run_dir", "checkpoint")


def _trainer_available() -> bool:
    return importlib.util.find_spec("smat_dist.train.trainer") is not None


@pytest.fixture(params=[TOY, TRAINER], ids=["toy", "trainer"])
def rank_fn(request):
    if request.param == TRAINER and not _trainer_available():
        pytest.skip("smat_dist.train.trainer is not written yet")
    return request.param


def job_config(rank_fn: str, tmp_path: Path, tasks: int, extra=()):
    if rank_fn == TOY:   # 0.3 s per step so a signal lands mid-run
        ov = ["data.sources=[unused]", f"train.tasks={tasks}", "checkpoint.every_tasks=5",
              "+model.kwargs.toy_step_s=0.3"]
    else:                # a tiny real run: 2 experts, small ViT, a generated dataset
        from tests.data_fixture import make_dataset

        data = make_dataset(tmp_path / "data", images=12, size=32)
        ov = [f"data.sources=[{data}]", f"train.tasks={tasks}", "checkpoint.every_tasks=4", "method.experts=2",
              "model.image_size=32", "model.patch_size=8", "+model.kwargs.depth=2", "data.mode=fixed",
              "data.ways=3", "data.shots=2", "data.queries=2"]
    return compose("train", JOB + ov + list(extra))


def final_state(result: dict, run_dir: Path) -> tuple[dict, dict]:
    """What must match between an interrupted and an uninterrupted run: the result (less timings and the
    resume point) and the last metrics record of the last task."""
    keep = lambda d: {k: v for k, v in d.items() if not any(s in k for s in VOLATILE)}  # noqa: E731
    res = keep({k: v for k, v in result.items() if k not in ("ranks", "job_id")})
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines() if r.strip()]
    task_key = "task" if "task" in rows[-1] else "tasks"
    last = max(rows, key=lambda r: r.get(task_key, 0))
    return res, keep(last)


def wait_for_progress(job, run_dir: Path, records: int, timeout: float = 180) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= records:
            return
        if job.done():
            pytest.fail(f"job {job.job_id} ended before it made progress: {job.stderr()}")
        time.sleep(0.3)
    pytest.fail(f"job {job.job_id}: no {records} metrics records after {timeout}s")


@pytest.fixture
def reference(slurm_cluster, rank_fn, tmp_path_factory):
    """The uninterrupted 2-task job (also the 'trains to completion' check)."""
    run = tmp_path_factory.mktemp("ref") / "run"
    cfg = job_config(rank_fn, run.parent, tasks=30)
    result = wait(submit(cfg, str(run), rank_fn), poll_s=1)
    return run, result


def test_two_task_job_trains_to_completion(reference):
    run, result = reference
    assert result["status"] == "done" and result["tasks"] == 30
    assert len(result["ranks"]) == 2 and all(r["status"] == "done" for r in result["ranks"])
    assert (run / "checkpoints" / "latest").exists()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["scontrol_requeue", "timeout_signal"])
def test_requeued_job_resumes_to_the_same_final_state(reference, rank_fn, tmp_path, how, capsys):
    setup_logging()
    ref_run, ref_result = reference
    run = tmp_path / "run"
    job = submit(job_config(rank_fn, tmp_path, tasks=30), str(run), rank_fn)
    wait_for_progress(job, run, records=8)
    if how == "scontrol_requeue":   # SIGTERM to the tasks, SLURM requeues the job itself
        subprocess.run(["scontrol", "requeue", job.job_id], check=True)
    else:                           # submitit's timeout emulation: USR2 -> checkpoint -> job requeues itself
        job._interrupt(timeout=True)
    result = wait(job, poll_s=1)
    logs = (run / "submitit" / f"{job.job_id}_0_log.err").read_text()
    assert "attempt 2" in logs, "the job was not requeued"
    assert ("SIGUSR2" if how == "timeout_signal" else "SIGTERM") in logs
    # the user waiting on the console is told why the first attempt ended and who requeued it
    console = capsys.readouterr().err
    if how == "timeout_signal":
        assert re.search(rf"job {job.job_id} attempt 1: stopped at task \d+ by SIGUSR2 \(sent by SLURM as the time "
                         r"limit nears.*checkpoint written; requeued by smat_dist \(1 of \d+\)", console), console
    else:
        assert re.search(rf"job {job.job_id} attempt 1: stopped at task \d+ by SIGTERM \(sent by SLURM: preemption, "
                         r"`scontrol requeue` or `scancel`\); checkpoint written; SLURM requeues", console), console
    if rank_fn == TOY:
        assert 5 <= result["resumed_from"] < 30   # resumed from a checkpoint, not from scratch
    assert final_state(result, run) == final_state(ref_result, ref_run)


def test_failed_job_reports_error_and_log_path(slurm_cluster, tmp_path, capsys):
    setup_logging()
    run = tmp_path / "run"
    cfg = job_config(TOY, tmp_path, tasks=10, extra=["+model.kwargs.toy_fail_at=2"])
    job = submit(cfg, str(run), TOY)
    with pytest.raises(LaunchError) as e:
        wait(job, poll_s=1)
    msg = str(e.value)
    assert f"SLURM job {job.job_id} failed" in msg and "ValueError: toy failure at task 2 on rank 1" in msg
    log = Path(e.value.log_path)
    assert log.is_file() and f"log: {log}" in msg and "toy failure" in log.read_text()
    # requeued once by the job's teardown, then recognised as the same failure and not retried
    history = [json.loads(x) for x in (run / "failures.jsonl").read_text().splitlines()]
    assert [h["retry"] for h in history] == [True, False] and "same way at the same task" in msg
    console = capsys.readouterr().err
    assert re.search(rf"job {job.job_id} attempt 1: failed: rank 1 of 2 .*toy failure at task 2.*; requeued by "
                     r"smat_dist's teardown \(retry 1 of", console), console
    assert re.search(rf"job {job.job_id} attempt 2: failed: .*; not requeued \(the previous attempt failed the same "
                     "way", console), console


# ---- the multi-node path: the dev cluster has two slurmd (smat-node1, smat-node2, slurm/devcluster.sh) ----

TWO_NODES = ["launcher.nodes=2", "launcher.tasks_per_node=1"]


def _node_list(job_id: str) -> str:
    out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "NodeList"], capture_output=True,
                         text=True, check=True).stdout.split()
    return out[-1] if out else ""


def _two_nodes_up(slurm_cluster) -> None:
    up = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, check=True).stdout.split()
    assert len(set(up)) >= 2, f"the dev cluster should have 2 nodes (slurm/devcluster.sh), sinfo shows {up}"


def test_two_node_job_trains_to_completion(slurm_cluster, tmp_path):
    """1 task on each of 2 nodes: torch.distributed across SLURM nodes (MASTER_ADDR = the first node)."""
    _two_nodes_up(slurm_cluster)
    run = tmp_path / "run"
    job = submit(job_config(TOY, tmp_path, tasks=12, extra=TWO_NODES), str(run), TOY)
    result = wait(job, poll_s=1)
    assert result["status"] == "done" and result["tasks"] == 12
    assert len(result["ranks"]) == 2 and all(r["status"] == "done" for r in result["ranks"])
    assert _node_list(job.job_id) == "smat-node[1-2]"
    log0 = (run / "submitit" / f"{job.job_id}_0_log.err").read_text()
    assert "2 rank(s), master smat-node1:" in log0


@pytest.mark.slow
def test_two_node_job_requeued_resumes_to_the_same_final_state(reference, rank_fn, tmp_path):
    """2 nodes x 1 task, requeued mid-run (SIGTERM on both nodes), resumes from its checkpoint and ends in
    the same state as the uninterrupted 1 node x 2 tasks job: same world size, so the same episodes."""
    _two_nodes_up(None)
    ref_run, ref_result = reference
    run = tmp_path / "run"
    job = submit(job_config(rank_fn, tmp_path, tasks=30, extra=TWO_NODES), str(run), rank_fn)
    wait_for_progress(job, run, records=8, timeout=300)
    subprocess.run(["scontrol", "requeue", job.job_id], check=True)
    result = wait(job, poll_s=1)
    assert result["status"] == "done" and result["tasks"] == 30
    assert _node_list(job.job_id) == "smat-node[1-2]"
    logs = [(run / "submitit" / f"{job.job_id}_{t}_log.err").read_text() for t in (0, 1)]
    assert "attempt 2: 2 rank(s), master smat-node1:" in logs[0], "the job was not requeued"
    assert all("SIGTERM" in text for text in logs), "each node's task should have been stopped by SIGTERM"
    if rank_fn == TOY:
        assert 5 <= result["resumed_from"] < 30
    else:
        resumed = [int(m) for m in re.findall(r"resumed from \S+ at (\d+) tasks", logs[0])]
        assert resumed and 0 < resumed[-1] < 30, "the requeued job did not resume from a checkpoint"
    assert final_state(result, run) == final_state(ref_result, ref_run)


def test_multirun_sweep_submits_one_job_per_point(slurm_cluster, tmp_path):
    """`smat-train -m launcher=slurm a=1,2` (Hydra's basic sweeper; no hydra-submitit-launcher): every point is
    its own SLURM job, all submitted before any is waited for; each trains in its own run folder."""
    code = ("import sys; from smat_dist.launch.cli import main; "
            f"main({TOY!r}, sys.argv[1:])")
    argv = ["-m", *JOB, "data.sources=[unused]", "checkpoint.every_tasks=5", "+model.kwargs.toy_step_s=0.3",
            "train.tasks=6,9", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    points = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [p["status"] for p in points] == ["submitted", "submitted"], r.stdout
    assert time.time() - t0 < 60, "the sweep waited for its jobs instead of submitting them all"
    ids = [p["job_id"] for p in points]
    assert len(set(ids)) == 2
    deadline = time.time() + 240
    states = {}
    while time.time() < deadline:
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(ids)],
                             capture_output=True, text=True, check=True).stdout
        states = dict(line.split("|")[:2] for line in out.split())
        if all(states.get(i) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") for i in ids):
            break
        time.sleep(1)
    assert all(states.get(i) == "COMPLETED" for i in ids), states
    for p, tasks in zip(points, (6, 9)):
        rows = [json.loads(x) for x in (Path(p["run_dir"]) / "metrics.jsonl").read_text().splitlines() if x]
        assert max(row.get("task", row.get("tasks", 0)) for row in rows) == tasks
