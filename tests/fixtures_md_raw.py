"""Raw trees in the original download layouts that Meta-Dataset's converter reads (dataset_to_records.py),
named with the real class names from MD's published split files, one tiny image per class unless asked.

The expected MD output is written from MD's rules, not from our converter: MD labels the classes in the
order of its split file (train, valid, test) and names them as the file does.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from data_tools.sources.md_lists import AUX_DIR
from tests.fixtures_layouts import write

SPLIT_FILES = AUX_DIR / "splits"


def split_file(source: str) -> Path:
    return SPLIT_FILES / f"{source}_splits.json"


def md_listing(source: str) -> list[tuple[str, str]]:
    """MD's (class name, split) in label order, as its converter assigns them from the split file."""
    d = json.loads(split_file(source).read_text())
    return [(n, s) for key, s in (("train", "train"), ("valid", "val"), ("test", "test")) for n in d[key]]


def md_names(source: str) -> list[str]:
    return [n for n, _ in md_listing(source)]


def jpeg(seed: int, mode: str = "RGB", size=(8, 6)) -> bytes:
    rng = np.random.RandomState(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buf = io.BytesIO()
    Image.fromarray(rng.randint(0, 255, shape, dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def dtd(root: Path, names: list[str], gray: tuple[str, ...] = ()) -> Path:
    """images/<class>/<class>_0001.jpg; classes in ``gray`` get a grayscale JPEG (DTD has a few)."""
    for i, n in enumerate(names):
        write(root / "images" / n / f"{n}_0001.jpg", jpeg(i, "L" if n in gray else "RGB"))
    return root


def vgg_flower(root: Path, labels: list[int]) -> Path:
    """jpg/image_%05d.jpg numbered from 1 and imagelabels.mat {"labels": 1 x N} (102flowers layout)."""
    from scipy.io import savemat

    for i in range(len(labels)):
        write(root / "jpg" / f"image_{i + 1:05d}.jpg", jpeg(i))
    savemat(root / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    return root


def cu_birds(root: Path, names: list[str]) -> Path:
    """classes.txt ('<id> <NNN.Name>' in id order) and images/<NNN.Name>/*.jpg (CUB_200_2011 layout)."""
    names = sorted(names, key=lambda n: int(n.split(".")[0]))
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("".join(f"{int(n.split('.')[0])} {n}\n" for n in names))
    for i, n in enumerate(names):
        write(root / "images" / n / f"{n.split('.', 1)[1]}_0001.jpg", jpeg(i))
    return root


def aircraft(root: Path, names: list[str]) -> Path:
    """data/{variants.txt, images_variant_trainval.txt, images_variant_test.txt, images_box.txt, images/*.jpg}."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "variants.txt").write_text("".join(f"{n}\n" for n in names))
    tv, te, boxes = [], [], []
    for i, n in enumerate(names):
        for j in range(2):
            img = f"{1000000 + 2 * i + j:07d}"
            write(data / "images" / f"{img}.jpg", jpeg(2 * i + j, size=(12, 10)))
            boxes.append(f"{img} 1 2 9 8")
            (tv if j == 0 else te).append(f"{img} {n}")
    (data / "images_variant_trainval.txt").write_text("\n".join(tv) + "\n")
    (data / "images_variant_test.txt").write_text("\n".join(te) + "\n")
    (data / "images_box.txt").write_text("\n".join(boxes) + "\n")
    return root


def quickdraw(root: Path, names: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        np.save(root / f"{n}.npy", np.random.RandomState(i).randint(0, 2, (1, 784)).astype(bool))
    return root


def fungi(root: Path, categories: list[tuple[int, str]], images: list[tuple[int, str]]) -> Path:
    """train.json / val.json (COCO-style: images, annotations, categories) and images/<file>.

    ``images``: (category id, "train" | "val") per image, in image-list order; annotations are written in
    reverse order, so a converter that follows annotation order instead of image order is caught.
    """
    cats = [{"id": c, "name": n, "supercategory": "Fungi"} for c, n in categories]
    sets = {w: {"images": [], "annotations": [], "categories": cats} for w in ("train", "val")}
    for k, (cid, which) in enumerate(images):
        fname = f"images/{cid:04d}/{k:05d}.JPG"
        write(root / fname, jpeg(k))
        sets[which]["images"].append({"id": k, "file_name": fname})
        sets[which]["annotations"].insert(0, {"id": k, "image_id": k, "category_id": cid})
    for which, d in sets.items():
        (root / f"{which}.json").write_text(json.dumps(d))
    return root


# COCO 2017's 80 categories in instances_train2017.json order (MD's seeded rule indexes this order)
COCO_CATEGORIES = (
    "person, bicycle, car, motorcycle, airplane, bus, train, truck, boat, traffic light, fire hydrant, stop sign, "
    "parking meter, bench, bird, cat, dog, horse, sheep, cow, elephant, bear, zebra, giraffe, backpack, umbrella, "
    "handbag, tie, suitcase, frisbee, skis, snowboard, sports ball, kite, baseball bat, baseball glove, skateboard, "
    "surfboard, tennis racket, bottle, wine glass, cup, fork, knife, spoon, bowl, banana, apple, sandwich, orange, "
    "broccoli, carrot, hot dog, pizza, donut, cake, chair, couch, potted plant, bed, dining table, toilet, tv, "
    "laptop, mouse, remote, keyboard, cell phone, microwave, oven, toaster, sink, refrigerator, book, clock, vase, "
    "scissors, teddy bear, hair drier, toothbrush").split(", ")


def mscoco(root: Path, names: list[str]) -> Path:
    """train2017/%012d.jpg and instances_train2017.json with one box per category (ids 1..N, file order)."""
    anns, images = [], []
    for k, _ in enumerate(names):
        write(root / "train2017" / f"{k:012d}.jpg", jpeg(k, size=(20, 16)))
        images.append({"id": k, "file_name": f"{k:012d}.jpg"})
        anns.append({"id": k, "image_id": k, "category_id": k + 1, "bbox": [2.0, 3.0, 8.0, 6.0]})
    cats = [{"id": i + 1, "name": n, "supercategory": "x"} for i, n in enumerate(names)]
    (root / "instances_train2017.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                               "categories": cats}))
    return root


def traffic_sign(root: Path, ids: list[int], per_class: int = 1) -> Path:
    """Final_Training/Images/%05d/{%05d_%05d.ppm, GT-%05d.csv} (GTSRB training set layout)."""
    for c in ids:
        d = root / "Final_Training" / "Images" / f"{c:05d}"
        for j in range(per_class):
            buf = io.BytesIO()
            Image.open(io.BytesIO(jpeg(100 * c + j))).save(buf, format="PPM")
            write(d / f"{j // 30:05d}_{j % 30:05d}.ppm", buf.getvalue())
        (d / f"GT-{c:05d}.csv").write_text("Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n")
    return root
