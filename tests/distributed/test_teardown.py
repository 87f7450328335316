"""A rank frees its process groups before its interpreter exits: gloo's worker and transport threads that
outlive the rank race interpreter finalization, which aborted a rank now and then (SIGABRT, `terminate called
without an active exception`) after a run that had finished cleanly. The refused resume (every rank raises) is
covered by test_checkpoint_scale.test_flipped_byte_is_named_by_the_rank_that_reads_it."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.helpers import c10d_threads_left, report_c10d_threads_at_exit

pytestmark = pytest.mark.dist


def engine_rank(cfg, run_dir, should_stop):
    """A rank of the launchers' contract that holds what the trainer holds: the groups (initialised as the
    trainer does), a DeepSpeed engine (which clones the world group), and one collective."""
    import torch
    import torch.distributed as dist

    from smat_dist.distributed.engine import DeepSpeedOptimizer
    from smat_dist.distributed.process_group import init_distributed

    rank, world = init_distributed(cfg.dist)
    report_c10d_threads_at_exit(Path(run_dir) / f"threads-rank{rank}.json")
    module = torch.nn.Linear(4, 2)
    opt = DeepSpeedOptimizer(module, torch.optim.SGD(module.parameters(), lr=0.1), cfg.dist, 1, world, None)
    ranks = [None] * world
    dist.all_gather_object(ranks, rank)
    return {"status": "done", "ranks": ranks, "engine_world": opt.engine.world_size}


def test_local_ranks_leave_no_c10d_thread_to_interpreter_exit(tmp_path):
    from smat_dist.config.schema import Config
    from smat_dist.launch.local import launch_local

    cfg = Config()
    out = launch_local(cfg, str(tmp_path), rank_fn=engine_rank, nproc=2)
    assert [r["ranks"] for r in out["ranks"]] == [[0, 1], [0, 1]] and out["engine_world"] == 2
    left, reports = c10d_threads_left([tmp_path / f"threads-rank{r}.json" for r in range(2)])
    assert left == [[], []], reports
