"""smat-convert on Meta-Dataset's own record folders: every spec class MD writes, and inconsistent specs refused.

The folders are built by tests/fixtures_md.py in the exact shape of MD's to_dict / export_graph / make_example
(plain DatasetSpecification, Omniglot's BiLevelDatasetSpecification, ILSVRC's HierarchicalDatasetSpecification
with three split roots and the v2 one with a single root) and written as real TFRecord files.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import tests.fixtures_md as md
from data_tools.cli import main
from smat_dist.data.episodes import EpisodeConfig, EpisodeStream
from smat_dist.data.spec import SpecError, load_spec

DTD_NAMES = {"TRAIN": ["banded", "blotchy", "braided", "bubbly"], "VALID": ["bumpy", "chequered"],
             "TEST": ["cobwebbed", "cracked", "crosshatched"]}
OMNIGLOT = {"TRAIN": [("Anglo-Saxon_Futhorc", 3), ("Arcadian", 2)], "VALID": [("Tagalog", 2)],
            "TEST": [("Angelic", 2), ("Atemayar_Qelisayer", 3)]}


def run(capsys, *argv) -> tuple[int, dict | None, str]:
    """(exit code, the JSON result or None, the stderr text)."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return rc, (json.loads(lines[-1]) if rc == 0 and lines else None), err


def one_error(capsys, *argv) -> str:
    """The single `smat-convert: error:` line of a refused conversion (no traceback, no second error line)."""
    rc, _, err = run(capsys, *argv)
    assert rc == 2, err
    errors = [line for line in err.splitlines() if line.startswith("smat-convert: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def written(out: Path) -> dict:
    return json.loads((out / "spec.json").read_text())


def stored_images(out: Path, cls: dict) -> list[bytes]:
    with open(out / cls["shard"], "rb") as f:
        data = []
        for offset, size, _ in cls["members"]:
            f.seek(offset)
            data.append(f.read(size))
    return data


def assert_classes_and_bytes(out: Path, expected: list[tuple[str, str]]) -> dict:
    """Classes (name, split) in label order, and each class's images byte-identical to its records."""
    spec = written(out)
    assert [(c["name"], c["split"]) for c in spec["classes"]] == expected
    assert [c["label"] for c in spec["classes"]] == list(range(len(expected)))
    for c in spec["classes"]:
        lab = c["label"]
        assert stored_images(out, c) == [md.image_bytes(lab, i) for i in range(md.count_of(lab))], c["name"]
    return spec


def split_of(key: str) -> str:
    return {"TRAIN": "train", "VALID": "val", "TEST": "test"}[key]


# ---- the three spec classes convert ---------------------------------------------------------------------------

def test_plain_dataset_specification(tmp_path, capsys):
    inp = md.records_folder(tmp_path / "dtd", md.plain_spec("dtd", DTD_NAMES))
    rc, result, err = run(capsys, "md_tfrecords", "--input", inp, "--output", tmp_path / "o")
    assert rc == 0, err
    assert result["warnings"] == [] and result["name"] == "dtd"
    spec = assert_classes_and_bytes(tmp_path / "o", [(n, split_of(k)) for k in md.SPLIT_KEYS for n in DTD_NAMES[k]])
    assert {s: len(v) for s, v in spec["splits"].items()} == {"train": 4, "val": 2, "test": 3}
    assert spec["ontology"] is None


def test_bilevel_dataset_specification(tmp_path, capsys):
    inp = md.records_folder(tmp_path / "omniglot", md.bilevel_spec("omniglot", OMNIGLOT))
    rc, result, err = run(capsys, "md_tfrecords", "--input", inp, "--output", tmp_path / "o")
    assert rc == 0, err
    assert result["warnings"] == []
    expected = [(f"{a}-character{j + 1:02d}", split_of(k)) for k in md.SPLIT_KEYS for a, n in OMNIGLOT[k]
                for j in range(n)]
    spec = assert_classes_and_bytes(tmp_path / "o", expected)
    assert spec["ontology"] == {"type": "bilevel", "superclasses": {
        "Anglo-Saxon_Futhorc": [0, 1, 2], "Arcadian": [3, 4], "Tagalog": [5, 6], "Angelic": [7, 8],
        "Atemayar_Qelisayer": [9, 10, 11]}}
    stream = EpisodeStream([str(tmp_path / "o")], "test", EpisodeConfig(image_size=16, min_ways=2), seed=3)
    for i in range(10):  # an episode's classes come from one alphabet of the split
        prefixes = {name.rsplit("-", 1)[0] for name in stream.describe(i).class_names}
        assert len(prefixes) == 1 and prefixes <= {"Angelic", "Atemayar_Qelisayer"}
    stream.close()


@pytest.fixture(scope="module")
def ilsvrc3(tmp_path_factory) -> tuple[Path, Path, dict]:
    """MD's ilsvrc_2012 records (three split roots) and their conversion."""
    tmp = tmp_path_factory.mktemp("ilsvrc3")
    spec = md.ilsvrc_spec()
    inp = md.records_folder(tmp / "ilsvrc_2012", spec)
    out = tmp / "o"
    assert main(["md_tfrecords", "--input", str(inp), "--output", str(out)]) == 0
    return inp, out, spec


def eligible(stream: EpisodeStream) -> dict[str, set[str]]:
    names = {c.label: c.name for c in stream.specs[0].classes.values()}
    s = stream.samplers[0]
    return {n: {names[lab] for lab in span} for n, span in zip(s.dag.nodes, s.dag.span)}


def test_hierarchical_spec_with_three_split_roots(ilsvrc3):
    _, out, spec = ilsvrc3
    order = md.class_order(md.ILSVRC_3_SPLITS)
    got = assert_classes_and_bytes(out, [(wn, split_of(k)) for wn, k in order])
    assert {s: len(v) for s, v in got["splits"].items()} == {"train": 7, "val": 4, "test": 6}
    assert got["counts"]["images"] == sum(md.count_of(i) for i in range(len(order)))
    onto = got["ontology"]
    assert onto["type"] == "dag" and set(onto["splits"]) == {"train", "val", "test"}
    assert {s: g["root"] for s, g in onto["splits"].items()} == {"train": "n00001740", "val": "n02075296",
                                                                 "test": "n03183080"}
    # each split keeps its own subgraph, with its shared child (person; neck brace) under both parents
    assert onto["splits"]["train"]["nodes"] == md.TRAIN_GRAPH
    assert onto["splits"]["val"]["nodes"] == md.VALID_GRAPH
    assert onto["splits"]["test"]["nodes"] == md.TEST_GRAPH
    assert onto["words"]["n02075296"] == "carnivore" and onto["words"]["n03814639"] == "neck brace"
    load_spec(str(out))  # the reader accepts it


@pytest.mark.parametrize("split, min_ways, nodes", [
    ("train", 2, {"n00001740", "n00004475", "n00007347", "n00007846", "n00033020", "n01439121"}),
    ("val", 2, {"n02075296", "n02086346", "n02090475"}),
    ("test", 2, {"n03183080", "n02895606", "n03046257"}),  # support spans 1 class: not eligible
])
def test_each_split_samples_from_its_own_subgraph(ilsvrc3, split, min_ways, nodes):
    _, out, _ = ilsvrc3
    graph = {"train": md.TRAIN_GRAPH, "val": md.VALID_GRAPH, "test": md.TEST_GRAPH}[split]
    stream = EpisodeStream([str(out)], split, EpisodeConfig(image_size=16, min_ways=min_ways), seed=7)
    spans = eligible(stream)
    assert set(spans) == nodes
    for n in nodes:
        assert spans[n] == md.spanned_leaves(graph, n)
    seen = set()
    for i in range(40):
        chosen = frozenset(stream.describe(i).class_names)
        assert chosen in {frozenset(v) for v in spans.values()}
        seen.add(chosen)
    assert len(seen) == len({frozenset(v) for v in spans.values()})
    ep = stream.episode(0)
    assert ep.support.shape[1:] == (3, 16, 16) and ep.ways == len(stream.describe(0).labels)
    stream.close()


def test_hierarchical_spec_with_one_root(tmp_path, capsys):
    spec = md.ilsvrc_spec(one_root=True)
    assert spec["split_subgraphs"]["VALID"] == [] and spec["images_per_class"]["TEST"] == {}
    inp = md.records_folder(tmp_path / "ilsvrc_2012_v2", spec)
    rc, result, err = run(capsys, "md_tfrecords", "--input", inp, "--output", tmp_path / "o")
    assert rc == 0, err
    assert result["name"] == "ilsvrc_2012_v2" and result["warnings"] == []
    order = md.class_order(md.ILSVRC_1_ROOT)
    got = assert_classes_and_bytes(tmp_path / "o", [(wn, "train") for wn, _ in order])
    assert {s: len(v) for s, v in got["splits"].items()} == {"train": 17, "val": 0, "test": 0}
    assert got["ontology"]["splits"] == {"train": {"root": "n00001740", "nodes": md.ILSVRC_1_ROOT["TRAIN"]}}
    stream = EpisodeStream([str(tmp_path / "o")], "train", EpisodeConfig(image_size=16, min_ways=5), seed=1)
    spans = eligible(stream)
    assert spans["n00001740"] == set(md.leaves_of(md.ILSVRC_1_ROOT["TRAIN"]))
    assert spans["n03183080"] == md.spanned_leaves(md.TEST_GRAPH, "n03183080")
    stream.close()


@pytest.mark.parametrize("one_root", [False, True])
def test_ilsvrc_originals_with_md_spec_match_the_records(tmp_path, capsys, one_root):
    spec = md.ilsvrc_spec(one_root)
    (tmp_path / "md").mkdir()
    spec_path = tmp_path / "md" / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    train = md.synset_folders(tmp_path / "train", spec)
    rc, result, err = run(capsys, "ilsvrc_2012", "--input", train, "--output", tmp_path / "a", "--md-spec", spec_path)
    assert rc == 0, err
    assert result["warnings"] == []
    md.records_folder(tmp_path / "rec", spec)
    assert main(["md_tfrecords", "--input", str(tmp_path / "rec"), "--output", str(tmp_path / "b")]) == 0
    a, b = written(tmp_path / "a"), written(tmp_path / "b")
    assert a["name"] == b["name"] == spec["name"]
    assert [(c["name"], c["split"], c["count"]) for c in a["classes"]] == [(c["name"], c["split"], c["count"])
                                                                            for c in b["classes"]]
    assert a["ontology"] == b["ontology"]
    for ca, cb in zip(a["classes"], b["classes"]):
        assert stored_images(tmp_path / "a", ca) == stored_images(tmp_path / "b", cb)


def test_pmf_h5_takes_the_hierarchical_spec(tmp_path):
    import h5py
    import numpy as np

    spec = md.ilsvrc_spec()
    md.write_spec(tmp_path / "h5", spec)
    for label in range(md.n_classes(spec)):
        with h5py.File(tmp_path / "h5" / f"{label}.h5", "w") as f:
            for j in range(md.count_of(label)):  # P>M>F's groups: image, label, id
                g = f.create_group(str(j))
                g.create_dataset("image", data=np.full((6, 5, 3), label, dtype=np.uint8))
                g.create_dataset("label", data=np.array(label))
                g.create_dataset("id", data=np.array(j))
    assert main(["pmf_h5", "--input", str(tmp_path / "h5"), "--output", str(tmp_path / "o")]) == 0
    got = written(tmp_path / "o")
    assert [c["name"] for c in got["classes"]] == [wn for wn, _ in md.class_order(md.ILSVRC_3_SPLITS)]
    assert got["ontology"]["splits"]["val"]["root"] == "n02075296"


# ---- inconsistent specs: one error line naming the class, file or key --------------------------------------

def convert_bad(tmp_path, capsys, spec: dict, n: int | None = None) -> str:
    inp = md.records_folder(tmp_path / "in", spec, n)
    line = one_error(capsys, "md_tfrecords", "--input", inp, "--output", tmp_path / "o")
    assert str(inp / "dataset_spec.json") in line or "class file" in line, line
    assert not (tmp_path / "o" / "spec.json").exists()
    return line


def test_class_missing_from_class_names_is_refused(tmp_path, capsys):
    spec = md.plain_spec("dtd", DTD_NAMES)
    del spec["class_names"]["5"]
    line = convert_bad(tmp_path, capsys, spec)
    assert line.endswith("dataset_spec.json: class 5 (split VALID) has no entry in class_names")


def test_bilevel_without_superclass_names_is_refused(tmp_path, capsys):
    spec = md.bilevel_spec("omniglot", OMNIGLOT)
    del spec["superclass_names"]
    line = convert_bad(tmp_path, capsys, spec)
    assert line.endswith("dataset_spec.json: BiLevelDatasetSpecification without key 'superclass_names'")


def test_bilevel_superclass_missing_from_its_maps_is_refused(tmp_path, capsys):
    spec = md.bilevel_spec("omniglot", OMNIGLOT)
    del spec["superclass_names"]["3"]
    assert convert_bad(tmp_path, capsys, spec).endswith(
        "superclass 3 (split TEST) has no entry in superclass_names")
    spec = md.bilevel_spec("omniglot", OMNIGLOT)
    del spec["classes_per_superclass"]["0"]
    assert convert_bad(tmp_path / "b", capsys, spec).endswith(
        "superclass 0 (split TRAIN) has no entry in classes_per_superclass")


def test_record_files_beyond_classes_per_split_are_named_in_a_warning(tmp_path, capsys):
    spec = md.plain_spec("dtd", DTD_NAMES)
    inp = md.records_folder(tmp_path / "in", spec, n=11)  # 9 classes in the spec, 11 record files
    spec["classes_per_split"]["TEST"] = 1                  # now the spec lists 7: 7..10 are left over
    md.write_spec(inp, spec)
    rc, result, err = run(capsys, "md_tfrecords", "--input", inp, "--output", tmp_path / "o")
    assert rc == 0, err
    warning = next(w for w in result["warnings"] if "not converted" in w)
    assert "4 class files" in warning and "classes_per_split (7 classes)" in warning
    assert warning.endswith("7.tfrecords, 8.tfrecords, 9.tfrecords, 10.tfrecords")
    assert "class_names lists 2 classes beyond the 7 of classes_per_split (labels 7, 8)" in " ".join(
        result["warnings"])
    assert warning in err  # logged too
    assert [c["name"] for c in written(tmp_path / "o")["classes"]][-1] == "cobwebbed"


def test_hierarchical_class_names_must_match_the_leaves(tmp_path, capsys):
    spec = md.ilsvrc_spec()
    spec["class_names"]["8"] = "n99999999"
    assert convert_bad(tmp_path, capsys, spec).endswith(
        "class_names.'8' is 'n99999999', but label 8 is leaf 'n02086910' of split VALID (Meta-Dataset labels the "
        "sorted leaves of TRAIN, then VALID, then TEST)")
    spec = md.ilsvrc_spec()
    del spec["class_names"]["16"]
    assert convert_bad(tmp_path / "b", capsys, spec).endswith("class 16 (split TEST) has no entry in class_names")


def test_hierarchical_images_per_class_by_split(tmp_path, capsys):
    spec = md.ilsvrc_spec()
    del spec["images_per_class"]["VALID"]["n02090622"]
    assert convert_bad(tmp_path, capsys, spec).endswith(
        "key images_per_class.VALID has no count for class 9 ('n02090622')")
    spec = md.ilsvrc_spec()
    spec["images_per_class"] = {str(i): md.count_of(i) for i in range(md.n_classes(spec))}  # flat, by label
    assert convert_bad(tmp_path / "b", capsys, spec).endswith(
        "key images_per_class of a HierarchicalDatasetSpecification is keyed by split (TRAIN, VALID, TEST), each "
        "mapping WordNet ids to counts; got key '0'")


def test_split_subgraph_defects_are_named(tmp_path, capsys):
    spec = md.ilsvrc_spec()
    valid = spec["split_subgraphs"]["VALID"]
    root = next(n for n in valid if n["wn_id"] == "n02075296")
    root["children_ids"].remove("n02090475")
    next(n for n in valid if n["wn_id"] == "n02090475")["parents_ids"] = []
    assert convert_bad(tmp_path / "a", capsys, spec).endswith(
        "split_subgraphs.VALID has 2 roots (n02075296, n02090475); a split's subgraph needs exactly one")
    spec = md.ilsvrc_spec()
    next(n for n in spec["split_subgraphs"]["TEST"] if n["wn_id"] == "n03046257")["children_ids"].append("n09999999")
    assert convert_bad(tmp_path / "b", capsys, spec).endswith(
        "node 'n03046257' of split_subgraphs.TEST has child 'n09999999' which is not a node of split_subgraphs.TEST")
    spec = md.ilsvrc_spec()
    del spec["split_subgraphs"]["TEST"]
    assert convert_bad(tmp_path / "c", capsys, spec).endswith(
        "key split_subgraphs has no entry for split 'TEST' (Meta-Dataset writes all three, an unused split as [])")
    spec = md.ilsvrc_spec()  # a class in two splits
    test = spec["split_subgraphs"]["TEST"]
    next(n for n in test if n["wn_id"] == "n03046257")["children_ids"].append("n02086646")
    test.append({"wn_id": "n02086646", "words": "Blenheim spaniel", "children_ids": [], "parents_ids": ["n03046257"]})
    assert convert_bad(tmp_path / "d", capsys, spec).endswith(
        "class 'n02086646' is a leaf of both split_subgraphs.VALID and split_subgraphs.TEST; a class belongs to "
        "one split")


def test_unknown_spec_class_and_missing_record_file(tmp_path, capsys):
    spec = md.plain_spec("dtd", DTD_NAMES)
    spec["__class__"] = "FancyDatasetSpecification"
    assert "key '__class__' is 'FancyDatasetSpecification'" in convert_bad(tmp_path / "a", capsys, spec)
    spec = md.plain_spec("dtd", DTD_NAMES)
    line = convert_bad(tmp_path / "b", capsys, spec, n=8)
    assert line.endswith(f"missing class file for label 8 ('crosshatched'): expected {tmp_path / 'b' / 'in'}"
                         f"/8.tfrecords")
    spec = md.plain_spec("dtd", DTD_NAMES)
    spec["class_names"]["3"] = "banded"
    assert convert_bad(tmp_path / "c", capsys, spec).endswith(
        "class name 'banded' is used by classes 0 and 3 (key 'class_names')")


def test_md_spec_for_ilsvrc_must_be_hierarchical(tmp_path, capsys):
    spec_path = tmp_path / "dtd_spec.json"
    spec_path.write_text(json.dumps(md.plain_spec("dtd", DTD_NAMES)))
    (tmp_path / "train").mkdir()
    line = one_error(capsys, "ilsvrc_2012", "--input", tmp_path / "train", "--output", tmp_path / "o",
                     "--md-spec", spec_path)
    assert line.endswith(f"--md-spec {spec_path} is a DatasetSpecification, not the ILSVRC "
                         f"HierarchicalDatasetSpecification (no split_subgraphs)")


def test_synset_folders_outside_the_spec_are_named_in_a_warning(tmp_path, capsys):
    spec = md.ilsvrc_spec()
    spec_path = tmp_path / "ilsvrc_2012_dataset_spec.json"
    spec_path.write_text(json.dumps(spec))
    train = md.synset_folders(tmp_path / "train", spec)
    (train / "n00000001").mkdir()
    rc, result, err = run(capsys, "ilsvrc_2012", "--input", train, "--output", tmp_path / "o", "--md-spec", spec_path)
    assert rc == 0, err
    assert result["warnings"] == [f"ilsvrc_2012: 1 folders of {train} are not classes of --md-spec {spec_path} and "
                                  f"are not converted: n00000001"]


# ---- the reader's per-split DAG --------------------------------------------------------------------------------

def test_reader_refuses_a_bad_per_split_ontology(ilsvrc3, tmp_path):
    _, out, _ = ilsvrc3
    raw = written(out)
    bad = tmp_path / "bad"
    bad.mkdir()
    for s in json.loads((out / "spec.json").read_text())["shards"]:
        (bad / s["file"]).symlink_to(out / s["file"])
    raw["ontology"]["splits"]["extra"] = raw["ontology"]["splits"]["val"]
    (bad / "spec.json").write_text(json.dumps(raw))
    with pytest.raises(SpecError, match=r"key ontology.splits.'extra' names a split the dataset does not have"):
        load_spec(str(bad))
    del raw["ontology"]["splits"]["extra"]
    del raw["ontology"]["splits"]["val"]
    (bad / "spec.json").write_text(json.dumps(raw))
    EpisodeStream([str(bad)], "train", EpisodeConfig(image_size=16, min_ways=2), seed=0).close()
    with pytest.raises(SpecError, match=r"key ontology.splits has no subgraph for split 'val'"):
        EpisodeStream([str(bad)], "val", EpisodeConfig(image_size=16, min_ways=2), seed=0)
