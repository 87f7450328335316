"""Checkpoints at O(pool / ranks): a 4-rank run resumes at 3, 2 and 1 ranks exactly like the uninterrupted
run; a kill -9 during an async save leaves the previous `latest` loadable; a flipped byte in one shard is
reported, naming that file, by the one rank that reads it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.data_fixture import make_dataset
from smat_dist.bench.spawn import run_ranks as spawn_ranks
from tests.distributed.helpers import c10d_threads_left, report_c10d_threads_at_exit, run_ranks, tiny_config, train_rank

pytestmark = pytest.mark.dist
STEP = 12          # tasks per step: divisible by 4, 3, 2 and 1 ranks, so every world size runs the same steps


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(make_dataset(tmp_path_factory.mktemp("data"), "toy"))


def _cfg(data_dir, world, tasks=2 * STEP):
    cfg = tiny_config(data_dir, tasks=tasks, tasks_per_rank=STEP // world, experts=3)
    cfg.model.kwargs = {"depth": 2}
    cfg.data.ways, cfg.data.shots, cfg.data.queries = 2, 1, 1
    cfg.method.sparsity.lambda_lr = 5.0    # multipliers visibly non-zero after one step
    return cfg


def _losses(d):
    return [json.loads(x)["loss/task"] for x in (Path(d) / "metrics.jsonl").read_text().splitlines()]


def _pool(results):
    parts = sorted((r["pool"] for r in results if r["pool"]), key=lambda p: p["lo"])
    return torch.cat([p["delta"] for p in parts]), torch.cat([p["log_alpha"] for p in parts]), parts[0]["multipliers"]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    return d, run_ranks(train_rank, 1, _cfg(data_dir, 1), str(d))


@pytest.fixture(scope="module")
def saved_at_4(data_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("four")
    run_ranks(train_rank, 4, _cfg(data_dir, 4), str(d), 1)       # one step of 12 tasks, then stop and save
    return d


@pytest.mark.parametrize("world", [3, 2, 1])
def test_saved_at_4_resumes_at_fewer_ranks_like_the_uninterrupted_run(data_dir, reference, saved_at_4, tmp_path,
                                                                      world):
    ref_dir, ref = reference
    cfg = _cfg(data_dir, world)
    cfg.resume = str(saved_at_4)
    res = run_ranks(train_rank, world, cfg, str(tmp_path))
    assert res[0]["out"]["tasks"] == 2 * STEP
    assert _losses(tmp_path) == pytest.approx(_losses(ref_dir)[1:], rel=1e-5, abs=1e-6)
    d0, la0, lam0 = _pool(ref)
    d1, la1, lam1 = _pool(res)
    torch.testing.assert_close(d1, d0, rtol=1e-5, atol=1e-6)
    # lr 1e6 on the logits turns rounding-order differences into ~1e-3 (see test_training._assert_same_state)
    torch.testing.assert_close(la1, la0, rtol=0, atol=1e-2)
    torch.testing.assert_close(lam1, lam0, rtol=1e-5, atol=1e-8)
    assert lam0.abs().sum() > 0
    m = json.loads((tmp_path / "checkpoints" / "latest").parent.joinpath(
        (tmp_path / "checkpoints" / "latest").read_text().strip(), "manifest.json").read_text())
    assert m["world_size"] == world and len(m["shards"]["pool"]) == world


def _flip_rank(rank, world, cfg, run_dir, report):
    from smat_dist.train import trainer

    report_c10d_threads_at_exit(Path(report) / f"threads-rank{rank}.json")
    try:
        trainer.train(cfg, run_dir)
    except Exception as e:   # every rank raises the same agreed error
        return str(e)
    return "no error"


def test_flipped_byte_is_named_by_the_rank_that_reads_it(data_dir, tmp_path):
    cfg = _cfg(data_dir, 2, tasks=STEP)
    run_ranks(train_rank, 2, cfg, str(tmp_path / "a"))
    ck = tmp_path / "a" / "checkpoints"
    ck = ck / (ck / "latest").read_text().strip()
    shard = ck / "pool-rank00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    cfg2 = _cfg(data_dir, 2, tasks=2 * STEP)
    cfg2.resume = str(tmp_path / "a")
    # spawned ranks: the check below needs each rank's interpreter exit, which a forked rank skips
    msgs = spawn_ranks(_flip_rank, 2, cfg2, str(tmp_path / "b"), str(tmp_path))
    assert msgs[0] == msgs[1]
    assert "rank 1: checkpoint file" in msgs[0] and "pool-rank00001.safetensors is corrupt" in msgs[0]
    assert "rank 0:" not in msgs[0]           # rank 0 never read (nor hashed) rank 1's shard
    assert not (tmp_path / "b" / "checkpoints").exists() or not list((tmp_path / "b" / "checkpoints").glob("step-*"))
    # the refused resume tore its process groups down: no gloo (or TCPStore) thread was left to race interpreter
    # exit (which aborted a rank now and then: `terminate called without an active exception`)
    left, reports = c10d_threads_left([tmp_path / f"threads-rank{r}.json" for r in range(2)])
    assert left == [[], []], reports


_KILL_SCRIPT = r"""
import sys, time, torch
from smat_dist.config.schema import MethodConfig, ModelConfig
from smat_dist.build import build_local
from smat_dist.checkpoint import Checkpointer
from smat_dist.distributed.comm import Comm
from smat_dist.checkpoint import shard_file
root = sys.argv[1]
s = build_local(ModelConfig(image_size=32, patch_size=8, kwargs={"depth": 2}), MethodConfig(experts=64), seed=0)
ck = Checkpointer(root, Comm(), async_save=True)
ck.save(2, {"pool": s.pool}, {"experts": 64})
ck.wait()
with torch.no_grad():
    s.pool.shard.delta.add_(1.0)
real = shard_file._HashingFile.write
def slow(self, mv):          # a slow filesystem: the save is still in flight when the kill arrives
    real(self, mv)
    time.sleep(0.05)
shard_file._HashingFile.write = slow
ck.save(4, {"pool": s.pool}, {"experts": 64})
print("saving", flush=True)
ck.wait()
print("finished", flush=True)
"""


def test_kill_9_during_async_save_keeps_the_previous_latest(tmp_path):
    root = tmp_path / "ck"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    p = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(root)], stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline().strip() == "saving"
    tmp = root / "step-000000004.tmp"
    deadline = time.monotonic() + 60
    while not (tmp / "pool-rank00000.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)                                   # part of the shard is on disk
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert (tmp / "pool-rank00000.safetensors").exists() and not (tmp / "manifest.json").exists()
    assert (root / "latest").read_text().strip() == "step-000000002"

    from smat_dist.build import build_local
    from smat_dist.checkpoint import Checkpointer, find_latest
    from smat_dist.config.schema import MethodConfig, ModelConfig
    from smat_dist.distributed.comm import Comm

    fresh = build_local(ModelConfig(image_size=32, patch_size=8, kwargs={"depth": 2}), MethodConfig(experts=64),
                        seed=0)
    want = fresh.pool.shard.delta.detach().clone()
    with torch.no_grad():
        fresh.pool.shard.delta.add_(7.0)
    Checkpointer(root, Comm()).load(find_latest(root), {"pool": fresh.pool}, expect={"experts": 64})
    torch.testing.assert_close(fresh.pool.shard.delta.detach(), want, rtol=0, atol=0)   # the step-2 state
