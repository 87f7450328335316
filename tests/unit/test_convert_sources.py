"""smat-convert on tiny fixtures of every source layout: counts, splits, readable members, bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import tests.fixtures_layouts as fx
from data_tools.cli import main
from data_tools.splits import md_split_indices
from tests.unit.test_convert_writer import check_shards

ROOT = Path(__file__).resolve().parents[2]


def convert(source, inp, out, *extra):
    rc = main([source, "--input", str(inp), "--output", str(out), *map(str, extra)])
    assert rc == 0
    return check_shards(out)


def split_sizes(spec):
    return tuple(len(spec["splits"][s]) for s in ("train", "val", "test"))


def test_seeded_rule_reproduces_meta_dataset_vgg_flower_split():
    # MD's published vgg_flower_splits.json (labels 1..102)
    tr, va, te = md_split_indices(71, 15, 16)
    assert [i + 1 for i in tr[:6]] == [90, 38, 80, 30, 29, 12]
    assert [i + 1 for i in te] == [5, 9, 15, 19, 35, 40, 41, 42, 45, 46, 65, 85, 89, 94, 96, 98]
    assert [i + 1 for i in va] == [10, 16, 17, 23, 26, 47, 53, 56, 57, 62, 82, 83, 86, 97, 102]


def test_md_tfrecords(tmp_path, capsys):
    inp = fx.md_tfrecords(tmp_path / "rec")
    spec = convert("md_tfrecords", inp, tmp_path / "o")
    assert spec["name"] == "dtd" and split_sizes(spec) == (2, 1, 1) and spec["counts"]["images"] == 12
    assert [c["name"] for c in spec["classes"]] == ["class0", "class1", "class2", "class3"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["status"] == "written"
    # rerun: no-op that says so
    assert main(["md_tfrecords", "--input", str(inp), "--output", str(tmp_path / "o")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["status"] == "already complete"


def test_md_tfrecords_truncated_and_corrupt_files_are_named(tmp_path, capsys):
    inp = fx.md_tfrecords(tmp_path / "rec")
    data = (inp / "2.tfrecords").read_bytes()
    (inp / "2.tfrecords").write_bytes(data[:-10])
    assert main(["md_tfrecords", "--input", str(inp), "--output", str(tmp_path / "o")]) == 2
    assert f"{inp / '2.tfrecords'}: truncated record" in capsys.readouterr().err
    assert not (tmp_path / "o" / "spec.json").exists()
    (inp / "2.tfrecords").write_bytes(data[:20] + bytes([data[20] ^ 1]) + data[21:])
    assert main(["md_tfrecords", "--input", str(inp), "--output", str(tmp_path / "o")]) == 2
    assert "corrupt record data (CRC mismatch)" in capsys.readouterr().err
    (inp / "3.tfrecords").unlink()
    assert main(["md_tfrecords", "--input", str(inp), "--output", str(tmp_path / "o")]) == 2
    assert f"expected {inp / '3.tfrecords'}" in capsys.readouterr().err


def test_pmf_h5(tmp_path):
    spec = convert("pmf_h5", fx.pmf_h5(tmp_path / "h5"), tmp_path / "o")
    assert spec["name"] == "cu_birds" and split_sizes(spec) == (2, 1, 1) and spec["counts"]["images"] == 12


def test_omniglot_bilevel_and_md_validation_alphabets(tmp_path):
    spec = convert("omniglot", fx.omniglot(tmp_path / "om"), tmp_path / "o", "--partial")
    assert split_sizes(spec) == (4, 2, 2)
    names = [c["name"] for c in spec["classes"]]
    assert names[:4] == ["Greek-character01", "Greek-character02", "Latin-character01", "Latin-character02"]
    assert spec["classes"][4]["name"].startswith("Tagalog-") and spec["classes"][4]["split"] == "val"
    assert spec["ontology"] == {"type": "bilevel", "superclasses": {"Greek": [0, 1], "Latin": [2, 3],
                                                                    "Tagalog": [4, 5], "Kannada": [6, 7]}}


def test_omniglot_without_partial_names_missing_alphabets(tmp_path, capsys):
    assert main(["omniglot", "--input", str(fx.omniglot(tmp_path / "om")), "--output", str(tmp_path / "o")]) == 2
    assert "expected 30 and 20" in capsys.readouterr().err


@pytest.mark.parametrize("source,builder,sizes,images", [
    ("aircraft", fx.aircraft, (2, 1, 1), 8), ("cu_birds", fx.cu_birds, (2, 1, 1), 8),
    ("dtd", fx.dtd, (2, 1, 1), 8), ("fungi", fx.fungi, (2, 1, 1), 8),
    ("vgg_flower", fx.vgg_flower, (4, 0, 0), 8), ("mscoco", fx.mscoco, (0, 2, 2), 8),
    ("traffic_sign", fx.traffic_sign, (0, 0, 3), 6),
])
def test_meta_dataset_original_layouts(tmp_path, source, builder, sizes, images):
    spec = convert(source, builder(tmp_path / "in"), tmp_path / "o", "--partial")
    assert spec["name"] == source and split_sizes(spec) == sizes and spec["counts"]["images"] == images
    assert not spec["skipped"]


def test_aircraft_crops_to_box_and_mscoco_scales_box(tmp_path):
    from PIL import Image
    spec = convert("aircraft", fx.aircraft(tmp_path / "a"), tmp_path / "o", "--partial")
    c = spec["classes"][0]
    with open(tmp_path / "o" / c["shard"], "rb") as f:
        f.seek(c["members"][0][0])
        assert Image.open(__import__("io").BytesIO(f.read(c["members"][0][1]))).size == (10, 8)
    spec = convert("mscoco", fx.mscoco(tmp_path / "m"), tmp_path / "p", "--partial")
    c = spec["classes"][0]
    with open(tmp_path / "p" / c["shard"], "rb") as f:
        f.seek(c["members"][0][0])
        # box (3,4,10,8) scaled 1.2 about its centre: x 2..14, y 3.2..12.8; half-integer corrected to
        # pixel box (2, 3, 15, 13)
        assert Image.open(__import__("io").BytesIO(f.read(c["members"][0][1]))).size == (13, 10)


def test_full_source_with_missing_classes_is_an_error(tmp_path, capsys):
    assert main(["cu_birds", "--input", str(fx.cu_birds(tmp_path / "in")), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "found 4 classes in the input, Meta-Dataset has 200" in err and "--partial" in err


def test_missing_annotation_file_names_expected_path(tmp_path, capsys):
    inp = fx.aircraft(tmp_path / "a")
    (inp / "data" / "images_box.txt").unlink()
    assert main(["aircraft", "--input", str(inp), "--output", str(tmp_path / "o"), "--partial"]) == 2
    assert f"missing Aircraft box file: expected {inp / 'data' / 'images_box.txt'}" in capsys.readouterr().err
    inp = fx.mscoco(tmp_path / "m")
    (inp / "instances_train2017.json").unlink()
    assert main(["mscoco", "--input", str(inp), "--output", str(tmp_path / "p")]) == 2
    assert str(inp / "instances_train2017.json") in capsys.readouterr().err


def test_quickdraw_rule_scales_and_arrays_become_png(tmp_path):
    spec = convert("quickdraw", fx.quickdraw(tmp_path / "q", n=10), tmp_path / "o")
    assert split_sizes(spec) == (7, 1, 2) and spec["counts"]["images"] == 30
    assert {m[2] for c in spec["classes"] for m in c["members"]} == {"png"}


def test_ilsvrc_dag_split_and_ontology(tmp_path, capsys):
    train, md_spec = fx.ilsvrc(tmp_path / "inet")
    assert main(["ilsvrc_2012", "--input", str(train), "--output", str(tmp_path / "x")]) == 2
    assert "needs --md-spec" in capsys.readouterr().err
    spec = convert("ilsvrc_2012", train, tmp_path / "o", "--md-spec", md_spec, "--partial")
    assert [(c["name"], c["split"]) for c in spec["classes"]] == [("n01", "train"), ("n02", "train"),
                                                                  ("n03", "val"), ("n04", "test")]
    onto = spec["ontology"]
    assert onto["type"] == "dag"
    # the reader's format (docs/data_format.md): each split's own subgraph, internal node -> child ids, leaves
    # are class names
    assert onto["splits"] == {"train": {"root": "n0", "nodes": {"n0": ["n1"], "n1": ["n01", "n02"]}},
                              "val": {"root": "n0", "nodes": {"n0": ["n2"], "n2": ["n03"]}},
                              "test": {"root": "n0", "nodes": {"n0": ["n3"], "n3": ["n04"]}}}
    assert onto["words"]["n02"] == "n02"


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar(tmp_path, kind):
    spec = convert(kind, fx.cifar(tmp_path / kind, kind), tmp_path / "o", "--max-classes", 5)
    assert split_sizes(spec) == (0, 0, 5) and spec["counts"]["images"] == 10


def test_mnist_and_truncated_idx(tmp_path, capsys):
    inp = fx.mnist(tmp_path / "mn")
    spec = convert("mnist", inp, tmp_path / "o")
    assert split_sizes(spec) == (0, 0, 10) and spec["counts"]["images"] == 20
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "20 images written, expected 10000" in result["warnings"][0]  # published count differs: a warning
    import gzip
    raw = gzip.open(inp / "t10k-images-idx3-ubyte.gz").read()
    with gzip.open(inp / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[:-5])
    assert main(["mnist", "--input", str(inp), "--output", str(tmp_path / "p")]) == 2
    assert "t10k-images-idx3-ubyte.gz: truncated" in capsys.readouterr().err


def test_imagefolder_splits_corrupt_strict_and_min_count(tmp_path, capsys):
    inp = fx.imagefolder(tmp_path / "pets", classes=[f"k{i}" for i in range(10)])
    spec = convert("imagefolder", inp, tmp_path / "o", "--splits", "train=0.6,val=0.2,test=0.2")
    assert spec["name"] == "pets" and split_sizes(spec) == (6, 2, 2)
    c = spec["classes"][0]
    with open(tmp_path / "o" / c["shard"], "rb") as f:
        f.seek(c["members"][0][0])
        assert f.read(c["members"][0][1]) == (inp / c["name"] / "0.jpg").read_bytes()
    (inp / "k3" / "1.jpg").write_bytes(b"garbage")
    spec = convert("imagefolder", inp, tmp_path / "p")
    assert split_sizes(spec) == (0, 0, 10) and spec["skipped"][0]["path"] == str(inp / "k3" / "1.jpg")
    assert main(["imagefolder", "--input", str(inp), "--output", str(tmp_path / "q"), "--strict"]) == 2
    assert f"corrupt image {inp / 'k3' / '1.jpg'}" in capsys.readouterr().err
    assert main(["imagefolder", "--input", str(inp), "--output", str(tmp_path / "r"), "--min-count", "3"]) == 2
    assert "class 'k3' of pets has 2 readable images, below the minimum of 3" in capsys.readouterr().err
    # the output of another dataset is refused
    assert main(["dtd", "--input", str(fx.dtd(tmp_path / "d")), "--output", str(tmp_path / "p"), "--partial"]) == 2
    assert "already holds dataset 'pets'" in capsys.readouterr().err


def test_cli_help_lists_sources_and_offline_unknown_domain(tmp_path):
    r = subprocess.run([sys.executable, "-m", "data_tools.cli", "--help"], capture_output=True, text=True, cwd=ROOT,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0
    for s in ("md_tfrecords", "pmf_h5", "ilsvrc_2012", "quickdraw", "imagefolder", "offline-all"):
        assert s in r.stdout
    r = subprocess.run([sys.executable, "-m", "data_tools.cli", "offline:no_such_domain", "--output",
                        str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "smat-convert: error:" in r.stderr
    assert "no_such_domain" in r.stderr or "offline" in r.stderr


def test_offline_only_flags_are_refused_for_other_sources(tmp_path, capsys):
    inp = fx.imagefolder(tmp_path / "pets")
    assert main(["imagefolder", "--input", str(inp), "--output", str(tmp_path / "o"), "--image-size", "32"]) == 2
    assert "--image-size only apply to offline" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
