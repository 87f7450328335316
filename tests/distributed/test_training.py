"""2 CPU ranks over gloo through the real DeepSpeed trainer: equivalence with one rank, exact resume,
resume across world sizes, refusal of incompatible checkpoints, NaN handling."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.data_fixture import make_dataset
from tests.distributed.helpers import read_pool_shard, run_ranks, tiny_config, train_rank

pytestmark = pytest.mark.dist
TASKS = 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(make_dataset(tmp_path_factory.mktemp("data"), "toy"))


def _pool(results):
    parts = sorted((r["pool"] for r in results if r["pool"]), key=lambda p: p["lo"])
    delta = torch.cat([p["delta"] for p in parts])
    la = torch.cat([p["log_alpha"] for p in parts])
    return delta, la


def _losses(run_dir) -> list[float]:
    return [json.loads(x)["loss/task"] for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _assert_same_state(a, b, exact: bool = False):
    """Same parameters. Across world sizes the summation order of the mask gradients differs (one
    matmul over the round's tasks vs accumulation task by task); the mask learning rate of 1e6 turns
    those 1e-9 rounding differences into ~1e-3 in the logits, so there the logits are compared at that
    scale and the resulting hard masks must agree almost everywhere."""
    da, la = _pool(a)
    db, lb = _pool(b)
    n = min(len(da), len(db))
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(da[:n], db[:n], **tol)
    if exact:
        torch.testing.assert_close(la[:n], lb[:n], rtol=0, atol=0)
    else:
        torch.testing.assert_close(la[:n], lb[:n], rtol=0, atol=1e-2)
        from smat_dist.pool.gates import gate
        assert (gate(la[:n]) == 0).eq(gate(lb[:n]) == 0).float().mean() > 0.9999
    ra, rb = a[0]["replicated"], b[0]["replicated"]
    # AdamW normalises each update by the gradient's own scale, so near-zero gradients (the skill tokens
    # start at 1e-3) differing by rounding move by up to one learning rate (1e-4) per step.
    tol = tol if exact else dict(rtol=1e-3, atol=3e-4)
    assert ra.keys() == rb.keys()
    for k in ra:
        torch.testing.assert_close(ra[k].double(), rb[k].double(), **tol, msg=k)


@pytest.fixture(scope="module")
def two_rank_run(data_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("r2")
    return d, run_ranks(train_rank, 2, _with_val(tiny_config(data_dir, tasks=TASKS, tasks_per_rank=1)), str(d))


@pytest.fixture(scope="module")
def one_rank_run(data_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("r1")
    return d, run_ranks(train_rank, 1, _with_val(tiny_config(data_dir, tasks=TASKS, tasks_per_rank=2)), str(d))


def _with_val(cfg):
    cfg.train.val_every_tasks = 4
    cfg.data.val_episodes = 3
    cfg.logging.mask_diagnostics = True    # read-only: also checked to be the same on 2 ranks as on 1
    return cfg


def test_two_ranks_equal_one_rank_on_the_same_tasks(two_rank_run, one_rank_run):
    (d2, r2), (d1, r1) = two_rank_run, one_rank_run
    l1, l2 = _losses(d1), _losses(d2)
    v1 = [json.loads(x).get("val/acc_mean") for x in (d1 / "metrics.jsonl").read_text().splitlines()]
    v2 = [json.loads(x).get("val/acc_mean") for x in (d2 / "metrics.jsonl").read_text().splitlines()]
    assert v1[1] is not None and v1 == v2  # validation split over ranks gives the same accuracy
    assert len(l1) == len(l2) == TASKS // 2
    assert l1 == pytest.approx(l2, rel=1e-5, abs=1e-6)
    _assert_same_state(r1, r2)
    delta, _ = _pool(r2)
    assert delta.abs().max() > 0, "training must move the shared delta"
    m = [json.loads(x) for x in (d2 / "metrics.jsonl").read_text().splitlines()]
    # Per-task bytes of the sharded merge: P floats out and P back per rank, whatever M is.
    assert all(x["sent_bytes_per_task"] > 0 for x in m)
    for key in ("loss/query_ce", "loss/kd_dense", "loss/kd_pretrained", "loss/sparsity_penalty", "sparsity/expert0",
                "temperature", "tasks_per_s", "peak_mem_bytes", "episode/ways"):
        assert key in m[-1], key
    # the mask diagnostics are global sums over the slices: the same on 2 ranks as on 1 (rounding apart)
    m1 = [json.loads(x) for x in (d1 / "metrics.jsonl").read_text().splitlines()]
    for key in ("mask/penalty_grad_norm", "mask/task_grad_norm", "mask/at_clamp_low", "mask/at_clamp_high",
                "mask/clip_scale"):
        assert [r[key] for r in m] == pytest.approx([r[key] for r in m1], rel=1e-3, abs=1e-6), key


def test_exact_resume_two_ranks(data_dir, two_rank_run, tmp_path):
    d_full, full = two_rank_run
    cfg = tiny_config(data_dir, tasks=TASKS, tasks_per_rank=1)
    first = run_ranks(train_rank, 2, cfg, str(tmp_path), 1)  # stop after one step (2 tasks)
    assert first[0]["out"]["status"] == "stopped" and first[0]["out"]["tasks"] == 2
    resumed = run_ranks(train_rank, 2, cfg, str(tmp_path))   # auto-resume from run_dir/checkpoints/latest
    assert resumed[0]["out"]["tasks"] == TASKS
    assert _losses(tmp_path) == _losses(d_full)  # bit-exact at the same world size
    _assert_same_state(resumed, full, exact=True)


@pytest.mark.parametrize("first_world,second_world,stage", [(2, 1, 0), (1, 2, 0), (2, 1, 2)])
def test_resume_across_world_sizes(data_dir, one_rank_run, tmp_path, first_world, second_world, stage):
    """Stage 0: our own resharding; stage 2: the ZeRO-partitioned optimiser state goes through DeepSpeed's
    universal checkpoint (ZeRO stages train identically, so the stage-0 run is the reference)."""
    _, full = one_rank_run
    a, b = tmp_path / "a", tmp_path / "b"
    run_ranks(train_rank, first_world, tiny_config(data_dir, tasks=TASKS, tasks_per_rank=2 // first_world,
                                                   zero_stage=stage), str(a), 1)
    cfg = tiny_config(data_dir, tasks=TASKS, tasks_per_rank=2 // second_world, zero_stage=stage)
    cfg.resume = str(a)
    resumed = run_ranks(train_rank, second_world, cfg, str(b))
    assert resumed[0]["out"]["tasks"] == TASKS
    # The resumed run continues the same episode stream: its two steps equal the uninterrupted run's last two.
    assert _losses(b) == pytest.approx(_losses(one_rank_run[0])[1:], rel=1e-5, abs=1e-6)
    _assert_same_state(resumed, full)


def test_incompatible_checkpoint_is_refused(data_dir, two_rank_run, tmp_path):
    d_full, _ = two_rank_run
    cfg = tiny_config(data_dir, tasks=TASKS + 2, experts=3)
    cfg.resume = str(d_full)
    with pytest.raises(Exception) as e:
        run_ranks(train_rank, 1, cfg, str(tmp_path))
    assert "experts=4" in str(e.value) and "experts=3" in str(e.value)


def _nan_rank(rank, world, cfg, run_dir):
    from smat_dist.train import step as step_mod
    from smat_dist.train import trainer

    real = step_mod.smat_step
    calls = {"n": 0}

    def poisoned(method, pool, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # poison the shared delta on the second step
            with torch.no_grad():
                pool.shard.delta[0] = float("nan")
        return real(method, pool, *a, **k)

    trainer.smat_step = poisoned
    try:
        trainer.train(cfg, run_dir)
    except step_mod.NonFiniteLoss as e:
        return str(e)
    return "no error"


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    cfg = tiny_config(data_dir, tasks=TASKS, tasks_per_rank=2, every=2)
    msgs = run_ranks(_nan_rank, 1, cfg, str(tmp_path))
    assert "non-finite loss at task 2" in msgs[0]
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert latest == "step-000000002"
    sd = read_pool_shard(tmp_path / "checkpoints" / latest / "pool-rank00000.safetensors")
    assert torch.isfinite(sd["delta"]).all()


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stages_train_the_same(data_dir, two_rank_run, tmp_path, stage):
    """ZeRO stages partition the replicated state differently but must not change the training."""
    d_full, _ = two_rank_run
    res = run_ranks(train_rank, 2, tiny_config(data_dir, tasks=4, zero_stage=stage), str(tmp_path))
    assert res[0]["out"]["tasks"] == 4
    assert _losses(tmp_path) == pytest.approx(_losses(d_full)[:2], rel=1e-6, abs=1e-7)


def test_pmf_baseline_trains_on_two_ranks_and_loads_for_eval(data_dir, tmp_path):
    from smat_dist.eval.loading import load_method

    res = run_ranks(train_rank, 2, tiny_config(data_dir, tasks=4, method="pmf"), str(tmp_path))
    losses = _losses(tmp_path)
    assert len(losses) == 2 and losses[1] < losses[0]
    setup = load_method(str(tmp_path))
    torch.testing.assert_close(setup.method.delta.detach(), res[0]["replicated"]["delta"])


def test_lean_pool_trains_like_the_stored_pool(data_dir, two_rank_run, tmp_path):
    """method.sparsity.lean recomputes the masks and their gradient instead of storing them: same run."""
    d_full, full = two_rank_run
    cfg = _with_val(tiny_config(data_dir, tasks=TASKS, tasks_per_rank=1))
    cfg.method.sparsity.lean = True
    lean = run_ranks(train_rank, 2, cfg, str(tmp_path))
    assert _losses(tmp_path) == pytest.approx(_losses(d_full), rel=1e-5, abs=1e-6)
    _assert_same_state(lean, full)


def test_top_teacher_two_ranks_equal_one_rank(data_dir, two_rank_run, tmp_path):
    """method.teacher.top_fraction through the real trainer: 2 ranks = 1 rank, and only the teacher changed."""
    def cfg(tasks_per_rank):
        c = tiny_config(data_dir, tasks=TASKS, tasks_per_rank=tasks_per_rank)
        c.method.teacher.top_fraction = 0.5
        return c

    r2 = run_ranks(train_rank, 2, cfg(1), str(tmp_path / "r2"))
    r1 = run_ranks(train_rank, 1, cfg(2), str(tmp_path / "r1"))
    assert _losses(tmp_path / "r2") == pytest.approx(_losses(tmp_path / "r1"), rel=1e-5, abs=1e-6)
    _assert_same_state(r2, r1)
    whole = [json.loads(x) for x in (Path(two_rank_run[0]) / "metrics.jsonl").read_text().splitlines()]
    top = [json.loads(x) for x in (tmp_path / "r2" / "metrics.jsonl").read_text().splitlines()]
    assert top[0]["loss/query_ce"] == pytest.approx(whole[0]["loss/query_ce"], rel=1e-6)
    assert top[0]["loss/kd_dense"] != pytest.approx(whole[0]["loss/kd_dense"], rel=1e-6)
