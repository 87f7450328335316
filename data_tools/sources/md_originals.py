"""The ten Meta-Dataset sources in their original download layouts, with MD's class names, splits and crops.

Each follows MD's dataset_to_records.py: which files make a class and in which order, MD's class names (which
its split files hold), the split (MD's split file or spec when given, else its seeded rule; see md_common.py),
Omniglot's inversion, Aircraft's and MSCOCO's box crops, GTSRB's seeded image order, ILSVRC's duplicate skips.
Where MD re-encodes an image (not an RGB JPEG, cropped, inverted, or an array) the writer stores the same
pixels as lossless PNG instead of MD's JPEG; docs/data_format.md lists each source's difference.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import ImageOps

from data_tools.sources.base import (ClassPlan, Options, Plan, files_in, md_file_items, pil_item, require,
                                     subdirs)
from data_tools.sources.md_common import check_md_spec, md_split
from data_tools.sources.md_lists import duplicate_files, label_names
from data_tools.sources.md_spec import load_md_spec
from data_tools.splits import MD_COUNTS, md_fraction_counts, md_split_indices, ordered_by_split
from data_tools.writer import ConversionError

# MD holds out these 5 smallest background alphabets for validation.
OMNIGLOT_VALID = ["Blackfoot_(Canadian_Aboriginal_Syllabics)", "Ojibwe_(Canadian_Aboriginal_Syllabics)",
                  "Inuktitut_(Canadian_Aboriginal_Syllabics)", "Tagalog", "Alphabet_of_the_Magi"]


def _plan(source: str, classes: list[ClassPlan], opts: Options, warnings: list[str]) -> Plan:
    c = MD_COUNTS[source]
    plan = Plan(source, classes, expected_classes=c["classes"], expected_images=c.get("images"), warnings=warnings)
    return check_md_spec(plan, opts)


def plan_omniglot(inp: Path, opts: Options) -> Plan:
    bg = require(inp / "images_background", "Omniglot background set")
    ev = require(inp / "images_evaluation", "Omniglot evaluation set")
    bg_alpha = subdirs(bg)
    train = [a for a in bg_alpha if a not in OMNIGLOT_VALID]
    valid = [a for a in OMNIGLOT_VALID if a in bg_alpha]  # in MD's listed order, not sorted

    def invert(im):
        return ImageOps.invert(im.convert("L"))  # MD: white background, black strokes

    classes = []
    for split, root, alphabets in (("train", bg, train), ("val", bg, valid), ("test", ev, subdirs(ev))):
        for a in alphabets:
            for ch in subdirs(root / a):
                paths = files_in(root / a / ch)
                classes.append(ClassPlan(f"{a}-{ch}", split,  # MD's class name: '<alphabet>-<character>'
                                         lambda p=paths: (pil_item(x, invert) for x in p), superclass=a))
    if not opts.extra.get("partial") and len(bg_alpha) + len(subdirs(ev)) != 50:
        raise ConversionError(f"omniglot: found {len(bg_alpha)} background and {len(subdirs(ev))} evaluation "
                              f"alphabets in {inp}, expected 30 and 20 (pass --partial for a subset)")
    return _plan("omniglot", classes, opts, [])


def plan_dtd(inp: Path, opts: Options) -> Plan:
    root = require(inp / "images", "DTD images folder")
    names = subdirs(root)  # MD's split indexes the sorted class folder names
    order, warnings = md_split("dtd", names, opts)
    return _plan("dtd", [ClassPlan(n, s, md_file_items(files_in(root / n))) for n, s in order], opts, warnings)


def plan_cu_birds(inp: Path, opts: Options) -> Plan:
    lines = require(inp / "classes.txt", "CUB classes.txt").read_text().splitlines()
    names = [line.split()[1] for line in lines if line.strip()]  # '<id> <NNN.Name>': MD's names are NNN.Name
    root = require(inp / "images", "CUB images folder")
    order, warnings = md_split("cu_birds", names, opts, present={n for n in names if (root / n).is_dir()})
    return _plan("cu_birds", [ClassPlan(n, s, md_file_items(files_in(root / n))) for n, s in order], opts,
                 warnings)


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
    # MD's seeded split indexes the sorted lines of data/variants.txt (the same set as the image files give)
    listed = data / "variants.txt"
    names = sorted({v.strip() for v in listed.read_text().splitlines() if v.strip()} if listed.exists()
                   else variants)
    order, warnings = md_split("aircraft", names, opts, present=set(variants))
    classes = []
    for n, split in order:
        imgs = sorted(variants[n])
        missing = [i for i in imgs if i not in boxes]
        if missing:
            raise ConversionError(f"aircraft: image {missing[0]} has no box in {data / 'images_box.txt'}")
        classes.append(ClassPlan(n, split, lambda ims=imgs: (
            pil_item(data / "images" / f"{i}.jpg", lambda im, b=boxes[i]: im.convert("RGB").crop(b)) for i in ims)))
    return _plan("aircraft", classes, opts, warnings)


def plan_quickdraw(inp: Path, opts: Options) -> Plan:
    files = sorted(p for p in inp.glob("*.npy"))
    if not files:
        raise ConversionError(f"quickdraw: no <class>.npy files in {inp}")
    names = sorted(p.name[:p.name.find(".")] for p in files)
    if opts.split_file or opts.md_spec:
        order, warnings = md_split("quickdraw", names, opts)
    else:  # MD's rule for quickdraw scales with the number of .npy files, so no --partial needed
        order = ordered_by_split(names, *md_split_indices(*md_fraction_counts(len(names)), seed=opts.seed))
        warnings = []

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
    plan = Plan("quickdraw", [ClassPlan(n, s, items(n)) for n, s in order], warnings=warnings)
    if len(names) == sum(MD_COUNTS["quickdraw"]["classes"]):
        plan.expected_classes = MD_COUNTS["quickdraw"]["classes"]
    return check_md_spec(plan, opts)


def plan_fungi(inp: Path, opts: Options) -> Plan:
    tr = json.loads(require(inp / "train.json", "Fungi train.json").read_text())
    va = json.loads(require(inp / "val.json", "Fungi val.json").read_text())
    cats = sorted(tr["categories"], key=lambda c: c["id"])
    if [c["id"] for c in cats] != list(range(len(cats))):
        raise ConversionError(f"fungi: category ids in {inp / 'train.json'} are not 0..{len(cats) - 1}")
    names = [f"{c['id']:04d}.{c['name']}" for c in cats]  # MD's class names
    class_of = {}
    for ann in tr["annotations"] + va["annotations"]:
        if ann["image_id"] in class_of:
            raise ConversionError(f"fungi: image id {ann['image_id']} has two annotations (MD expects one)")
        class_of[ann["image_id"]] = ann["category_id"]
    by_class = defaultdict(list)
    for im in tr["images"] + va["images"]:  # MD lists a class's images in the order of the image lists
        if im["id"] not in class_of:
            raise ConversionError(f"fungi: image id {im['id']} ({im['file_name']}) has no annotation")
        by_class[names[class_of[im["id"]]]].append(inp / im["file_name"])
    order, warnings = md_split("fungi", names, opts, present=set(by_class))
    return _plan("fungi", [ClassPlan(n, s, md_file_items(by_class[n])) for n, s in order], opts, warnings)


def plan_vgg_flower(inp: Path, opts: Options) -> Plan:
    from scipy.io import loadmat

    mat = require(inp / "imagelabels.mat", "VGG Flower imagelabels.mat")
    labels = loadmat(mat)["labels"].ravel()
    names = [f"{i + 1:03d}.{n}" for i, n in enumerate(label_names("VggFlower_labels.txt"))]  # '090.canna lily'
    paths = defaultdict(list)
    for i, lab in enumerate(labels):
        if not 1 <= int(lab) <= len(names):
            raise ConversionError(f"{mat}: image {i + 1} has label {int(lab)}, outside 1..{len(names)}")
        paths[names[int(lab) - 1]].append(require(inp / "jpg" / f"image_{i + 1:05d}.jpg", "VGG Flower image"))
    order, warnings = md_split("vgg_flower", names, opts, present=set(paths))
    return _plan("vgg_flower", [ClassPlan(n, s, md_file_items(paths[n])) for n, s in order], opts, warnings)


def plan_traffic_sign(inp: Path, opts: Options) -> Plan:
    root = require(inp / "Final_Training" / "Images", "GTSRB Final_Training/Images folder")
    names = [f"{i:02d}.{n}" for i, n in enumerate(label_names("TrafficSign_labels.txt"))]  # '00.Speed limit ...'

    def folder(name: str) -> Path:
        return root / f"{int(name.split('.', 1)[0]):05d}"
    order, warnings = md_split("traffic_sign", names, opts, present={n for n in names if folder(n).is_dir()})

    def items(name: str):
        def gen():
            # MD: the folder's files but GT-<id>.csv, sorted, then shuffled with RandomState(seed + 1)
            paths = [str(p) for p in files_in(folder(name))]
            np.random.RandomState(opts.seed + 1).shuffle(paths)
            return md_file_items([Path(p) for p in paths])()
        return gen
    return _plan("traffic_sign", [ClassPlan(n, s, items(n)) for n, s in order], opts, warnings)


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
    names = [c["name"] for c in data["categories"]]  # MD's seeded rule indexes the categories in file order
    name_of = {c["id"]: c["name"] for c in data["categories"]}
    by_name = defaultdict(list)
    for a in data["annotations"]:  # MD writes a class's crops in annotation order
        if a["category_id"] not in name_of:
            raise ConversionError(f"{ann_path}: annotation {a.get('id')} has unknown category_id {a['category_id']}")
        by_name[name_of[a["category_id"]]].append(a)
    order, warnings = md_split("mscoco", names, opts, present=set(by_name))

    def items(name):
        return lambda: (pil_item(img_dir / f"{a['image_id']:012d}.jpg", _coco_crop(a["bbox"])) for a in by_name[name])
    return _plan("mscoco", [ClassPlan(n, s, items(n)) for n, s in order], opts, warnings)


def plan_ilsvrc_2012(inp: Path, opts: Options) -> Plan:
    """ImageNet train folder of synsets, split by a Meta-Dataset hierarchical spec (--md-spec).

    The spec (MD's published dataset_specs/ilsvrc_2012_dataset_spec.json: 712/158/130 classes, or
    ilsvrc_2012_v2_dataset_spec.json: all 1000 in train) holds each split's WordNet subgraph; its leaves are the
    classes, labelled as MD does, and each split's subgraph is recorded as that split's DAG ontology. As MD, the
    images its duplicate lists name (also in Caltech-101/256 or CUB, other datasets' test data) are left out
    unless --keep-duplicates.
    """
    if opts.md_spec is None:
        raise ConversionError("ilsvrc_2012 needs --md-spec PATH: Meta-Dataset's ilsvrc_2012_dataset_spec.json "
                              "(dataset_conversion/dataset_specs/), which defines the 712/158/130 DAG split")
    md = load_md_spec(Path(opts.md_spec), need_names=False)
    if md.kind != "HierarchicalDatasetSpecification":
        raise ConversionError(f"--md-spec {opts.md_spec} is a {md.kind}, not the ILSVRC "
                              f"HierarchicalDatasetSpecification (no split_subgraphs)")
    keep = bool(opts.extra.get("keep_duplicates"))
    duplicates = duplicate_files(opts.extra.get("md_duplicates"))
    present = set(subdirs(inp))
    classes, n_dups = [], 0
    for c in md.classes:
        if c.name not in present:
            if opts.extra.get("partial"):
                continue
            raise ConversionError(f"ilsvrc_2012: missing synset folder {inp / c.name} (class of split {c.split}); "
                                  f"pass --partial to convert a subset")
        files = files_in(inp / c.name)
        dups = sum(1 for p in files if p.name in duplicates)  # MD matches file names, not paths
        n_dups += dups
        if dups and not keep:
            files = [p for p in files if p.name not in duplicates]
        classes.append(ClassPlan(c.name, c.split, md_file_items(files)))
    warnings = list(md.warnings)
    unlisted = sorted(present - {c.name for c in md.classes})
    if unlisted:
        warnings.append(f"ilsvrc_2012: {len(unlisted)} folders of {inp} are not classes of --md-spec "
                        f"{opts.md_spec} and are not converted: {', '.join(unlisted[:8])}"
                        f"{', ...' if len(unlisted) > 8 else ''}")
    if keep:
        warnings.append(f"ilsvrc_2012: --keep-duplicates: {n_dups} images that Meta-Dataset leaves out as "
                        f"duplicates of Caltech-101/256 and CUB images are kept; those datasets' test images are "
                        f"now also training images, and counts differ from Meta-Dataset's spec")
    per_class = {md.classes[lab].name: n for lab, n in md.per_class.items()} or None
    return Plan(md.name or "ilsvrc_2012", classes, expected_classes=md.counts(), dag=md.dag, warnings=warnings,
                expected_per_class=per_class, report={"duplicates_kept" if keep else "duplicates_dropped": n_dups})
