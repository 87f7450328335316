"""Meta-Dataset's converted forms: the official TFRecords folder and P>M>F's per-class h5 files.

Both sit next to MD's ``dataset_spec.json``, which assigns labels contiguously train, valid, test and
gives class names (and, for Omniglot, alphabets; for ILSVRC, the per-split WordNet subgraphs).
P>M>F (scripts/convert_tfrecord_to_h5.py) writes ``<label>.h5`` beside each ``<label>.tfrecords``: groups
"0".."n-1", each holding ``image`` (decoded uint8 HxWxC, resized to 224 when larger), ``label`` and ``id``.
TFRecords are read without TensorFlow: framing and CRCs are checked here, the tf.train.Example is parsed
with the protobuf class that ships with the ``tfrecord`` package.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

import crc32c

from data_tools.sources.base import ClassPlan, Options, Plan, require
from data_tools.writer import ConversionError

_SPLIT_KEYS = (("TRAIN", "train"), ("VALID", "val"), ("TEST", "test"))


def _masked_crc(data: bytes) -> int:
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_tfrecord(path: Path) -> Iterator[bytes]:
    """Yield the records of a TFRecord file; a truncated or corrupt file raises naming the file and offset."""
    with open(path, "rb") as f:
        while True:
            start = f.tell()
            head = f.read(12)
            if not head:
                return
            if len(head) < 12:
                raise ConversionError(f"{path}: truncated record header at byte {start}")
            (length,) = struct.unpack("<Q", head[:8])
            (len_crc,) = struct.unpack("<I", head[8:])
            if _masked_crc(head[:8]) != len_crc:
                raise ConversionError(f"{path}: corrupt record length (CRC mismatch) at byte {start}")
            data = f.read(length)
            tail = f.read(4)
            if len(data) < length or len(tail) < 4:
                raise ConversionError(f"{path}: truncated record at byte {start} (wanted {length} bytes)")
            if _masked_crc(data) != struct.unpack("<I", tail)[0]:
                raise ConversionError(f"{path}: corrupt record data (CRC mismatch) at byte {start}")
            yield data


def parse_example(record: bytes, path: Path) -> tuple[bytes, int]:
    """(image bytes, label) from a serialized tf.train.Example with MD's keys 'image' and 'label'."""
    from tfrecord import example_pb2  # imported here: protobuf is only needed for this source

    ex = example_pb2.Example()
    ex.ParseFromString(record)
    feat = ex.features.feature
    if "image" not in feat or "label" not in feat:
        raise ConversionError(f"{path}: record has keys {sorted(feat)}, expected 'image' and 'label'")
    return feat["image"].bytes_list.value[0], int(feat["label"].int64_list.value[0])


def read_md_spec(path: Path) -> dict:
    """Normalise MD's three spec kinds into {name, labels: [(label, class name, split, superclass)], ...}."""
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read Meta-Dataset spec {path}: {e}") from e
    names = {int(k): str(v) for k, v in spec.get("class_names", {}).items()}
    per_class = {int(k): int(v) for k, v in spec.get("images_per_class", {}).items()}
    labels, dag = [], None
    if "classes_per_split" in spec:
        lab = 0
        for md_key, split in _SPLIT_KEYS:
            for _ in range(int(spec["classes_per_split"].get(md_key, 0))):
                labels.append((lab, names.get(lab, str(lab)), split, None))
                lab += 1
    elif "superclasses_per_split" in spec:  # bilevel (Omniglot): superclasses contiguous, classes contiguous
        sc_names = {int(k): v for k, v in spec["superclass_names"].items()}
        per_sc = {int(k): int(v) for k, v in spec["classes_per_superclass"].items()}
        sc, lab = 0, 0
        for md_key, split in _SPLIT_KEYS:
            for _ in range(int(spec["superclasses_per_split"].get(md_key, 0))):
                for _ in range(per_sc[sc]):
                    labels.append((lab, names.get(lab, str(lab)), split, sc_names[sc]))
                    lab += 1
                sc += 1
    elif "split_subgraphs" in spec:  # ILSVRC: leaves of each split's subgraph, sorted by WordNet id
        leaves, dag = dag_from_subgraphs(spec["split_subgraphs"])
        lab = 0
        for _, split in _SPLIT_KEYS:
            for wn in leaves[split]:
                labels.append((lab, wn, split, None))
                lab += 1
    else:
        raise ConversionError(f"{path}: not a Meta-Dataset dataset spec (no classes_per_split, "
                              f"superclasses_per_split or split_subgraphs)")
    return {"name": spec.get("name"), "labels": labels, "per_class": per_class, "dag": dag,
            "file_pattern": spec.get("file_pattern", "{}.tfrecords")}


def dag_from_subgraphs(split_subgraphs: dict) -> tuple[dict[str, list[str]], dict]:
    """Leaves per split and the union DAG {"nodes": {wn: {"words", "children"}}, "root"} of MD's subgraphs."""
    leaves, nodes = {}, {}
    for md_key, split in _SPLIT_KEYS:
        graph = split_subgraphs.get(md_key, [])
        leaves[split] = sorted(n["wn_id"] for n in graph if not n["children_ids"])
        for n in graph:
            node = nodes.setdefault(n["wn_id"], {"words": n.get("words", ""), "children": []})
            node["children"] = sorted(set(node["children"]) | set(n["children_ids"]))
    has_parent = {c for n in nodes.values() for c in n["children"]}
    roots = sorted(set(nodes) - has_parent)
    if len(roots) != 1:
        raise ConversionError(f"ImageNet DAG has {len(roots)} roots ({roots[:3]}), expected 1")
    return leaves, {"nodes": nodes, "root": roots[0]}


def _records_items(path: Path, label: int):
    def gen():
        for i, rec in enumerate(read_tfrecord(path)):
            img, lab = parse_example(rec, path)
            if lab != label:
                raise ConversionError(f"{path}: record {i} has label {lab}, expected {label}")
            yield f"{path}#{i}", img
    return gen


def _h5_items(path: Path):
    def gen():
        import h5py
        import numpy as np

        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise ConversionError(f"cannot open h5 file {path}: {e}") from e
        with f:
            keys = sorted(f.keys(), key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
            for k in keys:
                grp = f[k]
                if "image" not in grp:
                    raise ConversionError(f"{path}: group {k!r} has no 'image' dataset (P>M>F layout)")
                arr = np.asarray(grp["image"][()])
                # P>M>F stores decoded arrays; very old files stored encoded bytes as a uint8 vector
                yield f"{path}#{k}", (arr.tobytes() if arr.ndim == 1 else arr)
    return gen


def _plan(inp: Path, opts: Options, kind: str) -> Plan:
    spec_path = require(inp / "dataset_spec.json", "Meta-Dataset dataset_spec.json")
    md = read_md_spec(spec_path)
    pattern = md["file_pattern"]
    if kind == "h5":
        pattern = pattern.replace("tfrecords", "h5")
    classes = []
    for label, cname, split, sc in md["labels"]:
        path = inp / pattern.format(label)
        if not path.exists():
            raise ConversionError(f"missing class file for label {label} ({cname!r}): expected {path}")
        items = _records_items(path, label) if kind == "tfrecords" else _h5_items(path)
        classes.append(ClassPlan(cname, split, items, superclass=sc))
    counts = tuple(sum(1 for c in classes if c.split == s) for s in ("train", "val", "test"))
    per_class = {md["labels"][i][1]: n for i, n in md["per_class"].items() if i < len(md["labels"])}
    return Plan(md["name"] or inp.name, classes, expected_classes=counts,
                expected_images=sum(per_class.values()) or None, expected_per_class=per_class or None,
                dag=md["dag"])


def plan_md_tfrecords(inp: Path, opts: Options) -> Plan:
    return _plan(inp, opts, "tfrecords")


def plan_pmf_h5(inp: Path, opts: Options) -> Plan:
    return _plan(inp, opts, "h5")
