"""`smat-convert --verify DIR`: check a converted dataset (or a folder of them) against its spec.json.

For every shard: present, the size and SHA-256 spec.json records (a spec written before they were recorded
cannot be checked for them, which is said, not counted as damage). For every member: its bytes lie where
spec.json says (the tar header just before them names the member), and they decode as an image, the same full
decode the episode reader does. Every bad shard and member is reported, not only the first; the command
exits 2 if there is any. Local folders only. Does not import torch.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from smat_dist.data.spec import SpecError, load_spec
from smat_dist.utils.log import get_logger

log = get_logger("data_tools.verify")

_DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)
_HASH_CHUNK = 4 << 20


@dataclass
class DatasetReport:
    folder: str
    name: str = ""
    shards: int = 0
    images: int = 0
    problems: list[str] = field(default_factory=list)   # damage: each one line naming shard (and member)
    notes: list[str] = field(default_factory=list)      # what could not be checked

    def as_dict(self) -> dict:
        return {"folder": self.folder, "name": self.name, "shards": self.shards, "images": self.images,
                "ok": not self.problems, "problems": self.problems, "notes": self.notes}


def dataset_folders(root: Path) -> list[Path]:
    """``root`` itself when it holds spec.json, else its sub-folders that do (e.g. an offline-all output)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--verify {root}: not a folder")
    if (root / "spec.json").exists():
        return [root]
    found = sorted(p for p in root.iterdir() if p.is_dir() and (p / "spec.json").exists())
    if not found:
        raise FileNotFoundError(f"--verify {root}: no spec.json in it or in its sub-folders (not a smat-convert "
                                f"output, or the conversion did not finish: spec.json is written last)")
    return found


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _header_name(f, off: int) -> str | None:
    """The member name in the ustar header block that precedes data at ``off`` (None if none can be read)."""
    if off < tarfile.BLOCKSIZE:
        return None
    block = os.pread(f.fileno(), tarfile.BLOCKSIZE, off - tarfile.BLOCKSIZE)
    if len(block) != tarfile.BLOCKSIZE:
        return None
    try:
        return tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape").name
    except tarfile.HeaderError:
        return None


def verify_dataset(folder: Path) -> DatasetReport:
    folder = Path(folder)
    rep = DatasetReport(folder=str(folder))
    try:
        spec = load_spec(str(folder))
    except SpecError as e:
        rep.problems.append(str(e))
        return rep
    rep.name, rep.shards = spec.name, len(spec.shards)
    bad_shards: set[str] = set()
    for fname, s in spec.shards.items():
        path = folder / fname
        if not path.is_file():
            rep.problems.append(f"missing shard {path}")
            bad_shards.add(fname)
            continue
        size, digest = s.get("bytes"), s.get("sha256")
        if isinstance(size, int):
            got = path.stat().st_size
            if got != size:
                rep.problems.append(f"{'truncated' if got < size else 'changed'} shard {path}: {got} bytes, "
                                    f"spec.json records {size}")
        else:
            rep.notes.append(f"shard {path}: spec.json records no size (older smat-convert); size not checked")
        if isinstance(digest, str):
            got_digest = _sha256(path)
            if got_digest != digest:
                rep.problems.append(f"digest mismatch in shard {path}: sha256 {got_digest}, spec.json records "
                                    f"{digest}")
        else:
            rep.notes.append(f"shard {path}: spec.json records no sha256 (older smat-convert); digest not checked")
    t0, last = time.time(), time.time()
    for cls in sorted(spec.classes.values(), key=lambda c: c.label):
        if cls.shard in bad_shards:
            rep.problems.append(f"class {cls.name!r}: its {cls.count} images are in missing shard "
                                f"{folder / cls.shard}")
            continue
        path = folder / cls.shard
        with open(path, "rb", buffering=0) as f:
            for i, (off, size, ext) in enumerate(cls.members):
                key = f"c{cls.label:05d}_{i:06d}"
                where = f"{key} in shard {path} (class {cls.name!r})"
                rep.images += 1
                data = os.pread(f.fileno(), size, off)
                if len(data) != size:
                    rep.problems.append(f"truncated image {where}: {len(data)} of {size} bytes at offset {off}")
                    continue
                name = _header_name(f, off)
                if name != f"{key}.{ext}":
                    rep.problems.append(f"misplaced image {where}: the tar header before offset {off} names "
                                        f"{name!r}, expected {key}.{ext!r}")
                    continue
                try:
                    with Image.open(io.BytesIO(data)) as im:
                        im.convert("RGB")   # the same full decode as smat_dist.data.transforms.decode
                except _DECODE_ERRORS as e:
                    rep.problems.append(f"corrupt image {where}: {e}")
        if time.time() - last > 10:
            last = time.time()
            log.info("%s: %d images checked (%.0f/s), %d problem(s) so far", spec.name, rep.images,
                     rep.images / max(last - t0, 1e-9), len(rep.problems))
    return rep


def verify(root: Path) -> list[DatasetReport]:
    """Verify every dataset under ``root`` (see dataset_folders); log each problem; return the reports."""
    reports = []
    for folder in dataset_folders(root):
        rep = verify_dataset(folder)
        for p in rep.problems:
            log.error("%s: %s", rep.name or folder, p)
        if rep.notes:
            log.warning("%s: %d check(s) not possible, e.g. %s", rep.name or folder, len(rep.notes), rep.notes[0])
        log.info("%s: %s (%d shards, %d images, %d problem(s))", rep.name or folder,
                 "ok" if not rep.problems else "DAMAGED", rep.shards, rep.images, len(rep.problems))
        reports.append(rep)
    return reports
