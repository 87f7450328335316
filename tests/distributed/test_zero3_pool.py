"""dist.pool=zero3 (the pool under real DeepSpeed ZeRO-3, a comparison path) trains SMAT as the sharded path does:
three steps of two tasks per rank on 2 gloo ranks, the same episodes and initial state, give the same losses,
sparsity terms and updated pool (delta, mask logits, multipliers) to fp32 rounding. The rules are the sharded
path's (the logits' clip at mask_clip as a scaled learning rate, delta unclipped, the penalty's gradient added
at the step's end); only the gate's gradient is autograd's and the summation orders differ. The config refuses
what the path does not support."""
from __future__ import annotations

import pytest
import torch

from smat_dist.bench.spawn import run_ranks

pytestmark = pytest.mark.dist
STEPS, K, M = 3, 2, 4


def _train(rank: int, world: int, path: str, cfg, mc, episodes):
    from smat_dist.bench.scale import _AllReducedHyper
    from smat_dist.build import build_pool
    from smat_dist.distributed.comm import Comm
    from smat_dist.method.optim import TorchHyperOptimizer, hypernet_optimizer
    from smat_dist.method.smat import SMAT
    from smat_dist.model.backbone import FunctionalBackbone, build_backbone
    from smat_dist.train.step import smat_step

    torch.manual_seed(0)
    fb = FunctionalBackbone(build_backbone(mc), pad_to=world)
    method = SMAT(fb, cfg, 0)
    comm = Comm()
    pool = build_pool(fb, cfg, 0, comm, comm, merge=path)
    params = list(method.hypernet.parameters())
    hyper = _AllReducedHyper(TorchHyperOptimizer(hypernet_optimizer(params, cfg), cfg.hypernet.clip), params, comm)
    metrics = []
    for s in range(STEPS):
        metrics.append(smat_step(method, pool, hyper, episodes[s], (s * world + rank) * K, s * world * K))
    if path == "zero3":
        state = pool.store.full_state()
    else:
        state = {"delta": pool.shard.delta.detach().clone(), "log_alpha": pool.shard.log_alpha.detach().clone()}
    state["multipliers"] = pool.controller.multipliers.clone()
    state["hypernet"] = torch.cat([p.detach().reshape(-1) for p in params])
    return metrics, state


def _rank(rank: int, world: int):
    from smat_dist.bench.step import model_config, synthetic_episode
    from smat_dist.config.schema import DistConfig, MethodConfig
    from smat_dist.distributed.process_group import init_distributed

    init_distributed(DistConfig())
    mc = model_config("vit_tiny_patch16_224", 32, 8, 1)
    cfg = MethodConfig(name="smat", experts=M)
    cfg.delta_lr = 1e-2
    cfg.warmup_tasks, cfg.total_tasks = 2, 16
    cfg.sparsity.lambda_lr = 1e4      # the multipliers move in the first step: the penalty's gradient is exercised
    cfg.sparsity.mask_clip = 0.05     # below the second step's logit gradient norm (~0.12): the clip is exercised
    episodes = [[synthetic_episode(3, 2, 2, 32, 0, 1000 * s + 10 * rank + j, torch.device("cpu")) for j in range(K)]
                for s in range(STEPS)]
    return {path: _train(rank, world, path, cfg, mc, episodes) for path in ("sharded", "zero3")}


def test_zero3_steps_equal_sharded_steps():
    res = run_ranks(_rank, 2)
    for r in res:
        (ms, ss), (mz, sz) = r["sharded"], r["zero3"]
        for a, b in zip(ms, mz):
            for key in ("loss/task", "loss/sparsity_penalty", "sparsity/expert0", "density_l0/expert0",
                        "lambda/expert0", "grad_norm/log_alpha"):
                assert key in a and key in b, key
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
        torch.testing.assert_close(sz["multipliers"], ss["multipliers"], rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(sz["hypernet"], ss["hypernet"], rtol=1e-4, atol=1e-6)
    full_delta = torch.cat([res[0]["sharded"][1]["delta"], res[1]["sharded"][1]["delta"]])
    full_la = torch.cat([res[0]["sharded"][1]["log_alpha"], res[1]["sharded"][1]["log_alpha"]])
    z = res[0]["zero3"][1]
    assert full_delta.abs().max() > 1e-4, "delta did not move: the comparison would be empty"
    torch.testing.assert_close(z["delta"], full_delta, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(z["log_alpha"], full_la, rtol=1e-4, atol=1e-4)
    ms = res[0]["sharded"][0]
    assert max(m["loss/sparsity_penalty"] for m in ms) > 0, "the penalty was never exercised"
    assert max(m["grad_norm/log_alpha"] for m in ms) > 0.05, "the logits' clip was never exercised"
