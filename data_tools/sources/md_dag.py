"""ImageNet's WordNet DAG as Meta-Dataset stores it (one subgraph per split) and as smat-convert writes it.

MD's ``split_subgraphs`` (imagenet_specification.export_graph) hold, for each of TRAIN, VALID and TEST, the
list of that split's nodes ``{"wn_id", "words", "children_ids", "parents_ids"}`` sorted by id. The subgraphs are
separate graphs: in ``ilsvrc_2012`` TRAIN is rooted at ``entity``, VALID at ``carnivore`` and TEST at ``device``;
in ``ilsvrc_2012_v2`` every class is in TRAIN and VALID/TEST are empty. A split's leaves are its classes.
MD's sampler draws an episode of a split from that split's subgraph only, so the subgraphs are kept apart:
the ``ontology`` written to spec.json is ``{"type": "dag", "splits": {split: {"root", "nodes"}}, "words"}``
(docs/data_format.md), read by smat_dist.data.ontology.
"""
from __future__ import annotations

from pathlib import Path

from data_tools.writer import ConversionError

SPLITS = (("TRAIN", "train"), ("VALID", "val"), ("TEST", "test"))


def read_split_subgraphs(split_subgraphs: dict, path: Path) -> dict[str, dict]:
    """Check MD's ``split_subgraphs`` and return, per non-empty split, ``{"root": id, "leaves": [sorted ids],
    "nodes": {id: {"words": str, "children": [sorted ids]}}}``; errors name the file, split key and node."""
    unknown = sorted(set(split_subgraphs) - {k for k, _ in SPLITS})
    if unknown:
        raise ConversionError(f"{path}: key split_subgraphs has unknown split {unknown[0]!r} "
                              f"(expected TRAIN, VALID, TEST)")
    out: dict[str, dict] = {}
    leaf_split: dict[str, str] = {}
    for md_key, split in SPLITS:
        where = f"split_subgraphs.{md_key}"
        if md_key not in split_subgraphs:
            raise ConversionError(f"{path}: key split_subgraphs has no entry for split {md_key!r} (Meta-Dataset "
                                  f"writes all three, an unused split as [])")
        graph = split_subgraphs[md_key]
        if not isinstance(graph, list):
            raise ConversionError(f"{path}: key {where} must be a list of nodes, got {type(graph).__name__}")
        if not graph:
            continue
        nodes = _read_nodes(graph, where, path)
        root = _single_root(nodes, where, path)
        _check_acyclic(nodes, root, where, path)
        leaves = sorted(n for n, v in nodes.items() if not v["children"])
        for wn in leaves:
            if wn in leaf_split:
                raise ConversionError(f"{path}: class {wn!r} is a leaf of both split_subgraphs.{leaf_split[wn]} "
                                      f"and {where}; a class belongs to one split")
            leaf_split[wn] = md_key
        out[split] = {"root": root, "leaves": leaves, "nodes": nodes}
    return out


def _read_nodes(graph: list, where: str, path: Path) -> dict[str, dict]:
    nodes: dict[str, dict] = {}
    parents: dict[str, list[str] | None] = {}
    for i, n in enumerate(graph):
        wn = n.get("wn_id") if isinstance(n, dict) else None
        if not isinstance(wn, str) or not wn:
            raise ConversionError(f"{path}: key {where}[{i}] must be a node with a string 'wn_id', got {n!r:.80}")
        kids = n.get("children_ids")
        if not isinstance(kids, list) or not all(isinstance(k, str) for k in kids):
            raise ConversionError(f"{path}: node {wn!r} of {where} needs 'children_ids' (a list of WordNet ids)")
        words = n.get("words", "")
        if not isinstance(words, str):
            raise ConversionError(f"{path}: node {wn!r} of {where}: 'words' must be a string, got {words!r:.80}")
        if wn in nodes:
            raise ConversionError(f"{path}: node {wn!r} appears twice in {where}")
        nodes[wn] = {"words": words, "children": sorted(set(kids))}
        par = n.get("parents_ids")
        if par is not None and (not isinstance(par, list) or not all(isinstance(p, str) for p in par)):
            raise ConversionError(f"{path}: node {wn!r} of {where}: 'parents_ids' must be a list of WordNet ids")
        parents[wn] = par
    for wn, v in nodes.items():
        outside = [k for k in v["children"] if k not in nodes]
        if outside:
            raise ConversionError(f"{path}: node {wn!r} of {where} has child {outside[0]!r} which is not a node "
                                  f"of {where}")
    # export_graph writes both directions; they must agree (a hand-edited spec may break one side)
    has_parent: dict[str, set[str]] = {wn: set() for wn in nodes}
    for wn, v in nodes.items():
        for k in v["children"]:
            has_parent[k].add(wn)
    for wn, par in parents.items():
        if par is not None and set(par) != has_parent[wn]:
            raise ConversionError(f"{path}: node {wn!r} of {where} lists parents_ids {sorted(par)} but is a child of "
                                  f"{sorted(has_parent[wn])}")
    return nodes


def _single_root(nodes: dict[str, dict], where: str, path: Path) -> str:
    children = {k for v in nodes.values() for k in v["children"]}
    roots = sorted(set(nodes) - children)
    if len(roots) != 1:
        shown = ", ".join(roots[:5]) + (", ..." if len(roots) > 5 else "")
        raise ConversionError(f"{path}: {where} has {len(roots)} roots ({shown or 'none: a cycle'}); a split's "
                              f"subgraph needs exactly one")
    return roots[0]


def _check_acyclic(nodes: dict[str, dict], root: str, where: str, path: Path) -> None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    stack: list[tuple[str, bool]] = [(root, False)]
    while stack:
        n, done = stack.pop()
        if done:
            state[n] = 2
            continue
        if state.get(n) == 2:
            continue
        state[n] = 1
        stack.append((n, True))
        for k in nodes[n]["children"]:
            if state.get(k) == 1:
                raise ConversionError(f"{path}: {where} has a cycle through {k!r}")
            if k not in state:
                stack.append((k, False))
    unreachable = sorted(set(nodes) - set(state))
    if unreachable:  # one root, so these sit on a cycle with no way in
        raise ConversionError(f"{path}: {where} has nodes not reachable from its root {root!r} (a cycle), "
                              f"e.g. {unreachable[0]!r}")


def dag_ontology(dag: dict, written: dict[str, str]) -> dict | None:
    """The reader's ontology (docs/data_format.md) for the classes written, ``written`` mapping class name to
    split: each split's subgraph pruned to the nodes with a written class of that split below them (so --partial
    / --max-classes outputs stay valid). None when no split has a written class."""
    splits, words = {}, {}
    for split, g in dag["splits"].items():
        nodes = g["nodes"]
        mine = {name for name, s in written.items() if s == split}
        inner = sorted(n for n in mine if nodes.get(n, {}).get("children"))
        if inner:  # the reader treats any id with children as internal: such a class could never be drawn
            raise ConversionError(f"ImageNet DAG: classes {inner[:5]} have children in the {split} subgraph; "
                                  f"classes must be leaves")
        keep = _keep_above(nodes, g["root"], mine)
        if not keep.get(g["root"]):
            continue
        kept = sorted(n for n, k in keep.items() if k)
        splits[split] = {"root": g["root"],
                         "nodes": {n: [c for c in nodes[n]["children"] if keep.get(c)]
                                   for n in kept if nodes[n]["children"]}}
        for n in kept:
            if nodes[n]["words"]:
                words.setdefault(n, nodes[n]["words"])
    if not splits:
        return None
    return {"type": "dag", "splits": splits, "words": dict(sorted(words.items()))}


def _keep_above(nodes: dict[str, dict], root: str, leaves: set[str]) -> dict[str, bool]:
    """Iterative post-order: a node is kept when it is a written leaf or has a kept child (shared children once)."""
    keep: dict[str, bool] = {}
    stack = [(root, False)]
    while stack:
        n, done = stack.pop()
        kids = nodes[n]["children"]
        if done:
            keep[n] = n in leaves or any(keep.get(c, False) for c in kids)
            continue
        if n in keep:
            continue
        keep[n] = False  # provisional until its children are done
        stack.append((n, True))
        stack.extend((c, False) for c in kids if c not in keep)
    return keep
