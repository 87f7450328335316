"""dist.pool=zero3 (the pool under real DeepSpeed ZeRO-3, a comparison path) trains SMAT as the sharded path does:
three steps of two tasks per rank on 2 gloo ranks, the same episodes and initial state, give the same losses,
sparsity terms and updated pool (delta, mask logits, multipliers) to fp32 rounding. The rules are the sharded
path's (the logits' clip at mask_clip as a scaled learning rate, delta unclipped, the penalty's gradient added
at the step's end); only the gate's gradient is autograd's and the summation orders differ. The config refuses
what the path does not support."""
from __future__ import annotations

import pytest
import torch

from tests.distributed.helpers import run_ranks

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


def _trainer_rank(rank: int, world: int, cfg, run_dir: str):
    from smat_dist.train import trainer

    return trainer.train(cfg, run_dir)


def test_trainer_runs_zero3_as_sharded(tmp_path):
    """Through the real trainer (the hypernetwork's DeepSpeed engine beside the pool's ZeRO-3 engine): the same
    logged losses as the sharded path; no checkpoint is written."""
    import json

    from tests.data_fixture import make_dataset
    from tests.distributed.helpers import tiny_config

    data = str(make_dataset(tmp_path / "data", "toy"))
    losses = {}
    for path in ("sharded", "zero3"):
        cfg = tiny_config(data, tasks=4, pool=path)
        run_dir = tmp_path / path
        out = run_ranks(_trainer_rank, 2, cfg, str(run_dir))
        assert out[0]["tasks"] == 4
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[path] = [(r["loss/task"], r["loss/sparsity_penalty"]) for r in rows if "loss/task" in r]
        if path == "zero3":
            assert out[0]["checkpoint"] is None and not (run_dir / "checkpoints" / "latest").exists()
    assert len(losses["zero3"]) == 2
    for a, b in zip(losses["sharded"], losses["zero3"]):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6)


def test_config_refuses_what_zero3_does_not_support():
    from smat_dist.config.checks import ConfigError
    from smat_dist.config.schema import Config

    def make(**sparsity):
        cfg = Config()
        cfg.dist.pool = "zero3"
        cfg.checkpoint.every_tasks = 0
        for k, v in sparsity.items():
            setattr(cfg.method.sparsity, k, v)
        return cfg

    import dataclasses

    dataclasses.replace(make())     # the supported combination
    for key, value in (("structured", True), ("lean", True), ("noise_eps", 1e-6), ("compile", True)):
        with pytest.raises(ConfigError, match=rf"^dist\.pool=zero3: allowed only with .*got method\.sparsity\.{key}"):
            dataclasses.replace(make(**{key: value}))
    cfg = make()
    cfg.checkpoint.every_tasks = 200
    with pytest.raises(ConfigError, match=r"^dist\.pool=zero3 is a benchmark comparison path: checkpoint\.\*/resume "
                                          r"not supported .*got checkpoint\.every_tasks"):
        dataclasses.replace(cfg)


def test_bench_counts_zero3_bytes_with_deepspeeds_comms_logger():
    """smat-bench scale's zero3 rows: bytes from DeepSpeed's comms logger, M x P per task (grows with M)."""
    from smat_dist.bench.scale import measure_point

    rows = {}
    for m in (4, 16):
        rows[m] = measure_point(dict(model="vit_tiny_patch16_224", experts=m, ranks=2, path="zero3", image_size=32,
                                     depth=1, patch_size=8, tasks_per_rank=1, steps=1, ways=2, shots=1, queries=1,
                                     threads=1))
    for row in rows.values():
        ops = row["ds_comms"]
        assert row["sent_bytes_per_task"] == pytest.approx(sum(o["sent_bytes"] for o in ops.values()))
        # the chunks' partitions (delta + every expert's logits) gathered from the other rank at least once
        assert ops["all_gather_into_tensor"]["sent_bytes"] >= row["pool_bytes_per_rank"]
        assert row["zero3_settings"]["stage3_param_persistence_threshold"] == 0
    assert rows[16]["sent_bytes_per_task"] > 3 * rows[4]["sent_bytes_per_task"]
    # the planner's zero3 formula is the pool's gather + reduce-scatter to the byte
    from smat_dist.bench.plan import plan

    for m, row in rows.items():
        ops = row["ds_comms"]
        pool_bytes = ops["all_gather_into_tensor"]["sent_bytes"] + ops["reduce_scatter_tensor"]["sent_bytes"]
        assert pool_bytes == plan("vit_tiny_patch16_224", experts=m, ranks=2, image_size=32, patch_size=8,
                                  kwargs={"depth": 1})["sent_bytes_per_task"]["zero3"]
