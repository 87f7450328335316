"""Class splits shared by the original-layout Meta-Dataset converters: MD's split file, MD's spec, or MD's rule.

MD's converter (dataset_to_records.py) keys every split by class *name* (``get_splits`` reads
``<source>_splits.json``: {"train": [...], "valid": [...], "test": [...]}, labels assigned in that order), and
draws a missing split with its seeded rule over the names in a source-specific order. The converters here
pass the names in that order; this module picks the listing and checks it against the classes of the input.
"""
from __future__ import annotations

from pathlib import Path

from data_tools.sources.base import Options, Plan
from data_tools.sources.md_spec import load_md_spec
from data_tools.splits import MD_COUNTS, md_split_indices, ordered_by_split, read_split_file
from data_tools.writer import ConversionError


def md_counts_for(source: str, n: int, opts: Options) -> tuple[int, int, int]:
    """MD's (train, valid, test) class counts; with --partial, scaled to the n classes found."""
    counts = MD_COUNTS[source]["classes"]
    if n == sum(counts):
        return counts
    if not opts.extra.get("partial"):
        raise ConversionError(
            f"{source}: found {n} classes in the input, Meta-Dataset has {sum(counts)} "
            f"(train/valid/test {counts[0]}/{counts[1]}/{counts[2]}); classes are missing or the input is "
            f"not the full dataset. Pass --partial to convert a subset with proportionally scaled splits")
    total = sum(counts)
    scaled = [int(n * c / total) for c in counts]
    for i, c in enumerate(counts):  # every split MD uses keeps at least one class when possible
        if c and not scaled[i] and sum(scaled) < n:
            scaled[i] = 1
    last = max(i for i, c in enumerate(counts) if c)
    scaled[last] += n - sum(scaled)
    return tuple(scaled)


def given_listing(opts: Options) -> tuple[list[tuple[str, str]], str] | None:
    """[(name, split)] in MD label order from --split-file, else from a plain/bilevel --md-spec; None without."""
    if opts.split_file:
        try:
            return read_split_file(opts.split_file), f"split file {opts.split_file}"
        except ValueError as e:
            raise ConversionError(str(e)) from e
    if opts.md_spec:
        md = load_md_spec(Path(opts.md_spec))
        if md.kind == "HierarchicalDatasetSpecification":
            raise ConversionError(f"--md-spec {opts.md_spec} is a {md.kind} (ILSVRC's); this source needs its own "
                                  f"DatasetSpecification")
        return [(c.name, c.split) for c in md.classes], f"--md-spec {opts.md_spec}"
    return None


def md_split(source: str, names: list[str], opts: Options, present: set[str] | None = None
             ) -> tuple[list[tuple[str, str]], list[str]]:
    """([(name, split)] in MD label order, warnings).

    ``names``: MD's class names in the order its seeded rule indexes them; ``present``: those with data in the
    input (default: all). The listing comes from --split-file, else --md-spec, else MD's seeded rule over
    ``names`` (scaled under --partial when the input has fewer names than MD). A listed class without data is
    an error unless --partial; an input class the listing does not hold is left out with a warning.
    """
    present = set(names) if present is None else present
    given = given_listing(opts)
    if given is None:
        tr, va, te = md_counts_for(source, len(names), opts)
        listing, what = ordered_by_split(names, *md_split_indices(tr, va, te, seed=opts.seed)), "Meta-Dataset"
    else:
        listing, what = given
    missing = [(n, s) for n, s in listing if n not in present]
    if missing and not opts.extra.get("partial"):
        n, s = missing[0]
        raise ConversionError(f"{what}: class {n!r} of split {s!r} is not in the input ({len(missing)} of "
                              f"{len(listing)} listed classes are missing); pass --partial to convert a subset")
    listed = {n for n, _ in listing}
    unlisted = [n for n in names if n in present and n not in listed]
    warnings = []
    if unlisted:
        warnings.append(f"{source}: {len(unlisted)} classes of the input are not in {what}'s split and are not "
                        f"converted: {', '.join(unlisted[:8])}{', ...' if len(unlisted) > 8 else ''}")
    return [(n, s) for n, s in listing if n in present], warnings


def check_md_spec(plan: Plan, opts: Options) -> Plan:
    """With a plain/bilevel --md-spec: the plan's classes must be the spec's (same names, splits, label order,
    alphabets), and the spec's per-class image counts become the expected counts (a difference is warned)."""
    if not opts.md_spec:
        return plan
    md = load_md_spec(Path(opts.md_spec))
    by_name = {c.name: c for c in md.classes}
    for c in plan.classes:
        m = by_name.get(c.name)
        if m is None or m.split != c.split or m.superclass != c.superclass:
            want = "not a class" if m is None else f"of split {m.split!r}" + (
                f", alphabet {m.superclass!r}" if m.superclass else "")
            raise ConversionError(f"--md-spec {opts.md_spec}: class {c.name!r} of split {c.split!r} is {want} "
                                  f"in the spec; the input or the spec is not Meta-Dataset's {plan.name}")
    planned = [c.name for c in plan.classes]
    kept = set(planned)
    spec_order = [c.name for c in md.classes if c.name in kept]
    if planned != spec_order:
        i = next(k for k, (a, b) in enumerate(zip(planned, spec_order)) if a != b)
        raise ConversionError(f"--md-spec {opts.md_spec}: label order differs at class {i}: the input gives "
                              f"{planned[i]!r}, the spec {spec_order[i]!r}")
    plan.expected_classes = md.counts()
    if md.per_class:
        plan.expected_per_class = {md.classes[lab].name: n for lab, n in md.per_class.items()}
        plan.expected_images = sum(md.per_class.values())
    plan.warnings = plan.warnings + md.warnings
    return plan
