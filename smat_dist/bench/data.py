"""Data-pipeline benchmark: Meta-Dataset episodes per second from the shards, at 0, 1 and 2 workers.

For each worker count it times ``EpisodeStream.loader`` over the same episodes (train augmentation, the
method's 128 px) and reports episodes/s, images/s and the latency of the first episode (worker start-up
included). As the naive baseline, the very same episodes' images are exported from the shards to a
class-per-folder tree of files and decoded + transformed with PIL in this process (``folder_images_per_s``),
which is what a plain ImageFolder pipeline does per image. With ``data_dir=None`` a small dataset of real
PNG bytes (40 classes x 30 images at 84 px) is written with the shard writer into a temporary folder.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from smat_dist.data.episodes import EpisodeConfig, EpisodeStream
from smat_dist.data.reader import ShardReader
from smat_dist.data.rng import episode_rng
from smat_dist.data.transforms import decode, normalize_batch, train_transform
from smat_dist.utils.log import get_logger

log = get_logger("bench.data")


def _synthetic_image(label: int, i: int, size: int) -> np.ndarray:
    """A class-specific colour gradient with a random blob and noise: compresses like a photo-ish PNG."""
    rng = np.random.default_rng(label * 7919 + i)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256], np.float32)
    img = base[None, None, :] * (0.5 + 0.5 * xx[..., None]) + 60 * yy[..., None]
    cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def build_synthetic(out_dir: str, classes: int = 40, images: int = 30, size: int = 84) -> str:
    from data_tools.writer import DatasetWriter

    path = os.path.join(out_dir, "synthetic")
    with DatasetWriter(path, "synthetic", "bench-synthetic") as w:
        for c in range(classes):
            w.add_class(f"class{c:03d}", "train", ((f"{c}/{i}", _synthetic_image(c, i, size)) for i in range(images)))
    return path


def _sources(data_dir: str) -> list[str]:
    """One dataset folder, or a folder of dataset folders (each with spec.json)."""
    if os.path.exists(os.path.join(data_dir, "spec.json")):
        return [data_dir]
    found = sorted(str(p.parent) for p in Path(data_dir).glob("*/spec.json"))
    if not found:
        raise FileNotFoundError(f"{data_dir}: neither a dataset folder (no spec.json) nor a folder of datasets")
    return found


def _export_folder_tree(stream: EpisodeStream, indices: list[int], root: str) -> list[list[list[str]]]:
    """Write the images of the given episodes as root/source/class/i.ext; return per-episode per-class paths."""
    reader, out = ShardReader(), []
    for idx in indices:
        d = stream.describe(idx)
        spec = stream.specs[stream.source_names.index(d.source)]
        per_class = []
        for label, s_ids, q_ids in zip(d.labels, d.support_ids, d.query_ids):
            cls = spec.classes[label]
            folder = os.path.join(root, spec.name, cls.name.replace("/", "_"))
            os.makedirs(folder, exist_ok=True)
            paths = []
            for i, data in zip(s_ids + q_ids, reader.read(spec, label, s_ids + q_ids)):
                p = os.path.join(folder, f"{i:06d}.{cls.members[i][2]}")
                if not os.path.exists(p):
                    with open(p, "wb") as f:
                        f.write(data)
                paths.append(p)
            per_class.append(paths)
        out.append(per_class)
    reader.close()
    return out


def _folder_baseline(paths: list[list[list[str]]], indices: list[int], stream: EpisodeStream) -> tuple[float, int]:
    """Seconds and image count to open, decode and transform the exported files, one episode at a time."""
    size, n = stream.cfg.image_size, 0
    t0 = time.perf_counter()
    for idx, per_class in zip(indices, paths):
        rng = episode_rng(stream.seed, stream.split, "folder", idx, "aug")
        tensors = []
        for class_paths in per_class:
            for p in class_paths:
                with open(p, "rb") as f:
                    tensors.append(train_transform(decode(f.read()), size, rng))
        normalize_batch(tensors, size)
        n += len(tensors)
    return time.perf_counter() - t0, n


def run(data_dir: str | None = None, episodes: int = 8, workers: tuple[int, ...] = (0, 1, 2), split: str = "train",
        image_size: int = 128, seed: int = 0, emit=None, synthetic: tuple[int, int] = (40, 30)) -> list[dict]:
    """Benchmark the episode pipeline; return (and pass each to ``emit`` as measured) one JSON-able dict per
    worker count.

    ``synthetic``: (classes, images per class) of the generated dataset when ``data_dir`` is None."""
    with tempfile.TemporaryDirectory(prefix="smat-bench-data-") as tmp:
        if data_dir is None:
            t0 = time.perf_counter()
            data_dir = build_synthetic(tmp, classes=synthetic[0], images=synthetic[1])
            log.info("built synthetic dataset in %.1f s", time.perf_counter() - t0)
            dataset = f"synthetic({synthetic[0]} classes x {synthetic[1]} PNG @84px)"
        else:
            dataset = data_dir
        sources = _sources(data_dir)
        cfg = EpisodeConfig(image_size=image_size)
        stream = EpisodeStream(sources, split, cfg, seed=seed, train_aug=True)
        indices = list(range(episodes))
        paths = _export_folder_tree(stream, indices, os.path.join(tmp, "folders"))
        folder_s, folder_images = _folder_baseline(paths, indices, stream)
        results = []
        for w in workers:
            it = stream.loader(start=0, rank=0, world=1, per_rank=1, workers=w)
            t0 = time.perf_counter()
            first = next(it)[0]
            first_s = time.perf_counter() - t0
            images = first.num_images
            for _ in range(episodes - 1):
                images += next(it)[0].num_images
            total = time.perf_counter() - t0
            del it  # shuts the workers down before the next setting starts its own
            row = {"bench": "data", "dataset": dataset, "sources": len(sources), "split": split,
                   "image_size": image_size, "workers": w, "episodes": episodes, "images": images,
                   "episodes_per_s": round(episodes / total, 3), "images_per_s": round(images / total, 1),
                   "first_episode_s": round(first_s, 3),
                   "folder_images_per_s": round(folder_images / folder_s, 1),
                   "folder_episodes_per_s": round(episodes / folder_s, 3), "cpus": os.cpu_count()}
            results.append(row)
            if emit:
                emit(row)
        stream.close()
    return results
