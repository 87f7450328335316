"""Meta-Dataset's converted forms: the official TFRecords folder and P>M>F's per-class h5 files.

Both sit next to MD's ``dataset_spec.json`` (any of its three spec classes, read by md_spec.py), which assigns
labels contiguously train, valid, test and gives class names (and, for Omniglot, alphabets; for ILSVRC, the
per-split WordNet subgraphs, kept per split as the DAG ontology).
P>M>F (scripts/convert_tfrecord_to_h5.py) writes ``<label>.h5`` beside each ``<label>.tfrecords``: groups
"0".."n-1", each holding ``image`` (decoded uint8 HxWxC, resized to 224 when larger), ``label`` and ``id``.
TFRecords are read without TensorFlow: framing and CRCs are checked here, the tf.train.Example is parsed
with the protobuf class that ships with the ``tfrecord`` package.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterator

import crc32c

from data_tools.sources.base import ClassPlan, Options, Plan, require
from data_tools.sources.md_spec import load_md_spec
from data_tools.writer import ConversionError


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
    md = load_md_spec(spec_path)
    pattern = md.file_pattern
    if kind == "h5":
        pattern = pattern.replace("tfrecords", "h5")
    classes = []
    for c in md.classes:
        path = inp / pattern.format(c.label)
        if not path.exists():
            raise ConversionError(f"missing class file for label {c.label} ({c.name!r}): expected {path}")
        items = _records_items(path, c.label) if kind == "tfrecords" else _h5_items(path)
        classes.append(ClassPlan(c.name, c.split, items, superclass=c.superclass))
    per_class = {md.classes[lab].name: n for lab, n in md.per_class.items()}
    warnings = md.warnings + _unlisted_files(inp, pattern, len(md.classes), spec_path, md.kind)
    return Plan(md.name or inp.name, classes, expected_classes=md.counts(),
                expected_images=sum(per_class.values()) or None, expected_per_class=per_class or None,
                dag=md.dag, warnings=warnings)


def _unlisted_files(inp: Path, pattern: str, n: int, spec_path: Path, kind: str) -> list[str]:
    """A warning naming the class files of the folder that the spec does not list (they are not converted)."""
    head, tail = pattern.split("{}")
    extra = []
    for f in sorted(inp.iterdir()):
        name = f.name
        if name.startswith(head) and name.endswith(tail) and len(name) > len(head) + len(tail):
            ident = name[len(head):len(name) - len(tail)]
            if not (ident.isdigit() and int(ident) < n and str(int(ident)) == ident):
                extra.append(name)
    if not extra:
        return []
    extra.sort(key=lambda s: (len(s), s))
    what = "classes_per_split" if kind == "DatasetSpecification" else (
        "superclasses_per_split / classes_per_superclass" if kind == "BiLevelDatasetSpecification"
        else "the split_subgraphs leaves")
    return [f"{spec_path}: {len(extra)} class files in {inp} are not listed by its {what} ({n} classes) and are "
            f"not converted: {', '.join(extra[:8])}{', ...' if len(extra) > 8 else ''}"]


def plan_md_tfrecords(inp: Path, opts: Options) -> Plan:
    return _plan(inp, opts, "tfrecords")


def plan_pmf_h5(inp: Path, opts: Options) -> Plan:
    return _plan(inp, opts, "h5")
