"""The offline domain registry and the conversion driver: plan classes, split them, write shards.

ID domains get Meta-Dataset-style class splits (70/15/15 of classes, seeded); noto_scripts splits whole
alphabets (Omniglot style) and records the alphabet -> letters ontology. OOD domains put every class in test.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from data_tools.writer import DatasetWriter
from smat_dist.utils.log import get_logger

from . import glyphs, iconify, pictures
from .common import DomainPlan, assign_splits
from .fetch import fetch_packages, packages_for, require

log = get_logger("data_tools.offline")


@dataclass(frozen=True)
class DomainInfo:
    name: str
    kind: str                          # "id" (meta-train/val/test class splits) or "ood" (all classes in test)
    render: Callable[..., DomainPlan]  # (cache_dir, *, max_classes, images_per_class, image_size, seed)
    default_max_classes: int | None    # the demo-sized subset; None = every class
    default_images_per_class: int | None
    description: str

    @property
    def packages(self) -> list[str]:
        """Registry packages this domain is built from (digits needs none: it ships inside scikit-learn)."""
        return [f"{p.kind}:{p.spec}" for p in packages_for([self.name])]


DOMAINS: dict[str, DomainInfo] = {d.name: d for d in (
    DomainInfo("noto_scripts", "id", glyphs.noto_scripts, 200, 20,
               "letters of ~130 scripts in the Noto fonts; alphabet-level splits (Omniglot-like)"),
    DomainInfo("kanji", "id", glyphs.kanji, 200, 20, "6,394 kanji from kanjidraw strokes, jittered rendering"),
    DomainInfo("textures", "id", pictures.textures, 200, 20, "168 GIMP patterns, crops at random scale/angle"),
    DomainInfo("emoji", "id", iconify.emoji, 200, 11, "emoji drawn by >= 5 of 11 iconify emoji sets"),
    DomainInfo("icons", "id", iconify.icons, 200, 20, "UI icon names drawn by >= 10 of 55 iconify icon sets"),
    DomainInfo("clipart", "id", pictures.clipart, 100, 20, "openclipart category folders with >= 20 drawings"),
    DomainInfo("fashion_mnist", "ood", pictures.fashion_mnist, None, 200, "Fashion-MNIST product photos, 10 classes"),
    DomainInfo("digits", "ood", pictures.digits, None, None, "scikit-learn 8x8 handwritten digits, 10 classes"),
)}


def fetch(domains, cache_dir) -> None:
    """Fetch and unpack every package the given domains need into ``cache_dir`` (idempotent: packages already
    there are skipped); an unknown domain name is refused before anything is fetched."""
    domains = list(domains)
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown offline domain(s) {unknown}; known: {sorted(DOMAINS)}")
    fetch_packages(domains, cache_dir)


def _converter_id(domain, max_classes, images_per_class, image_size, seed) -> str:
    """The spec's 'converter' field: the arguments are part of it, so a rerun with other arguments into the same
    folder is refused by the writer instead of silently returning the old dataset."""
    return (f"offline:{domain} max_classes={max_classes or 'all'} images_per_class={images_per_class or 'all'} "
            f"image_size={image_size} seed={seed}")


ALL = 0  # max_classes / images_per_class value meaning "every class" / "every image the source has"


def convert(domain: str, output_dir, cache_dir, *, max_classes: int | None = None,
            images_per_class: int | None = None, image_size: int = 84, seed: int = 0,
            fetch_missing: bool = True) -> dict:
    """Render one domain into ``output_dir`` (shards + spec.json) and return the spec; a no-op if already complete.

    max_classes / images_per_class: None takes the domain's demo-sized default (DOMAINS[domain]), ALL (0) takes
    every class / image, a positive number caps them. ``cache_dir`` holds the fetched packages; missing ones are
    fetched first (setup time: Debian/npm registries only) unless ``fetch_missing`` is False.
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown offline domain {domain!r}; known: {sorted(DOMAINS)}")
    info = DOMAINS[domain]
    for key, v in (("max_classes", max_classes), ("images_per_class", images_per_class)):
        if v is not None and v < 0:
            raise ValueError(f"{key} must be >= 0 (0 = all) or None (the domain's default), got {v}")
    if max_classes is None:
        max_classes = info.default_max_classes
    if images_per_class is None:
        images_per_class = info.default_images_per_class
    max_classes = max_classes or None  # renderers take None as "all"
    images_per_class = images_per_class or None
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    t0 = time.time()
    conv = _converter_id(domain, max_classes, images_per_class, image_size, seed)
    if (Path(output_dir) / "spec.json").exists():
        # complete already: the writer checks it is this domain with these arguments and returns its spec
        with DatasetWriter(output_dir, name=domain, converter=conv) as w:
            return w.spec
    if fetch_missing:
        fetch([domain], cache_dir)
    require(cache_dir, domain)
    plan = info.render(cache_dir, max_classes=max_classes, images_per_class=images_per_class,
                       image_size=image_size, seed=seed)
    split_of = _splits(domain, info.kind, plan, seed)
    groups: dict[str, list[int]] = {}
    with DatasetWriter(output_dir, name=domain, converter=conv, min_count=max(1, plan.min_count)) as w:
        for i, c in enumerate(plan.classes):
            items = c.items()
            if plan.drop_short:
                items = list(items)  # one class of small images: cheap to hold while counting
                if len(items) < plan.min_count:
                    log.warning("%s: leaving out class %r: %d usable images, below %d", domain, c.name,
                                len(items), plan.min_count)
                    plan.skipped.append({"path": c.name, "reason": f"class left out: {len(items)} usable images, "
                                                                   f"below {plan.min_count}"})
                    continue
            label = w.add_class(c.name, split_of[c.group if plan.split_by_group else c.name], items)
            if c.group is not None:
                groups.setdefault(c.group, []).append(label)
            if (i + 1) % 50 == 0 or i + 1 == len(plan.classes):
                log.info("%s: %d/%d classes (%.0f s)", domain, i + 1, len(plan.classes), time.time() - t0)
        if groups:
            w.set_ontology({"type": "bilevel", "superclasses": groups})
        w.skipped.extend(plan.skipped)
    spec = w.spec
    log.info("%s: %d classes (%s), %d images in %.1f s", domain, spec["counts"]["classes"],
             "/".join(f"{s}={len(spec['splits'][s])}" for s in ("train", "val", "test")),
             spec["counts"]["images"], time.time() - t0)
    return spec


def _splits(domain: str, kind: str, plan: DomainPlan, seed: int) -> dict[str, str]:
    if kind == "ood":
        return {c.name: "test" for c in plan.classes}
    if plan.split_by_group:
        return assign_splits([c.group for c in plan.classes], seed, domain)
    return assign_splits([c.name for c in plan.classes], seed, domain)


def convert_all(output_root, cache_dir, *, domains=None, max_classes: int | None = None,
                images_per_class: int | None = None, image_size: int = 84, seed: int = 0,
                fetch_missing: bool = True) -> dict[str, str]:
    """Fetch (if needed) and convert every domain (or ``domains``) into ``output_root/<domain>/``; None takes each
    domain's demo-sized default, ALL (0) everything. Returns domain -> folder."""
    domains = list(DOMAINS) if domains is None else list(domains)
    if fetch_missing:
        fetch(domains, cache_dir)  # one apt-get/npm call for all domains rather than one per domain
    out = {}
    for d in domains:
        folder = Path(output_root) / d
        convert(d, folder, cache_dir, max_classes=max_classes, images_per_class=images_per_class,
                image_size=image_size, seed=seed, fetch_missing=False)
        out[d] = str(folder)
    return out
