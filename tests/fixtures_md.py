"""Meta-Dataset record folders as MD's own converter writes them, in miniature.

Written from MD's code (meta_dataset/data/dataset_spec.py, imagenet_specification.export_graph and
dataset_conversion/dataset_to_records.py), not from memory:
- ``dataset_spec.json`` is ``json.dump(spec.to_dict(), f, indent=2)``: the namedtuple's fields in order, then
  ``__class__``; Split enums by name (TRAIN/VALID/TEST); integer ids as string keys; ``path`` and
  ``file_pattern`` ("{}.tfrecords").
- a class's records are ``file_pattern.format(label)``, each a tf.train.Example with ``image`` (bytes_list, the
  encoded image as stored) and ``label`` (int64_list), in TFRecord framing (length, masked CRC32C, data, CRC).
- ILSVRC (HierarchicalDatasetSpecification): ``split_subgraphs`` {split: export_graph(nodes)}, nodes sorted by
  wn_id, each {"wn_id", "words", "children_ids" (sorted), "parents_ids" (sorted)}; ``images_per_class`` {split:
  {wn_id: images spanned by the node}} for every node of the split's subgraph; ``class_names`` {label: wn_id},
  labels over the sorted leaves of TRAIN, then VALID, then TEST. ``ilsvrc_2012`` roots its three subgraphs at
  entity, carnivore and device; ``ilsvrc_2012_v2`` (train_split_only) puts everything in TRAIN and writes [] / {}
  for VALID and TEST.
The WordNet ids and words below are real ones taken from MD's published ilsvrc_2012_dataset_spec.json; the
graphs are excerpts (a few nodes of each split, one shared child per DAG).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from tests.fixtures_layouts import img

SPLIT_KEYS = ("TRAIN", "VALID", "TEST")

WORDS = {
    "n00001740": "entity", "n00004475": "organism, being", "n00007347": "causal agent, cause, causal agency",
    "n00007846": "person, individual, someone, somebody, mortal, soul", "n00033020": "communication",
    "n01439121": "cyprinid, cyprinid fish", "n09835506": "ballplayer, baseball player",
    "n10148035": "groom, bridegroom", "n10565667": "scuba diver", "n01440764": "tench, Tinca tinca",
    "n01443537": "goldfish, Carassius auratus", "n06794110": "street sign",
    "n06874185": "traffic light, traffic signal, stoplight",
    "n02075296": "carnivore", "n02086346": "toy spaniel", "n02090475": "wolfhound",
    "n02086646": "Blenheim spaniel", "n02086910": "papillon", "n02090622": "borzoi, Russian wolfhound",
    "n02090721": "Irish wolfhound",
    "n03183080": "device", "n02895606": "breathing device, breathing apparatus, breathing machine, ventilator",
    "n03046257": "clock", "n04359589": "support", "n03868863": "oxygen mask", "n04251144": "snorkel",
    "n02708093": "analog clock", "n03196217": "digital clock", "n04548280": "wall clock", "n03814639": "neck brace",
}

# parent -> children of each split's subgraph. person has two parents (organism, causal agent) and neck brace two
# (device, support), as in MD's graphs.
TRAIN_GRAPH = {"n00001740": ["n00004475", "n00007347", "n00033020"], "n00004475": ["n00007846", "n01439121"],
               "n00007347": ["n00007846"], "n00007846": ["n09835506", "n10148035", "n10565667"],
               "n01439121": ["n01440764", "n01443537"], "n00033020": ["n06794110", "n06874185"]}
VALID_GRAPH = {"n02075296": ["n02086346", "n02090475"], "n02086346": ["n02086646", "n02086910"],
               "n02090475": ["n02090622", "n02090721"]}
TEST_GRAPH = {"n03183080": ["n02895606", "n03046257", "n03814639", "n04359589"],
              "n02895606": ["n03868863", "n04251144"], "n03046257": ["n02708093", "n03196217", "n04548280"],
              "n04359589": ["n03814639"]}
ILSVRC_3_SPLITS = {"TRAIN": TRAIN_GRAPH, "VALID": VALID_GRAPH, "TEST": TEST_GRAPH}
# ilsvrc_2012_v2: one subgraph (rooted at entity) holding every class; carnivore and device hang below it
ILSVRC_1_ROOT = {"TRAIN": {**TRAIN_GRAPH, "n00001740": TRAIN_GRAPH["n00001740"] + ["n03183080"],
                           "n00004475": TRAIN_GRAPH["n00004475"] + ["n02075296"], **VALID_GRAPH, **TEST_GRAPH},
                 "VALID": {}, "TEST": {}}


def count_of(label: int) -> int:
    """Images of class ``label`` in the fixtures: 3, 4 or 5 (unequal, as real classes are)."""
    return 3 + label % 3


def image_bytes(label: int, i: int) -> bytes:
    return img(1000 * label + i)


# ---- spec dicts, in the shape of MD's to_dict ---------------------------------------------------------------

def plain_spec(name: str, names: dict[str, list[str]]) -> dict:
    """DatasetSpecification.to_dict(): ``names`` holds the class names of TRAIN, VALID, TEST in label order."""
    flat = [n for k in SPLIT_KEYS for n in names.get(k, [])]
    return {"name": name,
            "classes_per_split": {k: len(names.get(k, [])) for k in SPLIT_KEYS},
            "images_per_class": {str(i): count_of(i) for i in range(len(flat))},
            "class_names": {str(i): n for i, n in enumerate(flat)},
            "path": f"/records/{name}", "file_pattern": "{}.tfrecords", "__class__": "DatasetSpecification"}


def bilevel_spec(name: str, alphabets: dict[str, list[tuple[str, int]]]) -> dict:
    """BiLevelDatasetSpecification.to_dict(); ``alphabets`` {split: [(alphabet, n characters), ...]}. Class names
    are '<alphabet>-characterNN' as MD's Omniglot converter writes them."""
    per_split, per_sc, sc_names, names = {}, {}, {}, []
    for k in SPLIT_KEYS:
        per_split[k] = len(alphabets.get(k, []))
        for alphabet, n in alphabets.get(k, []):
            sc = len(sc_names)
            sc_names[str(sc)] = alphabet
            per_sc[str(sc)] = n
            names += [f"{alphabet}-character{j + 1:02d}" for j in range(n)]
    return {"name": name, "superclasses_per_split": per_split, "classes_per_superclass": per_sc,
            "images_per_class": {str(i): count_of(i) for i in range(len(names))},
            "superclass_names": sc_names, "class_names": {str(i): n for i, n in enumerate(names)},
            "path": f"/records/{name}", "file_pattern": "{}.tfrecords", "__class__": "BiLevelDatasetSpecification"}


def leaves_of(graph: dict[str, list[str]]) -> list[str]:
    kids = {c for cs in graph.values() for c in cs}
    return sorted(kids - set(graph))


def export_graph(graph: dict[str, list[str]]) -> list[dict]:
    """imagenet_specification.export_graph: one record per node, sorted by wn_id."""
    ids = set(graph) | {c for cs in graph.values() for c in cs}
    parents: dict[str, set[str]] = {n: set() for n in ids}
    for p, cs in graph.items():
        for c in cs:
            parents[c].add(p)
    return [{"wn_id": n, "words": WORDS[n], "children_ids": sorted(set(graph.get(n, []))),
             "parents_ids": sorted(parents[n])} for n in sorted(ids)]


def spanned_leaves(graph: dict[str, list[str]], node: str) -> set[str]:
    kids = graph.get(node, [])
    return {node} if not kids else set().union(*(spanned_leaves(graph, c) for c in kids))


def class_order(graphs: dict[str, dict]) -> list[tuple[str, str]]:
    """[(wn_id, split key)] in MD's label order."""
    return [(wn, k) for k in SPLIT_KEYS for wn in leaves_of(graphs[k])]


def hierarchical_spec(name: str, graphs: dict[str, dict]) -> dict:
    """HierarchicalDatasetSpecification.to_dict() for the given per-split graphs."""
    order = class_order(graphs)
    images = {wn: count_of(label) for label, (wn, _) in enumerate(order)}
    ipc = {}
    for k in SPLIT_KEYS:
        g = graphs[k]
        nodes = [r["wn_id"] for r in export_graph(g)] if g else []
        ipc[k] = {n: sum(images[leaf] for leaf in spanned_leaves(g, n)) for n in nodes}
    return {"name": name,
            "split_subgraphs": {k: export_graph(graphs[k]) if graphs[k] else [] for k in SPLIT_KEYS},
            "images_per_class": ipc,
            "class_names": {str(label): wn for label, (wn, _) in enumerate(order)},
            "path": f"/records/{name}", "file_pattern": "{}.tfrecords",
            "__class__": "HierarchicalDatasetSpecification"}


def ilsvrc_spec(one_root: bool = False) -> dict:
    return (hierarchical_spec("ilsvrc_2012_v2", ILSVRC_1_ROOT) if one_root
            else hierarchical_spec("ilsvrc_2012", ILSVRC_3_SPLITS))


def n_classes(spec: dict) -> int:
    return len(spec["class_names"])


# ---- folders ------------------------------------------------------------------------------------------------

def write_spec(root: Path, spec: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "dataset_spec.json", "w") as f:
        json.dump(spec, f, indent=2)  # dataset_to_records.write_data_spec
    return root


def write_records(path: Path, label: int, images: list[bytes]) -> None:
    from tfrecord.writer import TFRecordWriter

    w = TFRecordWriter(str(path))
    for data in images:
        w.write({"image": (data, "byte"), "label": (label, "int")})  # make_example's 'image' / 'label' features
    w.close()


def records_folder(root: Path, spec: dict, n: int | None = None) -> Path:
    """dataset_spec.json plus ``{label}.tfrecords`` for labels 0..n-1 (default: every class of the spec)."""
    spec = copy.deepcopy(spec)
    write_spec(root, spec)
    for label in range(n_classes(spec) if n is None else n):
        write_records(root / spec["file_pattern"].format(label), label,
                      [image_bytes(label, i) for i in range(count_of(label))])
    return root


def synset_folders(root: Path, spec: dict) -> Path:
    """ImageNet's train/ layout for the classes of a hierarchical spec, with the same images as records_folder."""
    for label, wn in ((int(k), v) for k, v in spec["class_names"].items()):
        d = root / wn
        d.mkdir(parents=True, exist_ok=True)
        for i in range(count_of(label)):
            (d / f"{wn}_{i}.JPEG").write_bytes(image_bytes(label, i))
    return root
