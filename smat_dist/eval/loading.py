"""Load a trained method from a checkpoint into a single-process LocalSetup (evaluation, analysis).

The pool is re-sliced from however many ranks wrote it into one slice covering the whole flat vector,
so a model trained on any world size evaluates on any other.
"""
from __future__ import annotations

from pathlib import Path

import torch

from smat_dist.config.schema import Config
from smat_dist.distributed import checkpoint as ckpt
from smat_dist.method.build import LocalSetup, build_local
from smat_dist.utils.log import get_logger

log = get_logger(__name__)


def load_config(ck: Path) -> Config:
    from smat_dist.config.hydra import load_yaml

    for p in (ck / "config.yaml", ck.parent.parent / "config.yaml"):
        if p.is_file():
            return load_yaml(p)
    raise ckpt.CheckpointError(f"no config.yaml in {ck} or its run folder")


def load_method(path: str, fb=None) -> LocalSetup:
    ck = ckpt.find_latest(path)
    if ck is None:
        raise ckpt.CheckpointError(f"{path}: no complete checkpoint (no 'latest' file or manifest.json)")
    manifest = ckpt.read_manifest(ck)
    cfg = load_config(ck)
    setup = build_local(cfg.model, cfg.method, seed=cfg.train.seed, fb=fb)
    ckpt.check_compatible(manifest, {"method": cfg.method.name, "backbone": cfg.model.name,
                                     "backbone_signature": setup.fb.space.signature()}, ck)
    state = torch.load(ck / "replicated.pt", map_location="cpu", weights_only=True)
    missing, unexpected = setup.method.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ckpt.CheckpointError(f"{ck}/replicated.pt does not match method {cfg.method.name}: missing {missing}, "
                                   f"unexpected {unexpected}")
    if setup.pool is not None:
        sl = ckpt.load_pool_slice(ck, manifest, 0, setup.pool.hi, setup.pool.numel, cfg.method.sparsity.clamp,
                                  group_ids=setup.pool.group_ids)
        with torch.no_grad():
            setup.pool.delta.copy_(sl["delta"])
            setup.pool.log_alpha.copy_(sl["log_alpha"])
    log.info("loaded %s model from %s (%d tasks)", cfg.method.name, ck, manifest["tasks"])
    return setup
