"""A tiny but real distributed rank function with the trainer's contract, for launcher tests.

`train(cfg, run_dir, should_stop) -> dict` like `smat_dist.train.trainer.train`: gloo process group from
the launcher's env vars, a linear model trained with all-reduced gradients on per-(step, rank) seeded
data, a checkpoint every `checkpoint.every_tasks` steps and on stop (`checkpoints/latest` names the newest
complete one), auto-resume, `metrics.jsonl` on rank 0. Knobs ride in `model.kwargs`: `toy_step_s` (sleep
per step, so signals land mid-run), `toy_fail_at` (rank 1 raises at that step) and `toy_kill_at` (rank 1
SIGKILLs itself there, as the OOM killer would).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist


def _latest(ckpt_root: Path) -> Path | None:
    p = ckpt_root / "latest"
    if not p.is_file():
        return None
    d = ckpt_root / p.read_text().strip()
    return d if (d / "state.pt").is_file() else None


def _save(ckpt_root: Path, step: int, w: torch.Tensor, rank: int) -> None:
    dist.barrier()
    if rank == 0:
        d = ckpt_root / f"step_{step:06d}"
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"step": step, "w": w.clone()}, d / "state.pt.tmp")
        os.replace(d / "state.pt.tmp", d / "state.pt")
        (ckpt_root / "latest.tmp").write_text(d.name)
        os.replace(ckpt_root / "latest.tmp", ckpt_root / "latest")   # the pointer flips last: atomic
    dist.barrier()


def train(cfg, run_dir: str, should_stop=None) -> dict:
    should_stop = should_stop or (lambda: False)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        return _loop(cfg, Path(run_dir), should_stop, rank, world)
    finally:
        dist.destroy_process_group()


def _loop(cfg, run_dir: Path, should_stop, rank: int, world: int) -> dict:
    kw = cfg.model.kwargs
    step_s, fail_at = float(kw.get("toy_step_s", 0.0)), kw.get("toy_fail_at")
    g = torch.Generator().manual_seed(cfg.train.seed)
    target = torch.randn(8, generator=g)
    w, start = torch.zeros(8), 0
    ckpt_root = run_dir / "checkpoints"
    latest = _latest(ckpt_root)
    if latest is not None:
        state = torch.load(latest / "state.pt", weights_only=True)
        w, start = state["w"], state["step"]
        print(f"toy: rank {rank} resumed from {latest} at step {start}", flush=True)
    metrics = run_dir / "metrics.jsonl"
    for step in range(start, cfg.train.tasks):
        if fail_at is not None and step == int(fail_at) and rank == 1:
            raise ValueError(f"toy failure at task {step} on rank {rank}")
        if kw.get("toy_kill_at") is not None and step == int(kw["toy_kill_at"]) and rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step * 17 + rank)
        x = torch.randn(16, 8, generator=gen)
        err = x @ w - x @ target
        loss = (err ** 2).mean()
        grad = 2 * x.T @ err / len(err)
        dist.all_reduce(grad)
        dist.all_reduce(loss)
        w = w - 0.05 * grad / world
        if rank == 0:
            with open(metrics, "a") as f:
                f.write(json.dumps({"task": step + 1, "loss": loss.item() / world}) + "\n")
        if step_s:
            time.sleep(step_s)
        done = step + 1
        stop = torch.tensor([1.0 if should_stop() else 0.0])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)   # every rank stops at the same boundary
        if stop.item() > 0 and done < cfg.train.tasks:
            _save(ckpt_root, done, w, rank)
            return {"status": "stopped", "tasks": done}
        if done % cfg.checkpoint.every_tasks == 0:
            _save(ckpt_root, done, w, rank)
    if start < cfg.train.tasks:
        _save(ckpt_root, cfg.train.tasks, w, rank)
    digest = hashlib.sha256(w.numpy().tobytes()).hexdigest()[:16]
    return {"status": "done", "tasks": cfg.train.tasks, "digest": digest, "resumed_from": start}
