"""Meta-testing on several gloo ranks: the same per-episode accuracies as one rank, with the episodes split
over the ranks, and with the SMAT pool sharded (each rank holds 1/world of it and merges through the
sharded merger) in every mode."""
from __future__ import annotations

import pytest

from tests.distributed.helpers import run_ranks
from tests.unit.test_eval_protocol import _eval_on_ranks, data, make_setups, single  # noqa: F401 (fixtures)

pytestmark = pytest.mark.dist


def test_identical_across_reruns_and_world_sizes(data, single):
    # a fresh process each time (rerun) and 2 gloo ranks splitting the episodes: the same per-episode accuracies
    two = run_ranks(_eval_on_ranks, 2, data)
    assert two[0][1] == two[1][1] == single[1]
    assert two[0][0]["results"] == two[1][0]["results"] == single[0]["results"]
    assert two[0][0]["meta"]["world_size"] == 2


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_pool_evaluation_equals_one_rank(data, single, world):
    """Each rank holds 1/world of the pool and merges through the sharded merger: same per-episode accuracies
    in every mode (zero-shot, full fine-tuning, LoRA), 5 episodes per domain split unevenly over the ranks."""
    res = run_ranks(_eval_on_ranks, world, data, True)
    for r, per in res:
        assert per == single[1]
        assert r["results"] == single[0]["results"]
    rows = [r["pool_entries_here"] for r, _ in res]
    total = make_setups()["smat"].pool.shard.log_alpha.shape[0]
    assert max(rows) <= -(-total // world) + world     # each rank holds its slice only
