"""Builds a single-process method (backbone, pool, merger, optimisers) from config: tests, bench, eval."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from smat_dist.config.schema import MethodConfig, ModelConfig
from smat_dist.method.baselines import PMF, Pretrained
from smat_dist.method.merge import LocalMerger
from smat_dist.method.optim import PoolOptimizer, hypernet_optimizer
from smat_dist.method.pool import ExpertPool
from smat_dist.method.smat import SMAT
from smat_dist.model.backbone import FunctionalBackbone, build_backbone


@dataclass
class LocalSetup:
    fb: FunctionalBackbone
    method: torch.nn.Module
    pool: ExpertPool | None
    merger: LocalMerger | None
    pool_opt: PoolOptimizer | None
    hyper_opt: object | None


def build_local(model_cfg: ModelConfig, cfg: MethodConfig, seed: int = 0, fb: FunctionalBackbone | None = None
                ) -> LocalSetup:
    from smat_dist.train.step import TorchHyperOptimizer

    torch.manual_seed(seed)
    fb = fb or FunctionalBackbone(build_backbone(model_cfg))
    if cfg.name == "smat":
        method = SMAT(fb, cfg, seed)
        pool = ExpertPool.for_space(fb.space, 0, 1, cfg.experts, cfg.sparsity, seed)
        merger = LocalMerger(pool, fb.space.padded)
        hyper = TorchHyperOptimizer(hypernet_optimizer(method.hypernet.parameters(), cfg), cfg.hypernet.clip)
        return LocalSetup(fb, method, pool, merger, PoolOptimizer(pool, cfg), hyper)
    if cfg.name == "pmf":
        method = PMF(fb, cfg)
        opt = torch.optim.SGD([{"params": list(method.parameters()), "lr": cfg.pmf_lr, "momentum": cfg.pmf_momentum,
                                "base_lr": cfg.pmf_lr, "name": "pmf"}])
        return LocalSetup(fb, method, None, None, None, TorchHyperOptimizer(opt, None))
    if cfg.name == "pretrained":
        return LocalSetup(fb, Pretrained(fb, cfg), None, None, None, None)
    raise ValueError(f"method.name={cfg.name!r}: expected smat, pmf or pretrained")
