"""Builders of tiny datasets in each source's original on-disk layout (real files, real formats)."""
from __future__ import annotations

import gzip
import io
import json
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def img(seed: int, size=(12, 10), fmt="JPEG", mode="RGB") -> bytes:
    rng = np.random.RandomState(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    im = Image.fromarray(rng.randint(0, 255, shape, dtype=np.uint8))
    if mode == "1":
        im = im.convert("1")
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def imagefolder(root: Path, classes=("cat", "dog", "eel"), per_class=3) -> Path:
    for ci, c in enumerate(classes):
        for i in range(per_class):
            write(root / c / f"{i}.jpg", img(ci * 100 + i))
    return root


def md_spec(name: str, counts=(2, 1, 1), per_class=3) -> dict:
    n = sum(counts)
    return {"name": name, "classes_per_split": {"TRAIN": counts[0], "VALID": counts[1], "TEST": counts[2]},
            "images_per_class": {str(i): per_class for i in range(n)},
            "class_names": {str(i): f"class{i}" for i in range(n)}, "path": "/x", "file_pattern": "{}.tfrecords",
            "__class__": "DatasetSpecification"}


def md_tfrecords(root: Path, counts=(2, 1, 1), per_class=3) -> Path:
    """Real framed TFRecords (tfrecord package writer: length, masked CRC32C, data, CRC)."""
    from tfrecord.writer import TFRecordWriter

    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_spec.json").write_text(json.dumps(md_spec("dtd", counts, per_class)))
    for label in range(sum(counts)):
        w = TFRecordWriter(str(root / f"{label}.tfrecords"))
        for i in range(per_class):
            w.write({"image": (img(label * 10 + i), "byte"), "label": (label, "int")})
        w.close()
    return root


def pmf_h5(root: Path, counts=(2, 1, 1), per_class=3) -> Path:
    import h5py

    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_spec.json").write_text(json.dumps(md_spec("cu_birds", counts, per_class)))
    for label in range(sum(counts)):
        with h5py.File(root / f"{label}.h5", "w") as f:
            for j in range(per_class):
                g = f.create_group(str(j))
                img = np.random.RandomState(label * 10 + j).randint(0, 255, (9, 7, 3), dtype=np.uint8)
                g.create_dataset("image", data=img)
                g.create_dataset("label", data=np.array(label))
                g.create_dataset("id", data=np.array(j))
    return root


def omniglot(root: Path) -> Path:
    # two train alphabets, one MD validation alphabet, one evaluation alphabet; 2 characters x 2 drawings
    for split, alpha in (("images_background", "Latin"), ("images_background", "Greek"),
                         ("images_background", "Tagalog"), ("images_evaluation", "Kannada")):
        for ch in ("character01", "character02"):
            for i in range(2):
                write(root / split / alpha / ch / f"{i}.png", img(hash((alpha, ch, i)) % 1000, fmt="PNG", mode="1"))
    return root


def aircraft(root: Path, variants=("A300", "B737", "C130", "D328"), per_class=2) -> Path:
    data = root / "data"
    boxes, tv, te = [], [], []
    for vi, v in enumerate(variants):
        for i in range(per_class):
            name = f"{vi:03d}{i:04d}"
            write(data / "images" / f"{name}.jpg", img(vi * 10 + i, size=(20, 16)))
            boxes.append(f"{name} 2 3 12 11")
            (tv if i % 2 == 0 else te).append(f"{name} {v}")
    (data / "images_box.txt").write_text("\n".join(boxes) + "\n")
    (data / "images_variant_trainval.txt").write_text("\n".join(tv) + "\n")
    (data / "images_variant_test.txt").write_text("\n".join(te) + "\n")
    return root


def cu_birds(root: Path, n=4, per_class=2) -> Path:
    names = [f"{i + 1:03d}.Bird_{i}" for i in range(n)]
    (root).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("".join(f"{i + 1} {nm}\n" for i, nm in enumerate(names)))
    for i, nm in enumerate(names):
        for j in range(per_class):
            write(root / "images" / nm / f"{j}.jpg", img(i * 10 + j))
    return root


def dtd(root: Path, n=4, per_class=2) -> Path:
    return imagefolder(root / "images", classes=[f"texture{i}" for i in range(n)], per_class=per_class).parent


def quickdraw(root: Path, n=4, per_class=3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        np.save(root / f"thing{i}.npy", np.random.RandomState(i).randint(0, 255, (per_class, 784), dtype=np.uint8))
    return root


def fungi(root: Path, n=4, per_class=2) -> Path:
    cats = [{"id": i, "name": f"fungus{i}"} for i in range(n)]
    sets = {"train": {"images": [], "annotations": [], "categories": cats},
            "val": {"images": [], "annotations": [], "categories": cats}}
    k = 0
    for c in range(n):
        for j in range(per_class):
            which = "train" if j % 2 == 0 else "val"
            fname = f"images/{c}/{k}.jpg"
            write(root / fname, img(k))
            sets[which]["images"].append({"id": k, "file_name": fname})
            sets[which]["annotations"].append({"id": k, "image_id": k, "category_id": c})
            k += 1
    for which, d in sets.items():
        (root / f"{which}.json").write_text(json.dumps(d))
    return root


def vgg_flower(root: Path, n=4, per_class=2) -> Path:
    from scipy.io import savemat

    labels = [c + 1 for c in range(n) for _ in range(per_class)]
    for i in range(len(labels)):
        write(root / "jpg" / f"image_{i + 1:05d}.jpg", img(i))
    savemat(root / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    return root


def traffic_sign(root: Path, n=3, per_class=2) -> Path:
    for c in range(n):
        d = root / "Final_Training" / "Images" / f"{c:05d}"
        for j in range(per_class):
            write(d / f"00000_{j:05d}.ppm", img(c * 10 + j, fmt="PPM"))
        (d / f"GT-{c:05d}.csv").write_text("Filename;Width\n")
    return root


def mscoco(root: Path, n=4, per_class=2) -> Path:
    cats = [{"id": 10 + c, "name": f"object{c}"} for c in range(n)]
    images, anns = [], []
    for k in range(n * per_class):
        write(root / "train2017" / f"{k:012d}.jpg", img(k, size=(30, 24)))
        images.append({"id": k, "file_name": f"{k:012d}.jpg"})
        anns.append({"id": k, "image_id": k, "category_id": 10 + k % n, "bbox": [3.0, 4.0, 10.0, 8.0]})
    (root / "instances_train2017.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                               "categories": cats}))
    return root


def ilsvrc(root: Path, per_class=2) -> tuple[Path, Path]:
    """Synset folders plus a miniature Meta-Dataset ILSVRC spec (split_subgraphs) with 2/1/1 leaves."""
    def node(wn, children, parents=()):
        return {"wn_id": wn, "words": wn, "children_ids": list(children), "parents_ids": list(parents)}
    sub = {"TRAIN": [node("n0", ["n1"]), node("n1", ["n01", "n02"], ["n0"]), node("n01", [], ["n1"]),
                     node("n02", [], ["n1"])],
           "VALID": [node("n0", ["n2"]), node("n2", ["n03"], ["n0"]), node("n03", [], ["n2"])],
           "TEST": [node("n0", ["n3"]), node("n3", ["n04"], ["n0"]), node("n04", [], ["n3"])]}
    for i, wn in enumerate(("n01", "n02", "n03", "n04")):
        for j in range(per_class):
            write(root / "train" / wn / f"{wn}_{j}.JPEG", img(i * 10 + j))
    spec = root / "ilsvrc_2012_dataset_spec.json"
    spec.write_text(json.dumps({"name": "ilsvrc_2012", "split_subgraphs": sub}))
    return root / "train", spec


def cifar(root: Path, kind="cifar10", per_class=2) -> Path:
    n = 10 if kind == "cifar10" else 100
    y = [c for c in range(n) for _ in range(per_class)]
    x = np.random.RandomState(0).randint(0, 255, (len(y), 3072), dtype=np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    if kind == "cifar10":
        pickle.dump({b"data": x, b"labels": y}, open(root / "test_batch", "wb"))
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(n)]}, open(root / "batches.meta", "wb"))
    else:
        pickle.dump({b"data": x, b"fine_labels": y}, open(root / "test", "wb"))
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(n)]}, open(root / "meta", "wb"))
    return root


def mnist(root: Path, per_class=2) -> Path:
    y = np.array([c for c in range(10) for _ in range(per_class)], dtype=np.uint8)
    x = np.random.RandomState(0).randint(0, 255, (len(y), 28, 28), dtype=np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    with gzip.open(root / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">4B3I", 0, 0, 8, 3, len(y), 28, 28) + x.tobytes())
    with gzip.open(root / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">4BI", 0, 0, 8, 1, len(y)) + y.tobytes())
    return root
