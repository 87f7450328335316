"""Meta-Dataset's converted forms: the official TFRecords folder and P>M>F's per-class h5 files.

Both sit next to MD's ``dataset_spec.json`` (any of its three spec classes, read by md_spec.py), which assigns
labels contiguously train, valid, test and gives class names (and, for Omniglot, alphabets; for ILSVRC, the
per-split WordNet subgraphs, kept per split as the DAG ontology).
P>M>F (scripts/convert_tfrecord_to_h5.py) writes ``<label>.h5`` beside each ``<label>.tfrecords``: groups
"0".."n-1" in the order its shuffling reader met the records, each holding ``image`` (decoded uint8 HxWxC;
squashed to 224x224 when both sides are at least 224), ``label`` and ``id`` (the record's byte offset in MD's
file, which restores MD's order).
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


PMF_SIDE = 224  # P>M>F resizes every image of at least 224x224 to exactly this (aspect ratio not kept)
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)  # what h5py raises on a damaged file


class PmfResized:
    """Counts the images P>M>F stored at 224x224 (its resize of larger images) while the classes are written."""

    def __init__(self, name: str):
        self.name, self.count, self.total = name, 0, 0

    def notes(self) -> list[str]:
        if not self.count or self.name == "quickdraw":  # quickdraw: 28x28 in both MD and P>M>F
            return []
        return [f"{self.name}: {self.count} of {self.total} images are {PMF_SIDE}x{PMF_SIDE}: P>M>F's "
                f"convert_tfrecord_to_h5.py resized every image of at least {PMF_SIDE}x{PMF_SIDE} to that size "
                f"(aspect ratio not kept), so these are not Meta-Dataset's pixels; convert MD's records "
                f"(md_tfrecords) for the original images"]


def _h5_scalar(grp, key: str, path: Path, k: str) -> int:
    if key not in grp:
        raise ConversionError(f"{path}: group {k!r} has no {key!r} dataset (P>M>F layout: image, label, id)")
    return int(grp[key][()])


def _h5_items(path: Path, label: int, resized: PmfResized):
    """P>M>F's groups in MD's record order (``id`` is the record's byte offset in MD's TFRecord file), each
    group's ``label`` checked; damage to the file's structure is an error naming the file and group, an
    unreadable image is skipped (or an error with --strict) as on the other routes."""
    def gen():
        import h5py
        import numpy as np

        try:
            f = h5py.File(path, "r")
        except H5_ERRORS as e:
            raise ConversionError(f"cannot open h5 file {path}: {e}") from e
        with f:
            k = None
            try:
                order = []
                for k in list(f.keys()):
                    grp = f[k]
                    got = _h5_scalar(grp, "label", path, k)
                    if got != label:
                        raise ConversionError(f"{path}: group {k!r} has label {got}, expected {label} (the spec's "
                                              f"label of this file)")
                    order.append((_h5_scalar(grp, "id", path, k), k))
            except H5_ERRORS as e:
                where = f" at group {k!r}" if k is not None else ""
                raise ConversionError(f"damaged h5 file {path}{where}: {type(e).__name__}: {e}") from e
            order.sort()
            for _, k in order:
                try:
                    ds = f[k]["image"]
                    arr = np.asarray(ds[()])
                except H5_ERRORS as e:
                    yield f"{path}#{k}", OSError(f"unreadable h5 image: {type(e).__name__}: {e}")
                    continue
                resized.total += 1
                resized.count += int(arr.ndim >= 2 and arr.shape[:2] == (PMF_SIDE, PMF_SIDE))
                # P>M>F stores decoded arrays; very old files stored encoded bytes as a uint8 vector
                yield f"{path}#{k}", (arr.tobytes() if arr.ndim == 1 else arr)
    return gen


def _plan(inp: Path, opts: Options, kind: str) -> Plan:
    spec_path = inp / "dataset_spec.json"
    if not spec_path.exists():
        domains = sorted(d.name for d in inp.iterdir() if (d / "dataset_spec.json").is_file())
        if domains:
            source = "md_tfrecords" if kind == "tfrecords" else "pmf_h5"
            raise ConversionError(
                f"{inp} is a data root holding one dataset per folder ({', '.join(domains)}); convert each "
                f"folder on its own, e.g. smat-convert {source} --input {inp / domains[0]} --output "
                f"<OUT>/{domains[0]}")
    require(spec_path, "Meta-Dataset dataset_spec.json")
    md = load_md_spec(spec_path)
    pattern = md.file_pattern
    if kind == "h5":
        pattern = pattern.replace("tfrecords", "h5")
    classes = []
    resized = PmfResized(md.name or inp.name)
    for c in md.classes:
        path = inp / pattern.format(c.label)
        if not path.exists():
            raise ConversionError(f"missing class file for label {c.label} ({c.name!r}): expected {path}")
        items = _records_items(path, c.label) if kind == "tfrecords" else _h5_items(path, c.label, resized)
        classes.append(ClassPlan(c.name, c.split, items, superclass=c.superclass))
    per_class = {md.classes[lab].name: n for lab, n in md.per_class.items()}
    warnings = md.warnings + _unlisted_files(inp, pattern, len(md.classes), spec_path, md.kind)
    return Plan(md.name or inp.name, classes, expected_classes=md.counts(),
                expected_images=sum(per_class.values()) or None, expected_per_class=per_class or None,
                dag=md.dag, warnings=warnings, notes=resized.notes if kind == "h5" else None)


def _unlisted_files(inp: Path, pattern: str, n: int, spec_path: Path, kind: str) -> list[str]:
    """A warning naming the class files of the folder that the spec does not list (they are not converted)."""
    head, tail = pattern.split("{}")
    extra = []
    for f in sorted(inp.iterdir()):
        name = f.name
        if name.startswith(head) and name.endswith(tail) and len(name) > len(head) + len(tail):
            ident = name[len(head):len(name) - len(tail)]
            if tail == ".h5" and not ident.isdigit():
                continue  # P>M>F's own files beside the class files (val_ep120_img128.h5: validation episodes)
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
