"""Class-split helper shared by the original-layout Meta-Dataset converters."""
from __future__ import annotations

from data_tools.sources.base import Options
from data_tools.splits import MD_COUNTS, load_split_file, md_split_indices, ordered_by_split
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


def md_split(source: str, keys: list, opts: Options) -> list[tuple[object, str]]:
    """[(key, split)] in MD label order, from --split-file when given, else MD's seeded rule over keys."""
    if opts.split_file:
        try:
            return load_split_file(opts.split_file, keys)
        except ValueError as e:
            raise ConversionError(str(e)) from e
    tr, va, te = md_counts_for(source, len(keys), opts)
    return ordered_by_split(keys, *md_split_indices(tr, va, te, seed=opts.seed))
