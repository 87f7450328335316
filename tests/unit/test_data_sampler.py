"""Meta-Dataset sampler invariants, ported from meta_dataset/data/sampling_test.py, plus the ontologies."""
from __future__ import annotations

import math

import numpy as np
import pytest

from smat_dist.data import sampler as S
from smat_dist.data.ontology import MAX_SPANNING_LEAVES_ELIGIBLE
from smat_dist.data.rng import episode_rng
from smat_dist.data.spec import SpecError, parse_spec

MIN_WAYS, MAX_WAYS, MAX_NUM_QUERY, MAX_SUPPORT, MAX_CONTRIB = 5, 50, 10, 500, 100
LO, HI = math.log(0.5), math.log(2)


def raw_spec(split_sizes: dict[str, int], images, ontology=None, names=None) -> dict:
    """A spec.json dict (no shards on disk: the sampler needs none)."""
    n = sum(split_sizes.values())
    images = list(images) if not isinstance(images, int) else [images] * n
    classes, splits, label = [], {}, 0
    for split, k in split_sizes.items():
        splits[split] = []
        for _ in range(k):
            classes.append({"label": label, "name": names[label] if names else f"c{label}", "split": split,
                            "count": images[label], "shard": "shard-000000.tar",
                            "members": [[512 * (j + 1), 10, "png"] for j in range(images[label])]})
            splits[split].append(label)
            label += 1
    return {"format": "smat-wds", "version": 1, "name": "md", "converter": "test", "splits": splits,
            "classes": classes, "shards": [{"file": "shard-000000.tar", "samples": 0, "bytes": 0, "sha256": ""}],
            "ontology": ontology, "counts": {"classes": n, "images": sum(images)}}


# Meta-Dataset's test DatasetSpecification: 15/5/10 classes with [10, 20, 30] * 10 images.
MD_SPEC = parse_spec(raw_spec({"train": 15, "val": 5, "test": 10}, [10, 20, 30] * 10), "/nowhere/md")


def rngs(n, split="train", source="md", seed=0):
    return ((i, episode_rng(seed, split, source, i)) for i in range(n))


# ---- the rule functions (SampleNumWaysUniformlyTest ... SampleNumSupportPerClassTest) -----------------------

def test_num_ways_bounds():
    g = np.random.default_rng(0)
    for _ in range(50):
        assert MIN_WAYS <= S.sample_num_ways_uniformly(10, MIN_WAYS, MAX_WAYS, g) <= 10
        assert S.sample_num_ways_uniformly(2 * MAX_WAYS, MIN_WAYS, MAX_WAYS, g) <= MAX_WAYS


def test_class_ids_unique_and_from_set():
    g = np.random.default_rng(0)
    for _ in range(20):
        ids = S.sample_class_ids_uniformly(MIN_WAYS, list(range(MAX_WAYS)), g)
        assert len(ids) == len(set(ids)) == MIN_WAYS and set(ids) <= set(range(MAX_WAYS))


def test_compute_num_query():
    assert S.compute_num_query(np.array([30, 45, 35, 50]), MAX_NUM_QUERY) == MAX_NUM_QUERY
    assert S.compute_num_query(np.array([10, 9, 20, 21]), MAX_NUM_QUERY) == 4  # at most half the smallest
    with pytest.raises(ValueError):
        S.compute_num_query(np.array([1, 3, 8, 8]), MAX_NUM_QUERY)


def test_support_set_size():
    g = np.random.default_rng(0)
    for _ in range(50):
        size = S.sample_support_set_size(np.array([MAX_SUPPORT] * 10), MAX_CONTRIB, MAX_SUPPORT, g)
        assert 10 <= size <= MAX_SUPPORT
    with pytest.raises(ValueError):
        S.sample_support_set_size(np.array([5] * 10), MAX_CONTRIB, 9, g)


def test_num_support_per_class():
    g = np.random.default_rng(0)
    for _ in range(50):
        n = S.sample_num_support_per_class(np.array([50, 40, 30, 20]), np.array([40, 30, 20, 10]), 50, LO, HI, g)
        assert n.sum() <= 50 and (n >= 1).all() and (n <= [40, 30, 20, 10]).all()
        n = S.sample_num_support_per_class(np.array([10] * 5), np.array([5] * 5), 5, LO, HI, g)
        assert (n == 1).all()
    with pytest.raises(ValueError):
        S.sample_num_support_per_class(np.array([10] * 5), np.array([5] * 5), 3, LO, HI, g)
    with pytest.raises(ValueError):
        S.sample_num_support_per_class(np.array([10] * 5), np.array([5, 0, 5, 5, 5]), 5, LO, HI, g)


# ---- whole-episode invariants (EpisodeDescrSamplerTest and friends) -----------------------------------------

def check_episode(spec, split, d, cfg):
    counts = np.array([spec.classes[lab].count for lab in d.labels])
    assert len(set(d.labels)) == d.ways, "classes repeat"
    assert set(d.labels) <= set(spec.splits[split]), "class from another split"
    assert all(s >= 1 for s in d.shots) and all(q >= 1 for q in d.queries)
    assert (np.array(d.shots) + np.array(d.queries) <= counts).all()
    assert len(set(d.queries)) == 1
    for s_ids, q_ids, s, q, n in zip(d.support_ids, d.query_ids, d.shots, d.queries, counts):
        assert len(s_ids) == s and len(q_ids) == q and not set(s_ids) & set(q_ids)
        assert all(0 <= i < n for i in s_ids + q_ids) and len(set(s_ids + q_ids)) == s + q
    if cfg.mode == "variable":
        assert cfg.min_ways <= d.ways <= min(cfg.max_ways_upper_bound, len(spec.splits[split]))
        assert d.queries[0] == min(cfg.max_num_query, int((counts // 2).min()))
        assert sum(d.shots) <= cfg.max_support_set_size


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_variable_episodes_invariants(split):
    cfg = S.SamplerConfig()
    sampler = S.EpisodeSampler(MD_SPEC, split, cfg)
    ways = set()
    for i, g in rngs(300, split):
        d = sampler.describe(g, i)
        check_episode(MD_SPEC, split, d, cfg)
        ways.add(d.ways)
    n = len(MD_SPEC.splits[split])
    assert ways == set(range(MIN_WAYS, n + 1)), "ways must cover [min_ways, num_classes] uniformly"


def test_large_classes_respect_support_bounds():
    spec = parse_spec(raw_spec({"train": 60}, 1000), "/nowhere/big")
    cfg = S.SamplerConfig()
    sampler = S.EpisodeSampler(spec, "train", cfg)
    biggest = 0
    for i, g in rngs(100):
        d = sampler.describe(g, i)
        check_episode(spec, "train", d, cfg)
        assert d.ways <= MAX_WAYS and d.queries[0] == MAX_NUM_QUERY
        biggest = max(biggest, sum(d.shots))
    assert biggest > 300  # the 500 cap is reached in practice, not only bounded


def test_determinism_from_key():
    sampler = S.EpisodeSampler(MD_SPEC, "train", S.SamplerConfig())
    a = sampler.describe(episode_rng(3, "train", "md", 7), 7)
    b = sampler.describe(episode_rng(3, "train", "md", 7), 7)
    c = sampler.describe(episode_rng(3, "train", "md", 8), 8)
    assert a == b and a != c


def test_fixed_mode():
    cfg = S.SamplerConfig(mode="fixed", ways=12, shots=3, queries=7)
    sampler = S.EpisodeSampler(MD_SPEC, "train", cfg)
    for i, g in rngs(30):
        d = sampler.describe(g, i)
        check_episode(MD_SPEC, "train", d, cfg)
        assert d.ways == 12 and d.shots == [3] * 12 and d.queries == [7] * 12


def test_fixed_mode_too_few_images_names_class():
    cfg = S.SamplerConfig(mode="fixed", ways=5, shots=5, queries=15)
    with pytest.raises(ValueError, match=r"md: class 'c0' \(label 0, split 'train'\) has 10 images"):
        S.EpisodeSampler(MD_SPEC, "train", cfg)


def test_ways_too_big():
    with pytest.raises(ValueError, match="split 'val' has 5 classes, fewer than ways=12"):
        S.EpisodeSampler(MD_SPEC, "val", S.SamplerConfig(mode="fixed", ways=12, shots=1, queries=1))
    small = parse_spec(raw_spec({"train": 4}, 10), "/nowhere/small")
    with pytest.raises(ValueError, match="fewer than min_ways=5"):
        S.EpisodeSampler(small, "train", S.SamplerConfig())


def test_variable_mode_one_image_class_names_class():
    spec = parse_spec(raw_spec({"train": 6}, [10, 10, 1, 10, 10, 10]), "/nowhere/one")
    with pytest.raises(ValueError, match=r"class 'c2' \(label 2, split 'train'\) has 1 image"):
        S.EpisodeSampler(spec, "train", S.SamplerConfig())


def test_bad_mode_rejected():
    with pytest.raises(ValueError, match="mode"):
        S.SamplerConfig(mode="banana")


# ---- ontologies ---------------------------------------------------------------------------------------------

def bilevel_spec(sizes=(5, 7, 9), test_sizes=(6,)):
    n_train, n_test = sum(sizes), sum(test_sizes)
    supers, label = {}, 0
    for k, size in enumerate(sizes + test_sizes):
        supers[f"alpha{k}"] = list(range(label, label + size))
        label += size
    return parse_spec(raw_spec({"train": n_train, "test": n_test}, 20,
                               ontology={"type": "bilevel", "superclasses": supers}), "/nowhere/omni")


def test_bilevel_episodes_come_from_one_superclass():
    spec = bilevel_spec()
    sampler = S.EpisodeSampler(spec, "train", S.SamplerConfig())
    groups = [set(v) for v in spec.ontology["superclasses"].values()]
    seen = set()
    for i, g in rngs(200):
        d = sampler.describe(g, i)
        check_episode(spec, "train", d, S.SamplerConfig())
        owners = [k for k, grp in enumerate(groups) if set(d.labels) <= grp]
        assert len(owners) == 1, f"episode {i} mixes superclasses: {d.labels}"
        assert d.ways <= len(groups[owners[0]])
        seen.add(owners[0])
    assert seen == {0, 1, 2}  # every train alphabet is used, never the test one
    test_sampler = S.EpisodeSampler(spec, "test", S.SamplerConfig())
    assert set(test_sampler.describe(episode_rng(0, "test", "md", 0), 0).labels) <= groups[3]


def test_bilevel_superclass_too_small_names_it():
    spec = bilevel_spec(sizes=(5, 3))
    with pytest.raises(ValueError, match="superclass 'alpha1' has 3 classes in split 'train'"):
        S.EpisodeSampler(spec, "train", S.SamplerConfig())
    # fixed N-way episodes ignore the ontology, as Meta-Dataset's num_ways does
    S.EpisodeSampler(spec, "train", S.SamplerConfig(mode="fixed", ways=5, shots=1, queries=1))


def dag_spec():
    # root -> animal -> {dog (0-5), cat (6-8)}, root -> thing -> {tool (9-15), dog}  (dog is shared: a DAG)
    names = [f"n{i:08d}" for i in range(20)]
    nodes = {"root": ["animal", "thing"], "animal": ["dog", "cat"], "thing": ["tool", "dog"],
             "dog": names[0:6], "cat": names[6:9], "tool": names[9:16], "other": [names[16]]}
    nodes["root"].append("other")
    nodes["other"] = names[16:20]
    return parse_spec(raw_spec({"train": 16, "test": 4}, 20, names=names,
                               ontology={"type": "dag", "root": "root", "nodes": nodes}), "/nowhere/inet")


def test_dag_episodes_come_from_one_eligible_node():
    spec = dag_spec()
    cfg = S.SamplerConfig()
    sampler = S.EpisodeSampler(spec, "train", cfg)
    spans = {n: set(s) for n, s in zip(sampler.dag.nodes, sampler.dag.span)}
    # cat spans 3 < min_ways and "other" spans no train leaf: both ineligible
    assert set(spans) == {"root", "animal", "thing", "dog", "tool"}
    assert spans["thing"] == set(range(0, 6)) | set(range(9, 16))
    for i, g in rngs(200):
        d = sampler.describe(g, i)
        check_episode(spec, "train", d, cfg)
        assert any(set(d.labels) == s for s in spans.values()), d.labels  # whole node (all spans <= 50)


def test_dag_subsamples_to_max_ways():
    cfg = S.SamplerConfig(max_ways_upper_bound=6)
    sampler = S.EpisodeSampler(dag_spec(), "train", cfg)
    spans = [set(s) for s in sampler.dag.span]
    for i, g in rngs(100):
        d = sampler.describe(g, i)
        assert d.ways <= 6 and any(set(d.labels) <= s for s in spans)
    assert MAX_SPANNING_LEAVES_ELIGIBLE == 392


def test_dag_bad_leaf_and_cycle():
    raw = raw_spec({"train": 6}, 20, ontology={"type": "dag", "root": "r", "nodes": {"r": ["c0", "zzz"]}})
    with pytest.raises(SpecError, match="ontology leaf 'zzz'"):
        S.EpisodeSampler(parse_spec(raw, "/nowhere/x"), "train", S.SamplerConfig())
    raw = raw_spec({"train": 6}, 20, ontology={"type": "dag", "root": "r", "nodes": {"r": ["a"], "a": ["r", "c0"]}})
    with pytest.raises(SpecError, match="cycle"):
        S.EpisodeSampler(parse_spec(raw, "/nowhere/x"), "train", S.SamplerConfig())
