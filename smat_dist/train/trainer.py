"""The trainer: one rank of meta-training, the same code under one process, torchrun, the deepspeed
launcher and a submitit task (the launcher only sets RANK/WORLD_SIZE/MASTER_* and calls `train`)."""
from __future__ import annotations

import dataclasses
import hashlib
import shutil
import json
import resource
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional

import torch
from omegaconf import OmegaConf

from smat_dist.config.schema import Config
from smat_dist.data.episodes import EpisodeConfig, EpisodeStream
from smat_dist.distributed import checkpoint as ckpt
from smat_dist.distributed.comm import Comm
from smat_dist.distributed.engine import DeepSpeedOptimizer, device, init_distributed
from smat_dist.distributed.sharded import build_merger
from smat_dist.method.baselines import PMF
from smat_dist.method.optim import PoolOptimizer, hypernet_optimizer
from smat_dist.method.pool import ExpertPool
from smat_dist.method.smat import SMAT
from smat_dist.model.backbone import FunctionalBackbone, build_backbone
from smat_dist.train.step import NonFiniteLoss, dense_step, smat_step
from smat_dist.utils.log import get_logger, setup_logging

log = get_logger(__name__)


def config_yaml(cfg) -> str:
    return OmegaConf.to_yaml(cfg if OmegaConf.is_config(cfg) else OmegaConf.structured(cfg), resolve=True)


def config_hash(cfg) -> str:
    return hashlib.sha256(config_yaml(cfg).encode()).hexdigest()[:16]


def episode_config(cfg: Config) -> EpisodeConfig:
    d = cfg.data
    return EpisodeConfig(mode=d.mode, ways=d.ways, shots=d.shots, queries=d.queries, image_size=cfg.model.image_size,
                         max_ways_upper_bound=d.max_ways, max_support_set_size=d.max_support)


def _peak_mem() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class _Run:
    """Everything one rank trains with, built from config."""

    def __init__(self, cfg: Config, rank: int, world: int, universal: bool = False):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.dev = device()
        self.comm = Comm()          # counts the pool's collectives (the benchmark's bytes per task)
        self.log_comm = Comm()      # metrics and control traffic, counted apart
        self.k = cfg.train.tasks_per_rank
        torch.manual_seed(cfg.train.seed)
        self.fb = FunctionalBackbone(build_backbone(cfg.model), pad_to=world).to(self.dev)
        m = cfg.method
        self.pool = self.merger = self.pool_opt = None
        if m.name == "smat":
            self.method = SMAT(self.fb, m, cfg.train.seed).to(self.dev)
            self.pool = ExpertPool.for_space(self.fb.space, rank, world, m.experts, m.sparsity,
                                             cfg.train.seed).to(self.dev)
            self.merger = build_merger(cfg.dist.pool, self.pool, self.fb.space.padded, self.comm)
            self.pool_opt = PoolOptimizer(self.pool, m)
            opt = hypernet_optimizer(self.method.hypernet.parameters(), m)
            clip = m.hypernet.clip
        elif m.name == "pmf":
            self.method = PMF(self.fb, m).to(self.dev)
            opt = torch.optim.SGD([{"params": list(self.method.parameters()), "lr": m.pmf_lr, "momentum": m.pmf_momentum,
                                    "base_lr": m.pmf_lr, "name": "pmf"}])
            clip = None
        else:
            raise ValueError(f"method.name={m.name!r} has nothing to meta-train (use smat-eval for 'pretrained')")
        self.hyper = DeepSpeedOptimizer(self.method, opt, cfg.dist, self.k, world, clip, universal=universal)
        precision = cfg.dist.precision
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_available() else "fp32"
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" and torch.cuda.is_available()
                         else torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext())

    def identity(self) -> dict:
        return {"method": self.cfg.method.name, "backbone": self.cfg.model.name,
                "backbone_signature": self.fb.space.signature(),
                "experts": self.cfg.method.experts if self.pool is not None else 0}

    def replicated_state(self) -> dict:
        return self.hyper.module_state()

    def step(self, episodes, first_index: int, tasks: int) -> dict:
        with self.autocast:
            if self.pool is not None:
                return smat_step(self.method, self.merger, self.pool, self.pool_opt, self.hyper, episodes,
                                 first_index, tasks, self.world, self.log_comm.all_reduce)
            return dense_step(self.method, self.hyper, episodes, first_index, tasks)


def _universal_copy(ck: Path, run_dir: Path, rank: int, comm: Comm) -> Path:
    """DeepSpeed's universal checkpoint of `ck`'s replicated state, made once by rank 0 (outside `ck`, whose
    files are checksummed) for a resume at another world size with ZeRO stage > 0."""
    import subprocess
    import sys

    out = run_dir / ".universal" / ck.name
    if rank == 0 and not (out / "done").exists():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ck / "ds" / "state"),
               "--output_folder", str(out / "state"), "--inject_missing_state"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise ckpt.CheckpointError(f"converting {ck}/ds to a universal checkpoint failed: {res.stderr[-800:]}")
        (out / "done").touch()
        log.info("universal checkpoint of %s written to %s", ck, out)
    comm.barrier()
    return out


def _resume(run: _Run, ck: Path, universal: Path | None = None) -> dict:
    manifest = ckpt.read_manifest(ck)
    ckpt.check_compatible(manifest, run.identity(), ck)
    if run.pool is not None:
        sl = ckpt.load_pool_slice(ck, manifest, run.pool.lo, run.pool.hi, run.pool.numel,
                                  run.cfg.method.sparsity.clamp, group_ids=run.pool.group_ids)
        with torch.no_grad():
            run.pool.delta.copy_(sl["delta"])
            run.pool.log_alpha.copy_(sl["log_alpha"])
        if sl["same_layout"] and sl["optimizer"]:
            run.pool_opt.load_state_dict(sl["optimizer"])
        elif sl["momentum"] is not None:
            run.pool_opt.opt.state[run.pool.delta]["momentum_buffer"] = sl["momentum"].to(run.pool.delta)
    if universal is not None:
        run.hyper.load(str(universal), tag="state")
        # The universal format carries parameters and optimiser state, not buffers (task counter,
        # multipliers, spectral-norm vectors): take those from the full replicated state we saved.
        state = torch.load(ck / "replicated.pt", map_location="cpu", weights_only=True)
        with torch.no_grad():
            for name, buf in run.method.named_buffers():
                if name in state:
                    buf.copy_(state[name].to(buf))
    else:
        run.hyper.load(str(ck / "ds"), tag="state")
    ckpt.restore_rng(ck, run.rank)
    log.info("resumed from %s at %d tasks (written by %d ranks)", ck, manifest["tasks"], manifest["world_size"])
    return manifest


def _to(ep, dev: torch.device):
    if dev.type == "cpu":
        return ep
    return dataclasses.replace(ep, support=ep.support.to(dev, non_blocking=True), query=ep.query.to(dev, non_blocking=True),
                               support_labels=ep.support_labels.to(dev), query_labels=ep.query_labels.to(dev))


@torch.no_grad()
def validate(run: _Run, cfg: Config) -> dict[str, float]:
    """Zero-shot accuracy on the fixed validation episodes of every training source.

    Rank r takes episodes r, r+R, ...; every rank runs the same number of merges (the sharded merge is a
    collective), padding with a repeat whose result is dropped, and the accuracies are summed over ranks."""
    from smat_dist.data.fixed_sets import fixed_episodes
    from smat_dist.method.protonet import accuracy

    n = cfg.data.val_episodes
    out = {}
    if run.merger is not None:
        run.merger.begin_step(train=False)
    per_rank = -(-n // run.world)
    for src in cfg.data.sources:
        eps = fixed_episodes(src, "val", n, cfg=episode_config(cfg))
        acc = torch.zeros(2, dtype=torch.float64)
        for j in range(per_rank):
            i = run.rank + j * run.world
            ep = _to(eps[min(i, n - 1)], run.dev)
            logits = run.method.predict(ep, run.merger)
            if i < n:
                acc += torch.tensor([accuracy(logits, ep.query_labels), 1.0], dtype=torch.float64)
        acc = run.log_comm.all_reduce(acc)
        out[f"val/acc/{eps.stream.source_names[0]}"] = float(acc[0] / acc[1])
    out["val/acc_mean"] = sum(out.values()) / max(1, len(out))
    if run.merger is not None:
        run.merger.end_step()
    return out


def _stop_agreed(run: _Run, should_stop) -> bool:
    flag = torch.tensor([1.0 if (should_stop is not None and should_stop()) else 0.0])
    return bool(run.log_comm.all_reduce(flag).item() > 0)


def train(cfg: Config, run_dir: str, should_stop: Optional[Callable[[], bool]] = None) -> dict:
    setup_logging()
    rank, world = init_distributed(cfg.dist)
    run_dir = Path(run_dir)
    ck_root = run_dir / "checkpoints"
    tasks, cursor, wandb_id = 0, 0, None
    source = cfg.resume or (str(run_dir) if ckpt.find_latest(run_dir) is not None else None)
    ck = universal = None
    if source:
        ck = ckpt.find_latest(source)
        if ck is None:
            raise ckpt.CheckpointError(f"resume={source}: no complete checkpoint there (no 'latest' or manifest.json)")
        written_by = ckpt.read_manifest(ck, verify=False)["world_size"]
        if written_by != world and cfg.dist.zero_stage > 0:
            # ZeRO partitions the replicated optimiser state by world size: re-partition through DeepSpeed's
            # universal checkpoint (the pool is re-sliced by our own loader).
            universal = _universal_copy(ck, run_dir, rank, Comm())
    run = _Run(cfg, rank, world, universal=universal is not None)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "config.yaml").exists():
            (run_dir / "config.yaml").write_text(config_yaml(cfg))
    if ck is not None:
        manifest = _resume(run, ck, universal)
        tasks, cursor, wandb_id = manifest["tasks"], manifest["cursor"], manifest.get("wandb_run_id")
    wb = None
    if rank == 0 and cfg.logging.wandb_mode != "disabled":
        from smat_dist.train import wandb_run

        wb, wandb_id = wandb_run.start(cfg, str(run_dir), wandb_id)
    wandb_id = run.log_comm.broadcast_object(wandb_id)
    if not cfg.data.sources:
        raise ValueError("data.sources is empty: give the training dataset folders (smat-convert output)")
    stream = EpisodeStream(list(cfg.data.sources), "train", episode_config(cfg), seed=cfg.train.seed, train_aug=True)
    batches = stream.loader(start=cursor, rank=rank, world=world, per_rank=run.k, workers=cfg.data.workers)
    per_step = run.k * world
    meta = lambda: dict(run.identity(), cursor=cursor, config_hash=config_hash(cfg), wandb_run_id=wandb_id)  # noqa: E731

    def save():
        return ckpt.save(ck_root, run.log_comm, tasks=tasks, meta=meta(), pool=run.pool,
                         pool_opt=run.pool_opt, replicated=run.replicated_state(), ds_opt=run.hyper,
                         keep=cfg.checkpoint.keep, texts={"config.yaml": config_yaml(cfg)})

    metrics_f = open(run_dir / "metrics.jsonl", "a") if rank == 0 else None
    status = "done"
    last_saved = tasks
    try:
        while tasks < cfg.train.tasks:
            if _stop_agreed(run, should_stop):
                status = "stopped"
                break
            t0 = time.perf_counter()
            episodes = [_to(e, run.dev) for e in next(batches)]
            t_data = time.perf_counter() - t0
            sent0 = run.comm.sent_bytes
            try:
                m = run.step(episodes, cursor + rank * run.k, tasks)
            except NonFiniteLoss as e:
                log.error("%s; stopping. The last good checkpoint stays 'latest' in %s", e, ck_root)
                raise
            dt = time.perf_counter() - t0
            sent = run.comm.sent_bytes - sent0
            tasks += per_step
            cursor += per_step
            keys = sorted(k for k in m if k.startswith(("loss/", "acc/", "episode/")))
            avg = run.log_comm.all_reduce(torch.tensor([m[k] for k in keys], dtype=torch.float64)) / world
            m.update({k: float(v) for k, v in zip(keys, avg)})
            m.update({"tasks": tasks, "step": tasks // per_step, "tasks_per_s": per_step / dt, "step_s": dt,
                      "data_wait_s": t_data, "sent_bytes_per_task": sent / run.k, "peak_mem_bytes": _peak_mem()})
            if cfg.train.val_every_tasks and tasks % cfg.train.val_every_tasks < per_step:
                m.update(validate(run, cfg))
                log.info("validation at %d tasks: mean zero-shot accuracy %.3f", tasks, m["val/acc_mean"])
            if metrics_f is not None:
                metrics_f.write(json.dumps(m) + "\n")
                metrics_f.flush()
                if wb is not None:
                    wandb_run.log(m, tasks)
                if (tasks // per_step) % max(1, cfg.train.log_every) == 0:
                    log.info("tasks %d/%d loss %.4f acc %.3f %.2f tasks/s", tasks, cfg.train.tasks,
                             m.get("loss/task", float("nan")), m.get("acc/query", float("nan")), m["tasks_per_s"])
            if cfg.checkpoint.every_tasks and tasks - last_saved >= cfg.checkpoint.every_tasks:
                save()
                last_saved = tasks
        if tasks != last_saved or ckpt.find_latest(ck_root) is None:
            save()
    finally:
        if metrics_f is not None:
            metrics_f.close()
        if wb is not None:
            wandb_run.finish()
        stream.close()
    return {"status": status, "tasks": tasks, "cursor": cursor, "run_dir": str(run_dir),
            "checkpoint": str(ckpt.find_latest(ck_root))}
