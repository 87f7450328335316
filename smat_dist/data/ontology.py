"""Meta-Dataset's class ontologies, read from ``spec['ontology']``.

Bilevel (Omniglot): ``{"type": "bilevel", "superclasses": {"Alphabet": [label, ...], ...}}``. An episode
first picks one superclass (alphabet) of the split uniformly, then its ways and classes within it.

DAG (ImageNet): ``{"type": "dag", "root": ID, "nodes": {ID: [child ID, ...], ...}, "words": {ID: text}}`` (``words``
optional, informative only), one graph for every split; or, as smat-convert writes Meta-Dataset's ImageNet,
``{"type": "dag", "splits": {split: {"root": ID, "nodes": {...}}}, "words": {...}}``, each split's own subgraph (MD
roots its validation and test subgraphs at their own synsets), a split's episodes using only its subgraph.
An id that is not a key of ``nodes`` (or whose child list is empty) is a leaf and must be a class of the dataset,
named by the class ``name`` (smat-convert writes the WordNet id, e.g. ``n01440764``) or, when no class has that
name, by its label as a decimal string. As in Meta-Dataset, the internal nodes of the split's subgraph that span
between ``min_ways`` and 392 of the split's leaves are eligible; an episode picks one uniformly and uses its
spanned leaves (sub-sampled to ``max_ways_upper_bound``).
"""
from __future__ import annotations

from dataclasses import dataclass

from .spec import DatasetSpec, SpecError

# Meta-Dataset's bound on the leaves an internal node may span to be eligible (the smallest value that keeps
# every ImageNet leaf reachable); larger nodes would make class choice close to uniform anyway.
MAX_SPANNING_LEAVES_ELIGIBLE = 392


@dataclass
class BilevelOntology:
    superclasses: list[str]          # sorted names of the split's superclasses
    members: dict[str, list[int]]    # superclass -> its labels in the split, in label order


@dataclass
class DagOntology:
    nodes: list[str]                 # eligible internal nodes, sorted by id
    span: list[list[int]]            # labels of the split's leaves each eligible node spans, sorted


def bilevel_for_split(spec: DatasetSpec, split: str, min_ways: int) -> BilevelOntology:
    in_split = set(spec.split_labels(split))
    members: dict[str, list[int]] = {}
    for sup, labels in spec.ontology["superclasses"].items():
        mine = sorted(lab for lab in labels if lab in in_split)
        if not mine:
            continue  # superclasses of other splits
        if len(mine) < min_ways:
            # Meta-Dataset raises here too: such a superclass cannot produce a min_ways episode.
            raise ValueError(f"{spec.name}: superclass {sup!r} has {len(mine)} classes in split {split!r}, "
                             f"fewer than min_ways={min_ways}")
        members[sup] = mine
    if not members:
        raise ValueError(f"{spec.name}: no superclass of the bilevel ontology has classes in split {split!r}")
    covered = {lab for labs in members.values() for lab in labs}
    missing = in_split - covered
    if missing:
        names = [spec.classes[lab].name for lab in sorted(missing)[:5]]
        raise SpecError(f"{spec.spec_path}: key ontology.superclasses does not cover classes {names} of "
                        f"split {split!r}")
    return BilevelOntology(sorted(members), members)


def _leaf_label(spec: DatasetSpec, node: str, by_name: dict[str, int]) -> int:
    if node in by_name:
        return by_name[node]
    if node.isdigit() and int(node) in spec.classes:
        return int(node)
    raise SpecError(f"{spec.spec_path}: ontology leaf {node!r} is neither a class name nor a class label")


def split_graph(spec: DatasetSpec, split: str) -> tuple[str, dict[str, list[str]], str]:
    """(root, internal node -> children, key for errors) of the DAG the split's episodes are drawn from."""
    onto = spec.ontology
    if "splits" not in onto:
        return onto["root"], onto["nodes"], "ontology"
    graph = onto["splits"].get(split)
    if graph is None:
        raise SpecError(f"{spec.spec_path}: key ontology.splits has no subgraph for split {split!r} "
                        f"(has {sorted(onto['splits'])})")
    return graph["root"], graph["nodes"], f"ontology.splits.{split!r}"


def dag_for_split(spec: DatasetSpec, split: str, min_ways: int) -> DagOntology:
    root, nodes, key = split_graph(spec, split)
    children: dict[str, list[str]] = {k: list(v) for k, v in nodes.items()}
    if root not in children:
        raise SpecError(f"{spec.spec_path}: {key} root {root!r} is not a key of {key}.nodes")
    by_name = {c.name: c.label for c in spec.classes.values()}
    in_split = set(spec.split_labels(split))
    # Post-order traversal with memoisation: the leaves each node spans (a DAG: shared children are reused).
    span: dict[str, frozenset[int]] = {}
    stack: list[tuple[str, bool]] = [(root, False)]
    on_path: set[str] = set()
    while stack:
        node, done = stack.pop()
        if node in span:
            continue
        kids = children.get(node, [])
        if not kids:
            span[node] = frozenset({_leaf_label(spec, node, by_name)})
            continue
        if done:
            on_path.discard(node)
            span[node] = frozenset().union(*(span[k] for k in kids))
            continue
        if node in on_path:
            raise SpecError(f"{spec.spec_path}: {key} has a cycle through {node!r}")
        on_path.add(node)
        stack.append((node, True))
        stack.extend((k, False) for k in kids if k not in span)
    reachable = set().union(*(s for n, s in span.items() if not children.get(n)))
    unreachable = in_split - reachable
    if unreachable:
        names = [spec.classes[lab].name for lab in sorted(unreachable)[:5]]
        raise SpecError(f"{spec.spec_path}: classes {names} of split {split!r} are not leaves under ontology "
                        f"root {root!r}")
    nodes, spans = [], []
    for node in sorted(n for n in span if children.get(n)):
        leaves = sorted(span[node] & in_split)
        if min_ways <= len(leaves) <= MAX_SPANNING_LEAVES_ELIGIBLE:
            nodes.append(node)
            spans.append(leaves)
    if not nodes:
        raise ValueError(f"{spec.name}: no ontology node spans between min_ways={min_ways} and "
                         f"{MAX_SPANNING_LEAVES_ELIGIBLE} classes of split {split!r}; no episode can be drawn")
    return DagOntology(nodes, spans)
