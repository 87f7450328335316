"""Write one dataset as WebDataset tar shards plus ``spec.json`` (the contract in docs/data_format.md).

All images of a class are written consecutively into one shard; a shard closes after the class that takes
it past ``shard_bytes``. ``spec.json`` is written last and atomically, so its presence means the dataset is
complete: a rerun with the same name and converter is a no-op, and the partial output of a crashed run
(shards without a spec) is removed and redone. The writer only ever creates or deletes files whose names it
owns (``shard-NNNNNN.tar``, ``spec.json``, ``spec.json.tmp``) directly inside ``out_dir``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

from smat_dist.data.spec import FORMAT  # noqa: F401 (one format name for the writer and the reader)
from smat_dist.utils.log import get_logger

log = get_logger("data_tools.writer")

VERSION = 1
SPLITS = ("train", "val", "test")
_OWNED = re.compile(r"^(shard-\d{6}\.tar|spec\.json\.tmp)$")
# Modes PNG can store as is; anything else (CMYK, YCbCr, float, ...) is converted to RGB or L first.
_BYTESIO = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")  # PIL names the buffer, not the file
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"}


class ConversionError(RuntimeError):
    """Bad input or a bad output folder; the message names the file, class or folder at fault."""


class _HashingFile:
    """Write-only file wrapper that hashes and counts bytes as tarfile writes them (no second read pass)."""

    def __init__(self, path: Path):
        self._f = open(path, "wb")
        self.sha = hashlib.sha256()
        self.pos = 0

    def write(self, b) -> int:
        self._f.write(b)
        self.sha.update(b)
        self.pos += len(b)
        return len(b)

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def encode_image(image: Any, image_format: str = "png") -> tuple[bytes, str]:
    """Return (bytes, ext) for one image. Raises (OSError/ValueError from PIL) when the image is corrupt.

    An exception instance stands for a source file the converter could not read and is raised as is.
    Encoded JPEG/PNG bytes are kept exactly as the source stores them (after a full decode proves they are
    readable); other encoded formats (GIF, BMP, TIFF, ...), PIL images and uint8 arrays are re-encoded.
    """
    if isinstance(image, BaseException):
        raise image  # the converter could not read the source file; the writer skips and records it
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # full decode: a truncated or garbled file fails here, not in the training loop
            if im.format == "JPEG":
                return data, "jpg"
            if im.format == "PNG":
                return data, "png"
            return _encode_pil(im, image_format)
    if isinstance(image, Image.Image):
        return _encode_pil(image, image_format)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"array images must be uint8, got {image.dtype}")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise ValueError(f"array images must be HxW or HxWxC with C in 1,3,4; got shape {image.shape}")
        return _encode_pil(Image.fromarray(np.ascontiguousarray(image)), image_format)
    raise TypeError(f"unsupported image type {type(image).__name__} (want bytes, PIL.Image or uint8 ndarray)")


def _encode_pil(im: Image.Image, image_format: str) -> tuple[bytes, str]:
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)  # animated GIF/TIFF: keep the first frame
    buf = io.BytesIO()
    if image_format == "png":
        if im.mode not in _PNG_MODES:
            im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
        im.save(buf, format="PNG")
        return buf.getvalue(), "png"
    if image_format == "jpg":
        if im.mode not in ("L", "RGB"):
            im = im.convert("RGB")
        im.save(buf, format="JPEG", quality=95)
        return buf.getvalue(), "jpg"
    raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")


def _settings(converter: Any) -> dict | None:
    """A converter string as {key: value}: the CLI's JSON object, or data_tools.offline's 'name k=v k=v'."""
    if not isinstance(converter, str):
        return None
    try:
        obj = json.loads(converter)
        if isinstance(obj, dict):
            return obj
    except ValueError:
        pass
    parts = converter.split()
    if len(parts) < 2 or not all("=" in p for p in parts[1:]):
        return None
    return {"source": parts[0], **dict(p.split("=", 1) for p in parts[1:])}


def converter_diff(old: Any, new: Any) -> list[str]:
    """['seed: 22 there, 5 now', ...] for the keys whose values differ; [] when either is not key=value data."""
    a, b = _settings(old), _settings(new)
    if a is None or b is None:
        return []
    missing = object()

    def show(d: dict, k: str) -> str:
        return json.dumps(d[k]) if k in d else "(unset)"
    return [f"{k}: {show(a, k)} there, {show(b, k)} now" for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing)]


class DatasetWriter:
    """Context manager that writes one dataset folder. See the module docstring for the rules."""

    def __init__(self, out_dir, name: str, converter: str, *, shard_bytes: int = 256 << 20, min_count: int = 1,
                 strict: bool = False, image_format: str = "png"):
        if shard_bytes <= 0:
            raise ValueError(f"shard_bytes must be positive, got {shard_bytes}")
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        if image_format not in ("png", "jpg"):
            raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
        self.out_dir = Path(out_dir)
        self.name, self.converter = name, converter
        self.shard_bytes, self.min_count, self.strict, self.image_format = shard_bytes, min_count, strict, image_format
        self.classes: list[dict] = []
        self.shards: list[dict] = []
        self.skipped: list[dict] = []
        self.ontology: dict | None = None
        self.notes: list[str] = []  # how the stored images differ from the source's; in spec.json when any
        self.spec: dict | None = None
        self.complete = False  # True when out_dir already holds this dataset (rerun is a no-op)
        self._names: dict[str, int] = {}
        self._tar: tarfile.TarFile | None = None
        self._file: _HashingFile | None = None
        self._shard_samples = 0
        self._failed: str | None = None
        self._closed = False
        self._prepare_out_dir()

    # ---- output folder -------------------------------------------------------------------------------
    def _prepare_out_dir(self) -> None:
        d = self.out_dir
        if d.exists() and not d.is_dir():
            raise ConversionError(f"output {d} exists and is not a folder")
        d.mkdir(parents=True, exist_ok=True)
        spec_path = d / "spec.json"
        if spec_path.exists():
            try:
                spec = json.loads(spec_path.read_text())
            except (OSError, ValueError) as e:
                raise ConversionError(f"output folder {d} holds an unreadable {spec_path.name} ({e}); "
                                      f"remove the folder or choose another --output") from e
            if spec.get("format") != FORMAT or spec.get("name") != self.name or spec.get("converter") != self.converter:
                raise ConversionError(self._refusal(d, spec))
            self.spec, self.complete = spec, True
            self._names = {c["name"]: c["label"] for c in spec["classes"]}
            log.info("%s: %s is already complete (%d classes, %d images); nothing to do",
                     self.name, d, spec["counts"]["classes"], spec["counts"]["images"])
            return
        entries = sorted(os.listdir(d))
        foreign = [e for e in entries if not _OWNED.match(e)]
        if foreign:
            raise ConversionError(
                f"output folder {d} holds files that are not a partial smat-convert output "
                f"({', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}); choose an empty or new --output")
        if entries:
            log.warning("%s: removing partial output of an interrupted run in %s (%d files, no spec.json)",
                        self.name, d, len(entries))
            for e in entries:
                os.unlink(d / e)  # unlink removes a symlink itself, never what it points to

    def _refusal(self, d: Path, spec: dict) -> str:
        """Why a complete output folder cannot be reused: the other dataset's name, else the converter settings
        that differ, by key (a rerun with one changed option must say which)."""
        tail = "remove the folder or choose another --output"
        if spec.get("format") != FORMAT or spec.get("name") != self.name:
            return (f"output folder {d} already holds dataset {spec.get('name')!r} written by converter "
                    f"{spec.get('converter')!r}; this run writes {self.name!r}: {tail}")
        diff = converter_diff(spec.get("converter"), self.converter)
        if diff:
            return (f"output folder {d} already holds dataset {self.name!r} written with other settings: "
                    f"{'; '.join(diff)}: {tail}")
        return (f"output folder {d} already holds dataset {self.name!r} written by converter "
                f"{spec.get('converter')!r}, this run is {self.converter!r}: {tail}")

    # ---- writing -------------------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._failed:
            raise ConversionError(f"writer for {self.name} is unusable after an earlier error: {self._failed}")
        if self._closed:
            raise ConversionError(f"writer for {self.name} is already closed")

    def _open_shard(self) -> None:
        fname = f"shard-{len(self.shards):06d}.tar"
        self._file = _HashingFile(self.out_dir / fname)
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._shard_samples = 0
        self.shards.append({"file": fname, "samples": 0, "bytes": 0, "sha256": None})

    def _add_member(self, name: str, data: bytes) -> int:
        """Append one member and return the byte offset of its data in the tar."""
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: reruns give identical shards
        self._tar.addfile(info, io.BytesIO(data))
        # addfile leaves tar.offset just past the data padded to 512-byte blocks; the data starts right there minus
        # that padded size. close() re-reads every header and checks this against TarInfo.offset_data.
        return self._tar.offset - ((len(data) + 511) // 512) * 512

    def add_class(self, name: str, split: str, items: Iterable[tuple[str, object]]) -> int:
        """Write one class; return its global label. items: (source id, image) pairs, consumed lazily."""
        if self.complete:
            if name not in self._names:
                raise ConversionError(f"{self.out_dir}/spec.json is complete but has no class {name!r}")
            return self._names[name]
        self._check_usable()
        if split not in SPLITS:
            raise ValueError(f"class {name!r}: split must be one of {SPLITS}, got {split!r}")
        if name in self._names:
            raise ValueError(f"class {name!r} added twice to {self.name}")
        if self._tar is None:
            self._open_shard()
        label = len(self.classes)
        members = []
        try:
            for src, image in items:
                try:
                    data, ext = encode_image(image, self.image_format)
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                    # PIL raises OSError/UnidentifiedImageError for bad bytes, SyntaxError for some broken headers
                    reason = _BYTESIO.sub("data", str(e))
                    if self.strict:
                        raise ConversionError(f"corrupt image {src} (class {name!r}): {reason}") from e
                    log.warning("%s: skipping unreadable image %s: %s", self.name, src, reason)
                    self.skipped.append({"path": str(src), "reason": reason})
                    continue
                key = f"c{label:05d}_{len(members):06d}"
                off = self._add_member(f"{key}.{ext}", data)
                self._add_member(f"{key}.cls", str(label).encode("ascii"))
                members.append([off, len(data), ext])
            if len(members) < self.min_count:
                raise ValueError(f"class {name!r} of {self.name} has {len(members)} readable images, "
                                 f"below the minimum of {self.min_count}")
        except BaseException as e:
            # the shard now holds a partial class: the writer cannot produce a consistent dataset any more
            self._failed = f"{type(e).__name__}: {e}"
            raise
        shard = self.shards[-1]
        self.classes.append({"label": label, "name": name, "split": split, "count": len(members),
                             "shard": shard["file"], "members": members})
        self._names[name] = label
        self._shard_samples += len(members)
        if self._file.pos >= self.shard_bytes:
            self._close_shard()
        return label

    def _close_shard(self) -> None:
        self._tar.close()  # writes the two zero end-of-archive blocks (and pads to the record size)
        self._file.close()
        shard = self.shards[-1]
        shard.update(samples=self._shard_samples, bytes=self._file.pos, sha256=self._file.sha.hexdigest())
        self._verify_offsets(shard["file"])
        log.info("%s: wrote %s (%d samples, %.1f MB)", self.name, shard["file"], shard["samples"], shard["bytes"] / 1e6)
        self._tar = self._file = None

    def _verify_offsets(self, fname: str) -> None:
        """Cross-check the offsets recorded for this shard against what tarfile reads back from the headers."""
        with tarfile.open(self.out_dir / fname, "r:") as t:
            found = {m.name: (m.offset_data, m.size) for m in t.getmembers()}
        for c in self.classes:
            if c["shard"] != fname:
                continue
            for i, (off, size, ext) in enumerate(c["members"]):
                key = f"c{c['label']:05d}_{i:06d}.{ext}"
                if found.get(key) != (off, size):
                    raise RuntimeError(f"{fname}: member {key} recorded at {(off, size)} but tar says {found.get(key)}")

    def set_ontology(self, ontology: dict | None) -> None:
        if ontology is not None and ontology.get("type") not in ("bilevel", "dag"):
            raise ValueError(f"ontology type must be 'bilevel' or 'dag', got {ontology.get('type')!r}")
        self.ontology = ontology

    def close(self) -> dict:
        """Finish the last shard and write spec.json atomically; return the spec."""
        if self.complete:
            return self.spec
        if self._closed:
            return self.spec
        self._check_usable()
        if not self.classes:
            raise ConversionError(f"{self.name}: no classes were written; nothing to save in {self.out_dir}")
        if self._tar is not None:
            self._close_shard()
        splits = {s: [c["label"] for c in self.classes if c["split"] == s] for s in SPLITS}
        spec = {
            "format": FORMAT, "version": VERSION, "name": self.name, "converter": self.converter,
            "splits": splits, "classes": self.classes, "shards": self.shards, "ontology": self.ontology,
            "skipped": self.skipped,
            "counts": {"classes": len(self.classes), "images": sum(c["count"] for c in self.classes)},
        }
        if self.notes:
            spec["notes"] = list(self.notes)
        tmp = self.out_dir / "spec.json.tmp"
        with open(tmp, "w") as f:
            json.dump(spec, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.out_dir / "spec.json")
        self.spec, self._closed = spec, True
        log.info("%s: complete in %s: %d classes, %d images in %d shards (%d skipped)", self.name, self.out_dir,
                 spec["counts"]["classes"], spec["counts"]["images"], len(self.shards), len(self.skipped))
        return spec

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:
            # leave the partial output without spec.json: the next run sees it as a crashed run and redoes it
            try:
                self._tar.close()
            finally:
                self._file.close()
                self._tar = self._file = None
