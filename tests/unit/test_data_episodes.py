"""Episode determinism, rank/worker index partitioning, cursor resume, and the fixed evaluation sets."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from smat_dist.data.episodes import EpisodeConfig, EpisodeStream, global_indices, next_cursor
from smat_dist.data.fixed_sets import EVAL_SEED, fixed_episodes
from tests.data_fixture import make_dataset

CFG = EpisodeConfig(image_size=32)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    a = make_dataset(root, "alpha", ontology="bilevel", images=12)
    b = make_dataset(root, "beta", splits={"train": 8, "val": 5, "test": 5}, images=[6 + i for i in range(18)])
    return [str(a), str(b)]


def digest(ep) -> str:
    h = hashlib.sha256()
    for t in (ep.support, ep.support_labels, ep.query, ep.query_labels):
        h.update(t.contiguous().numpy().tobytes())
    h.update(f"{ep.source}|{ep.split}|{ep.index}|{ep.ways}|{ep.class_names}".encode())
    return h.hexdigest()


def test_episode_shapes_and_labels(sources):
    s = EpisodeStream(sources, "train", CFG, seed=0, train_aug=True)
    for i in range(6):
        ep, d = s.episode(i), s.describe(i)
        assert ep.support.shape == (sum(d.shots), 3, 32, 32) and ep.support.dtype == torch.float32
        assert ep.query.shape == (sum(d.queries), 3, 32, 32)
        assert ep.support_labels.dtype == torch.long
        assert set(ep.support_labels.tolist()) == set(range(ep.ways)) == set(ep.query_labels.tolist())
        assert ep.class_names == d.class_names and ep.source == d.source and ep.index == i
        assert torch.isfinite(ep.support).all() and ep.support.abs().max() < 3  # normalised, not raw 0..255


def test_sources_are_chosen_uniformly(sources):
    s = EpisodeStream(sources, "train", CFG, seed=0)
    picks = [s.describe(i).source for i in range(400)]
    assert 150 < picks.count("alpha") < 250


def test_same_key_same_episode_and_aug_does_not_change_composition(sources):
    a = EpisodeStream(sources, "train", CFG, seed=3, train_aug=True)
    b = EpisodeStream(sources, "train", CFG, seed=3, train_aug=True)
    plain = EpisodeStream(sources, "train", CFG, seed=3, train_aug=False)
    other_seed = EpisodeStream(sources, "train", CFG, seed=4, train_aug=True)
    for i in (0, 5, 9):
        assert digest(a.episode(i)) == digest(b.episode(i))
        assert a.describe(i) == plain.describe(i)
        assert not a.episode(i).support.equal(plain.episode(i).support)
    assert [a.describe(i) for i in range(5)] != [other_seed.describe(i) for i in range(5)]
    assert a.describe(0) != a.describe(1)


def test_episode_identical_in_another_process(sources):
    s = EpisodeStream(sources, "train", CFG, seed=11, train_aug=True)
    here = [digest(s.episode(i)) for i in (2, 7)]
    code = (
        "import sys, json; sys.path.insert(0, sys.argv[1]);"
        "from tests.unit.test_data_episodes import digest, CFG;"
        "from smat_dist.data.episodes import EpisodeStream;"
        "s = EpisodeStream(json.loads(sys.argv[2]), 'train', CFG, seed=11, train_aug=True);"
        "print(json.dumps([digest(s.episode(i)) for i in (2, 7)]))"
    )
    out = subprocess.run([sys.executable, "-c", code, ROOT, json.dumps(sources)], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here


def collect(stream, start, world, per_rank, steps, workers=0):
    """{global index: digest} consumed by all ranks over `steps` steps, checking each rank's index formula."""
    got = {}
    for rank in range(world):
        it = stream.loader(start, rank=rank, world=world, per_rank=per_rank, workers=workers)
        for step in range(steps):
            batch = next(it)
            assert [e.index for e in batch] == global_indices(start, step, rank, world, per_rank)
            for e in batch:
                assert e.index not in got, "two ranks consumed the same episode"
                got[e.index] = digest(e)
    return got


def test_world_sizes_consume_the_same_stream(sources):
    s = EpisodeStream(sources, "train", CFG, seed=2, train_aug=True)
    w1 = collect(s, 0, world=1, per_rank=4, steps=2)
    w2 = collect(s, 0, world=2, per_rank=2, steps=2)
    assert sorted(w1) == sorted(w2) == list(range(8)) and w1 == w2


def test_resume_from_cursor_at_another_world_size(sources):
    s = EpisodeStream(sources, "train", CFG, seed=2, train_aug=True)
    full = collect(s, 0, world=1, per_rank=2, steps=4)          # uninterrupted: 8 episodes
    first = collect(s, 0, world=2, per_rank=1, steps=2)         # 2 steps at world 2 ...
    cursor = next_cursor(0, steps=2, world=2, per_rank=1)
    assert cursor == 4
    rest = collect(s, cursor, world=1, per_rank=2, steps=2)     # ... resumed at world 1
    assert {**first, **rest} == full


def test_workers_give_identical_episodes(sources):
    s = EpisodeStream(sources, "train", CFG, seed=9, train_aug=True)
    in_proc = collect(s, 5, world=2, per_rank=2, steps=2, workers=0)
    in_workers = collect(s, 5, world=2, per_rank=2, steps=2, workers=2)
    assert in_proc == in_workers and sorted(in_proc) == list(range(5, 13))


def test_loader_rejects_bad_rank(sources):
    s = EpisodeStream(sources, "train", CFG)
    with pytest.raises(ValueError, match="rank 2 is outside world size 2"):
        s.loader(0, rank=2, world=2, per_rank=1, workers=0)


def test_duplicate_source_names_rejected(sources):
    with pytest.raises(ValueError, match="alpha"):
        EpisodeStream([sources[0], f"pipe:cat {sources[0]}"], "train", CFG)


def test_fixed_mode_too_few_images_names_source_and_class(sources):
    with pytest.raises(ValueError, match=r"beta: class 'train_class000' \(label 0, split 'train'\) has 6 images"):
        EpisodeStream(sources, "train", EpisodeConfig(mode="fixed", ways=5, shots=5, queries=5, image_size=32))


def test_fixed_sets_and_manifest(sources, tmp_path):
    fx = fixed_episodes(sources, "val", 4)
    again = fixed_episodes(sources, "val", 4, seed=EVAL_SEED)
    assert [digest(e) for e in fx] == [digest(again[i]) for i in range(4)]
    assert not fx.stream.train_aug
    by_rank = {e.index: digest(e) for r in range(2) for e in fx.loader(workers=0, rank=r, world=2)}
    assert by_rank == {i: digest(fx[i]) for i in range(4)}
    path = tmp_path / "val_manifest.json"
    fx.write_manifest(path)
    m = json.loads(path.read_text())
    assert m["seed"] == EVAL_SEED and m["n"] == 4 and len(m["episodes"]) == 4
    e0, d0 = m["episodes"][0], fx.descriptions[0]
    assert e0["classes"] == d0.class_names and e0["shots"] == d0.shots and e0["source"] == d0.source
