"""CIFAR-10/100 (python pickle batches), MNIST (idx files) and any class-per-folder image tree.

CIFAR and MNIST are used by Meta-Dataset v2 for testing only, so all their classes go to the test split
and their official test set is converted (10,000 images each).
"""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

from data_tools.sources import base
from data_tools.sources.base import ClassPlan, Options, Plan, file_items, files_in, require, subdirs
from data_tools.splits import MD_COUNTS, SPLIT_NAMES, fraction_split
from data_tools.writer import ConversionError


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR batches hold only dicts, lists, bytes and numpy arrays: refuse anything else (pickle runs code)."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ConversionError(f"cannot read CIFAR batch {path}: {e}") from e


def _cifar(inp: Path, name: str, batch: str, meta: str, label_key: bytes, names_key: bytes) -> Plan:
    data = _load_pickle(require(inp / batch, f"{name} test batch"))
    names = [n.decode() for n in _load_pickle(require(inp / meta, f"{name} meta file"))[names_key]]
    x = np.asarray(data[b"data"], dtype=np.uint8)
    y = np.asarray(data[label_key])
    if x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
        raise ConversionError(f"{inp / batch}: expected data (N, 3072) and N labels, got {x.shape} and {len(y)}")
    imgs = x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # stored channel-planar; PNG wants HxWxC

    def items(c):
        idx = np.nonzero(y == c)[0]
        return lambda: ((f"{inp / batch}#{i}", imgs[i]) for i in idx)
    return Plan(name, [ClassPlan(n, "test", items(c)) for c, n in enumerate(names)],
                expected_classes=MD_COUNTS[name]["classes"], expected_images=MD_COUNTS[name]["images"])


def plan_cifar10(inp: Path, opts: Options) -> Plan:
    return _cifar(inp, "cifar10", "test_batch", "batches.meta", b"labels", b"label_names")


def plan_cifar100(inp: Path, opts: Options) -> Plan:
    return _cifar(inp, "cifar100", "test", "meta", b"fine_labels", b"fine_label_names")


def read_idx(path: Path) -> np.ndarray:
    """Parse an (optionally gzipped) idx file: magic 0x0000 + dtype byte + ndim byte, big-endian dims."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ConversionError(f"cannot read idx file {path}: {e}") from e
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ConversionError(f"{path}: not an idx file of unsigned bytes")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ConversionError(f"{path}: truncated, {body.size} bytes for dims {dims}")
    return body.reshape(dims)


def _find(inp: Path, stem: str) -> Path:
    for p in (inp / f"{stem}.gz", inp / stem):
        if p.exists():
            return p
    raise ConversionError(f"missing MNIST file: expected {inp / (stem + '.gz')} or {inp / stem}")


def plan_mnist(inp: Path, opts: Options) -> Plan:
    x = read_idx(_find(inp, "t10k-images-idx3-ubyte"))
    y = read_idx(_find(inp, "t10k-labels-idx1-ubyte"))
    if len(x) != len(y):
        raise ConversionError(f"MNIST in {inp}: {len(x)} images but {len(y)} labels")

    def items(c):
        idx = np.nonzero(y == c)[0]
        return lambda: ((f"mnist-t10k#{i}", x[i]) for i in idx)
    return Plan("mnist", [ClassPlan(str(c), "test", items(c)) for c in range(10)],
                expected_classes=MD_COUNTS["mnist"]["classes"], expected_images=MD_COUNTS["mnist"]["images"])


def plan_imagefolder(inp: Path, opts: Options) -> Plan:
    names = subdirs(inp)
    if not names:
        raise ConversionError(f"imagefolder: no class folders in {inp}")
    files = {n: files_in(inp / n) for n in names}
    exts = " ".join(sorted(base.IMAGE_EXTS))
    # every check before anything is written: an empty class would otherwise fail after the others were written
    empty = [n for n in names if not files[n]]
    if empty:
        raise ConversionError(f"imagefolder: {len(empty)} class folder(s) without images ({exts}), e.g. "
                              f"{inp / empty[0]}; remove them or add images")
    order = fraction_split(names, opts.fractions, seed=opts.seed) if opts.fractions else [(n, "test") for n in names]
    name = opts.extra.get("name") or inp.name
    counts = tuple(sum(1 for _, s in order if s == sp) for sp in SPLIT_NAMES)
    if opts.fractions:
        hollow = [sp for sp, n in zip(SPLIT_NAMES, counts) if n == 0 and opts.fractions.get(sp, 0) > 0]
        if hollow:
            got = ", ".join(f"{sp} {n}" for sp, n in zip(SPLIT_NAMES, counts))
            raise ConversionError(f"imagefolder: --splits leaves split {hollow[0]!r} with no class ({len(names)} "
                                  f"classes: {got}); raise its fraction or drop it from --splits")
    warnings = []
    if not opts.fractions:
        warnings.append(f"imagefolder: no --splits: all {len(names)} classes go to the test split (no training "
                        "classes: a domain for data.eval_sources only); to train on it give e.g. "
                        "--splits train=0.7,val=0.15,test=0.15")
    others = [f for n in names for f in base.other_files(inp / n)]
    if others:
        warnings.append(f"imagefolder: skipped {len(others)} file(s) that are not images ({exts}), e.g. {others[0]}")
    return Plan(name, [ClassPlan(n, s, file_items(files[n])) for n, s in order], expected_classes=counts,
                expected_images=sum(len(v) for v in files.values()),
                expected_per_class={n: len(v) for n, v in files.items()}, warnings=warnings)
