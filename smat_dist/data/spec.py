"""Load and validate a dataset's ``spec.json`` (the contract in docs/data_format.md).

A *source location* is one of:
- a local folder ``DIR`` (``DIR/spec.json``, ``DIR/shard-000000.tar``, ...);
- an ``http://`` / ``https://`` base URL (files are ``BASE/spec.json``, ``BASE/shard-...``);
- a ``pipe:`` command. If it contains ``{file}`` that is replaced by the file name
  (``pipe:curl -s http://host/omniglot/{file}``); otherwise ``/{file}`` is appended
  (``pipe:cat /data/omniglot`` reads ``pipe:cat /data/omniglot/spec.json``).
Every error names the spec file and the key at fault, so a bad conversion is found at startup.
"""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from typing import Any

from .remote import RemotePolicy, request

FORMAT = "smat-wds"
SUPPORTED_VERSIONS = (1,)
_SPLITS = ("train", "val", "test")


class SpecError(ValueError):
    """A spec.json that is missing, unreadable or inconsistent; the message names the file and key."""


def location_kind(location: str) -> str:
    if location.startswith("pipe:"):
        return "pipe"
    if location.startswith(("http://", "https://")):
        return "http"
    return "local"


def file_url(location: str, fname: str) -> str:
    """Where file ``fname`` of the dataset at ``location`` lives (a path, URL or pipe: command)."""
    kind = location_kind(location)
    if kind == "pipe":
        return location.replace("{file}", fname) if "{file}" in location else f"{location.rstrip('/')}/{fname}"
    if kind == "http":
        return f"{location.rstrip('/')}/{fname}"
    return os.path.join(location, fname)


def _read_bytes(url: str, policy: RemotePolicy | None = None) -> bytes:
    kind = location_kind(url)
    if kind == "local":
        with open(url, "rb") as f:
            return f.read()
    if kind == "http":
        return request(url, lambda r: r.read(), policy=policy)
    proc = subprocess.run(url[len("pipe:"):], shell=True, capture_output=True, timeout=600)
    if proc.returncode != 0:
        raise OSError(f"command exited with {proc.returncode}: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


@dataclass(frozen=True)
class ClassInfo:
    label: int
    name: str
    split: str
    count: int
    shard: str
    members: tuple  # ((data_offset, size, ext), ...) in key order c{label}_{i}


@dataclass
class DatasetSpec:
    name: str
    location: str
    converter: str
    version: int
    splits: dict[str, list[int]]
    classes: dict[int, ClassInfo]
    shards: dict[str, dict]
    ontology: dict | None
    counts: dict
    skipped: list = field(default_factory=list)

    @property
    def spec_path(self) -> str:
        return file_url(self.location, "spec.json")

    def split_labels(self, split: str) -> list[int]:
        if split not in self.splits:
            raise SpecError(f"{self.spec_path}: no split {split!r} (has {sorted(self.splits)})")
        return list(self.splits[split])

    def shard_url(self, shard: str) -> str:
        return file_url(self.location, shard)


def _need(d: dict, key: str, typ, where: str, path: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise SpecError(f"{path}: missing key {where}{key!r}")
    v = d[key]
    if typ is not None and not isinstance(v, typ):
        raise SpecError(f"{path}: key {where}{key!r} must be {getattr(typ, '__name__', typ)}, got {type(v).__name__}")
    return v


def _check_graph(graph: dict, where: str, path: str) -> None:
    nodes = _need(graph, "nodes", dict, where, path)
    root = _need(graph, "root", str, where, path)
    for node, kids in nodes.items():
        if isinstance(kids, dict):
            # {"words", "children", "label"} per node: the layout of smat-convert before the format was fixed
            raise SpecError(f"{path}: key {where}nodes.{node!r} must be a list of child ids, got an object; "
                            f"this spec was written by an older smat-convert, re-run the conversion")
        if not isinstance(kids, list) or not all(isinstance(k, str) for k in kids):
            raise SpecError(f"{path}: key {where}nodes.{node!r} must be a list of child ids (strings), "
                            f"got {kids!r:.80}")
    if root not in nodes:
        raise SpecError(f"{path}: key {where}root {root!r} is not a key of {where}nodes")


def _check_dag(ontology: dict, path: str, splits: dict) -> None:
    """Shape of a DAG ontology (docs/data_format.md): one graph for every split (``root``, ``nodes``) or one per
    split (``splits``: {split: {root, nodes}}, Meta-Dataset's per-split subgraphs); which leaves resolve to classes
    is checked per split."""
    if "splits" in ontology:
        per_split = _need(ontology, "splits", dict, "ontology.", path)
        for split, graph in per_split.items():
            if split not in splits:
                raise SpecError(f"{path}: key ontology.splits.{split!r} names a split the dataset does not have "
                                f"(has {sorted(splits)})")
            if not isinstance(graph, dict):
                raise SpecError(f"{path}: key ontology.splits.{split!r} must be an object with 'root' and 'nodes'")
            _check_graph(graph, f"ontology.splits.{split!r}.", path)
    else:
        _check_graph(ontology, "ontology.", path)
    words = ontology.get("words", {})
    if not isinstance(words, dict) or not all(isinstance(w, str) for w in words.values()):
        raise SpecError(f"{path}: key ontology.words must map node ids to strings")


def parse_spec(raw: dict, location: str) -> DatasetSpec:
    """Validate a decoded spec.json; ``location`` is only used to name the file in errors and find shards."""
    path = file_url(location, "spec.json")
    fmt = _need(raw, "format", str, "", path)
    if fmt != FORMAT:
        raise SpecError(f"{path}: key 'format' is {fmt!r}, expected {FORMAT!r}")
    version = _need(raw, "version", int, "", path)
    if version not in SUPPORTED_VERSIONS:
        raise SpecError(f"{path}: key 'version' is {version}, this reader supports {SUPPORTED_VERSIONS}; "
                        f"re-run smat-convert or upgrade smat_dist")
    name = _need(raw, "name", str, "", path)
    shards_raw = _need(raw, "shards", list, "", path)
    shards = {}
    for i, s in enumerate(shards_raw):
        f = _need(s, "file", str, f"shards[{i}].", path)
        shards[f] = s
    classes: dict[int, ClassInfo] = {}
    for i, c in enumerate(_need(raw, "classes", list, "", path)):
        w = f"classes[{i}]."
        label = _need(c, "label", int, w, path)
        cname = _need(c, "name", str, w, path)
        split = _need(c, "split", str, w, path)
        count = _need(c, "count", int, w, path)
        shard = _need(c, "shard", str, w, path)
        members = _need(c, "members", list, w, path)
        if label in classes:
            raise SpecError(f"{path}: key {w}'label' {label} is used twice")
        if shard not in shards:
            raise SpecError(f"{path}: key {w}'shard' names {shard!r} which is not in 'shards'")
        if len(members) != count:
            raise SpecError(f"{path}: class {cname!r}: 'count' is {count} but it has {len(members)} 'members'")
        for j, m in enumerate(members):
            if not (isinstance(m, list) and len(m) == 3 and isinstance(m[0], int) and isinstance(m[1], int)
                    and m[0] >= 0 and m[1] >= 0 and isinstance(m[2], str)):
                raise SpecError(f"{path}: key {w}'members'[{j}] of class {cname!r} must be "
                                f"[data_offset, size, ext], got {m!r}")
        classes[label] = ClassInfo(label, cname, split, count, shard, tuple(tuple(m) for m in members))
    splits_raw = _need(raw, "splits", dict, "", path)
    splits: dict[str, list[int]] = {}
    for s, labels in splits_raw.items():
        if not isinstance(labels, list):
            raise SpecError(f"{path}: key splits.{s!r} must be a list of labels")
        for lab in labels:
            if lab not in classes:
                raise SpecError(f"{path}: key splits.{s!r} lists label {lab!r} which is not in 'classes'")
            if classes[lab].split != s:
                raise SpecError(f"{path}: key splits.{s!r} lists class {classes[lab].name!r} "
                                f"whose own split is {classes[lab].split!r}")
        splits[s] = list(labels)
    ontology = raw.get("ontology")
    if ontology is not None:
        if not isinstance(ontology, dict) or ontology.get("type") not in ("bilevel", "dag"):
            raise SpecError(f"{path}: key 'ontology' must be null or have type 'bilevel' or 'dag'")
        if ontology["type"] == "bilevel":
            sup = _need(ontology, "superclasses", dict, "ontology.", path)
            for k, labels in sup.items():
                bad = [lab for lab in labels if lab not in classes]
                if bad:
                    raise SpecError(f"{path}: key ontology.superclasses.{k!r} lists unknown labels {bad[:5]}")
        else:
            _check_dag(ontology, path, splits)
    return DatasetSpec(name=name, location=location, converter=str(raw.get("converter", "")), version=version,
                       splits=splits, classes=classes, shards=shards, ontology=ontology,
                       counts=raw.get("counts", {}), skipped=raw.get("skipped", []))


def load_spec(location: str, policy: RemotePolicy | None = None) -> DatasetSpec:
    """Read and validate ``spec.json`` of the dataset at ``location`` (folder, http(s) URL or pipe: command);
    ``policy``: timeout and retries of an http(s) read."""
    location = str(location)
    path = file_url(location, "spec.json")
    try:
        data = _read_bytes(path, policy)
    except FileNotFoundError as e:
        raise SpecError(f"{path}: not found; the dataset at {location} is missing or its conversion did not "
                        f"finish (spec.json is written last)") from e
    except OSError as e:
        raise SpecError(f"{path}: cannot read ({e})") from e
    try:
        raw = json.loads(data)
    except ValueError as e:
        raise SpecError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: top level must be a JSON object")
    return parse_spec(raw, location)
