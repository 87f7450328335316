"""The data benchmark runs end to end on a tiny synthetic dataset and reports every field the CLI prints."""
from __future__ import annotations

import json

from smat_dist.bench.data import run


def test_bench_data_reports_each_worker_setting():
    emitted = []
    rows = run(None, episodes=2, workers=(0, 1), image_size=32, synthetic=(6, 8), emit=emitted.append)
    assert [json.loads(json.dumps(r)) for r in emitted] == rows and [r["workers"] for r in rows] == [0, 1]
    for r in rows:
        for key in ("episodes_per_s", "images_per_s", "folder_images_per_s", "first_episode_s"):
            assert r[key] > 0, key
        assert r["episodes"] == 2 and r["images"] >= 2 * 5 * 2  # >= 5 ways x (1 shot + 1 query) per episode
    assert rows[0]["images"] == rows[1]["images"]  # the same episodes at every worker count
