"""Icon domains from iconify JSON sets: emoji (class = emoji name, examples = vendor styles) and UI icons
(class = icon name, examples = icon sets). Each example is a different designer's drawing of the same concept.

An iconify set is ``{"prefix", "width", "height", "icons": {name: {"body", "width"?, ...}}, "aliases": {name:
{"parent", "hFlip"?, "vFlip"?, "rotate"?}}}``; an alias is the parent drawn with its own transformations, so
``arrow-left`` aliased to ``arrow-right`` + hFlip really points left. SVGs are rasterised with cairosvg.
"""
from __future__ import annotations

import functools
import io
import json
from collections import defaultdict
from pathlib import Path

from PIL import Image

from smat_dist.utils.log import get_logger

from .common import DomainClass, DomainPlan, fit_square, seeded_subset
from .fetch import npm_dir, packages_for

log = get_logger("data_tools.offline.iconify")

EMOJI_MIN_SETS = 5   # an emoji name drawn by fewer sets is not a class
ICON_MIN_SETS = 10   # an icon name drawn by fewer sets is not a class
_BANNED_LICENCES = ("CC-BY-NC",)  # non-commercial sets stay out of the benchmark


@functools.lru_cache(maxsize=128)
def _load_set(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read iconify set {path}: {e}") from e


def _sets(cache_dir, domain: str) -> dict[str, str]:
    """prefix -> icons.json path of every set of the domain, minus sets under a banned licence."""
    out = {}
    for pkg in packages_for([domain]):
        d = npm_dir(cache_dir, pkg.name)
        icons, info = d / "icons.json", d / "info.json"
        if not icons.exists():
            raise FileNotFoundError(f"{icons} is missing (run the offline fetch for {domain!r} first)")
        spdx = ""
        if info.exists():
            spdx = (json.loads(info.read_text()).get("license") or {}).get("spdx") or ""
        if spdx.startswith(_BANNED_LICENCES):
            log.info("%s: leaving out %s (licence %s)", domain, pkg.name, spdx)
            continue
        out[_load_set(str(icons))["prefix"]] = str(icons)
    return out


def _resolve(js: dict, name: str, depth: int = 0):
    """(icon dict, hFlip, vFlip, quarter turns) for a name that is an icon or an alias chain ending in one."""
    if name in js.get("icons", {}):
        return js["icons"][name], False, False, 0
    alias = js.get("aliases", {}).get(name)
    if alias is None or depth > 8:
        raise KeyError(f"iconify set {js.get('prefix')!r}: {name!r} is neither an icon nor a resolvable alias")
    icon, h, v, r = _resolve(js, alias["parent"], depth + 1)
    # iconify applies the alias's transformations on top of the parent's
    return ({**icon, **{k: alias[k] for k in ("width", "height", "left", "top") if k in alias}},
            h ^ bool(alias.get("hFlip")), v ^ bool(alias.get("vFlip")), (r + int(alias.get("rotate", 0))) % 4)


def render_icon(js: dict, name: str, size: int) -> Image.Image:
    """Rasterise one icon to a size x size RGB image on white (monochrome sets draw in black)."""
    import cairosvg

    icon, hflip, vflip, turns = _resolve(js, name)
    w = icon.get("width", js.get("width", 16))
    h = icon.get("height", js.get("height", 16))
    left, top = icon.get("left", js.get("left", 0)), icon.get("top", js.get("top", 0))
    turns = (turns + int(icon.get("rotate", 0))) % 4
    hflip ^= bool(icon.get("hFlip"))
    vflip ^= bool(icon.get("vFlip"))
    body = icon["body"].replace("currentColor", "#000")
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
           f'viewBox="{left} {top} {w} {h}" width="{w}" height="{h}">{body}</svg>')
    # render at 2x then downscale: thin strokes of 16 px icon sets survive the resize better
    scale = 2 * size / max(w, h)
    png = cairosvg.svg2png(bytestring=svg.encode(), output_width=max(1, round(w * scale)),
                           output_height=max(1, round(h * scale)))
    im = Image.open(io.BytesIO(png))
    im.load()
    if hflip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    if vflip:
        im = im.transpose(Image.FLIP_TOP_BOTTOM)
    if turns:
        im = im.rotate(-90 * turns, expand=True)  # iconify's rotate is clockwise quarter turns
    if im.convert("RGBA").getchannel("A").getbbox() is None:
        raise BlankIcon("renders blank (fully transparent)")
    return fit_square(im, size, margin=0.06)


class BlankIcon(ValueError):
    """The SVG draws nothing visible (an empty body, or shapes that need features cairosvg lacks)."""


def _plan(cache_dir, domain, min_sets, *, max_classes, images_per_class, image_size, seed) -> DomainPlan:
    sets = _sets(cache_dir, domain)
    by_name: dict[str, list[str]] = defaultdict(list)
    for prefix in sorted(sets):
        js = _load_set(sets[prefix])
        for name in sorted(set(js.get("icons", {})) | set(js.get("aliases", {}))):
            if js.get("icons", {}).get(name, {}).get("hidden"):
                continue  # hidden icons are kept only for backwards compatibility
            by_name[name].append(prefix)
    names = [n for n in sorted(by_name) if len(by_name[n]) >= min_sets]
    # with a class budget take the names most sets agree on (more examples per class), ties by name
    if max_classes is not None:
        names = sorted(names, key=lambda n: (-len(by_name[n]), n))[:max_classes]
    log.info("%s: %d sets; %d names in >= %d sets; using %d", domain, len(sets),
             sum(len(v) >= min_sets for v in by_name.values()), min_sets, len(names))

    skipped: list[dict] = []

    def items(name):
        prefixes = seeded_subset(by_name[name], images_per_class, seed, domain, name)

        def gen():
            for prefix in prefixes:
                src = f"{prefix}:{name}"
                try:
                    im = render_icon(_load_set(sets[prefix]), name, image_size)
                except Exception as e:  # a malformed SVG body in one set must not sink the class
                    log.warning("%s: cannot render %s: %s", domain, src, e)
                    skipped.append({"path": src, "reason": f"cannot render: {e}"})
                    continue
                yield src, im
        return gen

    # one broken drawing may take a class below its set count; a class that loses more is left out
    min_count = min(min_sets, images_per_class or min_sets) - 1
    return DomainPlan([DomainClass(n, items(n)) for n in sorted(names)], min_count=min_count, skipped=skipped,
                      drop_short=True)


def emoji(cache_dir, **kw) -> DomainPlan:
    return _plan(cache_dir, "emoji", EMOJI_MIN_SETS, **kw)


def icons(cache_dir, **kw) -> DomainPlan:
    return _plan(cache_dir, "icons", ICON_MIN_SETS, **kw)
