"""Faults in converted data: a corrupt image under data.on_corrupt=error|skip, a truncated shard found at
start-up, and `smat-convert --verify` on a good and a damaged folder. Real shards (tests/data_fixture.py)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from data_tools.verify import verify
from smat_dist.config.hydra import compose
from smat_dist.data.episodes import EpisodeConfig, EpisodeStream, episode_config
from smat_dist.data.reader import CorruptImageError, ShardError
from smat_dist.data.spec import load_spec
from tests.data_fixture import make_dataset

CFG = EpisodeConfig(mode="fixed", ways=3, shots=2, queries=2, image_size=16)
SKIP = EpisodeConfig(mode="fixed", ways=3, shots=2, queries=2, image_size=16, on_corrupt="skip")
SEED = 7


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("good"), "toy", images=10, shard_bytes=8 << 10)


def _corrupt(src, dst, label: int, member: int):
    """A copy of dataset ``src`` with member ``member`` of class ``label`` overwritten by zeros (same size)."""
    shutil.copytree(src, dst)
    spec = load_spec(str(dst))
    off, size, _ = spec.classes[label].members[member]
    with open(dst / spec.classes[label].shard, "r+b") as f:
        f.seek(off)
        f.write(b"\0" * size)
    return dst, spec


def _episode_drawing(stream, label: int, member: int) -> tuple[int, int, int]:
    """(index, class position, image position) of the first episode that draws the member."""
    for idx in range(500):
        d = stream.describe(idx)
        for j, (lab, s, q) in enumerate(zip(d.labels, d.support_ids, d.query_ids)):
            if lab == label and member in s + q:
                return idx, j, (s + q).index(member)
    raise AssertionError("no episode draws the member")


def _flat(ep) -> torch.Tensor:
    return torch.cat([ep.support, ep.query])


def test_error_policy_names_member_and_shard(good, tmp_path):
    bad, spec = _corrupt(good, tmp_path / "toy", label=2, member=3)
    stream = EpisodeStream([str(bad)], "train", CFG, seed=SEED)
    idx, _, _ = _episode_drawing(stream, 2, 3)
    with pytest.raises(CorruptImageError, match=rf"corrupt image c00002_000003 in shard .*{spec.classes[2].shard} "
                                                rf".*class '{spec.classes[2].name}'.*data.on_corrupt=skip"):
        stream.episode(idx)


def test_skip_policy_replaces_deterministically_and_warns(good, tmp_path, caplog):
    bad, spec = _corrupt(good, tmp_path / "toy", label=2, member=3)
    stream = EpisodeStream([str(bad)], "train", SKIP, seed=SEED, train_aug=True)
    clean = EpisodeStream([str(good)], "train", SKIP, seed=SEED, train_aug=True)
    idx, j, pos = _episode_drawing(stream, 2, 3)
    with caplog.at_level(logging.WARNING, logger="smat_dist"):
        ep = stream.episode(idx)
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"corrupt image c00002_000003 in shard {bad / spec.classes[2].shard}" in m
               and "data.on_corrupt=skip" in m and f"episode {idx}" in m for m in msgs), msgs
    assert stream.replaced == 1
    # only the corrupt image's slot differs from the clean data's episode
    ref = clean.episode(idx)
    d = stream.describe(idx)
    n_support = sum(len(x) for x in d.support_ids)
    if pos < len(d.support_ids[j]):
        slot = sum(len(x) for x in d.support_ids[:j]) + pos
    else:
        slot = n_support + sum(len(x) for x in d.query_ids[:j]) + pos - len(d.support_ids[j])
    a, b = _flat(ep), _flat(ref)
    assert [k for k in range(len(a)) if not torch.equal(a[k], b[k])] == [slot]
    # the replacement is not an image the episode holds already (support and query stay disjoint)
    assert not any(torch.equal(a[slot], a[k]) for k in range(len(a)) if k != slot)
    # the same again in this process (a resumed run), from the loader at that cursor with a data worker
    assert torch.equal(_flat(stream.episode(idx)), a)
    it = stream.loader(start=idx, rank=0, world=1, per_rank=1, workers=1)
    assert torch.equal(_flat(next(it)[0]), a)
    # another rank: another process, rank 1 of 2 of a loader whose step 0 holds episodes idx and idx+1
    out = tmp_path / "rank1.pt"
    code = ("import sys, torch; from smat_dist.data.episodes import EpisodeConfig, EpisodeStream;"
            "cfg = EpisodeConfig(mode='fixed', ways=3, shots=2, queries=2, image_size=16, on_corrupt='skip');"
            f"s = EpisodeStream([sys.argv[1]], 'train', cfg, seed={SEED}, train_aug=True);"
            f"ep = next(s.loader(start={idx - 1 if idx else 0}, rank=1 if {idx} else 0, world=2 if {idx} else 1))[0];"
            f"assert ep.index == {idx}, ep.index;"
            "torch.save(torch.cat([ep.support, ep.query]), sys.argv[2])")
    r = subprocess.run([sys.executable, "-c", code, str(bad), str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert torch.equal(torch.load(out), a)
    assert "corrupt image c00002_000003" in r.stderr   # that rank warns too


def test_skip_policy_from_the_run_config():
    cfg = compose("train", ["data.sources=[x]", "data.on_corrupt=skip"])
    assert episode_config(cfg).on_corrupt == "skip"
    assert episode_config(compose("train", ["data.sources=[x]"])).on_corrupt == "error"
    with pytest.raises(Exception, match="on_corrupt"):
        compose("train", ["data.sources=[x]", "data.on_corrupt=ignore"])


def test_skip_policy_with_no_readable_replacement_fails_naming_member(tmp_path):
    src = make_dataset(tmp_path / "src", "toy", images=4, splits={"train": 3, "val": 0, "test": 0})
    dst = tmp_path / "toy"
    shutil.copytree(src, dst)
    spec = load_spec(str(dst))
    cls = spec.classes[0]
    with open(dst / cls.shard, "r+b") as f:   # every image of class 0
        for off, size, _ in cls.members:
            f.seek(off)
            f.write(b"\0" * size)
    stream = EpisodeStream([str(dst)], "train", SKIP, seed=0)
    idx = next(i for i in range(200) if 0 in stream.describe(i).labels)
    with pytest.raises(CorruptImageError, match=r"corrupt image c00000_0000\d\d in shard .*no readable replacement"):
        stream.episode(idx)


def test_truncated_shard_found_at_start_naming_the_shard(good, tmp_path):
    dst = tmp_path / "toy"
    shutil.copytree(good, dst)
    spec = load_spec(str(dst))
    shard = sorted(spec.shards)[-1]
    size = os.path.getsize(dst / shard)
    with open(dst / shard, "r+b") as f:
        f.truncate(size - 700)
    t0 = time.perf_counter()
    with pytest.raises(ShardError, match=rf"truncated shard {dst / shard} \(dataset toy, class.*it is {size - 700} "
                                         rf"bytes, .*spec.json records {size}"):
        EpisodeStream([str(dst)], "val", CFG)   # any split: every shard of the dataset is checked
    assert time.perf_counter() - t0 < 5
    os.unlink(dst / shard)
    with pytest.raises(ShardError, match=rf"missing shard {dst / shard}"):
        EpisodeStream([str(dst)], "train", CFG)


def test_spec_without_sizes_still_loads_and_says_it_cannot_verify(good, tmp_path, caplog):
    dst = tmp_path / "toy"
    shutil.copytree(good, dst)
    raw = json.loads((dst / "spec.json").read_text())
    for s in raw["shards"]:
        del s["bytes"], s["sha256"]
    (dst / "spec.json").write_text(json.dumps(raw))
    with caplog.at_level(logging.WARNING, logger="smat_dist"):
        stream = EpisodeStream([str(dst)], "train", CFG)
    assert any("cannot verify the shard sizes" in r.getMessage() for r in caplog.records)
    stream.episode(0)
    rep = verify(dst)[0]
    assert rep.problems == [] and any("no sha256" in n for n in rep.notes)


def _convert_verify(path):
    return subprocess.run([sys.executable, "-m", "data_tools.cli", "--verify", str(path)], capture_output=True,
                          text=True, timeout=120)


def test_verify_good_folder_exits_0(good, tmp_path):
    r = _convert_verify(good)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] and out["datasets"][0]["name"] == "toy" and out["datasets"][0]["images"] == 22 * 10
    # a folder of dataset folders (an offline-all output) is verified dataset by dataset
    root = tmp_path / "all"
    shutil.copytree(good, root / "toy")
    make_dataset(root, "other", images=3)
    r = _convert_verify(root)
    assert r.returncode == 0 and [d["name"] for d in json.loads(r.stdout)["datasets"]] == ["other", "toy"]


def test_verify_damaged_folder_reports_every_bad_member_and_shard(good, tmp_path):
    bad, spec = _corrupt(good, tmp_path / "toy", label=2, member=3)
    off, size, _ = spec.classes[5].members[1]   # a second corrupt image, with a garbled header
    with open(bad / spec.classes[5].shard, "r+b") as f:
        f.seek(off + 4)
        f.write(b"garbage!")
    last = max(spec.classes)
    tshard = spec.classes[last].shard
    off, size, _ = spec.classes[last].members[-1]
    with open(bad / tshard, "r+b") as f:   # a truncated shard: its last image is cut
        f.truncate(off + size // 2)
    r = _convert_verify(bad)
    assert r.returncode == 2, (r.stdout, r.stderr)
    problems = json.loads(r.stdout)["datasets"][0]["problems"]
    text = "\n".join(problems)
    assert f"corrupt image c00002_000003 in shard {bad / spec.classes[2].shard}" in text
    assert f"corrupt image c00005_000001 in shard {bad / spec.classes[5].shard}" in text
    assert f"truncated shard {bad / tshard}" in text
    assert f"truncated image c{last:05d}_{spec.classes[last].count - 1:06d} in shard {bad / tshard}" in text
    # the digest catches damage that keeps the size (the two corrupt images' shards)
    assert f"digest mismatch in shard {bad / spec.classes[2].shard}" in text
    assert "corrupt image c00002_000003" in r.stderr   # each problem is logged too
