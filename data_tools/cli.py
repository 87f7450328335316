"""smat-convert SOURCE --input PATH --output DIR: convert one dataset to WebDataset shards + spec.json.

Offline domains (``offline:<domain>``, ``offline-all``) take --input as the package cache folder; without it the
cache is ``.offline-cache`` in the folder that holds the dataset folders: ``<output>/../.offline-cache`` for
``offline:<domain>`` and ``<output>/.offline-cache`` for ``offline-all`` (so both share one cache). Nothing is
written outside --output and that cache.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_tools.sources import SOURCES
from data_tools.sources.base import Options, Plan
from data_tools.sources.md_dag import dag_ontology
from data_tools.splits import parse_fractions
from data_tools.writer import ConversionError, DatasetWriter
from smat_dist.utils.log import get_logger, setup_logging
from smat_dist.utils.progress import Progress

log = get_logger("data_tools.cli")

MD_SEED = 22       # Meta-Dataset's seed for its class splits
OFFLINE_SEED = 0   # data_tools.offline.convert's default
OFFLINE_CACHE = ".offline-cache"
OFFLINE_IMAGE_SIZE = 84

MD_RULES = 2  # version of the original-layout rules (2: MD's class names, ILSVRC's duplicate lists)
MD_ORIGINALS = ("ilsvrc_2012", "omniglot", "aircraft", "cu_birds", "dtd", "quickdraw", "fungi", "vgg_flower",
                "traffic_sign", "mscoco")
# Options that only some sources read: any other source refuses them rather than ignoring them.
APPLIES_TO = {
    "--split-file": [s for s in MD_ORIGINALS if s not in ("omniglot", "ilsvrc_2012")],  # MD fixes those two
    "--md-spec": list(MD_ORIGINALS),
    "--keep-duplicates": ["ilsvrc_2012"],
    "--md-duplicates": ["ilsvrc_2012"],
    "--partial": list(MD_ORIGINALS),
    "--seed": [*MD_ORIGINALS, "imagefolder"],
    "--splits": ["imagefolder"],
    "--name": ["imagefolder"],
}


def build_parser() -> argparse.ArgumentParser:
    lines = [f"  {k:<14} {v[1]}" for k, v in SOURCES.items()]
    lines += ["  offline:<domain> an offline real-image domain (data_tools.offline)",
              "  offline-all    every offline domain, one folder each under --output"]
    p = argparse.ArgumentParser(
        prog="smat-convert", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert a dataset into WebDataset tar shards plus spec.json (docs/data_format.md).",
        epilog="sources:\n" + "\n".join(lines))
    p.add_argument("source", nargs="?", help="one of the sources listed below")
    p.add_argument("--verify", type=Path, metavar="DIR",
                   help="check a converted dataset (or a folder of them) instead of converting: decode every image, "
                        "check shard sizes and digests against spec.json; exit 2 if anything is damaged")
    p.add_argument("--input", type=Path,
                   help="dataset root in the source's layout; offline: the package cache folder (default "
                        "<output>/../.offline-cache for offline:<domain>, <output>/.offline-cache for offline-all)")
    p.add_argument("--output", type=Path, help="output folder (created; must be empty or ours); required")
    p.add_argument("--strict", action="store_true", help="fail on the first unreadable image instead of skipping")
    p.add_argument("--shard-bytes", type=int, default=256 << 20, help="close a shard after the class that passes this")
    p.add_argument("--min-count", type=int, default=1, help="fail when a class has fewer readable images")
    p.add_argument("--max-classes", type=int, help="keep at most N classes of each split (smoke runs)")
    p.add_argument("--split-file", type=Path,
                   help="Meta-Dataset's <source>_splits.json (shipped in data_tools/md_aux/splits/) instead of its "
                        "seeded rule; not for omniglot or ilsvrc_2012, whose splits are fixed")
    p.add_argument("--md-spec", type=Path,
                   help="Meta-Dataset's <source>_dataset_spec.json: ilsvrc_2012 needs it (the DAG split); other "
                        "original-layout sources take their split from it and check names and counts against it")
    p.add_argument("--keep-duplicates", action="store_true",
                   help="ilsvrc_2012: keep the images Meta-Dataset leaves out as duplicates of Caltech/CUB images")
    p.add_argument("--md-duplicates", type=Path, metavar="DIR",
                   help="ilsvrc_2012: folder holding Meta-Dataset's ImageNet_*_duplicates.txt (default: the copies "
                        "shipped in data_tools/md_aux)")
    p.add_argument("--splits", help="imagefolder: seeded class split, e.g. train=0.7,val=0.15,test=0.15")
    p.add_argument("--seed", type=int, default=None,
                   help=f"seed of the class split (default {MD_SEED}, as Meta-Dataset); offline: seed of the "
                        f"rendering and class split (default {OFFLINE_SEED})")
    p.add_argument("--images-per-class", type=int, default=None,
                   help="offline: images rendered per class (default: the domain's demo size; 0 = all)")
    p.add_argument("--image-size", type=int, default=None,
                   help=f"offline: side of the rendered square images (default {OFFLINE_IMAGE_SIZE})")
    p.add_argument("--partial", action="store_true",
                   help="accept an input with fewer classes than Meta-Dataset (MD's split kept for the classes "
                        "present, or scaled when the input alone names the classes); reports how many are missing")
    p.add_argument("--name", help="imagefolder: dataset name (default: the input folder name)")
    return p


def _select(plan: Plan, max_classes: int | None) -> list:
    if max_classes is None:
        return plan.classes
    seen: dict[str, int] = {}
    out = []
    for c in plan.classes:
        if seen.get(c.split, 0) < max_classes:
            seen[c.split] = seen.get(c.split, 0) + 1
            out.append(c)
    return out


def _check_classes(plan: Plan, classes: list, full: bool, partial: bool) -> None:
    found = tuple(sum(1 for c in classes if c.split == s) for s in ("train", "val", "test"))
    log.info("%s: %d classes to write (train/val/test %d/%d/%d)", plan.name, len(classes), *found)
    if full and plan.expected_classes and found != tuple(plan.expected_classes):
        raise ConversionError(f"{plan.name}: expected train/val/test classes {tuple(plan.expected_classes)}, "
                              f"the input gives {found}; pass --partial to convert a subset")
    if partial and plan.expected_classes:
        missing = sum(plan.expected_classes) - len(plan.classes)
        plan.report["classes_missing"] = missing
        if missing > 0:
            msg = (f"{plan.name}: --partial: {missing} of {sum(plan.expected_classes)} Meta-Dataset classes are not "
                   f"in the input (train/val/test {found[0]}/{found[1]}/{found[2]} of "
                   f"{'/'.join(map(str, plan.expected_classes))} converted)")
            log.warning(msg)
            plan.warnings.append(msg)


def _check_images(plan: Plan, spec: dict, full: bool) -> list[str]:
    warnings = []
    if full and plan.expected_images is not None and spec["counts"]["images"] != plan.expected_images:
        warnings.append(f"{plan.name}: {spec['counts']['images']} images written, expected {plan.expected_images} "
                        f"({len(spec['skipped'])} skipped as unreadable)")
    if plan.expected_per_class:
        bad = [(c["name"], c["count"], plan.expected_per_class[c["name"]]) for c in spec["classes"]
               if c["name"] in plan.expected_per_class and c["count"] != plan.expected_per_class[c["name"]]]
        if bad:
            warnings.append(f"{plan.name}: {len(bad)} classes differ from the expected image count, e.g. "
                            + ", ".join(f"{n}: {got} (expected {exp})" for n, got, exp in bad[:5]))
    for w in warnings:
        log.warning(w)
    return warnings


def convert(args: argparse.Namespace) -> dict:
    if args.source not in SOURCES:
        raise ConversionError(f"unknown source {args.source!r}; choose from {', '.join(SOURCES)}, "
                              f"offline:<domain>, offline-all")
    if args.input is None:
        raise ConversionError(f"{args.source} needs --input PATH")
    offline_only = [f for f, v in (("--images-per-class", args.images_per_class), ("--image-size", args.image_size))
                    if v is not None]
    if offline_only:
        raise ConversionError(f"{', '.join(offline_only)} only apply to offline:<domain> and offline-all, "
                              f"not to {args.source}")
    given = {"--split-file": args.split_file, "--md-spec": args.md_spec, "--keep-duplicates": args.keep_duplicates,
             "--md-duplicates": args.md_duplicates, "--partial": args.partial, "--seed": args.seed,
             "--splits": args.splits, "--name": args.name}
    for flag, value in given.items():
        if value not in (None, False) and args.source not in APPLIES_TO[flag]:
            raise ConversionError(f"{flag} does not apply to {args.source}; it is for "
                                  f"{', '.join(APPLIES_TO[flag])}")
    if args.seed is None:
        args.seed = MD_SEED
    if not args.input.is_dir():
        raise ConversionError(f"--input {args.input} is not a folder")
    inp, out = args.input.resolve(), args.output.resolve()
    if out == inp or inp in out.parents:
        # the next conversion of that tree would read the shards (or their folder) as input
        raise ConversionError(f"--output {args.output} is inside --input {args.input}: choose a folder outside the "
                              f"input tree")
    fractions = parse_fractions(args.splits) if args.splits else None
    opts = Options(max_classes=args.max_classes, split_file=args.split_file, md_spec=args.md_spec,
                   fractions=fractions, seed=args.seed,
                   extra={"partial": args.partial, "name": args.name, "keep_duplicates": args.keep_duplicates,
                          "md_duplicates": args.md_duplicates})
    settings = {"source": args.source, "input": str(args.input.resolve()), "max_classes": args.max_classes,
                "split_file": str(args.split_file) if args.split_file else None,
                "md_spec": str(args.md_spec) if args.md_spec else None, "splits": fractions,
                "seed": args.seed, "partial": args.partial, "min_count": args.min_count,
                "strict": args.strict, "shard_bytes": args.shard_bytes}
    if args.source in MD_ORIGINALS:
        # an output written under older rules (other class names, ILSVRC with MD's duplicates) is refused on a
        # rerun, naming this key, instead of being reused; bump when the classes or images written change
        settings["md_rules"] = MD_RULES
    if args.source == "ilsvrc_2012":
        settings["keep_duplicates"] = args.keep_duplicates
        settings["md_duplicates"] = str(args.md_duplicates) if args.md_duplicates else None
    converter = json.dumps(settings, sort_keys=True)
    plan = SOURCES[args.source][0](args.input, opts)
    for warning in plan.warnings:
        log.warning(warning)
    classes = _select(plan, args.max_classes)
    full = args.max_classes is None and not args.partial
    _check_classes(plan, classes, full, args.partial and args.max_classes is None)
    for key, value in plan.report.items():
        log.info("%s: %s = %s", plan.name, key, value)
    if plan.expected_per_class and args.source == "imagefolder":   # file counts: known before anything is written
        few = [(c.name, plan.expected_per_class[c.name]) for c in classes
               if plan.expected_per_class.get(c.name, args.min_count) < args.min_count]
        if few:
            raise ConversionError(f"class {few[0][0]!r} of {plan.name} has {few[0][1]} image file(s), below "
                                  f"--min-count {args.min_count} ({len(few)} such class(es))")
    with DatasetWriter(args.output, plan.name, converter, shard_bytes=args.shard_bytes, min_count=args.min_count,
                       strict=args.strict) as w:
        if w.complete:
            return {"name": plan.name, "output": str(args.output), "status": "already complete", **w.spec["counts"]}
        labels, supers = {}, {}
        with Progress(len(classes), f"convert {plan.name}", unit="class", units="classes", every_s=5.0) as bar:
            for i, c in enumerate(classes):
                labels[c.name] = w.add_class(c.name, c.split, c.items())
                if c.superclass is not None:
                    supers.setdefault(c.superclass, []).append(labels[c.name])
                bar.update_to(i + 1, extra=f"{c.name} ({c.split}): {w.classes[-1]['count']} images")
        notes = plan.notes() if plan.notes else []
        for note in notes:
            log.warning(note)
        w.notes = notes
        if supers:
            w.set_ontology({"type": "bilevel", "superclasses": supers})
        elif plan.dag:
            w.set_ontology(dag_ontology(plan.dag, {c.name: c.split for c in classes}))  # None: none written
    spec = w.spec
    warnings = plan.warnings + spec.get("notes", []) + _check_images(plan, spec, full)
    return {"name": plan.name, "output": str(args.output), "status": "written", **spec["counts"], **plan.report,
            "skipped": len(spec["skipped"]), "shards": len(spec["shards"]), "warnings": warnings}


def offline_cache(args: argparse.Namespace) -> Path:
    """--input, or ``.offline-cache`` in the folder holding the dataset folders (shared by both offline forms)."""
    if args.input is not None:
        return args.input
    root = args.output if args.source == "offline-all" else args.output.resolve().parent
    return root / OFFLINE_CACHE


def convert_offline(args: argparse.Namespace) -> list[dict]:
    try:
        import data_tools.offline as offline
    except ImportError as e:
        raise ConversionError(f"offline domains are unavailable: cannot import data_tools.offline ({e})") from e
    if (args.split_file or args.md_spec or args.splits or args.partial or args.name or args.keep_duplicates
            or args.md_duplicates):
        raise ConversionError("--split-file, --md-spec, --splits, --partial, --name, --keep-duplicates and "
                              "--md-duplicates do not apply to offline domains (their splits are seeded; see --seed)")
    domains = list(offline.DOMAINS) if args.source == "offline-all" else [args.source.split(":", 1)[1]]
    unknown = [d for d in domains if d not in offline.DOMAINS]
    if unknown:
        raise ConversionError(f"unknown offline domain {unknown[0]!r}; choose from {', '.join(offline.DOMAINS)}")
    cache = offline_cache(args)
    if cache.exists() and not cache.is_dir():
        raise ConversionError(f"offline package cache {cache} exists and is not a folder")
    kw = {"max_classes": args.max_classes, "images_per_class": args.images_per_class,
          "image_size": OFFLINE_IMAGE_SIZE if args.image_size is None else args.image_size,
          "seed": OFFLINE_SEED if args.seed is None else args.seed}
    log.info("offline %s -> %s (package cache %s, %s)", ", ".join(domains), args.output, cache,
             ", ".join(f"{k}={v}" for k, v in kw.items()))
    try:
        if args.source == "offline-all":
            folders = offline.convert_all(args.output, cache, **kw)
        else:
            offline.convert(domains[0], args.output, cache, **kw)
            folders = {domains[0]: str(args.output)}
    except offline.FetchError as e:  # a RuntimeError: report it like every other conversion error
        raise ConversionError(f"cannot fetch the packages into {cache}: {e}") from e
    out = []
    for d, folder in folders.items():
        spec = json.loads((Path(folder) / "spec.json").read_text())
        out.append({"name": d, "output": str(folder), "cache": str(cache), **spec["counts"],
                    "splits": {s: len(v) for s, v in spec["splits"].items()}})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verify is None and (args.source is None or args.output is None):
        parser.error("the following arguments are required: source, --output (or --verify DIR)")
    setup_logging()
    if args.verify is not None:
        from data_tools.verify import verify

        try:
            reports = verify(args.verify)
        except OSError as e:
            print(f"smat-convert: error: {e}", file=sys.stderr)
            return 2
        ok = all(not r.problems for r in reports)
        print(json.dumps({"verify": str(args.verify), "ok": ok, "datasets": [r.as_dict() for r in reports]}))
        return 0 if ok else 2
    try:
        if args.source.startswith("offline:") or args.source == "offline-all":
            result = convert_offline(args)
        else:
            result = convert(args)
    except (ConversionError, ValueError, OSError) as e:
        print(f"smat-convert: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
