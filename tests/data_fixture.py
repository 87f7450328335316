"""Tiny real datasets for tests: real PNG bytes in real shards, written by data_tools.writer.DatasetWriter."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data_tools.writer import DatasetWriter


def class_image(label: int, i: int, size: int = 16) -> np.ndarray:
    """A deterministic HxWx3 uint8 image: a per-class colour plus per-image noise (so images differ)."""
    rng = np.random.default_rng(label * 100_003 + i)
    base = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256], dtype=np.int64)
    img = base + rng.integers(-30, 31, size=(size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_dataset(root, name: str = "toy", splits: dict[str, int] | None = None, images: int | list[int] = 12,
                 size: int = 16, ontology: str | dict | None = None, shard_bytes: int = 64 << 10,
                 class_names: list[str] | None = None) -> Path:
    """Write dataset ``name`` under ``root/name`` and return its folder.

    splits: classes per split (default train 10, val 6, test 6); images: per class (int or one per class in
    label order); ontology: None, "bilevel" (superclasses of 5-7 consecutive classes per split), or a dict.
    """
    splits = splits or {"train": 10, "val": 6, "test": 6}
    out = Path(root) / name
    n = sum(splits.values())
    counts = images if isinstance(images, list) else [images] * n
    assert len(counts) == n
    with DatasetWriter(out, name, "test-fixture", shard_bytes=shard_bytes) as w:
        label = 0
        supers: dict[str, list[int]] = {}
        for split, k in splits.items():
            for c in range(k):
                cname = class_names[label] if class_names else f"{split}_class{c:03d}"
                items = [(f"{cname}/{i}", class_image(label, i, size)) for i in range(counts[label])]
                got = w.add_class(cname, split, items)
                assert got == label
                # bilevel: consecutive groups of 5 (the last group takes any remainder) within a split
                supers.setdefault(f"{split}_alpha{min(c // 5, max(k // 5 - 1, 0))}", []).append(label)
                label += 1
        if ontology == "bilevel":
            w.set_ontology({"type": "bilevel", "superclasses": supers})
        elif isinstance(ontology, dict):
            w.set_ontology(ontology)
    return out
