"""smat-bench rehearse end to end at a tiny size: the very command the integrator runs at ViT-B/16 x 26 experts,
here on a 2-block ViT-Ti with 8 experts (pool chunks of 262144 rows: both ranks hold real rows of the ~0.9M
entries, so the 2 -> 1 resume really re-slices the sums over rows; a few minutes on 2 busy cores)."""
from __future__ import annotations

import json

import pytest

from smat_dist.bench.cli import main

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def test_rehearsal_row_at_a_tiny_size(tmp_path, capsys):
    work = tmp_path / "work"
    rc = main(["rehearse", "--model", "vit_tiny_patch16_224", "--depth", "2", "--experts", "8", "--image-size", "32",
               "--patch-size", "8", "--save", "async", "--work", str(work)])
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    row = json.loads(out.strip().splitlines()[-1])
    assert row["bench"] == "rehearse" and row["pool_entries"] == row["params"] * 8
    # every phase ran and said so on stderr
    for phase in ("plan:", "data written", "trained 2 ranks", "resumed on 1 rank", "compared", "evaluated", "exported"):
        assert phase in err, phase
    tr, rs = row["train_2ranks"], row["resume_1rank"]
    assert len(tr["peak_over_base_bytes"]) == 2 and len(rs["peak_over_base_bytes"]) == 1
    assert all(p > 0 for p in tr["peak_over_base_bytes"] + rs["peak_over_base_bytes"])
    assert tr["ratio"] > 0 and rs["ratio"] > 0 and row["peak_ratio"] == max(tr["ratio"], rs["ratio"])
    assert len(tr["step_s"]) == 2 and len(rs["step_s"]) == 1
    assert tr["save_async"] == [True, True] and all(w >= b for w, b in zip(tr["save_written_s"], tr["save_block_s"]))
    assert rs["resume_load_s"] > 0
    # the 2-rank shards together hold what the 1-rank shard holds (each has its header and the multipliers)
    assert len(row["shard_bytes_2ranks"]) == 2 and len(row["shard_bytes_1rank"]) == 1
    assert all(b > 0 for b in row["shard_bytes_2ranks"])
    assert abs(sum(row["shard_bytes_2ranks"]) - row["shard_bytes_1rank"][0]) < 4096
    # the 1-rank resume read the 2-rank pool to the bit; after the step it ends where the uninterrupted run does
    assert row["resumed"]["reshard_bit_exact"] and row["resumed_equal"] and row["resumed_bit_exact"]
    assert row["resumed"]["pool_close"] and row["resumed"]["replicated_close"]
    assert row["resumed"]["loss_step2"][0] == pytest.approx(row["resumed"]["loss_step2"][1], rel=1e-6)
    assert row["eval_2ranks"]["averages"]["smat/zeroshot"]["id_avg"] is not None
    assert len(row["eval_2ranks"]["peak_over_base_bytes"]) == 2
    assert 0 < row["export"]["bytes"] < row["export"]["checkpoint_bytes"]
    assert not work.exists() or not any(work.iterdir())     # no --keep: the work folder is emptied
