"""A rank's checkpoint receipt appears under its name only once complete: rank 0's writer polls for the name
and reads it at once (before, it could read the file between the other rank's open and write: an empty
receipt, JSONDecodeError, a failed save; seen in a demo run on a loaded machine)."""
from __future__ import annotations

import json
import os

from smat_dist.checkpoint import files


def test_receipt_is_not_visible_under_its_name_until_written(tmp_path, monkeypatch):
    path = tmp_path / "done-rank00001.json"
    seen = []
    real_fsync = os.fsync

    def fsync(fd):   # the moment a slow writer is still inside the write: what does a poller see?
        seen.append(path.read_text() if path.is_file() else None)
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    files.write_receipt(path, {"rank": 1, "files": {}, "shards": {}})
    assert seen and all(s is None for s in seen), seen
    assert json.loads(path.read_text())["rank"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
