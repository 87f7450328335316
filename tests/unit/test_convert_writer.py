"""DatasetWriter: the shard format of docs/data_format.md, offsets, idempotence, restart, bad input."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_tools.writer import ConversionError, DatasetWriter
from tests.fixtures_layouts import img


def check_shards(out) -> dict:
    """Every member offset reads back the bytes tarfile extracts, which decode; sha256 and .cls agree."""
    spec = json.loads((out / "spec.json").read_text())
    assert spec["format"] == "smat-wds" and spec["version"] == 1
    for sh in spec["shards"]:
        data = (out / sh["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sh["sha256"] and len(data) == sh["bytes"]
    for c in spec["classes"]:
        assert len(c["members"]) == c["count"]
        with tarfile.open(out / c["shard"]) as t, open(out / c["shard"], "rb") as f:
            for i, (off, size, ext) in enumerate(c["members"]):
                key = f"c{c['label']:05d}_{i:06d}"
                f.seek(off)
                raw = f.read(size)
                assert raw == t.extractfile(f"{key}.{ext}").read()
                assert t.getmember(f"{key}.{ext}").offset_data == off
                assert t.extractfile(f"{key}.cls").read() == str(c["label"]).encode()
                Image.open(io.BytesIO(raw)).load()
    for s, labels in spec["splits"].items():
        assert labels == [c["label"] for c in spec["classes"] if c["split"] == s]
    assert spec["counts"] == {"classes": len(spec["classes"]), "images": sum(c["count"] for c in spec["classes"])}
    return spec


def test_writes_format_offsets_and_shard_rollover(tmp_path):
    out = tmp_path / "ds"
    jpg = img(1)
    with DatasetWriter(out, "toy", "toy-v1", shard_bytes=6000) as w:
        assert w.add_class("a", "train", [(f"a{i}", img(i)) for i in range(3)]) == 0
        assert w.add_class("b", "val", [("b0", np.zeros((5, 6), np.uint8)), ("b1", Image.new("RGB", (4, 4)))]) == 1
        assert w.add_class("c", "test", [("c0", jpg), ("c1", img(7, fmt="GIF", mode="L"))]) == 2
    spec = check_shards(out)
    assert spec["splits"] == {"train": [0], "val": [1], "test": [2]}
    assert [c["shard"] for c in spec["classes"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000001.tar"]
    exts = [m[2] for c in spec["classes"] for m in c["members"]]
    assert exts == ["jpg", "jpg", "jpg", "png", "png", "jpg", "png"]  # GIF re-encoded, JPEG kept as is
    c = spec["classes"][2]
    with open(out / c["shard"], "rb") as f:
        f.seek(c["members"][0][0])
        assert f.read(c["members"][0][1]) == jpg  # source bytes kept exactly
    # the shards are plain tars readable by webdataset, keys grouped per sample
    import webdataset as wds
    samples = list(wds.WebDataset(str(out / "shard-000001.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["c00001_000000", "c00001_000001", "c00002_000000", "c00002_000001"]
    assert samples[0]["cls"] == b"1"


def test_corrupt_image_skipped_and_recorded_or_fatal_with_strict(tmp_path):
    good, bad = img(1), img(2)[:40]  # a truncated JPEG
    with DatasetWriter(tmp_path / "a", "t", "t") as w:
        w.add_class("x", "test", [("x/0.jpg", good), ("x/1.jpg", bad), ("x/2.jpg", b"not an image")])
    spec = check_shards(tmp_path / "a")
    assert spec["classes"][0]["count"] == 1
    assert [s["path"] for s in spec["skipped"]] == ["x/1.jpg", "x/2.jpg"]
    assert "BytesIO" not in spec["skipped"][1]["reason"]
    with pytest.raises(ConversionError, match=r"corrupt image x/1.jpg \(class 'x'\)"):
        with DatasetWriter(tmp_path / "b", "t", "t", strict=True) as w:
            w.add_class("x", "test", [("x/0.jpg", good), ("x/1.jpg", bad)])
    assert not (tmp_path / "b" / "spec.json").exists()


def test_class_below_min_count_names_class_and_count(tmp_path):
    with pytest.raises(ValueError, match=r"class 'tiny' of t has 2 readable images, below the minimum of 3"):
        with DatasetWriter(tmp_path / "o", "t", "t", min_count=3) as w:
            w.add_class("tiny", "test", [("a", img(1)), ("b", img(2)), ("c", b"junk")])
    assert not (tmp_path / "o" / "spec.json").exists()


def test_bad_split_duplicate_class_and_bad_array(tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        DatasetWriter(tmp_path / "o", "t", "t").add_class("a", "valid", [("a", img(1))])
    w = DatasetWriter(tmp_path / "p", "t", "t")
    w.add_class("a", "test", [("a", img(1))])
    with pytest.raises(ValueError, match="added twice"):
        w.add_class("a", "test", [("a", img(1))])
    w2 = DatasetWriter(tmp_path / "q", "t", "t")
    with pytest.raises(TypeError, match="uint8"):
        w2.add_class("f", "test", [("f", np.zeros((3, 3), np.float32))])


def test_rerun_is_noop_and_crash_is_redone(tmp_path):
    out = tmp_path / "o"

    def run():
        with DatasetWriter(out, "t", "conv --x 1") as w:
            if w.complete:
                return w.spec
            w.add_class("a", "train", [("a", img(1))])
            w.add_class("b", "test", [("b", img(2))])
        return w.spec
    first = run()
    mtime = (out / "spec.json").stat().st_mtime_ns
    again = DatasetWriter(out, "t", "conv --x 1")
    assert again.complete and again.add_class("b", "test", iter(())) == 1
    assert again.close() == first and (out / "spec.json").stat().st_mtime_ns == mtime
    # simulated crash: spec missing, a shard half written, a stale spec.json.tmp
    (out / "spec.json").unlink()
    (out / "spec.json.tmp").write_text("{")
    with open(out / "shard-000000.tar", "r+b") as f:
        f.truncate(700)
    assert run() == first  # identical output (fixed tar metadata, deterministic order)
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar", "spec.json"]


def test_output_folder_of_another_dataset_or_foreign_files_is_an_error(tmp_path):
    out = tmp_path / "o"
    with DatasetWriter(out, "omniglot", "c1") as w:
        w.add_class("a", "test", [("a", img(1))])
    with pytest.raises(ConversionError, match=r"already holds dataset 'omniglot' written by converter 'c1'"):
        DatasetWriter(out, "dtd", "c1")
    with pytest.raises(ConversionError, match="already holds dataset"):
        DatasetWriter(out, "omniglot", "c2")
    other = tmp_path / "home"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(ConversionError, match=r"holds files that are not a partial smat-convert output \(thesis.tex\)"):
        DatasetWriter(other, "t", "t")
    assert (other / "thesis.tex").read_text() == "precious"
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConversionError, match="is not a folder"):
        DatasetWriter(f, "t", "t")


def test_ontology_and_empty_dataset(tmp_path):
    with DatasetWriter(tmp_path / "o", "t", "t") as w:
        w.add_class("A/1", "train", [("a", img(1))])
        w.set_ontology({"type": "bilevel", "superclasses": {"A": [0]}})
    assert json.loads((tmp_path / "o" / "spec.json").read_text())["ontology"]["superclasses"] == {"A": [0]}
    with pytest.raises(ConversionError, match="no classes were written"):
        DatasetWriter(tmp_path / "e", "t", "t").close()
