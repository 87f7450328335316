"""Meta-Dataset's ``dataset_spec.json``: its three spec classes, read and checked.

MD (meta_dataset/data/dataset_spec.py) serialises a spec with ``to_dict``: the namedtuple's fields plus a
``__class__`` key naming the class, Split enums written by name (``TRAIN``, ``VALID``, ``TEST``) and integer
ids written as JSON string keys. Labels are contiguous: train, then valid, then test; record files are
``file_pattern.format(label)`` (``{}.tfrecords``).

- ``DatasetSpecification``: ``classes_per_split`` {split: n}, ``images_per_class`` {label: n} (or {label: {pool:
  n}} for example-level splits, which MD's released converters never write), ``class_names`` {label: name}.
- ``BiLevelDatasetSpecification`` (Omniglot): ``superclasses_per_split`` {split: n}, ``classes_per_superclass``
  {superclass id: n}, ``superclass_names`` {id: name}; superclass ids and labels are both contiguous in split
  order, each superclass's classes following the previous superclass's.
- ``HierarchicalDatasetSpecification`` (ILSVRC): ``split_subgraphs`` {split: [{"wn_id", "words", "children_ids",
  "parents_ids"}, ...]} (each split's own WordNet subgraph; MD roots VALID and TEST at their own synsets, and
  ``ilsvrc_2012_v2`` leaves them empty), ``images_per_class`` {split: {wn_id: images spanned}} for every node of the
  split's subgraph, ``class_names`` {label: wn_id}, the labels following the sorted leaves of TRAIN, VALID, TEST.

A spec that does not hold together (a class without a name, a missing key, a class name twice, a leaf
in two splits) raises a ConversionError naming the file and the key or class.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from data_tools.writer import ConversionError

SPLITS = (("TRAIN", "train"), ("VALID", "val"), ("TEST", "test"))
SPEC_CLASSES = ("DatasetSpecification", "BiLevelDatasetSpecification", "HierarchicalDatasetSpecification")


@dataclass(frozen=True)
class MdClass:
    label: int
    name: str
    split: str                      # "train" | "val" | "test"
    superclass: str | None = None   # bilevel specs


@dataclass
class MdSpec:
    kind: str                                    # one of SPEC_CLASSES
    name: str | None
    classes: list[MdClass]                       # in label order (label == index)
    per_class: dict[int, int]                    # label -> images MD counted (empty when the spec has none)
    file_pattern: str = "{}.tfrecords"
    dag: dict | None = None                      # hierarchical: {"splits": {split: {"root", "nodes"}}} (md_dag)
    warnings: list[str] = field(default_factory=list)

    def counts(self) -> tuple[int, int, int]:
        return tuple(sum(1 for c in self.classes if c.split == s) for _, s in SPLITS)


def load_md_spec(path: Path, *, need_names: bool = True) -> MdSpec:
    """Read and check a dataset_spec.json. ``need_names=False`` (ImageNet synset folders with --md-spec) lets a
    hierarchical spec omit ``class_names`` and ``images_per_class``; when present they are still checked."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read Meta-Dataset spec {path}: {e}") from e
    if not isinstance(raw, dict):
        raise ConversionError(f"{path}: a Meta-Dataset spec is a JSON object, got {type(raw).__name__}")
    return parse_md_spec(raw, path, need_names=need_names)


def spec_kind(raw: dict, path: Path) -> str:
    """The spec class: the ``__class__`` key MD writes, else guessed from the keys (hand-written specs)."""
    if "__class__" in raw:
        kind = raw["__class__"]
        if kind not in SPEC_CLASSES:
            raise ConversionError(f"{path}: key '__class__' is {kind!r}; Meta-Dataset writes one of "
                                  f"{', '.join(SPEC_CLASSES)}")
        return kind
    for key, kind in (("split_subgraphs", SPEC_CLASSES[2]), ("superclasses_per_split", SPEC_CLASSES[1]),
                      ("classes_per_split", SPEC_CLASSES[0])):
        if key in raw:
            return kind
    raise ConversionError(f"{path}: not a Meta-Dataset dataset spec (no '__class__', classes_per_split, "
                          f"superclasses_per_split or split_subgraphs key)")


def parse_md_spec(raw: dict, path: Path, *, need_names: bool = True) -> MdSpec:
    kind = spec_kind(raw, path)
    reader = {SPEC_CLASSES[0]: _plain, SPEC_CLASSES[1]: _bilevel, SPEC_CLASSES[2]: _hierarchical}[kind]
    spec = reader(raw, path, kind, need_names)
    pattern = raw.get("file_pattern", "{}.tfrecords")
    if not isinstance(pattern, str) or pattern.count("{}") != 1:
        raise ConversionError(f"{path}: key 'file_pattern' must hold one '{{}}' for the class id, got {pattern!r}")
    spec.file_pattern = pattern
    name = raw.get("name")
    spec.name = str(name) if name is not None else None
    seen: dict[str, int] = {}
    for c in spec.classes:
        if c.name in seen:
            raise ConversionError(f"{path}: class name {c.name!r} is used by classes {seen[c.name]} and {c.label} "
                                  f"(key 'class_names')")
        seen[c.name] = c.label
    return spec


# ---- key helpers -------------------------------------------------------------------------------------------

def _need(raw: dict, key: str, path: Path, kind: str, typ=dict):
    if key not in raw:
        raise ConversionError(f"{path}: {kind} without key {key!r}")
    v = raw[key]
    if not isinstance(v, typ):
        raise ConversionError(f"{path}: key {key!r} must be a JSON {'object' if typ is dict else typ.__name__}, "
                              f"got {type(v).__name__}")
    return v


def _count(v, where: str, path: Path) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConversionError(f"{path}: key {where} must be a count (integer >= 0), got {v!r}")
    return v


def _per_split(d: dict, key: str, path: Path) -> list[int]:
    """[TRAIN, VALID, TEST] counts of a {split name: count} dict; every split key present, no other key."""
    unknown = sorted(set(d) - {k for k, _ in SPLITS})
    if unknown:
        raise ConversionError(f"{path}: key {key} has unknown split {unknown[0]!r} (expected TRAIN, VALID, TEST)")
    missing = [k for k, _ in SPLITS if k not in d]
    if missing:
        raise ConversionError(f"{path}: key {key} has no entry for split {missing[0]!r}")
    return [_count(d[k], f"{key}.{k}", path) for k, _ in SPLITS]


def _int_keyed(d: dict, key: str, path: Path) -> dict[int, object]:
    out = {}
    for k, v in d.items():
        try:
            i = int(k)
        except (TypeError, ValueError):
            raise ConversionError(f"{path}: key {key} is keyed by class id, got key {k!r}") from None
        if str(i) != str(k).strip() or i < 0:
            raise ConversionError(f"{path}: key {key} is keyed by class id (integer >= 0), got key {k!r}")
        out[i] = v
    return out


def _names(raw: dict, path: Path, kind: str) -> dict[int, str]:
    names = _int_keyed(_need(raw, "class_names", path, kind), "class_names", path)
    bad = [(k, v) for k, v in names.items() if not isinstance(v, str) or not v]
    if bad:
        raise ConversionError(f"{path}: key class_names.'{bad[0][0]}' must be a non-empty string, got {bad[0][1]!r}")
    return names


def _extra_names(names: dict[int, str], n: int, path: Path, what: str) -> list[str]:
    extra = sorted(k for k in names if k >= n)
    if not extra:
        return []
    return [f"{path}: class_names lists {len(extra)} classes beyond the {n} of {what} (labels "
            f"{', '.join(map(str, extra[:5]))}{', ...' if len(extra) > 5 else ''}); they are ignored"]


def _flat_counts(raw: dict, path: Path, kind: str, classes: list[MdClass]) -> dict[int, int]:
    ipc = _int_keyed(_need(raw, "images_per_class", path, kind), "images_per_class", path)
    out = {}
    for c in classes:
        if c.label not in ipc:
            raise ConversionError(f"{path}: key images_per_class has no entry for class {c.label} ({c.name!r})")
        v = ipc[c.label]
        if isinstance(v, dict):
            raise ConversionError(f"{path}: key images_per_class.'{c.label}' holds example-level pools "
                                  f"({sorted(v)}); only class-level splits are supported")
        out[c.label] = _count(v, f"images_per_class.'{c.label}'", path)
    return out


def _named(names: dict[int, str], label: int, split_key: str, path: Path) -> str:
    if label not in names:
        raise ConversionError(f"{path}: class {label} (split {split_key}) has no entry in class_names")
    return names[label]


# ---- the three spec classes --------------------------------------------------------------------------------

def _plain(raw: dict, path: Path, kind: str, need_names: bool) -> MdSpec:
    counts = _per_split(_need(raw, "classes_per_split", path, kind), "classes_per_split", path)
    names = _names(raw, path, kind)
    classes, label = [], 0
    for (md_key, split), n in zip(SPLITS, counts):
        for _ in range(n):
            classes.append(MdClass(label, _named(names, label, md_key, path), split))
            label += 1
    spec = MdSpec(kind, None, classes, _flat_counts(raw, path, kind, classes))
    spec.warnings += _extra_names(names, label, path, "classes_per_split")
    return spec


def _bilevel(raw: dict, path: Path, kind: str, need_names: bool) -> MdSpec:
    sc_counts = _per_split(_need(raw, "superclasses_per_split", path, kind), "superclasses_per_split", path)
    per_sc = _int_keyed(_need(raw, "classes_per_superclass", path, kind), "classes_per_superclass", path)
    sc_names = _int_keyed(_need(raw, "superclass_names", path, kind), "superclass_names", path)
    names = _names(raw, path, kind)
    classes, label, sc = [], 0, 0
    for (md_key, split), n_sc in zip(SPLITS, sc_counts):
        for _ in range(n_sc):
            if sc not in per_sc:
                raise ConversionError(f"{path}: superclass {sc} (split {md_key}) has no entry in "
                                      f"classes_per_superclass")
            if sc not in sc_names:
                raise ConversionError(f"{path}: superclass {sc} (split {md_key}) has no entry in superclass_names")
            sc_name = sc_names[sc]
            if not isinstance(sc_name, str) or not sc_name:
                raise ConversionError(f"{path}: key superclass_names.'{sc}' must be a non-empty string, "
                                      f"got {sc_name!r}")
            for _ in range(_count(per_sc[sc], f"classes_per_superclass.'{sc}'", path)):
                classes.append(MdClass(label, _named(names, label, md_key, path), split, sc_name))
                label += 1
            sc += 1
    dup = sorted({v for v in sc_names.values() if list(sc_names.values()).count(v) > 1})
    if dup:
        raise ConversionError(f"{path}: superclass name {dup[0]!r} is used twice (key 'superclass_names')")
    spec = MdSpec(kind, None, classes, _flat_counts(raw, path, kind, classes))
    spec.warnings += _extra_names(names, label, path, "superclasses_per_split")
    extra_sc = sorted(k for k in set(per_sc) | set(sc_names) if k >= sc)
    if extra_sc:
        spec.warnings.append(f"{path}: classes_per_superclass / superclass_names list superclasses beyond the {sc} "
                             f"of superclasses_per_split ({', '.join(map(str, extra_sc[:5]))}); they are ignored")
    return spec


def _hierarchical(raw: dict, path: Path, kind: str, need_names: bool) -> MdSpec:
    from data_tools.sources.md_dag import read_split_subgraphs

    graphs = read_split_subgraphs(_need(raw, "split_subgraphs", path, kind), path)
    leaves = {md_key: graphs[split]["leaves"] if split in graphs else [] for md_key, split in SPLITS}
    order = [(wn, md_key, split) for md_key, split in SPLITS for wn in leaves[md_key]]
    names = _names(raw, path, kind) if need_names or "class_names" in raw else None
    classes = []
    for label, (wn, md_key, split) in enumerate(order):
        if names is not None:
            got = _named(names, label, md_key, path)
            if got != wn:
                raise ConversionError(
                    f"{path}: class_names.'{label}' is {got!r}, but label {label} is leaf {wn!r} of split {md_key} "
                    f"(Meta-Dataset labels the sorted leaves of TRAIN, then VALID, then TEST)")
        classes.append(MdClass(label, wn, split))
    per_class: dict[int, int] = {}
    if need_names or "images_per_class" in raw:
        ipc = _need(raw, "images_per_class", path, kind)
        bad = sorted(k for k in ipc if k not in {m for m, _ in SPLITS})
        if bad:
            raise ConversionError(f"{path}: key images_per_class of a {kind} is keyed by split (TRAIN, VALID, TEST), "
                                  f"each mapping WordNet ids to counts; got key {bad[0]!r}")
        for c, (wn, md_key, _) in zip(classes, order):
            counts = ipc.get(md_key)
            if not isinstance(counts, dict) or wn not in counts:
                raise ConversionError(f"{path}: key images_per_class.{md_key} has no count for class {c.label} "
                                      f"({wn!r})")
            per_class[c.label] = _count(counts[wn], f"images_per_class.{md_key}.{wn!r}", path)
    spec = MdSpec(kind, None, classes, per_class, dag={"splits": {s: {"root": g["root"], "nodes": g["nodes"]}
                                                                   for s, g in graphs.items()}})
    if names is not None:
        spec.warnings += _extra_names(names, len(classes), path, "the split_subgraphs leaves")
    return spec
