"""Class splits: Meta-Dataset's published class counts and its seeded split rule, plus user-given splits.

Meta-Dataset (dataset_conversion/dataset_to_records.py) splits most sources with the legacy NumPy global
generator seeded with 22: first ``choice(n, n_train + n_valid, replace=False)`` picks train+valid indices
(test is the rest, sorted), then ``choice(trainval, n_train, replace=False)`` picks train (in that random
order; valid is the rest, sorted). Labels are then assigned train, then valid, then test. ``RandomState``
is NumPy's frozen legacy stream, so this reproduces MD's published split files exactly (checked in the
tests against vgg_flower_splits.json).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

MD_SEED = 22

# Classes per split (train, valid, test) as published by Meta-Dataset, and total images when fixed.
MD_COUNTS: dict[str, dict] = {
    "ilsvrc_2012": {"classes": (712, 158, 130)},
    "omniglot": {"classes": (883, 81, 659), "images": 32460},
    "aircraft": {"classes": (70, 15, 15), "images": 10000},
    "cu_birds": {"classes": (140, 30, 30), "images": 11788},
    "dtd": {"classes": (33, 7, 7), "images": 5640},
    "quickdraw": {"classes": (241, 52, 52)},
    "fungi": {"classes": (994, 200, 200), "images": 89760},
    "vgg_flower": {"classes": (71, 15, 16), "images": 8189},
    "traffic_sign": {"classes": (0, 0, 43), "images": 39209},
    "mscoco": {"classes": (0, 40, 40)},
    "cifar10": {"classes": (0, 0, 10), "images": 10000},
    "cifar100": {"classes": (0, 0, 100), "images": 10000},
    "mnist": {"classes": (0, 0, 10), "images": 10000},
}

SPLIT_NAMES = ("train", "val", "test")


def md_split_indices(n_train: int, n_valid: int, n_test: int, seed: int = MD_SEED) -> tuple[list, list, list]:
    """Meta-Dataset's seeded class split of range(n_train + n_valid + n_test); see the module docstring."""
    rng = np.random.RandomState(seed)
    n = n_train + n_valid + n_test
    trainval = rng.choice(n, n_train + n_valid, replace=False)
    test = np.setdiff1d(np.arange(n), trainval)
    train = rng.choice(trainval, n_train, replace=False)
    valid = np.setdiff1d(trainval, train)
    return [int(i) for i in train], [int(i) for i in valid], [int(i) for i in test]


def md_fraction_counts(n: int) -> tuple[int, int, int]:
    """Quickdraw's 70/15/15 rule: train int(0.7 n), valid int(0.85 n) - train, test the rest."""
    n_trainval, n_train = int(0.85 * n), int(0.7 * n)
    return n_train, n_trainval - n_train, n - n_trainval


def ordered_by_split(keys: list, train: list, valid: list, test: list) -> list[tuple[object, str]]:
    """[(key, split)] in Meta-Dataset's label order: train (as drawn), valid, test."""
    return ([(keys[i], "train") for i in train] + [(keys[i], "val") for i in valid]
            + [(keys[i], "test") for i in test])


def read_split_file(path: Path) -> list[tuple[str, str]]:
    """[(class name, split)] in label order from a Meta-Dataset splits JSON ({"train": [...], "valid": [...],
    "test": [...]}): MD's converter labels the classes in that order. A class listed twice is an error."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read split file {path}: {e}") from e
    if not isinstance(data, dict) or not any(k in data for k in ("train", "valid", "test")):
        raise ValueError(f"split file {path}: expected a JSON object with keys 'train', 'valid', 'test' "
                         f"(Meta-Dataset's <source>_splits.json)")
    odd = sorted(set(data) - {"train", "valid", "test"})
    if odd:
        raise ValueError(f"split file {path}: unknown key {odd[0]!r}; Meta-Dataset's keys are 'train', 'valid', "
                         f"'test'")
    out, seen = [], {}
    for md_name, split in (("train", "train"), ("valid", "val"), ("test", "test")):
        entries = data.get(md_name, [])
        if not isinstance(entries, list):
            raise ValueError(f"split file {path}: key {md_name!r} must be a list of class names")
        for entry in entries:
            s = str(entry)
            if s in seen:
                raise ValueError(f"split file {path}: class {s!r} is listed twice ({seen[s]!r} and {md_name!r})")
            seen[s] = md_name
            out.append((s, split))
    return out


def parse_fractions(text: str) -> dict[str, float]:
    """Parse 'train=0.7,val=0.15,test=0.15' into fractions that sum to 1."""
    out = {}
    for part in text.split(","):
        name, _, val = part.partition("=")
        name = name.strip()
        if name not in SPLIT_NAMES or not val:
            raise ValueError(f"bad --splits entry {part!r}: want NAME=FRACTION with NAME in {SPLIT_NAMES}")
        out[name] = float(val)
    if abs(sum(out.values()) - 1.0) > 1e-6 or any(v < 0 for v in out.values()):
        raise ValueError(f"--splits fractions must be >= 0 and sum to 1, got {out}")
    return out


def fraction_split(keys: list, fractions: dict[str, float], seed: int = MD_SEED) -> list[tuple[object, str]]:
    """Seeded class split by fractions: permute sorted keys, cut train / val / test (rounding down, rest to test)."""
    keys = sorted(keys)
    perm = np.random.RandomState(seed).permutation(len(keys))
    n_train = int(fractions.get("train", 0.0) * len(keys))
    n_val = int(fractions.get("val", 0.0) * len(keys))
    # the rounding remainder goes to the last split that was asked for
    if fractions.get("test", 0.0) == 0.0:
        if fractions.get("val", 0.0) > 0.0:
            n_val = len(keys) - n_train
        else:
            n_train = len(keys)
    out = []
    for rank, i in enumerate(perm):
        split = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
        out.append((keys[i], split))
    order = {"train": 0, "val": 1, "test": 2}
    return sorted(out, key=lambda kv: (order[kv[1]], str(kv[0])))
