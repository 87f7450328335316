"""Load a trained method from a checkpoint for evaluation and analysis, on one rank or on N.

The same load path as training (Checkpointer.load over the same parts): on N ranks each rank re-slices only
its own share of the pool (O(pool / N) memory and reads) and merges through the sharded merger; in one
process the slice is the whole pool. A model trained on any world size evaluates on any other.
"""
from __future__ import annotations

from pathlib import Path

import torch

from smat_dist.build import MethodSetup, build
from smat_dist.checkpoint import Checkpointer, CheckpointError, find_latest, read_manifest
from smat_dist.config.schema import Config
from smat_dist.distributed.comm import Comm
from smat_dist.utils.log import get_logger

log = get_logger(__name__)


class ModuleState:
    """The replicated module's full state (replicated.pt, written by the training engine's rank 0)."""

    def __init__(self, module: torch.nn.Module, what: str):
        self.module, self.what = module, what

    def state_dict(self) -> dict:
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, sd: dict) -> None:
        missing, unexpected = self.module.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"replicated.pt does not match method {self.what}: missing {missing}, "
                                  f"unexpected {unexpected}")


def load_config(ck: Path) -> Config:
    from smat_dist.train.run_folder import checkpoint_config

    try:
        return checkpoint_config(ck)
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from None


def load_method(path: str, fb=None, comm: Comm | None = None, control: Comm | None = None,
                device: torch.device | None = None) -> MethodSetup:
    """The method of the newest complete checkpoint under `path`; with a multi-rank `comm`, this rank's
    slice of its pool (every rank of comm must call it). It is built on `device` (default: the rank's compute
    device: its GPU where there is one); `control` carries the load's agreement (default: comm)."""
    ck = find_latest(path)
    if ck is None:
        raise CheckpointError(f"{path}: no complete checkpoint (no 'latest' file or manifest.json)")
    manifest = read_manifest(ck)
    cfg = load_config(ck)
    comm = comm or Comm(device_bound=True)
    if device is None:
        from smat_dist.distributed.process_group import device as rank_device

        device = rank_device()
    setup = build(cfg.model, cfg.method, seed=cfg.train.seed, comm=comm, hyper=None, fb=fb,
                  merge="sharded" if comm.world > 1 else "local", device=device)
    parts = {"replicated": ModuleState(setup.method, cfg.method.name)}
    if setup.pool is not None:
        parts["pool"] = setup.pool
    Checkpointer(ck.parent, control or comm).load(ck, parts, expect={
        "method": cfg.method.name, "backbone": cfg.model.name, "backbone_signature": setup.fb.space.signature()})
    log.info("loaded %s model from %s (%d tasks; pool slice %s of %d ranks)", cfg.method.name, ck, manifest["tasks"],
             "-" if setup.pool is None else f"[{setup.pool.shard.lo}, {setup.pool.shard.hi})", comm.world)
    return setup
