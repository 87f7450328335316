"""The P>M>F route: h5 files as P>M>F's scripts/convert_tfrecord_to_h5.py writes them from MD's records give
what the md_tfrecords route gives (same classes, same image order, same pixels), and damage is named.

P>M>F's layout (written here with h5py, not with our code): one ``<label>.h5`` per class beside
dataset_spec.json, groups "0".."n-1" in the order its shuffling reader met the records, each holding
``image`` (decoded uint8 HxWx3; resized to 224x224 when both sides are at least 224), ``label`` and ``id``
(the record's byte offset in MD's TFRecord file).
"""
from __future__ import annotations

import io
import json
import shutil
import struct
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

import tests.fixtures_md as md
from data_tools.cli import main
from tests.unit.test_convert_writer import check_shards

NAMES = {"TRAIN": ["alpha", "beta"], "VALID": ["gamma"], "TEST": ["delta"]}


def record_offsets(path: Path) -> list[tuple[int, bytes]]:
    """(byte offset, tf.train.Example bytes) of each record, read from the TFRecord framing."""
    data, out, pos = path.read_bytes(), [], 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        out.append((pos, data[pos + 12:pos + 12 + length]))
        pos += 12 + length + 4
    return out


def pmf_folder(records: Path, root: Path, big: int | None = None) -> Path:
    """P>M>F's h5 files from an MD records folder, groups in a shuffled order; class ``big``'s first image
    stands for one P>M>F resized (stored 224x224)."""
    root.mkdir(parents=True)
    shutil.copy(records / "dataset_spec.json", root / "dataset_spec.json")
    n = len(json.loads((records / "dataset_spec.json").read_text())["class_names"])
    for label in range(n):
        recs = record_offsets(records / f"{label}.tfrecords")
        images = [md.image_bytes(label, i) for i in range(len(recs))]  # what records_folder wrote, in order
        perm = np.random.RandomState(label).permutation(len(recs))
        with h5py.File(root / f"{label}.h5", "w", libver="latest") as f:
            for j, r in enumerate(perm):
                pixels = np.asarray(Image.open(io.BytesIO(images[r])).convert("RGB"))
                if label == big and r == 0:
                    pixels = np.asarray(Image.fromarray(pixels).resize((224, 224)))
                g = f.create_group(str(j))
                g.create_dataset("image", data=pixels)
                g.create_dataset("label", data=np.array(label))
                g.create_dataset("id", data=np.array(recs[r][0]))
    return root


def run(capsys, *argv) -> tuple[int, dict | None, str]:
    rc = main([*map(str, argv)])
    out = capsys.readouterr()
    return rc, (json.loads(out.out.strip().splitlines()[-1]) if rc == 0 else None), out.err


def pixels(out: Path, spec: dict) -> list[list[np.ndarray]]:
    got = []
    for c in spec["classes"]:
        with open(out / c["shard"], "rb") as f:
            row = []
            for off, size, _ in c["members"]:
                f.seek(off)
                row.append(np.asarray(Image.open(io.BytesIO(f.read(size))).convert("RGB")))
        got.append(row)
    return got


def test_pmf_h5_gives_md_record_order_names_and_pixels(tmp_path, capsys):
    records = md.records_folder(tmp_path / "rec", md.plain_spec("dtd", NAMES))
    h5 = pmf_folder(records, tmp_path / "h5")
    (h5 / "val_ep120_img128.h5").write_bytes(b"P>M>F's validation episodes, not a class")
    rc, _, err = run(capsys, "md_tfrecords", "--input", records, "--output", tmp_path / "a")
    assert rc == 0, err
    rc, result, err = run(capsys, "pmf_h5", "--input", h5, "--output", tmp_path / "b")
    assert rc == 0, err
    assert result["warnings"] == []  # the episodes file is not taken for a class file
    a, b = check_shards(tmp_path / "a"), check_shards(tmp_path / "b")
    assert [(c["name"], c["split"], c["count"]) for c in a["classes"]] == \
           [(c["name"], c["split"], c["count"]) for c in b["classes"]]
    pa, pb = pixels(tmp_path / "a", a), pixels(tmp_path / "b", b)
    assert all(np.array_equal(x, y) for ra, rb in zip(pa, pb) for x, y in zip(ra, rb))
    assert "notes" not in b


def test_pmf_resized_images_are_noted_in_the_spec_and_warned(tmp_path, capsys):
    records = md.records_folder(tmp_path / "rec", md.plain_spec("dtd", NAMES))
    h5 = pmf_folder(records, tmp_path / "h5", big=2)
    rc, result, err = run(capsys, "pmf_h5", "--input", h5, "--output", tmp_path / "o")
    assert rc == 0, err
    note = json.loads((tmp_path / "o" / "spec.json").read_text())["notes"][0]
    assert note.startswith("dtd: 1 of 15 images are 224x224: P>M>F's convert_tfrecord_to_h5.py resized")
    assert note in result["warnings"] and note in err


def test_swapped_class_files_fail_on_the_label(tmp_path, capsys):
    h5 = pmf_folder(md.records_folder(tmp_path / "rec", md.plain_spec("dtd", NAMES)), tmp_path / "h5")
    (h5 / "0.h5").rename(h5 / "x.h5")
    (h5 / "1.h5").rename(h5 / "0.h5")
    (h5 / "x.h5").rename(h5 / "1.h5")
    rc, _, err = run(capsys, "pmf_h5", "--input", h5, "--output", tmp_path / "o")
    assert rc == 2 and f"{h5 / '0.h5'}: group '0' has label 1, expected 0" in err


def damage_header(path: Path, group: str, member: str | None) -> None:
    """Flip a byte inside the object header of a group (or of one of its datasets): HDF5 checksums it."""
    with h5py.File(path, "r") as f:
        obj = f[group] if member is None else f[group][member]
        addr = h5py.h5o.get_info(obj.id).addr
    data = bytearray(path.read_bytes())
    data[addr + 8] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_h5_structure_is_a_named_error_and_a_damaged_image_a_skip(tmp_path, capsys):
    h5 = pmf_folder(md.records_folder(tmp_path / "rec", md.plain_spec("dtd", NAMES)), tmp_path / "h5")
    damage_header(h5 / "2.h5", "1", "image")
    rc, result, err = run(capsys, "pmf_h5", "--input", h5, "--output", tmp_path / "o")
    assert rc == 0, err
    spec = json.loads((tmp_path / "o" / "spec.json").read_text())
    assert spec["skipped"][0]["path"] == f"{h5 / '2.h5'}#1" and "unreadable h5 image" in spec["skipped"][0]["reason"]
    assert spec["classes"][2]["count"] == md.count_of(2) - 1
    rc, _, err = run(capsys, "pmf_h5", "--input", h5, "--output", tmp_path / "s", "--strict")
    assert rc == 2 and f"corrupt image {h5 / '2.h5'}#1" in err
    good = (h5 / "1.h5").read_bytes()
    damage_header(h5 / "1.h5", "2", "label")
    rc, _, err = run(capsys, "pmf_h5", "--input", h5, "--output", tmp_path / "p")
    assert rc == 2 and f"damaged h5 file {h5 / '1.h5'} at group '2': KeyError" in err
    (h5 / "1.h5").write_bytes(good)
    (h5 / "3.h5").write_bytes((h5 / "3.h5").read_bytes()[:300])
    rc, _, err = run(capsys, "pmf_h5", "--input", h5, "--output", tmp_path / "q")
    assert rc == 2 and f"h5 file {h5 / '3.h5'}" in err and "Traceback" not in err


def test_pmf_data_root_says_to_convert_each_domain(tmp_path, capsys):
    root = tmp_path / "pmf_root"
    pmf_folder(md.records_folder(tmp_path / "rec", md.plain_spec("dtd", NAMES)), root / "dtd")
    shutil.copytree(root / "dtd", root / "vgg_flower")
    rc, _, err = run(capsys, "pmf_h5", "--input", root, "--output", tmp_path / "o")
    assert rc == 2
    assert f"{root} is a data root holding one dataset per folder (dtd, vgg_flower); convert each folder on its " \
           f"own, e.g. smat-convert pmf_h5 --input {root / 'dtd'} --output <OUT>/dtd" in err
