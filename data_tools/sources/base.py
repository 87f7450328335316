"""What every source converter returns (a Plan of classes to write) and the file helpers they share.

A converter only reads its input layout and decides class names, splits and the order of labels; the CLI
feeds the plan to the DatasetWriter. Image items are produced lazily (one class at a time) so a
converter never holds a whole dataset in memory.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from PIL import Image

from data_tools.writer import ConversionError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}


@dataclass
class ClassPlan:
    name: str
    split: str
    items: Callable[[], Iterable[tuple[str, object]]]  # called once, when the class is written
    superclass: str | None = None                      # bilevel sources (Omniglot alphabets)


@dataclass
class Plan:
    name: str
    classes: list[ClassPlan]
    expected_classes: tuple[int, int, int] | None = None   # (train, val, test) classes when known
    expected_images: int | None = None
    expected_per_class: dict[str, int] | None = None       # class name -> images, when the source says
    dag: dict | None = None   # per split: {"splits": {split: {"root": id, "nodes": {id: {"words", "children"}}}}}
    warnings: list[str] = field(default_factory=list)      # found while planning; reported with the result
    report: dict = field(default_factory=dict)              # figures found while planning, added to the result
    notes: Callable[[], list[str]] | None = None  # after writing: how the stored images differ (spec.json "notes")


@dataclass
class Options:
    max_classes: int | None = None      # keep at most this many classes of each split (smoke runs)
    split_file: Path | None = None      # a Meta-Dataset splits JSON overriding the seeded rule
    md_spec: Path | None = None         # Meta-Dataset dataset_spec JSON (ILSVRC's DAG split)
    fractions: dict | None = None       # imagefolder: {"train": .7, "val": .15, "test": .15}
    seed: int = 22
    extra: dict = field(default_factory=dict)


def require(path: Path, what: str) -> Path:
    """Return path if it exists, else a ConversionError naming the expected path."""
    if not path.exists():
        raise ConversionError(f"missing {what}: expected {path}")
    return path


def read_item(path: Path) -> tuple[str, object]:
    """(source id, bytes) or (source id, OSError) so the writer records an unreadable file as skipped."""
    try:
        return str(path), path.read_bytes()
    except OSError as e:
        return str(path), e


def pil_item(path: Path, fn: Callable[[Image.Image], Image.Image]) -> tuple[str, object]:
    """(source id, fn(decoded image)) or (source id, error) when the file cannot be read or decoded."""
    try:
        with Image.open(path) as im:
            im.load()
            return str(path), fn(im)
    except (OSError, ValueError, SyntaxError) as e:
        return str(path), e if isinstance(e, OSError) else OSError(str(e))


def md_item(path: Path) -> tuple[str, object]:
    """An image file as MD's converter stores it: RGB JPEG bytes as they are, anything else converted to RGB
    (MD re-encodes those as JPEG; the writer stores the converted pixels as lossless PNG instead)."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "JPEG" and im.mode == "RGB":
                return str(path), data
            im.load()
            return str(path), im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        return str(path), e if isinstance(e, OSError) else OSError(str(e))


def files_in(folder: Path, exts: set[str] | None = IMAGE_EXTS) -> list[Path]:
    """Sorted regular files of a folder (not recursive), hidden files skipped, filtered by extension."""
    out = []
    for name in sorted(os.listdir(folder)):
        p = folder / name
        if name.startswith(".") or not p.is_file():
            continue
        if exts is None or p.suffix.lower() in exts:
            out.append(p)
    return out


def other_files(folder: Path, exts: set[str] = IMAGE_EXTS) -> list[Path]:
    """The regular, non-hidden files of a folder that `files_in` leaves out (not an image extension)."""
    return [folder / n for n in sorted(os.listdir(folder))
            if not n.startswith(".") and (folder / n).is_file() and (folder / n).suffix.lower() not in exts]


def subdirs(folder: Path) -> list[str]:
    return sorted(e for e in os.listdir(folder) if not e.startswith(".") and (folder / e).is_dir())


def file_items(paths: list[Path]) -> Callable[[], Iterator[tuple[str, object]]]:
    return lambda: (read_item(p) for p in paths)


def md_file_items(paths: list[Path]) -> Callable[[], Iterator[tuple[str, object]]]:
    return lambda: (md_item(p) for p in paths)
