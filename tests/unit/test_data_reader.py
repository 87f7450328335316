"""Shard reading on a local folder, a pipe: URL and an HTTP server with Range support; bad shards and specs."""
from __future__ import annotations

import http.server
import json
import os
import tarfile
import threading
from functools import partial

import pytest

from smat_dist.data.episodes import EpisodeConfig, EpisodeStream
from smat_dist.data.reader import ShardError, ShardReader
from smat_dist.data.spec import SpecError, load_spec
from tests.data_fixture import make_dataset

CFG = EpisodeConfig(image_size=32)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    # small shards: the dataset spans several shards, so the handle LRU is exercised
    return make_dataset(tmp_path_factory.mktemp("data"), "toy", shard_bytes=8 << 10)


def tar_members(folder) -> dict[str, bytes]:
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".tar"):
            with tarfile.open(os.path.join(folder, f)) as t:
                for m in t.getmembers():
                    out[m.name] = t.extractfile(m).read()
    return out


def test_local_read_matches_tar(ds):
    spec = load_spec(str(ds))
    assert len(spec.shards) > 2
    members = tar_members(ds)
    r = ShardReader(max_handles=2)
    for label in spec.splits["train"]:
        ids = [3, 0, 7]
        got = r.read(spec, label, ids)
        assert got == [members[f"c{label:05d}_{i:06d}.png"] for i in ids]
        assert r.open_handles <= 2
    r.close()
    assert r.open_handles == 0


def test_pipe_url_gives_identical_episodes(ds):
    local = EpisodeStream([str(ds)], "train", CFG, seed=5, train_aug=True)
    piped = EpisodeStream([f"pipe:cat {ds}"], "train", CFG, seed=5, train_aug=True)
    piped_tpl = EpisodeStream(["pipe:cat " + str(ds) + "/{file}"], "train", CFG, seed=5, train_aug=True)
    for i in range(3):
        a, b, c = local.episode(i), piped.episode(i), piped_tpl.episode(i)
        assert a.support.equal(b.support) and a.query.equal(b.query) and a.query.equal(c.query)
        assert a.class_names == b.class_names


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single byte-range support (the stdlib handler ignores Range)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        rng = self.headers.get("Range")
        path = self.translate_path(self.path)
        if not rng or not os.path.isfile(path):
            return super().do_GET()
        start, end = (int(x) for x in rng.split("=")[1].split("-"))
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_http_range_reads(ds):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_RangeHandler, directory=str(ds.parent)))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/{ds.name}"
        remote = EpisodeStream([url], "val", CFG, seed=1)
        local = EpisodeStream([str(ds)], "val", CFG, seed=1)
        a, b = remote.episode(0), local.episode(0)
        assert a.support.equal(b.support) and a.query.equal(b.query)
    finally:
        server.shutdown()
        server.server_close()


def _truncate_last_class(ds, tmp_path):
    """Copy the dataset and cut its last shard inside the last class's images; return (copy, spec, label)."""
    import shutil

    dst = tmp_path / "toy"
    shutil.copytree(ds, dst)
    spec = load_spec(str(dst))
    label = max(spec.classes)
    cls = spec.classes[label]
    off, size, _ = cls.members[cls.count // 2]
    with open(dst / cls.shard, "r+b") as f:
        f.truncate(off + size // 2)
    return dst, spec, label


def test_truncated_shard_names_shard_and_class(ds, tmp_path):
    dst, spec, label = _truncate_last_class(ds, tmp_path)
    cls = spec.classes[label]
    r = ShardReader()
    r.read(spec, label, [0])  # the intact head of the class still reads
    with pytest.raises(ShardError, match=rf"truncated shard .*{cls.shard}.*class '{cls.name}'"):
        r.read(spec, label, list(range(cls.count)))
    piped = load_spec(f"pipe:cat {dst}")
    with pytest.raises(ShardError, match=rf"{cls.shard}.*class '{cls.name}'"):
        ShardReader().read(piped, label, list(range(cls.count)))
    # through the episode API: a local folder is refused when the stream is built (shard sizes vs spec.json,
    # tests/unit/test_data_faults.py); a pipe: source cannot be sized up front and fails when an episode
    # of the test split reads the damaged class
    with pytest.raises(ShardError, match=rf"truncated shard .*{cls.shard}.*'{cls.name}'"):
        EpisodeStream([str(dst)], cls.split, CFG, seed=0)
    stream = EpisodeStream([f"pipe:cat {dst}"], cls.split, CFG, seed=0)
    idx = next(i for i in range(200) if label in stream.describe(i).labels)
    with pytest.raises(ShardError, match=cls.name):
        stream.episode(idx)


def test_corrupt_image_names_member(ds, tmp_path):
    import shutil

    dst = tmp_path / "toy"
    shutil.copytree(ds, dst)
    spec = load_spec(str(dst))
    cls = spec.classes[0]
    off, size, _ = cls.members[1]
    with open(dst / cls.shard, "r+b") as f:
        f.seek(off)
        f.write(b"\0" * size)
    with pytest.raises(OSError, match=rf"corrupt image c00000_000001 in shard .*{cls.shard}.*'{cls.name}'"):
        EpisodeStream([str(dst)], "train", CFG)._images(spec, [(0, [0, 1])])


def test_spec_errors_name_file_and_key(tmp_path, ds):
    with pytest.raises(SpecError, match=r"missing/spec.json: not found"):
        load_spec(str(tmp_path / "missing"))
    raw = json.loads((ds / "spec.json").read_text())
    for mutate, pattern in [
        (lambda r: r.update(version=99), r"key 'version' is 99"),
        (lambda r: r.update(format="tfrecord"), r"key 'format'"),
        (lambda r: r["classes"][2].pop("members"), r"missing key classes\[2\].'members'"),
        (lambda r: r["classes"][1].update(count=3), r"class 'train_class001': 'count' is 3"),
        (lambda r: r["classes"][0].update(shard="nope.tar"), r"'nope.tar' which is not in 'shards'"),
        (lambda r: r["splits"]["val"].append(0), r"splits.'val' lists class 'train_class000'"),
    ]:
        bad = dict(raw, classes=[dict(c) for c in raw["classes"]],
                   splits={k: list(v) for k, v in raw["splits"].items()})
        mutate(bad)
        d = tmp_path / f"bad{abs(hash(pattern))}"
        d.mkdir()
        (d / "spec.json").write_text(json.dumps(bad))
        with pytest.raises(SpecError, match=pattern) as e:
            load_spec(str(d))
        assert str(d / "spec.json") in str(e.value)


def test_pipe_reads_each_shard_once_per_episode(ds, tmp_path):
    """All classes of one shard come from a single stream of that shard (counted with a logging command)."""
    log = tmp_path / "opened.log"
    ds = make_dataset(tmp_path, "oneshard", shard_bytes=1 << 20)
    spec = load_spec(f"pipe:cat {ds}")
    shard = spec.classes[0].shard
    same_shard = [lab for lab, c in spec.classes.items() if c.shard == shard][:3]
    assert len(same_shard) >= 2
    spec = load_spec(f"pipe:echo {{file}} >> {log}; cat {ds}/{{file}}")
    got = ShardReader().read_classes(spec, [(lab, [1, 0]) for lab in same_shard])
    members = tar_members(ds)
    assert got == [[members[f"c{lab:05d}_{i:06d}.png"] for i in (1, 0)] for lab in same_shard]
    assert log.read_text().split() == ["spec.json", shard]
