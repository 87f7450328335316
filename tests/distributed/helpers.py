"""Shared pieces of the distributed tests: a tiny config and a rank function that trains and reports state."""
from __future__ import annotations

import torch

from smat_dist.config.schema import Config


def tiny_config(data_dir: str, *, tasks: int = 4, tasks_per_rank: int = 1, experts: int = 4, pool: str = "sharded",
                method: str = "smat", zero_stage: int = 0, every: int = 0) -> Config:
    cfg = Config()
    cfg.model.name = "vit_tiny_patch16_224"
    cfg.model.image_size = 32
    cfg.model.patch_size = 8
    cfg.method.name = method
    cfg.method.experts = experts
    cfg.method.warmup_tasks = 2
    cfg.method.total_tasks = 16
    cfg.method.delta_lr = 1e-2      # visible movement in a handful of steps
    cfg.data.sources = [data_dir]
    cfg.data.mode = "fixed"
    cfg.data.ways, cfg.data.shots, cfg.data.queries = 3, 2, 2
    cfg.data.workers = 0
    cfg.dist.pool = pool
    cfg.dist.zero_stage = zero_stage
    cfg.train.tasks = tasks
    cfg.train.tasks_per_rank = tasks_per_rank
    cfg.checkpoint.every_tasks = every
    cfg.logging.wandb_mode = "disabled"
    return cfg


def train_rank(rank: int, world: int, cfg: Config, run_dir: str, stop_after: int | None = None):
    """Train, then return this rank's pool slice, the replicated state and the logged losses."""
    import json
    from pathlib import Path

    from smat_dist.train import trainer

    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return stop_after is not None and calls["n"] > stop_after

    out = trainer.train(cfg, run_dir, should_stop=should_stop)
    ck = Path(out["checkpoint"])
    pf = ck / f"pool-rank{rank:05d}.safetensors"
    pool = read_pool_shard(pf) if pf.exists() else {}
    losses = []
    mf = Path(run_dir) / "metrics.jsonl"
    if rank == 0 and mf.exists():
        losses = [json.loads(line) for line in mf.read_text().splitlines()]
    rep = torch.load(ck / "replicated.pt", weights_only=True) if rank == 0 else {}
    if rank == 0 and pool:
        rep["pool.multipliers"] = pool["multipliers"]
    return {"out": out, "pool": pool, "replicated": rep, "metrics": losses}


def read_pool_shard(path) -> dict:
    """A saved pool shard as tensors: its entry range [lo, hi), delta, log_alpha, group ids, multipliers."""
    import json

    from smat_dist.checkpoint.shard_file import ShardReader

    with ShardReader(path, None) as r:
        rec = json.loads(r.metadata["tensors"])
        out = {"lo": rec["delta"]["lo"], "hi": rec["delta"]["hi"], "delta": r.read("delta"),
               "log_alpha": r.read("log_alpha"), "multipliers": r.read("_replicated.multipliers"),
               "group_ids": r.read("log_alpha.ids") if "log_alpha.ids" in r.header else None}
        if "delta_momentum" in r.header:
            out["delta_momentum"] = r.read("delta_momentum")
    return out


def c10d_threads() -> list[str]:
    """This process's live torch.distributed threads by their Linux names: gloo's workers and tcp transport
    loop, the TCPStore server's loop (rank 0)."""
    from pathlib import Path

    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
        except OSError:      # the thread ended while we looked
            continue
        if "gloo" in name or "tcpstore" in name:
            names.append(name)
    return sorted(names)


def report_c10d_threads_at_exit(path) -> None:
    """Write this rank's live torch.distributed threads to `path` as the interpreter starts to exit (atexit
    runs after the rank function and the harness's teardown, before finalization): none must be left then."""
    import atexit
    import json
    from pathlib import Path

    atexit.register(lambda: Path(path).write_text(json.dumps(c10d_threads())))
