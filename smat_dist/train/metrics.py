"""Where a step's metrics go: averaged over ranks, then metrics.jsonl and wandb on rank 0, and every
train.log_every steps a progress line in rank 0's log and its record in progress.jsonl (train/progress_records.py,
what the launcher's console shows)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from smat_dist.train import progress_records
from smat_dist.utils.log import get_logger

log = get_logger(__name__)
_AVERAGED = ("loss/", "acc/", "episode/")


class MetricsLogger:
    """Rank 0 writes metrics.jsonl (appended across requeues) and the wandb run; every rank averages."""

    def __init__(self, run_dir: Path, comm, cfg, wandb_id: str | None, total_tasks: int):
        self.comm, self.cfg, self.total, self.run_dir = comm, cfg, total_tasks, Path(run_dir)
        self.rank0 = comm.rank == 0
        self.file = open(Path(run_dir) / "metrics.jsonl", "a") if self.rank0 else None
        self.wandb = None
        if self.rank0 and cfg.logging.wandb_mode != "disabled":
            from smat_dist.train import wandb_run

            self.wandb, wandb_id = wandb_run.start(cfg, str(run_dir), wandb_id)
        self.wandb_id = comm.broadcast_object(wandb_id)
        self._t0, self._tasks0 = time.perf_counter(), None

    def average(self, m: dict) -> dict:
        """Losses, accuracies and episode sizes averaged over ranks (one all-reduce)."""
        keys = sorted(k for k in m if k.startswith(_AVERAGED))
        avg = self.comm.all_reduce(torch.tensor([m[k] for k in keys], dtype=torch.float64)) / self.comm.world
        return {**m, **{k: float(v) for k, v in zip(keys, avg)}}

    def log(self, m: dict, tasks: int, step: int, per_step: int) -> None:
        if not self.rank0:
            return
        self.file.write(json.dumps(m) + "\n")
        self.file.flush()
        if self.wandb is not None:
            from smat_dist.train import wandb_run

            wandb_run.log(m, tasks)
        if self._tasks0 is None:   # this process's first step: the rate counts from this start (a resume) only
            self._tasks0, self._t0 = tasks - per_step, time.perf_counter() - m["step_s"]
        if step % max(1, self.cfg.train.log_every) == 0 or tasks >= self.total:
            rate = (tasks - self._tasks0) / max(1e-9, time.perf_counter() - self._t0)
            eta = (self.total - tasks) / rate if rate > 0 else float("nan")
            loss, acc = m.get("loss/task", float("nan")), m.get("acc/query", float("nan"))
            shown = f"loss {loss:.4f} acc {acc:.3f}"
            log.info("tasks %d/%d %s %.3g tasks/s eta %s", tasks, self.total, shown, rate, _eta(eta))
            progress_records.write(self.run_dir, "progress", tasks=tasks, total=self.total, rate=rate,
                                   eta_s=None if eta != eta else eta, loss=loss, acc=acc, shown=shown)

    def validation(self, tasks: int, acc_mean: float) -> None:
        """The validation line in every rank's log; rank 0 writes it as a record too."""
        text = f"validation at {tasks} tasks: mean zero-shot accuracy {acc_mean:.3f}"
        log.info("%s", text)
        if self.rank0:
            progress_records.write(self.run_dir, "validation", tasks=tasks, acc_mean=acc_mean, text=text)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            from smat_dist.train import wandb_run

            wandb_run.finish()


def _eta(s: float) -> str:
    if s != s:
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
