"""The ten Meta-Dataset sources in their original download layouts, with MD's class splits and crops.

Each follows MD's dataset_to_records.py: which files make a class, class order, the seeded split (see
data_tools/splits.py), Omniglot's inversion, Aircraft's and MSCOCO's box crops. Images MD keeps as
stored are kept as stored; images MD transforms are re-encoded as PNG.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import ImageOps

from data_tools.sources.base import ClassPlan, Options, Plan, file_items, files_in, pil_item, require, subdirs
from data_tools.sources.md_common import md_split
from data_tools.sources.md_spec import load_md_spec
from data_tools.splits import MD_COUNTS
from data_tools.writer import ConversionError

# MD holds out these 5 smallest background alphabets for validation.
OMNIGLOT_VALID = ["Blackfoot_(Canadian_Aboriginal_Syllabics)", "Ojibwe_(Canadian_Aboriginal_Syllabics)",
                  "Inuktitut_(Canadian_Aboriginal_Syllabics)", "Tagalog", "Alphabet_of_the_Magi"]


def _expected(source: str) -> dict:
    c = MD_COUNTS[source]
    return {"expected_classes": c["classes"], "expected_images": c.get("images")}


def plan_omniglot(inp: Path, opts: Options) -> Plan:
    bg = require(inp / "images_background", "Omniglot background set")
    ev = require(inp / "images_evaluation", "Omniglot evaluation set")
    bg_alpha = subdirs(bg)
    train = [a for a in bg_alpha if a not in OMNIGLOT_VALID]
    valid = [a for a in OMNIGLOT_VALID if a in bg_alpha]

    def invert(im):
        return ImageOps.invert(im.convert("L"))  # MD: white background, black strokes

    classes = []
    for split, root, alphabets in (("train", bg, train), ("val", bg, valid), ("test", ev, subdirs(ev))):
        for a in alphabets:
            for ch in subdirs(root / a):
                paths = files_in(root / a / ch)
                classes.append(ClassPlan(f"{a}/{ch}", split,
                                         lambda p=paths: (pil_item(x, invert) for x in p), superclass=a))
    if not opts.extra.get("partial") and len(bg_alpha) + len(subdirs(ev)) != 50:
        raise ConversionError(f"omniglot: found {len(bg_alpha)} background and {len(subdirs(ev))} evaluation "
                              f"alphabets in {inp}, expected 30 and 20 (pass --partial for a subset)")
    return Plan("omniglot", classes, **_expected("omniglot"))


def plan_dtd(inp: Path, opts: Options) -> Plan:
    root = require(inp / "images", "DTD images folder")
    names = subdirs(root)  # MD's split indexes the sorted class folder names
    return Plan("dtd", [ClassPlan(names[k], s, file_items(files_in(root / names[k])))
                        for k, s in md_split("dtd", list(range(len(names))), opts)], **_expected("dtd"))


def plan_cu_birds(inp: Path, opts: Options) -> Plan:
    names = [line.split(" ", 1)[1].strip()
             for line in require(inp / "classes.txt", "CUB classes.txt").read_text().splitlines() if line.strip()]
    root = require(inp / "images", "CUB images folder")
    classes = []
    for k, split in md_split("cu_birds", list(range(len(names))), opts):
        folder = require(root / names[k], f"CUB class folder of {names[k]}")
        classes.append(ClassPlan(names[k], split, file_items(files_in(folder))))
    return Plan("cu_birds", classes, **_expected("cu_birds"))


def plan_aircraft(inp: Path, opts: Options) -> Plan:
    data = inp / "data"
    boxes = {}
    for line in require(data / "images_box.txt", "Aircraft box file").read_text().splitlines():
        if line.strip():
            name, *xyxy = line.split()
            boxes[name] = tuple(int(v) for v in xyxy)
    variants = defaultdict(list)
    for fname in ("images_variant_trainval.txt", "images_variant_test.txt"):
        for line in require(data / fname, "Aircraft variant file").read_text().splitlines():
            if line.strip():
                name, variant = line.split(" ", 1)
                variants[variant.strip()].append(name)
    names = sorted(variants)
    classes = []
    for k, split in md_split("aircraft", list(range(len(names))), opts):
        imgs = sorted(variants[names[k]])
        missing = [i for i in imgs if i not in boxes]
        if missing:
            raise ConversionError(f"aircraft: image {missing[0]} has no box in {data / 'images_box.txt'}")
        classes.append(ClassPlan(names[k], split, lambda ims=imgs: (
            pil_item(data / "images" / f"{i}.jpg", lambda im, b=boxes[i]: im.convert("RGB").crop(b)) for i in ims)))
    return Plan("aircraft", classes, **_expected("aircraft"))


def plan_quickdraw(inp: Path, opts: Options) -> Plan:
    files = sorted(p for p in inp.glob("*.npy"))
    if not files:
        raise ConversionError(f"quickdraw: no <class>.npy files in {inp}")
    names = sorted(p.name[:p.name.find(".")] for p in files)
    from data_tools.splits import md_fraction_counts, md_split_indices, ordered_by_split

    if opts.split_file:
        order = md_split("quickdraw", names, opts)
    else:  # MD's rule for quickdraw scales with the number of .npy files, so no --partial needed
        order = ordered_by_split(names, *md_split_indices(*md_fraction_counts(len(names)), seed=opts.seed))

    def items(name):
        def gen():
            path = inp / f"{name}.npy"
            arr = np.load(path, mmap_mode="r")
            if arr.ndim != 2 or int(np.sqrt(arr.shape[1])) ** 2 != arr.shape[1]:
                raise ConversionError(f"{path}: expected an (N, side*side) array, got shape {arr.shape}")
            side = int(np.sqrt(arr.shape[1]))
            for i in range(arr.shape[0]):
                row = np.asarray(arr[i])
                row = row.astype(np.uint8) * 255 if row.dtype == bool else row.astype(np.uint8)
                yield f"{path}#{i}", row.reshape(side, side)
        return gen
    classes = [ClassPlan(n, s, items(n)) for n, s in order]
    exp = {"expected_classes": MD_COUNTS["quickdraw"]["classes"]} if len(names) == 345 else {}
    return Plan("quickdraw", classes, **exp)


def plan_fungi(inp: Path, opts: Options) -> Plan:
    tr = json.loads(require(inp / "train.json", "Fungi train.json").read_text())
    va = json.loads(require(inp / "val.json", "Fungi val.json").read_text())
    cats = {c["id"]: c.get("name", str(c["id"])) for c in tr["categories"]}
    images = {im["id"]: im for im in tr["images"] + va["images"]}
    by_class = defaultdict(list)
    for ann in tr["annotations"] + va["annotations"]:
        if ann["image_id"] not in images:
            raise ConversionError(f"fungi: annotation for unknown image id {ann['image_id']}")
        by_class[ann["category_id"]].append(inp / images[ann["image_id"]]["file_name"])
    ids = sorted(cats)
    if ids != list(range(len(ids))):
        raise ConversionError(f"fungi: category ids in {inp / 'train.json'} are not 0..{len(ids) - 1}")
    return Plan("fungi", [ClassPlan(cats[k], s, file_items(by_class[k])) for k, s in md_split("fungi", ids, opts)],
                **_expected("fungi"))


def plan_vgg_flower(inp: Path, opts: Options) -> Plan:
    from scipy.io import loadmat

    mat = require(inp / "imagelabels.mat", "VGG Flower imagelabels.mat")
    labels = loadmat(mat)["labels"].ravel()
    paths = defaultdict(list)
    for i, lab in enumerate(labels):
        paths[int(lab)].append(require(inp / "jpg" / f"image_{i + 1:05d}.jpg", "VGG Flower image"))
    keys = sorted(paths)  # MD's split indices are 0-based over labels 1..102
    return Plan("vgg_flower", [ClassPlan(str(k), s, file_items(paths[k]))
                               for k, s in md_split("vgg_flower", keys, opts)], **_expected("vgg_flower"))


def plan_traffic_sign(inp: Path, opts: Options) -> Plan:
    root = require(inp / "Final_Training" / "Images", "GTSRB Final_Training/Images folder")
    names = subdirs(root)
    if len(names) != 43 and not opts.extra.get("partial"):
        raise ConversionError(f"traffic_sign: found {len(names)} class folders in {root}, expected 43")
    return Plan("traffic_sign", [ClassPlan(n, "test", file_items(files_in(root / n))) for n in names],
                **_expected("traffic_sign"))


def _coco_crop(bbox, ratio=1.2):
    """MD's rule: scale the (x, y, w, h) box by 1.2 about its centre, convert half-integer coordinates."""
    x, y, w, h = bbox
    x, y, w, h = x - 0.5 * w * (ratio - 1.0), y - 0.5 * h * (ratio - 1.0), w * ratio, h * ratio

    def crop(im):
        im = im.convert("RGB")
        W, H = im.size
        box = (max(int(round(x - 0.5)), 0), max(int(round(y - 0.5)), 0),
               min(int(round(x + w - 0.5)) + 1, W), min(int(round(y + h - 0.5)) + 1, H))
        if box[2] <= box[0] or box[3] <= box[1]:
            raise ValueError(f"empty crop {box} for box {bbox}")
        return im.crop(box)
    return crop


def plan_mscoco(inp: Path, opts: Options) -> Plan:
    ann_path = require(inp / "instances_train2017.json", "MSCOCO annotation file")
    img_dir = require(inp / "train2017", "MSCOCO train2017 image folder")
    data = json.loads(ann_path.read_text())
    cats = {c["id"]: c["name"] for c in data["categories"]}
    by_cat = defaultdict(list)
    for a in data["annotations"]:
        by_cat[a["category_id"]].append(a)
    # MD drew this split with an unseeded random.sample; pass MD's mscoco_splits.json as --split-file to
    # reproduce the published one. Without it we use the seeded rule (0/40/40) over sorted COCO ids.
    order = md_split("mscoco", sorted(cats), opts)

    def items(cid):
        return lambda: (pil_item(img_dir / f"{a['image_id']:012d}.jpg", _coco_crop(a["bbox"])) for a in by_cat[cid])
    return Plan("mscoco", [ClassPlan(cats[c], s, items(c)) for c, s in order],
                expected_classes=MD_COUNTS["mscoco"]["classes"])


def plan_ilsvrc_2012(inp: Path, opts: Options) -> Plan:
    """ImageNet train folder of synsets, split by a Meta-Dataset hierarchical spec (--md-spec).

    The spec (MD's published dataset_specs/ilsvrc_2012_dataset_spec.json: 712/158/130 classes, or
    ilsvrc_2012_v2_dataset_spec.json: all 1000 in train) holds each split's WordNet subgraph; its leaves are the
    classes, labelled as MD does, and each split's subgraph is recorded as that split's DAG ontology.
    """
    if opts.md_spec is None:
        raise ConversionError("ilsvrc_2012 needs --md-spec PATH: Meta-Dataset's ilsvrc_2012_dataset_spec.json "
                              "(dataset_conversion/dataset_specs/), which defines the 712/158/130 DAG split")
    md = load_md_spec(Path(opts.md_spec), need_names=False)
    if md.kind != "HierarchicalDatasetSpecification":
        raise ConversionError(f"--md-spec {opts.md_spec} is a {md.kind}, not the ILSVRC "
                              f"HierarchicalDatasetSpecification (no split_subgraphs)")
    present = set(subdirs(inp))
    classes = []
    for c in md.classes:
        if c.name not in present:
            if opts.extra.get("partial"):
                continue
            raise ConversionError(f"ilsvrc_2012: missing synset folder {inp / c.name} (class of split {c.split})")
        classes.append(ClassPlan(c.name, c.split, file_items(files_in(inp / c.name))))
    warnings = list(md.warnings)
    unlisted = sorted(present - {c.name for c in md.classes})
    if unlisted:
        warnings.append(f"ilsvrc_2012: {len(unlisted)} folders of {inp} are not classes of --md-spec "
                        f"{opts.md_spec} and are not converted: {', '.join(unlisted[:8])}"
                        f"{', ...' if len(unlisted) > 8 else ''}")
    return Plan(md.name or "ilsvrc_2012", classes, expected_classes=md.counts(), dag=md.dag, warnings=warnings)
