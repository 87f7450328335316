"""The user's own images: a support set (one folder per class) and query files or folders, read and
transformed exactly as smat-eval reads an episode's images (decode to RGB, eval resize + centre crop,
ImageNet normalisation), with every bad input named."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from smat_dist.data.transforms import decode, eval_transform

_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError)


class PredictError(ValueError):
    """A support set or query the predictor cannot use; the message names the folder or file."""


@dataclass
class LoadedImage:
    path: Path
    pixels: np.ndarray      # [size, size, 3] uint8 after the eval transform (what the model sees, un-normalised)


def load_image(path: Path, size: int) -> LoadedImage:
    try:
        data = Path(path).read_bytes()
        return LoadedImage(Path(path), eval_transform(decode(data), size))
    except _DECODE_ERRORS as e:
        raise PredictError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def read_support(root: str | Path, size: int) -> tuple[list[str], list[list[LoadedImage]]]:
    """(class names, images per class) from `root`/<class>/<images>; classes and images in name order."""
    root = Path(root)
    if not root.is_dir():
        raise PredictError(f"--support {root}: not a folder (expected one sub-folder of images per class)")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise PredictError(f"--support {root}: {len(classes)} class folder(s) "
                           f"({', '.join(p.name for p in classes) or 'none'}); a few-shot task needs at least 2 "
                           "classes, one sub-folder of images each")
    images = []
    for c in classes:
        files = _files(c)
        if not files:
            raise PredictError(f"--support class folder {c} holds no images")
        images.append([load_image(f, size) for f in files])
    return [c.name for c in classes], images


def read_queries(paths: list[str | Path], size: int, skip_bad: bool = False
                 ) -> tuple[list[LoadedImage], list[tuple[str, str]]]:
    """(query images, [(file, reason) skipped]): files as given, folders expanded (recursively, in name
    order). A file that is not an image is refused, or with skip_bad skipped and reported."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += _files(p)
        elif p.is_file():
            files.append(p)
        else:
            raise PredictError(f"--query {p}: no such file or folder")
    out, skipped = [], []
    for f in files:
        try:
            out.append(load_image(f, size))
        except PredictError as e:
            if not skip_bad:
                raise PredictError(f"{e} (pass --skip-bad to skip such queries)") from e
            skipped.append((str(f), str(e)))
    if not out:
        raise PredictError(f"--query {' '.join(map(str, paths))}: no readable query image")
    return out, skipped
