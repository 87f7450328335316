"""Image domains: GIMP textures (crops), openclipart categories, Fashion-MNIST and scikit-learn digits."""
from __future__ import annotations

import gzip
import hashlib
import os
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from smat_dist.utils.log import get_logger

from .common import DomainClass, DomainPlan, fit_square, on_white, rng_for, seeded_subset
from .fetch import deb_root

log = get_logger("data_tools.offline.pictures")

PATTERN_DIR = "usr/share/gimp/2.0/patterns"
CLIPART_DIR = "usr/share/openclipart/png"
FASHION_DIR = "usr/share/datasets/fashion-mnist"
CLIPART_MIN_IMAGES = 20
# openclipart holds a few posters of up to 623 Mpx (2.4 GB decoded): those are left out, the rest decoded
CLIPART_MAX_PIXELS = 40_000_000
FASHION_CLASSES = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle_boot")


# ---- textures ----------------------------------------------------------------------------------------------

def read_pat(path: Path) -> Image.Image:
    """Decode a GIMP .pat pattern (big-endian header: size, version, width, height, bytes per pixel, 'GPAT')."""
    b = path.read_bytes()
    if len(b) < 24 or b[20:24] != b"GPAT":
        raise ValueError(f"{path}: not a GIMP pattern (no GPAT magic)")
    hs, version, w, h, c = struct.unpack(">5I", b[:20])
    if c not in (1, 2, 3, 4) or w == 0 or h == 0 or len(b) < hs + w * h * c:
        raise ValueError(f"{path}: bad pattern header (w={w}, h={h}, bpp={c}, {len(b)} bytes)")
    a = np.frombuffer(b, np.uint8, offset=hs, count=w * h * c).reshape(h, w, c)
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[c]
    return Image.fromarray(a[:, :, 0] if c == 1 else a, mode)


def _texture_crop(pat: Image.Image, size: int, rng: np.random.Generator | None) -> Image.Image:
    """A crop of the tiled pattern at a random scale, angle, offset and flip (the whole tile when rng is None)."""
    if rng is None:
        return pat.resize((size, size), Image.LANCZOS)
    w, h = pat.size
    crop = max(8, int(min(w, h) * rng.uniform(0.45, 1.4)))
    # tile enough copies that a rotated crop anywhere in the middle never reaches the edge
    need = int(crop * 1.5) + max(w, h)
    tiled = Image.new(pat.mode, (need + w, need + h))
    for y in range(0, need + h, h):
        for x in range(0, need + w, w):
            tiled.paste(pat, (x, y))
    angle = float(rng.uniform(0, 360))
    cx, cy = tiled.size[0] / 2 + rng.uniform(0, w), tiled.size[1] / 2 + rng.uniform(0, h)
    half = crop * 0.75
    region = tiled.crop((int(cx - half), int(cy - half), int(cx + half), int(cy + half))).rotate(angle, Image.BICUBIC)
    m = (region.size[0] - crop) // 2
    out = region.crop((m, m, m + crop, m + crop))
    if rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return out.resize((size, size), Image.LANCZOS)


def textures(cache_dir, *, max_classes, images_per_class, image_size, seed) -> DomainPlan:
    root = deb_root(cache_dir) / PATTERN_DIR
    pats = sorted(root.rglob("*.pat"))
    if not pats:
        raise FileNotFoundError(f"no .pat patterns under {root} (are gimp-data and gimp-data-extras fetched?)")
    names = {p: p.relative_to(root).with_suffix("").as_posix() for p in pats}
    chosen = seeded_subset(pats, max_classes, seed, "textures", "classes")
    n = images_per_class or 20
    log.info("textures: %d patterns; using %d", len(pats), len(chosen))

    def items(p):
        def gen():
            pat = on_white(read_pat(p))
            for i in range(n):
                rng = None if i == 0 else rng_for(seed, "textures", names[p], i)
                yield f"{names[p]}.pat#{i}", _texture_crop(pat, image_size, rng)
        return gen

    return DomainPlan([DomainClass(names[p], items(p)) for p in chosen], min_count=n)


# ---- clip-art ----------------------------------------------------------------------------------------------

def _png_pixels(path: Path) -> int:
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        return -1
    w, h = struct.unpack(">II", head[16:24])
    return w * h


def _load_clipart(path: Path, size: int) -> Image.Image:
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = CLIPART_MAX_PIXELS + 1  # the caller has already checked the header size
    try:
        with Image.open(path) as im:
            im.load()
            # palette/grey-alpha/16-bit modes cannot be reduced: go to RGBA (which keeps transparency) first
            rgba = im if im.mode in ("RGB", "RGBA") else im.convert("RGBA")
            # shrink big drawings in integer steps first: LANCZOS over 100 Mpx would take seconds
            f = max(1, min(rgba.size) // (4 * size))
            small = rgba.reduce(f) if f > 1 else rgba.copy()
    finally:
        Image.MAX_IMAGE_PIXELS = old
    return fit_square(small, size, margin=0.04)


def clipart(cache_dir, *, max_classes, images_per_class, image_size, seed) -> DomainPlan:
    root = deb_root(cache_dir) / CLIPART_DIR
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is missing (is openclipart-png fetched?)")
    skipped, folders = [], {}
    for d, _, files in sorted(os.walk(root)):
        good, seen = [], {}
        for f in sorted(files):
            if not f.endswith(".png"):
                continue
            p = Path(d) / f
            px = _png_pixels(p)
            if px < 0 or px > CLIPART_MAX_PIXELS:
                skipped.append({"path": p.relative_to(root).as_posix(),
                                "reason": "not a PNG" if px < 0 else f"{px / 1e6:.0f} Mpx, above the "
                                f"{CLIPART_MAX_PIXELS / 1e6:.0f} Mpx limit"})
                continue
            digest = hashlib.sha256(p.read_bytes()).digest()
            if digest in seen:  # openclipart ships some drawings twice under two names: one class member each
                skipped.append({"path": p.relative_to(root).as_posix(), "reason": f"same file as {seen[digest]}"})
                continue
            seen[digest] = p.relative_to(root).as_posix()
            good.append(p)
        if len(good) >= CLIPART_MIN_IMAGES:
            folders[Path(d).relative_to(root).as_posix()] = good
    chosen = seeded_subset(sorted(folders), max_classes, seed, "clipart", "classes")
    n = images_per_class or max((len(folders[c]) for c in chosen), default=0)  # None: every image
    log.info("clipart: %d folders with >= %d distinct images; using %d, up to %d images each", len(folders),
             CLIPART_MIN_IMAGES, len(chosen), n)

    def items(name):
        # a seeded order of the whole folder: an unreadable file is replaced by the next one in that order
        files = [folders[name][i] for i in rng_for(seed, "clipart", name).permutation(len(folders[name]))]

        def gen():
            made = 0
            for p in files:
                if made >= n:
                    return
                rel = p.relative_to(root).as_posix()
                try:
                    im = _load_clipart(p, image_size)
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                    log.warning("clipart: skipping unreadable %s: %s", rel, e)
                    skipped.append({"path": rel, "reason": str(e)})
                    continue
                yield rel, im
                made += 1
        return gen

    # unreadable files are replaced and listed in 'skipped'; a folder that still falls short is left out
    return DomainPlan([DomainClass(c, items(c)) for c in chosen], min_count=min(CLIPART_MIN_IMAGES, n), skipped=skipped,
                      drop_short=True)


# ---- OOD: Fashion-MNIST and digits -------------------------------------------------------------------------

def _read_idx(path: Path, magic: int) -> np.ndarray:
    try:
        b = gzip.open(path).read()
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    got = struct.unpack(">I", b[:4])[0] if len(b) >= 4 else None
    if got != magic:
        raise ValueError(f"{path}: idx magic {got} is not {magic}")
    if magic == 2051:
        n, h, w = struct.unpack(">3I", b[4:16])
        if len(b) < 16 + n * h * w:
            raise ValueError(f"{path}: truncated ({len(b)} bytes for {n} images of {h}x{w})")
        return np.frombuffer(b, np.uint8, offset=16, count=n * h * w).reshape(n, h, w)
    n = struct.unpack(">I", b[4:8])[0]
    if len(b) < 8 + n:
        raise ValueError(f"{path}: truncated ({len(b)} bytes for {n} labels)")
    return np.frombuffer(b, np.uint8, offset=8, count=n)


def _upscale(gray: np.ndarray, size: int, resample) -> Image.Image:
    return Image.fromarray(gray).resize((size, size), resample).convert("RGB")


def fashion_mnist(cache_dir, *, max_classes, images_per_class, image_size, seed) -> DomainPlan:
    d = deb_root(cache_dir) / FASHION_DIR
    # the official test images first, then the training images when more are asked for
    parts = [(s, _read_idx(d / f"{s}-images-idx3-ubyte.gz", 2051), _read_idx(d / f"{s}-labels-idx1-ubyte.gz", 2049))
             for s in ("t10k", "train")]
    n = images_per_class or 7000  # None: every image (1,000 test + 6,000 train per class)
    labels = seeded_subset(list(range(10)), max_classes, seed, "fashion_mnist", "classes")

    def items(lab):
        def gen():
            made = 0
            for split, X, y in parts:
                for i in np.flatnonzero(y == lab):
                    if made >= n:
                        return
                    yield f"{split}#{i}", _upscale(X[i], image_size, Image.BILINEAR)
                    made += 1
        return gen

    return DomainPlan([DomainClass(FASHION_CLASSES[lab], items(lab)) for lab in labels], min_count=min(n, 1000))


def digits(cache_dir, *, max_classes, images_per_class, image_size, seed) -> DomainPlan:
    from sklearn.datasets import load_digits  # ships inside scikit-learn: nothing to fetch

    data = load_digits()
    X = (255 - np.clip(data.images, 0, 16) * (255 / 16)).round().astype(np.uint8)  # dark ink on white
    y = data.target
    labels = seeded_subset(list(range(10)), max_classes, seed, "digits", "classes")
    counts = {lab: int((y == lab).sum()) for lab in labels}
    n = min(images_per_class or max(counts.values()), min(counts.values()))

    def items(lab):
        def gen():
            for i in np.flatnonzero(y == lab)[:images_per_class]:
                yield f"load_digits#{i}", _upscale(X[i], image_size, Image.BILINEAR)
        return gen

    return DomainPlan([DomainClass(str(lab), items(lab)) for lab in labels], min_count=n)
