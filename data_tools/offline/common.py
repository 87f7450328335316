"""Shared pieces of the offline domains: the class plan a renderer returns, seeded splits, image fitting."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
from PIL import Image

SPLIT_FRACTIONS = (0.70, 0.15, 0.15)


@dataclass
class DomainClass:
    """One class to write: its name, an optional superclass (alphabet), and a lazy source of images."""
    name: str
    items: Callable[[], Iterator[tuple[str, Image.Image]]]
    group: str | None = None


@dataclass
class DomainPlan:
    classes: list[DomainClass]
    min_count: int                       # a class with fewer images is a conversion error
    split_by_group: bool = False         # Omniglot-style: whole alphabets go to one split
    # render a class fully before writing it and leave it out (listed in 'skipped') when broken drawings take it
    # below min_count, instead of failing the whole conversion: for sources where a few renders may fail
    drop_short: bool = False
    skipped: list[dict] = field(default_factory=list)


def rng_for(seed: int, *parts) -> np.random.Generator:
    """A generator that depends only on (seed, parts): reorderings elsewhere never change a class's images."""
    h = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def split_sizes(n: int) -> tuple[int, int, int]:
    """70/15/15 with at least one item in val and test whenever n >= 3."""
    if n < 3:
        raise ValueError(f"need at least 3 classes (or alphabets) to make train/val/test splits, got {n}")
    n_val = max(1, round(n * SPLIT_FRACTIONS[1]))
    n_test = max(1, round(n * SPLIT_FRACTIONS[2]))
    return n - n_val - n_test, n_val, n_test


def assign_splits(keys: list[str], seed: int, domain: str) -> dict[str, str]:
    """Seeded permutation of the sorted keys, cut 70/15/15 into train/val/test."""
    keys = sorted(set(keys))
    order = rng_for(seed, domain, "splits").permutation(len(keys))
    n_train, n_val, _ = split_sizes(len(keys))
    out = {}
    for rank, i in enumerate(order):
        out[keys[i]] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return out


def seeded_subset(items: list, k: int | None, seed: int, *parts) -> list:
    """k items drawn without replacement (all when k is None or >= len), kept in their original order."""
    if k is None or k >= len(items):
        return list(items)
    idx = sorted(rng_for(seed, *parts).choice(len(items), size=k, replace=False).tolist())
    return [items[i] for i in idx]


def on_white(im: Image.Image) -> Image.Image:
    """Composite an image with transparency onto white and return RGB."""
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


def fit_square(im: Image.Image, size: int, margin: float = 0.0) -> Image.Image:
    """Scale the image to fit a size x size white square (aspect kept, centred), RGB out."""
    im = on_white(im)
    inner = max(1, round(size * (1 - 2 * margin)))
    w, h = im.size
    s = inner / max(w, h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.LANCZOS)
    out = Image.new("RGB", (size, size), (255, 255, 255))
    out.paste(im, ((size - nw) // 2, (size - nh) // 2))
    return out

