"""Original downloads -> the dataset Meta-Dataset's own converter writes: class names, label order, splits,
per-class counts and image order, with MD's published split files (shipped in data_tools/md_aux/splits)
and without them (MD's seeded rule, which reproduces those files)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

import tests.fixtures_md_raw as raw
from data_tools.cli import main
from tests.unit.test_convert_writer import check_shards


def convert(capsys, source, inp, out, *extra) -> tuple[dict, dict]:
    """(spec.json, the printed result) of a conversion that must succeed; the shards are checked member by
    member when small (check_shards rescans a shard per class)."""
    rc = main([source, "--input", str(inp), "--output", str(out), *map(str, extra)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    spec = json.loads((out / "spec.json").read_text())
    if len(spec["classes"]) <= 50:
        check_shards(out)
    return spec, json.loads(printed.out.strip().splitlines()[-1])


def refused(capsys, source, inp, out, *extra) -> str:
    had_spec = (out / "spec.json").exists()
    assert main([source, "--input", str(inp), "--output", str(out), *map(str, extra)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (out / "spec.json").exists() == had_spec
    return err[-1]


def listing(spec: dict) -> list[tuple[str, str]]:
    return [(c["name"], c["split"]) for c in spec["classes"]]


def member(out, spec: dict, label: int, i: int = 0) -> bytes:
    c = spec["classes"][label]
    off, size, _ = c["members"][i]
    with open(out / c["shard"], "rb") as f:
        f.seek(off)
        return f.read(size)


BUILDERS = {
    "dtd": lambda root: raw.dtd(root, sorted(raw.md_names("dtd"))),
    "vgg_flower": lambda root: raw.vgg_flower(root, [k % 102 + 1 for k in range(102)]),
    "cu_birds": lambda root: raw.cu_birds(root, raw.md_names("cu_birds")),
    "aircraft": lambda root: raw.aircraft(root, sorted(raw.md_names("aircraft"))),
    "quickdraw": lambda root: raw.quickdraw(root, raw.md_names("quickdraw")),
    "mscoco": lambda root: raw.mscoco(root, raw.COCO_CATEGORIES),
    "traffic_sign": lambda root: raw.traffic_sign(root, list(range(43))),
}


@pytest.mark.parametrize("source", sorted(BUILDERS))
def test_full_source_gives_md_names_splits_and_labels(tmp_path, capsys, source):
    inp = BUILDERS[source](tmp_path / "in")
    expected = raw.md_listing(source)
    with_file, result = convert(capsys, source, inp, tmp_path / "a", "--split-file", raw.split_file(source))
    assert listing(with_file) == expected
    # the only warning: the fixture holds fewer images than the real dataset (when MD publishes a total)
    assert all("images written, expected" in w for w in result["warnings"])
    per_class = 2 if source == "aircraft" else 1
    assert [c["count"] for c in with_file["classes"]] == [per_class] * len(expected)
    seeded, _ = convert(capsys, source, inp, tmp_path / "b")  # MD's rule, seed 22: the same file
    assert listing(seeded) == expected


def test_md_split_file_names_an_absent_class_and_partial_keeps_md_labels_order(tmp_path, capsys):
    inp = raw.vgg_flower(tmp_path / "in", [1, 90, 5, 10, 90, 38])  # 3 train, 1 valid, 1 test class
    present = {"001.pink primrose", "090.canna lily", "005.english marigold", "010.globe thistle",
               "038.great masterwort"}
    first_absent = next(n for n, _ in raw.md_listing("vgg_flower") if n not in present)
    err = refused(capsys, "vgg_flower", inp, tmp_path / "x", "--split-file", raw.split_file("vgg_flower"))
    assert f"split file {raw.split_file('vgg_flower')}: class '{first_absent}' of split 'train' is not in the " \
           f"input (97 of 102 listed classes are missing); pass --partial" in err
    spec, result = convert(capsys, "vgg_flower", inp, tmp_path / "o", "--partial",
                           "--split-file", raw.split_file("vgg_flower"))
    assert listing(spec) == [(n, s) for n, s in raw.md_listing("vgg_flower") if n in present]
    assert spec["classes"][0]["name"] == "090.canna lily" and spec["classes"][0]["count"] == 2
    assert result["classes_missing"] == 97
    assert "vgg_flower: --partial: 97 of 102 Meta-Dataset classes are not in the input" in result["warnings"][0]
    # without the file: MD's seeded rule over the 102 names, the same labels
    seeded, _ = convert(capsys, "vgg_flower", inp, tmp_path / "p", "--partial")
    assert listing(seeded) == listing(spec)


def test_fungi_names_order_of_images_and_partial(tmp_path, capsys):
    expected = raw.md_listing("fungi")
    cats = sorted((int(n[:4]), n[5:]) for n, _ in expected)
    picks = [expected[0][0], expected[1][0], expected[994][0], expected[-1][0]]  # train, train, valid, test
    ids = [int(n[:4]) for n in picks]
    images = [(ids[0], "train"), (ids[1], "train"), (ids[0], "val"), (ids[2], "train"), (ids[3], "val"),
              (ids[0], "train")]
    inp = raw.fungi(tmp_path / "in", cats, images)
    spec, result = convert(capsys, "fungi", inp, tmp_path / "o", "--partial", "--split-file", raw.split_file("fungi"))
    assert listing(spec) == [(n, s) for n, s in expected if n in picks]
    assert result["classes_missing"] == 1394 - 4
    # MD lists a class's images in image-list order: train.json's, then val.json's
    first = spec["classes"][0]
    assert first["count"] == 3
    assert [member(tmp_path / "o", spec, 0, i) for i in range(3)] == [
        (inp / f"images/{ids[0]:04d}/{k:05d}.JPG").read_bytes() for k in (0, 5, 2)]
    seeded, _ = convert(capsys, "fungi", inp, tmp_path / "p", "--partial")
    assert listing(seeded) == listing(spec)


def test_traffic_sign_images_in_mds_seeded_order(tmp_path, capsys):
    inp = raw.traffic_sign(tmp_path / "in", [0, 14], per_class=6)
    spec, _ = convert(capsys, "traffic_sign", inp, tmp_path / "o", "--partial")
    assert listing(spec) == [("00.Speed limit (20km/h)", "test"), ("14.Stop", "test")]
    # MD: sorted file names (GT-00014.csv skipped), shuffled with RandomState(22 + 1)
    files = sorted(p.name for p in (inp / "Final_Training/Images/00014").glob("*.ppm"))
    np.random.RandomState(23).shuffle(files)
    got = [np.asarray(Image.open(io.BytesIO(member(tmp_path / "o", spec, 1, i)))) for i in range(6)]
    want = [np.asarray(Image.open(inp / "Final_Training/Images/00014" / f).convert("RGB")) for f in files]
    assert all(np.array_equal(g, w) for g, w in zip(got, want)) and files != sorted(files)


def test_dtd_grayscale_jpeg_becomes_rgb_and_rgb_jpeg_is_kept_byte_for_byte(tmp_path, capsys):
    names = sorted(raw.md_names("dtd"))
    inp = raw.dtd(tmp_path / "in", names, gray=("banded",))
    spec, _ = convert(capsys, "dtd", inp, tmp_path / "o")
    label = {c["name"]: c["label"] for c in spec["classes"]}
    gray = Image.open(io.BytesIO(member(tmp_path / "o", spec, label["banded"])))
    assert gray.mode == "RGB" and gray.format == "PNG"   # MD: RGB (as JPEG); here the same pixels, lossless
    src = Image.open(inp / "images/banded/banded_0001.jpg")
    assert np.array_equal(np.asarray(gray), np.asarray(src.convert("RGB")))
    kept = (inp / "images/chequered/chequered_0001.jpg").read_bytes()
    assert member(tmp_path / "o", spec, label["chequered"]) == kept


def test_omniglot_class_names_as_md_and_split_file_refused(tmp_path, capsys):
    from tests.fixtures_layouts import omniglot

    inp = omniglot(tmp_path / "om")
    err = refused(capsys, "omniglot", inp, tmp_path / "x", "--split-file", raw.split_file("dtd"))
    assert "--split-file does not apply to omniglot" in err
    err = refused(capsys, "omniglot", inp, tmp_path / "y")
    assert "expected 30 and 20 (pass --partial for a subset)" in err
    spec, result = convert(capsys, "omniglot", inp, tmp_path / "o", "--partial")
    assert spec["classes"][0]["name"] == "Greek-character01" and result["classes_missing"] == 1623 - 8


def test_md_spec_gives_the_split_and_checks_counts(tmp_path, capsys):
    names = sorted(raw.md_names("dtd"))
    inp = raw.dtd(tmp_path / "in", names)
    lst = raw.md_listing("dtd")
    spec_json = {"name": "dtd", "__class__": "DatasetSpecification", "path": "x", "file_pattern": "{}.tfrecords",
                 "classes_per_split": {"TRAIN": 33, "VALID": 7, "TEST": 7},
                 "class_names": {str(i): n for i, (n, _) in enumerate(lst)},
                 "images_per_class": {str(i): 1 for i in range(47)}}
    spec_json["images_per_class"]["3"] = 2
    md_spec = tmp_path / "dtd_dataset_spec.json"
    md_spec.write_text(json.dumps(spec_json))
    spec, result = convert(capsys, "dtd", inp, tmp_path / "o", "--md-spec", md_spec)
    assert listing(spec) == lst
    assert f"1 classes differ from the expected image count, e.g. {lst[3][0]}: 1 (expected 2)" in result["warnings"][-1]
    # a spec that disagrees with MD's split file on a class's split is refused, naming the class
    spec_json["classes_per_split"] = {"TRAIN": 32, "VALID": 8, "TEST": 7}
    md_spec.write_text(json.dumps(spec_json))
    err = refused(capsys, "dtd", inp, tmp_path / "x", "--md-spec", md_spec, "--split-file", raw.split_file("dtd"))
    assert f"--md-spec {md_spec}: class {lst[32][0]!r} of split 'train' is of split 'val' in the spec" in err


@pytest.mark.parametrize("source,flag,value", [
    ("md_tfrecords", "--md-spec", "x.json"), ("pmf_h5", "--split-file", "x.json"), ("imagefolder", "--partial", None),
    ("ilsvrc_2012", "--split-file", "x.json"), ("dtd", "--keep-duplicates", None), ("cifar10", "--seed", "3"),
    ("dtd", "--splits", "train=1"),
])
def test_flags_that_do_not_apply_are_refused(tmp_path, capsys, source, flag, value):
    (tmp_path / "in").mkdir()
    err = refused(capsys, source, tmp_path / "in", tmp_path / "o", flag, *([value] if value else []))
    assert f"{flag} does not apply to {source}; it is for " in err


def test_a_subset_refusal_names_partial(tmp_path, capsys):
    inp = raw.dtd(tmp_path / "in", sorted(raw.md_names("dtd"))[:10])
    err = refused(capsys, "dtd", inp, tmp_path / "x")
    assert "found 10 classes in the input, Meta-Dataset has 47" in err and "Pass --partial" in err
    err = refused(capsys, "dtd", inp, tmp_path / "y", "--split-file", raw.split_file("dtd"))
    assert "is not in the input (37 of 47 listed classes are missing); pass --partial" in err


def ilsvrc_with_a_duplicate(tmp_path):
    """The 2/1/1-leaf ImageNet fixture plus one file MD's CUB list names, and a spec counting as MD does."""
    from tests.fixtures_layouts import ilsvrc, img, write

    train, spec_path = ilsvrc(tmp_path / "inet")
    listed = next(line.split("#")[0].strip() for line in
                  (raw.AUX_DIR / "ImageNet_CUBirds_duplicates.txt").read_text().splitlines()
                  if line.strip() and not line.startswith("#"))
    write(train / "n01" / listed.split("/")[1], img(99))  # MD matches the file name, whatever the folder
    spec = json.loads(spec_path.read_text())
    spec["images_per_class"] = {"TRAIN": {"n01": 2, "n02": 2}, "VALID": {"n03": 2}, "TEST": {"n04": 2}}
    spec_path.write_text(json.dumps(spec))
    return train, spec_path


def test_ilsvrc_drops_mds_duplicates_and_counts_them(tmp_path, capsys):
    train, spec_path = ilsvrc_with_a_duplicate(tmp_path)
    spec, result = convert(capsys, "ilsvrc_2012", train, tmp_path / "o", "--md-spec", spec_path, "--partial")
    assert [c["count"] for c in spec["classes"]] == [2, 2, 2, 2] and result["duplicates_dropped"] == 1
    assert not any("differ from the expected image count" in w for w in result["warnings"])
    # kept on request, loudly; the spec's count now disagrees and says so
    spec, result = convert(capsys, "ilsvrc_2012", train, tmp_path / "k", "--md-spec", spec_path, "--partial",
                           "--keep-duplicates")
    assert spec["classes"][0]["count"] == 3 and result["duplicates_kept"] == 1
    assert any("--keep-duplicates: 1 images that Meta-Dataset leaves out" in w for w in result["warnings"])
    assert any("n01: 3 (expected 2)" in w for w in result["warnings"])
    # the kept-duplicates output is not reused by a run that drops them
    err = refused(capsys, "ilsvrc_2012", train, tmp_path / "k", "--md-spec", spec_path, "--partial")
    assert "written with other settings: keep_duplicates: true there, false now" in err


def test_ilsvrc_duplicate_lists_from_an_md_checkout(tmp_path, capsys):
    train, spec_path = ilsvrc_with_a_duplicate(tmp_path)
    checkout = tmp_path / "md"
    checkout.mkdir()
    err = refused(capsys, "ilsvrc_2012", train, tmp_path / "x", "--md-spec", spec_path, "--partial",
                  "--md-duplicates", checkout)
    assert f"--md-duplicates {checkout}: no ImageNet_Caltech101_duplicates.txt, ImageNet_Caltech256_duplicates.txt, " \
           f"ImageNet_CUBirds_duplicates.txt there" in err
    for name in ("Caltech101", "Caltech256", "CUBirds"):
        (checkout / f"ImageNet_{name}_duplicates.txt").write_text("# nothing listed\n")
    spec, result = convert(capsys, "ilsvrc_2012", train, tmp_path / "o", "--md-spec", spec_path, "--partial",
                           "--md-duplicates", checkout)
    assert spec["classes"][0]["count"] == 3 and result["duplicates_dropped"] == 0


def test_omniglot_subset_of_characters_names_partial_and_md_spec_checks_alphabets(tmp_path, capsys):
    from data_tools.sources.md_originals import OMNIGLOT_VALID
    from tests.fixtures_layouts import img, write

    background = [f"Bg{i:02d}" for i in range(25)] + OMNIGLOT_VALID
    for split, alphabets in (("images_background", background), ("images_evaluation", [f"Ev{i:02d}" for i in
                                                                                         range(20)])):
        for a in alphabets:
            write(tmp_path / "om" / split / a / "character01" / "0001_01.png", img(len(a), fmt="PNG", mode="1"))
    err = refused(capsys, "omniglot", tmp_path / "om", tmp_path / "x")
    assert "expected train/val/test classes (883, 81, 659), the input gives (25, 5, 20); pass --partial" in err
    # MD's BiLevelDatasetSpecification for this tree: superclasses train, valid, test in MD's order
    order = [(a, "TRAIN") for a in background[:25]] + [(a, "VALID") for a in OMNIGLOT_VALID] + \
            [(f"Ev{i:02d}", "TEST") for i in range(20)]
    bilevel = {"name": "omniglot", "__class__": "BiLevelDatasetSpecification", "path": "x",
               "file_pattern": "{}.tfrecords",
               "superclasses_per_split": {"TRAIN": 25, "VALID": 5, "TEST": 20},
               "classes_per_superclass": {str(i): 1 for i in range(50)},
               "superclass_names": {str(i): a for i, (a, _) in enumerate(order)},
               "class_names": {str(i): f"{a}-character01" for i, (a, _) in enumerate(order)},
               "images_per_class": {str(i): 1 for i in range(50)}}
    spec_path = tmp_path / "omniglot_dataset_spec.json"
    spec_path.write_text(json.dumps(bilevel))
    spec, result = convert(capsys, "omniglot", tmp_path / "om", tmp_path / "o", "--partial", "--md-spec", spec_path)
    assert [c["name"] for c in spec["classes"]] == [f"{a}-character01" for a, _ in order]
    assert not any("expected image count" in w for w in result["warnings"])
    bilevel["superclass_names"]["0"], bilevel["superclass_names"]["1"] = order[1][0], order[0][0]
    bilevel["class_names"]["0"], bilevel["class_names"]["1"] = bilevel["class_names"]["1"], bilevel["class_names"]["0"]
    spec_path.write_text(json.dumps(bilevel))
    err = refused(capsys, "omniglot", tmp_path / "om", tmp_path / "y", "--partial", "--md-spec", spec_path)
    assert "label order differs at class 0: the input gives 'Bg00-character01', the spec 'Bg01-character01'" in err


def test_ilsvrc_partial_reports_the_missing_classes(tmp_path, capsys):
    import shutil

    train, spec_path = ilsvrc_with_a_duplicate(tmp_path)
    shutil.rmtree(train / "n03")
    err = refused(capsys, "ilsvrc_2012", train, tmp_path / "x", "--md-spec", spec_path)
    assert f"missing synset folder {train / 'n03'} (class of split val); pass --partial" in err
    _, result = convert(capsys, "ilsvrc_2012", train, tmp_path / "o", "--md-spec", spec_path, "--partial")
    assert result["classes_missing"] == 1
    assert "ilsvrc_2012: --partial: 1 of 4 Meta-Dataset classes are not in the input (train/val/test 2/0/1 of " \
           "2/1/1 converted)" in result["warnings"]
