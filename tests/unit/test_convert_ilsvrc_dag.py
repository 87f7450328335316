"""ImageNet's DAG ontology end to end: smat-convert ilsvrc_2012 --md-spec writes it, EpisodeStream samples from it.

The fixture is a miniature WordNet with a shared child (t3 under both n1 and n2), so episodes drawn from the DAG
must use exactly the classes spanned by one eligible node; a plain uniform sampler would mix classes freely.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import tests.fixtures_layouts as fx
from data_tools.cli import main
from smat_dist.data.episodes import EpisodeConfig, EpisodeStream
from smat_dist.data.spec import SpecError, load_spec

PER_CLASS = 6
TRAIN = {"n1": ["t1", "t2", "t3"], "n2": ["t3", "t4", "t5", "t6"]}   # root n0 -> n1, n2 in the train subgraph
VALID = {"n7": ["v1", "v2", "v3"]}
TEST = {"n8": ["e1", "e2", "e3"]}


def _subgraph(mids: dict[str, list[str]]) -> list[dict]:
    """One Meta-Dataset split subgraph: root n0, the middle nodes, their leaves (MD's node record layout)."""
    parents: dict[str, list[str]] = {}
    for mid, leaves in mids.items():
        for leaf in leaves:
            parents.setdefault(leaf, []).append(mid)
    node = lambda wn, kids, par: {"wn_id": wn, "words": f"words of {wn}", "children_ids": kids,  # noqa: E731
                                  "parents_ids": par}
    return ([node("n0", sorted(mids), [])] + [node(m, leaves, ["n0"]) for m, leaves in mids.items()]
            + [node(leaf, [], par) for leaf, par in parents.items()])


def tiny_ilsvrc(root: Path) -> tuple[Path, Path]:
    leaves = sorted({leaf for g in (TRAIN, VALID, TEST) for ls in g.values() for leaf in ls})
    for i, wn in enumerate(leaves):
        for j in range(PER_CLASS):
            fx.write(root / "train" / wn / f"{wn}_{j}.JPEG", fx.img(i * 100 + j))
    spec = root / "ilsvrc_2012_dataset_spec.json"
    spec.write_text(json.dumps({"name": "ilsvrc_2012", "split_subgraphs": {
        "TRAIN": _subgraph(TRAIN), "VALID": _subgraph(VALID), "TEST": _subgraph(TEST)}}))
    return root / "train", spec


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("inet")
    train, md_spec = tiny_ilsvrc(tmp / "src")
    out = tmp / "ilsvrc_2012"
    # --partial: 12 classes instead of ImageNet's 1000
    assert main(["ilsvrc_2012", "--input", str(train), "--output", str(out), "--md-spec", str(md_spec),
                 "--partial"]) == 0
    return out


def test_written_ontology_is_the_documented_dag_format(converted):
    onto = json.loads((converted / "spec.json").read_text())["ontology"]
    assert onto["type"] == "dag"
    # each split keeps its own subgraph (here all three are rooted at n0, as in a hand-made spec)
    assert onto["splits"] == {
        "train": {"root": "n0", "nodes": {"n0": ["n1", "n2"], "n1": ["t1", "t2", "t3"],
                                          "n2": ["t3", "t4", "t5", "t6"]}},
        "val": {"root": "n0", "nodes": {"n0": ["n7"], "n7": ["v1", "v2", "v3"]}},
        "test": {"root": "n0", "nodes": {"n0": ["n8"], "n8": ["e1", "e2", "e3"]}}}
    assert onto["words"]["n2"] == "words of n2" and onto["words"]["t3"] == "words of t3"
    spec = load_spec(str(converted))  # the reader validates it
    assert {c.name for c in spec.classes.values()} == {leaf for g in (TRAIN, VALID, TEST)
                                                       for ls in g.values() for leaf in ls}


def test_variable_way_train_episodes_stay_under_one_dag_node(converted):
    stream = EpisodeStream([str(converted)], "train", EpisodeConfig(image_size=16, min_ways=3), seed=5)
    sampler = stream.samplers[0]
    names = {c.label: c.name for c in stream.specs[0].classes.values()}
    eligible = {n: {names[lab] for lab in span} for n, span in zip(sampler.dag.nodes, sampler.dag.span)}
    # min_ways=3: the root (6 train classes), n1 (3) and n2 (4, sharing t3 with n1) are all eligible
    assert eligible == {"n0": {f"t{i}" for i in range(1, 7)}, "n1": {"t1", "t2", "t3"},
                        "n2": {"t3", "t4", "t5", "t6"}}
    seen = set()
    for i in range(30):
        d = stream.describe(i)
        chosen = frozenset(d.class_names)
        # every episode's classes are exactly one eligible node's leaves (spans < max_ways_upper_bound)
        assert chosen in {frozenset(v) for v in eligible.values()}, d.class_names
        seen.add(chosen)
    assert len(seen) == 3  # each node gets picked: ways vary 3 / 4 / 6
    ep = stream.episode(0)
    d = stream.describe(0)
    assert ep.ways == len(d.labels) and ep.class_names == d.class_names
    assert ep.support.shape == (sum(d.shots), 3, 16, 16) and ep.query.shape == (sum(d.queries), 3, 16, 16)
    assert set(ep.support_labels.tolist()) == set(range(ep.ways))
    stream.close()


def test_max_classes_prunes_the_dag_to_written_classes(tmp_path):
    train, md_spec = tiny_ilsvrc(tmp_path / "src")
    out = tmp_path / "o"
    assert main(["ilsvrc_2012", "--input", str(train), "--output", str(out), "--md-spec", str(md_spec),
                 "--partial", "--max-classes", "2"]) == 0
    onto = json.loads((out / "spec.json").read_text())["ontology"]
    # train keeps t1, t2 (sorted order): n2 has no written class left and disappears
    assert onto["splits"] == {"train": {"root": "n0", "nodes": {"n0": ["n1"], "n1": ["t1", "t2"]}},
                              "val": {"root": "n0", "nodes": {"n0": ["n7"], "n7": ["v1", "v2"]}},
                              "test": {"root": "n0", "nodes": {"n0": ["n8"], "n8": ["e1", "e2"]}}}
    stream = EpisodeStream([str(out)], "train", EpisodeConfig(image_size=16, min_ways=2), seed=0)
    assert {frozenset(stream.describe(i).class_names) for i in range(5)} == {frozenset({"t1", "t2"})}


def test_old_converter_layout_is_refused_with_a_clear_error(converted, tmp_path):
    raw = json.loads((converted / "spec.json").read_text())
    raw["ontology"]["splits"]["train"]["nodes"]["n1"] = {"words": "x", "children": ["t1"], "label": None}
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "spec.json").write_text(json.dumps(raw))
    with pytest.raises(SpecError,
                       match=r"spec.json: key ontology.splits.'train'.nodes.'n1' must be a list of child ids.*older"):
        load_spec(str(bad))
