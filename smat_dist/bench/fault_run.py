"""smat-bench fault: how fast a job with a failed rank ends, and how it comes back.

For each case (bench/fault.py: `kill` -9 of rank 1 entering a step's all-to-all, a `nan` loss on rank 1, a
`hang`: rank 1 SIGSTOPped there) a tiny real run (2 ranks, a 2-block ViT on a generated dataset, a checkpoint
every 4 tasks) is faulted once in its first attempt and left to the launcher: it names the failure, and
retries it (launcher.max_failures=1; locally by restarting the ranks, on SLURM by the job's teardown
requeueing it). One row per case:

    detect_s     the fault -> every rank of the attempt has exited (failures.jsonl's record of it)
    requeue_s    the fault -> the first completed step of the retried attempt
    same_as_uninterrupted   every task's logged losses of the faulted run equal an uninterrupted run's
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from smat_dist.bench import fault
from smat_dist.launch import failure

FAULT_AT_TASKS = 6           # the 4th step of 2 ranks x 1 task, after the checkpoint at 4 tasks
TASKS = 12


def bench_config(data: str, launcher: str, step_timeout_s: float, kill_grace_s: float):
    from smat_dist.config.hydra import compose

    ov = [f"data.sources=[{data}]", f"train.tasks={TASKS}", "checkpoint.every_tasks=4", "method.experts=2",
          "model.image_size=32", "model.patch_size=8", "+model.kwargs.depth=2", "data.mode=fixed", "data.ways=3",
          "data.shots=2", "data.queries=2", "data.workers=0", "logging.wandb_mode=disabled",
          f"dist.step_timeout_s={step_timeout_s}", f"launcher.kill_grace_s={kill_grace_s}",
          "launcher.max_failures=1", f"launcher={launcher}"]
    if launcher == "slurm":
        ov += ["launcher.tasks_per_node=2", "launcher.cpus_per_task=1", "launcher.mem_gb=2",
               "launcher.timeout_min=20"]
    else:
        ov += ["launcher.nproc=2"]
    return compose("train", ov)


def _run(cfg, run_dir: Path, rank_fn: str) -> dict:
    from smat_dist.config.schema import LauncherName

    if cfg.launcher.name == LauncherName.local:
        from smat_dist.launch.local import launch_local

        return launch_local(cfg, str(run_dir), rank_fn=rank_fn, restarts=cfg.launcher.max_failures)
    from smat_dist.launch import slurm

    return slurm.wait(slurm.submit(cfg, str(run_dir), rank_fn), poll_s=1, run_dir=str(run_dir))


def losses_by_task(run_dir: Path) -> dict[int, dict]:
    """The losses logged for each task count (a retried step's later record wins)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out[row["tasks"]] = {k: v for k, v in row.items() if k.startswith("loss")}
    return out


def run_case(case: str, cfg, root: Path, reference: dict) -> dict:
    from smat_dist.launch.env import LaunchError

    run_dir = root / case
    fault.write_spec(run_dir, case, rank=1, at_tasks=FAULT_AT_TASKS)
    row = {"case": case, "launcher": cfg.launcher.name.value,
           "step_timeout_s": cfg.dist.step_timeout_s, "kill_grace_s": cfg.launcher.kill_grace_s}
    try:
        _run(cfg, run_dir, "smat_dist.bench.fault:inject")
        row["error"] = None
    except LaunchError as e:
        row["error"] = " ".join(str(e).split())
    fired = fault.read_stamp(run_dir, fault.FIRED)
    history = failure.read_history(run_dir)
    resumed = fault.read_stamp(run_dir, fault.RESUMED)
    row["detect_s"] = round(history[0]["time"] - fired, 2) if history and fired else None
    row["requeue_s"] = round(resumed - fired, 2) if resumed and fired else None
    row["cause"] = history[0]["message"] if history else None
    row["retried"] = bool(history and history[0]["retry"])
    row["same_as_uninterrupted"] = row["error"] is None and losses_by_task(run_dir) == reference
    return row


def run(launcher: str, cases: list[str], root: str | None = None, step_timeout_s: float = 15.0,
        kill_grace_s: float = 5.0, emit=None) -> list[dict]:
    from smat_dist.bench.data import build_synthetic

    tmp = None
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="smat-bench-fault-")
        root = tmp.name
    root_p = Path(root) / f"{launcher}-{time.strftime('%H%M%S')}"
    root_p.mkdir(parents=True)
    data = build_synthetic(str(root_p), classes=10, images=12, size=32)
    cfg = bench_config(data, launcher, step_timeout_s, kill_grace_s)
    rows = []
    try:
        _run(cfg, root_p / "reference", "smat_dist.train.trainer:train")
        reference = losses_by_task(root_p / "reference")
        for case in cases:
            row = run_case(case, cfg, root_p, reference)
            rows.append(row)
            if emit:
                emit(row)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return rows
