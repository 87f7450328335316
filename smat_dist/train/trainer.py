"""The trainer: one rank of meta-training, the same code under one process, torchrun, the deepspeed
launcher and a submitit task (the launcher only sets RANK/WORLD_SIZE/MASTER_* and calls `train`).

`Trainer` owns what one rank trains with (built by smat_dist.build), its checkpoint parts
(the pool component, the DeepSpeed engine, the train state, the RNG) and the loop's pieces: `train_step`,
`validate`, `save`, `close`; `train()` only wires them to the data stream and the stop flag.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from smat_dist.build import build
from smat_dist.checkpoint import Checkpointer, CheckpointError, find_latest, read_manifest
from smat_dist.checkpoint.deepspeed_part import DeepSpeedPart, universal_checkpoint
from smat_dist.config.schema import Config
from smat_dist.data.episodes import EpisodeStream, episode_config
from smat_dist.distributed.comm import Comm
from smat_dist.distributed.process_group import control_group, device, init_distributed
from smat_dist.distributed.timeouts import shorten_after_first_step
from smat_dist.method.mask_diagnostics import mask_diagnostics
from smat_dist.train import progress_records
from smat_dist.train.metrics import MetricsLogger
from smat_dist.train.state import RngState, TrainState
from smat_dist.train.step import NonFiniteLoss, dense_step, smat_step
from smat_dist.utils.device import autocast_for
from smat_dist.utils.log import get_logger, setup_logging
from smat_dist.utils.memory import peak_rss_bytes

log = get_logger(__name__)


def config_yaml(cfg) -> str:
    from smat_dist.config.hydra import to_yaml

    return to_yaml(cfg)


def config_hash(cfg) -> str:
    return hashlib.sha256(config_yaml(cfg).encode()).hexdigest()[:16]


def _peak_mem() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return peak_rss_bytes()


def _to(ep, dev: torch.device):
    return dataclasses.replace(ep, support=ep.support.to(dev, non_blocking=True),
                               query=ep.query.to(dev, non_blocking=True),
                               support_labels=ep.support_labels.to(dev), query_labels=ep.query_labels.to(dev))


class Trainer:
    """One rank's training state and the pieces of the loop."""

    def __init__(self, cfg: Config, run_dir: Path, rank: int, world: int, resume_from: Path | None = None):
        self.cfg, self.run_dir, self.rank, self.world = cfg, run_dir, rank, world
        if cfg.method.name not in ("smat", "pmf"):
            raise ValueError(f"method.name={cfg.method.name!r} has nothing to meta-train "
                             "(use smat-eval for 'pretrained')")
        self.dev = device()
        # Three views of the process group: the pool's merge traffic (device tensors, counted: the benchmark's
        # bytes per task); the step's small device reductions (sparsity counts, clip norms); and host-side
        # control (stop flags, metrics, checkpoint agreement), which under NCCL has its own gloo group.
        self.comm = Comm(device_bound=True)
        self.step_comm = Comm(device_bound=True)
        self.log_comm = Comm(group=control_group())
        self.k = cfg.train.tasks_per_rank
        universal = None
        if resume_from is not None and read_manifest(resume_from)["world_size"] != world and cfg.dist.zero_stage > 0:
            # ZeRO partitions the replicated optimiser state by world size: re-partition it through DeepSpeed's
            # universal checkpoint (the pool is re-sliced by our own loader).
            universal = universal_checkpoint(resume_from, run_dir / ".universal" / resume_from.name, self.log_comm)
        self.setup = build(cfg.model, cfg.method, seed=cfg.train.seed, comm=self.comm, control=self.step_comm,
                           merge=str(getattr(cfg.dist.pool, "value", cfg.dist.pool)), hyper="deepspeed",
                           dist_cfg=cfg.dist, tasks_per_rank=self.k, universal=universal is not None, device=self.dev)
        self.method, self.pool, self.hyper = self.setup.method, self.setup.pool, self.setup.hyper
        # dist.pool=zero3 is a comparison path without checkpoints (the config check refuses checkpoint.* / resume)
        self.can_save = not (cfg.method.name == "smat" and cfg.dist.pool == "zero3")
        if self.pool is not None:
            self.pool.diagnostics = mask_diagnostics if cfg.logging.mask_diagnostics else None
        self.autocast = autocast_for(self.dev, cfg.dist.precision)
        self.state = TrainState()
        self.checkpointer = Checkpointer(run_dir / "checkpoints", self.log_comm, keep=cfg.checkpoint.keep,
                                         async_save=cfg.checkpoint.async_save, keep_every=cfg.checkpoint.keep_every)
        if resume_from is not None:
            manifest = self.checkpointer.load(resume_from, self.parts(), expect=self.identity(), universal=universal)
            tasks, ranks = int(manifest["tasks"]), int(manifest["world_size"])
            text = f"resumed from {resume_from} at {tasks} tasks (written by {ranks} ranks)"
            log.info("%s", text)
            if rank == 0:
                progress_records.write(run_dir, "resumed", resumed_at=tasks, checkpoint=str(resume_from),
                                       ranks=ranks, text=text)
        self.last_saved = self.state.tasks if resume_from is not None else None
        self.tasks_at_start = self.state.tasks   # the first step of this attempt ends the long start-up timeout

    def identity(self) -> dict:
        return {"method": self.cfg.method.name, "backbone": self.cfg.model.name,
                "backbone_signature": self.setup.fb.space.signature(),
                "experts": self.cfg.method.experts if self.pool is not None else 0}

    def parts(self) -> dict:
        parts = {"replicated": DeepSpeedPart(self.hyper, self.rank), "train": self.state, "rng": RngState()}
        if self.pool is not None:
            parts["pool"] = self.pool
        return parts

    def train_step(self, episodes) -> dict:
        first = self.state.cursor + self.rank * self.k
        if self.pool is not None:
            return smat_step(self.method, self.pool, self.hyper, episodes, first, self.state.tasks, self.autocast,
                             comm=self.step_comm)
        return dense_step(self.method, self.hyper, episodes, first, self.state.tasks, self.autocast,
                          comm=self.step_comm)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Zero-shot accuracy on the fixed validation episodes of every training source.

        Rank r takes episodes r, r+R, ...; every rank runs the same number of merges (the sharded merge is a
        collective), padding with a repeat whose result is dropped, and the accuracies are summed over ranks."""
        from smat_dist.data.fixed_sets import fixed_episodes
        from smat_dist.method.protonet import accuracy

        cfg = self.cfg
        n = cfg.data.val_episodes
        out = {}
        if self.pool is not None:
            self.pool.begin_step(train=False)
        per_rank = -(-n // self.world)
        for src in cfg.data.sources:
            eps = fixed_episodes(src, "val", n, cfg=episode_config(cfg))
            acc = torch.zeros(2, dtype=torch.float64)
            for j in range(per_rank):
                i = self.rank + j * self.world
                ep = _to(eps[min(i, n - 1)], self.dev)
                logits = self.method.predict(ep, self.pool)
                if i < n:
                    acc += torch.tensor([accuracy(logits, ep.query_labels), 1.0], dtype=torch.float64)
            acc = self.log_comm.all_reduce(acc)
            out[f"val/acc/{eps.stream.source_names[0]}"] = float(acc[0] / acc[1])
        out["val/acc_mean"] = sum(out.values()) / max(1, len(out))
        if self.pool is not None:
            self.pool.end_eval()
        return out

    def save(self) -> None:
        meta = dict(self.identity(), cursor=self.state.cursor, config_hash=config_hash(self.cfg),
                    wandb_run_id=self.state.wandb_run_id)
        self.checkpointer.save(self.state.tasks, self.parts(), meta, texts={"config.yaml": config_yaml(self.cfg)})
        self.last_saved = self.state.tasks

    def stop_agreed(self, should_stop) -> bool:
        flag = torch.tensor([1.0 if (should_stop is not None and should_stop()) else 0.0])
        return bool(self.log_comm.all_reduce(flag).item() > 0)

    def close(self) -> None:
        """Wait for the save in flight (every rank's files durable, `latest` updated)."""
        self.checkpointer.close()


def _resume_source(cfg: Config, run_dir: Path) -> Path | None:
    source = cfg.resume or (str(run_dir) if find_latest(run_dir) is not None else None)
    if not source:
        return None
    ck = find_latest(source)
    if ck is None:
        raise CheckpointError(f"resume={source}: no complete checkpoint there (no 'latest' or manifest.json)")
    return ck


def train(cfg: Config, run_dir: str, should_stop: Optional[Callable[[], bool]] = None) -> dict:
    setup_logging()
    rank, world = init_distributed(cfg.dist)
    run_dir = Path(run_dir)
    if not cfg.data.sources:
        raise ValueError("data.sources is empty: give the training dataset folders (smat-convert output)")
    tr = Trainer(cfg, run_dir, rank, world, resume_from=_resume_source(cfg, run_dir))
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "config.yaml").exists():
            (run_dir / "config.yaml").write_text(config_yaml(cfg))
    st = tr.state
    metrics = MetricsLogger(run_dir, tr.log_comm, cfg, st.wandb_run_id, cfg.train.tasks)
    st.wandb_run_id = metrics.wandb_id
    stream = EpisodeStream(list(cfg.data.sources), "train", episode_config(cfg), seed=cfg.train.seed, train_aug=True)
    batches = stream.loader(start=st.cursor, rank=rank, world=world, per_rank=tr.k, workers=cfg.data.workers)
    per_step = tr.k * world
    status = "done"
    try:
        while st.tasks < cfg.train.tasks:
            if tr.stop_agreed(should_stop):
                status = "stopped"
                break
            t0 = time.perf_counter()
            episodes = [_to(e, tr.dev) for e in next(batches)]
            t_data = time.perf_counter() - t0
            sent0 = tr.comm.sent_bytes
            try:
                m = tr.train_step(episodes)
            except NonFiniteLoss as e:
                log.error("%s; stopping. The last good checkpoint stays 'latest' in %s", e, run_dir / "checkpoints")
                raise
            dt = time.perf_counter() - t0
            if st.tasks == tr.tasks_at_start:
                shorten_after_first_step(cfg.dist, *[g for g in (control_group(),) if g is not None])
            st.tasks += per_step
            st.cursor += per_step
            m = metrics.average(m)
            m.update({"tasks": st.tasks, "step": st.tasks // per_step, "tasks_per_s": per_step / dt, "step_s": dt,
                      "data_wait_s": t_data, "sent_bytes_per_task": (tr.comm.sent_bytes - sent0) / tr.k,
                      "peak_mem_bytes": _peak_mem()})
            if cfg.train.val_every_tasks and st.tasks % cfg.train.val_every_tasks < per_step:
                m.update(tr.validate())
                metrics.validation(st.tasks, m["val/acc_mean"])
            metrics.log(m, st.tasks, st.tasks // per_step, per_step)
            if cfg.checkpoint.every_tasks and st.tasks - (tr.last_saved or 0) >= cfg.checkpoint.every_tasks:
                tr.save()
        if st.tasks != tr.last_saved and tr.can_save:
            tr.save()
        tr.close()
    except BaseException as e:
        e.smat_tasks = st.tasks   # where it failed, for the launcher's failure record (launch/failure.py)
        raise
    finally:
        metrics.close()
        stream.close()
    return {"status": status, "tasks": st.tasks, "cursor": st.cursor, "run_dir": str(run_dir),
            "checkpoint": str(find_latest(run_dir / "checkpoints")) if tr.can_save else None}
