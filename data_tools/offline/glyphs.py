"""Character domains: letters of the world's scripts from the Noto fonts (Omniglot-like) and kanji strokes.

Both draw each example at twice the output size and downscale, so jittered strokes stay anti-aliased. The
jitter of example k depends only on (seed, class, k): a class's images never change when other classes do.
"""
from __future__ import annotations

import functools
import json
import math
import unicodedata
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from smat_dist.utils.log import get_logger

from .common import DomainClass, DomainPlan, rng_for, seeded_subset
from .fetch import deb_root

log = get_logger("data_tools.offline.glyphs")

NOTO_DIR = "usr/share/fonts/truetype/noto"
KANJI_JSON = "usr/lib/python3/dist-packages/kanjidraw/data.json"
# The Unicode character name is "<SCRIPT> [CAPITAL |SMALL ]LETTER ..." (or SYLLABLE/IDEOGRAPH/...): the words
# before the first of these markers name the script, which is the alphabet (superclass) of the letter.
_NAME_MARKERS = (" CAPITAL LETTER", " SMALL LETTER", " LETTER", " SYLLABLE", " IDEOGRAPH", " CHARACTER")
_ALPHABET_ALIASES = {"GEORGIAN MTAVRULI": "GEORGIAN"}  # Mtavruli capitals belong to the Georgian alphabet
MIN_LETTERS = 10          # an alphabet with fewer letters is left out
LETTERS_PER_ALPHABET = 20  # default cap when max_classes is given (Omniglot has 14-55 letters per alphabet)


def _alphabet_of(cp: int) -> str | None:
    """The script a code point is a letter of, or None for non-letters, Latin-1 and decomposable letters."""
    if cp <= 0xFF:
        return None
    c = chr(cp)
    # L* without modifier letters; decomposable letters (accented, presentation forms) are near-copies of
    # their base letter and would make near-duplicate classes
    if unicodedata.category(c) not in ("Lu", "Ll", "Lt", "Lo") or unicodedata.decomposition(c):
        return None
    name = unicodedata.name(c, "")
    for m in _NAME_MARKERS:
        i = name.find(m)
        if i > 0:
            a = name[:i]
            return _ALPHABET_ALIASES.get(a, a)
    return None


@functools.lru_cache(maxsize=4)
def _noto_index(font_dir: str) -> dict[str, dict[int, list[str]]]:
    """alphabet -> code point -> font files (sorted) that map it, for alphabets with >= MIN_LETTERS letters."""
    from fontTools.ttLib import TTFont

    fonts = sorted(Path(font_dir).glob("*.ttf"))
    if not fonts:
        raise FileNotFoundError(f"no .ttf fonts in {font_dir} (is fonts-noto-core fetched?)")
    index: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for f in fonts:
        cmap = TTFont(str(f), lazy=True).getBestCmap() or {}
        for cp in cmap:
            a = _alphabet_of(cp)
            if a is not None:
                index[a][cp].append(f.name)
    return {a: dict(v) for a, v in index.items() if len(v) >= MIN_LETTERS}


@functools.lru_cache(maxsize=512)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _render_letter(font_path: str, cp: int, size: int, rng: np.random.Generator | None) -> Image.Image | None:
    """One letter, centred, black on white; None when the font draws nothing for it."""
    R = 2 * size
    scale, angle, dx, dy, stroke = 0.7, 0.0, 0.0, 0.0, 0
    if rng is not None:
        scale = 0.7 * rng.uniform(0.8, 1.12)
        angle = rng.uniform(-10, 10)
        dx, dy = rng.uniform(-0.07, 0.07, size=2) * R
        stroke = int(rng.choice([0, 0, 1, 2]))
    ch = chr(cp)
    pt = R // 2
    box = _font(font_path, pt).getbbox(ch)
    w, h = box[2] - box[0], box[3] - box[1]
    if w <= 0 or h <= 0:
        return None
    # size by the glyph's own ink box, not the font size: scripts whose letters are drawn small (or huge)
    # in the em square all fill about `scale` of the image
    pt = max(8, int(pt * scale * R / max(w, h)) // 2 * 2)  # even sizes only: fewer cached fonts
    font = _font(font_path, pt)
    box = font.getbbox(ch, stroke_width=stroke)
    w, h = box[2] - box[0], box[3] - box[1]
    canvas = Image.new("L", (R, R), 255)
    x = (R - w) / 2 - box[0] + dx
    y = (R - h) / 2 - box[1] + dy
    ImageDraw.Draw(canvas).text((x, y), ch, font=font, fill=0, stroke_width=stroke, stroke_fill=0)
    if ImageOps.invert(canvas).getbbox() is None:
        return None
    if angle:
        canvas = canvas.rotate(angle, resample=Image.BICUBIC, fillcolor=255)
    return canvas.resize((size, size), Image.LANCZOS).convert("RGB")


def _choose_letters(index, max_classes, seed):
    """{alphabet: [code points]}: every letter, or about max_classes spread over as many alphabets as fit."""
    alphabets = sorted(index)
    if max_classes is None:
        return {a: sorted(index[a]) for a in alphabets}
    # Omniglot-like shape: about per_alph letters from each of max_classes/per_alph alphabets (>= 3 alphabets,
    # so that train/val/test each get one)
    per_alph = 1 if max_classes < 6 else max(2, min(LETTERS_PER_ALPHABET, max_classes // 20))
    n_alph = max(3, min(len(alphabets), max_classes // per_alph))
    chosen = seeded_subset(alphabets, n_alph, seed, "noto_scripts", "alphabets")
    # deal the class budget out round-robin, so small alphabets that run out leave more for the others
    take, budget = dict.fromkeys(chosen, 0), max_classes
    while budget > 0:
        dealt = 0
        for a in chosen:
            if budget > 0 and take[a] < len(index[a]):
                take[a] += 1
                budget -= 1
                dealt += 1
        if not dealt:
            break
    out = {a: seeded_subset(sorted(index[a]), k, seed, "noto_scripts", a) for a, k in take.items() if k}
    return out


def noto_scripts(cache_dir, *, max_classes, images_per_class, image_size, seed) -> DomainPlan:
    font_dir = deb_root(cache_dir) / NOTO_DIR
    index = _noto_index(str(font_dir))
    n = images_per_class or 20
    letters = _choose_letters(index, max_classes, seed)
    log.info("noto_scripts: %d alphabets with >= %d letters; using %d alphabets, %d letters",
             len(index), MIN_LETTERS, len(letters), sum(map(len, letters.values())))

    def items(alphabet, cp):
        fonts = [str(font_dir / f) for f in sorted(index[alphabet][cp])]

        def gen():
            made, k = 0, 0
            # the first pass over the fonts renders each font untouched; later examples add jitter
            while made < n and k < 4 * n + len(fonts):
                f = fonts[k % len(fonts)]
                jitter = None if k < len(fonts) else rng_for(seed, "noto_scripts", cp, k)
                im = _render_letter(f, cp, image_size, jitter)
                if im is not None:
                    yield f"{Path(f).name}#U+{cp:04X}#{k}", im
                    made += 1
                k += 1
        return gen

    classes = [DomainClass(f"{a}/U+{cp:04X}", items(a, cp), group=a) for a in sorted(letters) for cp in letters[a]]
    return DomainPlan(classes, min_count=n, split_by_group=True)


# ---- kanji ------------------------------------------------------------------------------------------------

def _render_kanji(strokes, size: int, rng: np.random.Generator | None) -> Image.Image:
    """Strokes (line segments on a 256 grid) drawn as slightly curved brush lines with per-example jitter."""
    R = 2 * size
    k = R / 256.0
    width = 11.0
    scale, angle, shift = 0.86, 0.0, np.zeros(2)
    if rng is not None:
        width = rng.uniform(7.0, 16.0)
        scale = 0.86 * rng.uniform(0.88, 1.08)
        angle = math.radians(rng.uniform(-6, 6))
        shift = rng.uniform(-10, 10, size=2)
    ca, sa = math.cos(angle), math.sin(angle)

    def tf(p):  # rotate/scale about the grid centre, then shift, then to canvas pixels
        x, y = p[0] - 128.0, p[1] - 128.0
        return ((ca * x - sa * y) * scale + 128.0 + shift[0]) * k, ((sa * x + ca * y) * scale + 128.0 + shift[1]) * k

    canvas = Image.new("L", (R, R), 255)
    d = ImageDraw.Draw(canvas)
    for seg in strokes:
        p0, p1 = np.array(seg[:2], float), np.array(seg[2:], float)
        w = width
        bend = 0.0
        if rng is not None:
            p0 = p0 + rng.normal(0, 3.0, 2)
            p1 = p1 + rng.normal(0, 3.0, 2)
            bend = rng.normal(0, 0.08)  # control-point offset as a fraction of the stroke length
            w = width * rng.uniform(0.85, 1.15)
        v = p1 - p0
        ctrl = (p0 + p1) / 2 + bend * np.array([-v[1], v[0]])
        t = np.linspace(0, 1, 12)[:, None]
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * ctrl + t ** 2 * p1  # quadratic Bezier
        xy = [tf(p) for p in pts]
        wp = max(1, int(round(w * k * scale)))
        d.line(xy, fill=0, width=wp, joint="curve")
        for x, y in (xy[0], xy[-1]):  # round caps
            r = wp / 2
            d.ellipse((x - r, y - r, x + r, y + r), fill=0)
    return canvas.resize((size, size), Image.LANCZOS).convert("RGB")


def kanji(cache_dir, *, max_classes, images_per_class, image_size, seed) -> DomainPlan:
    path = deb_root(cache_dir) / KANJI_JSON
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"cannot read kanji strokes {path}: {e} (is python3-kanjidraw fetched?)") from e
    strokes = {}
    for n_strokes, table in data.items():
        for ch, segs in table.items():
            if not segs or any(len(s) != 4 for s in segs):
                raise ValueError(f"{path}: kanji {ch!r} ({n_strokes} strokes) has malformed strokes {segs[:2]}")
            strokes[ch] = segs
    n = images_per_class or 20
    chars = seeded_subset(sorted(strokes), max_classes, seed, "kanji", "classes")
    log.info("kanji: %d kanji in %s; using %d", len(strokes), path.name, len(chars))

    def items(ch):
        def gen():
            for i in range(n):
                rng = None if i == 0 else rng_for(seed, "kanji", ch, i)
                yield f"kanji/U+{ord(ch):04X}#{i}", _render_kanji(strokes[ch], image_size, rng)
        return gen

    return DomainPlan([DomainClass(f"U+{ord(ch):04X} {ch}", items(ch)) for ch in chars], min_count=n)
