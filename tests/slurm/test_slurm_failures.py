"""A failing rank in a real SLURM job (slurm/devcluster.sh), the real trainer, the fault injected in its own
step (bench/fault.py): the step ends at once (srun --kill-on-bad-exit), the job's teardown names the cause in
failure.json and requeues the job by itself, and the requeued job finishes with the uninterrupted run's
losses. (A deterministic failure, retried once and then not: tests/slurm/test_slurm_jobs.py
test_failed_job_reports_error_and_log_path.)"""
from __future__ import annotations

import pytest

from smat_dist.bench import fault_run
from smat_dist.launch.slurm import submit, wait

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_killed_rank_job_requeues_itself_and_ends_like_the_uninterrupted_run(slurm_cluster, tmp_path):
    from smat_dist.bench.data import build_synthetic

    data = build_synthetic(str(tmp_path), classes=10, images=12, size=32)
    cfg = fault_run.bench_config(data, "slurm", step_timeout_s=15.0, kill_grace_s=5.0)
    wait(submit(cfg, str(tmp_path / "ref"), "smat_dist.train.trainer:train"), poll_s=1, run_dir=str(tmp_path / "ref"))
    row = fault_run.run_case("kill", cfg, tmp_path, fault_run.losses_by_task(tmp_path / "ref"))
    assert row["error"] is None and row["retried"], row
    assert row["cause"].startswith("rank 1 of 2 was killed without a Python error (srun: Killed"), row
    assert row["detect_s"] < 30 and row["requeue_s"] < 180, row
    assert row["same_as_uninterrupted"], row
    logs = (tmp_path / "kill" / "submitit").glob("*_0_log.err")
    assert any("attempt 2" in p.read_text() for p in logs), "the job was not requeued"
