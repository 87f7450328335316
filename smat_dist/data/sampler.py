"""Meta-Dataset's episode composition sampler (variable-way variable-shot), plus fixed N-way K-shot.

The functions mirror meta_dataset/data/sampling.py rule for rule (ways, query count, support-set size,
log-uniform class imbalance, DAG and bilevel ontologies); only the random generator differs: every call
takes a counter-based numpy Generator (see rng.py) instead of a module-level RandomState, so an episode is
a pure function of its identity. After the composition, each class's support and query images are a
uniformly random subset of the class without replacement, support first (as MD's shuffled class streams).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .ontology import bilevel_for_split, dag_for_split
from .spec import DatasetSpec


@dataclass(frozen=True)
class SamplerConfig:
    mode: str = "variable"               # "variable" (Meta-Dataset) or "fixed" (N-way K-shot Q-query)
    ways: int = 5                        # fixed mode only
    shots: int = 5                       # fixed mode only
    queries: int = 10                    # fixed mode only (per class)
    min_ways: int = 5
    max_ways_upper_bound: int = 50
    max_num_query: int = 10
    max_support_set_size: int = 500
    max_support_size_contrib_per_class: int = 100
    min_log_weight: float = math.log(0.5)
    max_log_weight: float = math.log(2.0)
    ignore_dag_ontology: bool = False
    ignore_bilevel_ontology: bool = False

    def __post_init__(self):
        if self.mode not in ("variable", "fixed"):
            raise ValueError(f"episode mode must be 'variable' or 'fixed', got {self.mode!r}")
        if self.mode == "fixed" and (self.ways < 1 or self.shots < 1 or self.queries < 0):
            raise ValueError(f"fixed episodes need ways>=1, shots>=1, queries>=0; got {self.ways}/{self.shots}/"
                             f"{self.queries}")
        if self.min_ways < 1 or self.max_ways_upper_bound < self.min_ways:
            raise ValueError(f"need 1 <= min_ways <= max_ways_upper_bound, got {self.min_ways}, "
                             f"{self.max_ways_upper_bound}")
        if self.min_log_weight > self.max_log_weight:
            raise ValueError("min_log_weight must be <= max_log_weight")


@dataclass
class EpisodeDescription:
    source: str
    split: str
    index: int
    labels: list[int]                    # global labels, in episode-label order (episode label j = labels[j])
    class_names: list[str]
    shots: list[int]                     # support images per class
    queries: list[int]                   # query images per class (equal across classes, as in MD)
    support_ids: list[list[int]] = field(default_factory=list)   # member indices within each class
    query_ids: list[list[int]] = field(default_factory=list)

    @property
    def ways(self) -> int:
        return len(self.labels)

    def to_json(self) -> dict:
        return {"source": self.source, "split": self.split, "index": self.index, "ways": self.ways,
                "classes": self.class_names, "labels": self.labels, "shots": self.shots, "queries": self.queries}


# ---- Meta-Dataset's rules, one function each (names follow sampling.py) ------------------------------------

def sample_num_ways_uniformly(num_classes: int, min_ways: int, max_ways: int, rng: np.random.Generator) -> int:
    max_ways = min(max_ways, num_classes)
    return int(rng.integers(min_ways, max_ways + 1))


def sample_class_ids_uniformly(num_ways: int, rel_classes, rng: np.random.Generator) -> np.ndarray:
    return rng.choice(np.asarray(rel_classes), num_ways, replace=False)


def compute_num_query(images_per_class: np.ndarray, max_num_query: int) -> int:
    """Balanced query: at most max_num_query and at most half of the smallest class."""
    if images_per_class.min() < 2:
        raise ValueError("Expected at least 2 images per class.")
    return int(np.minimum(max_num_query, (images_per_class // 2).min()))


def sample_support_set_size(num_remaining_per_class: np.ndarray, max_support_size_contrib_per_class: int,
                            max_support_set_size: int, rng: np.random.Generator) -> int:
    if max_support_set_size < len(num_remaining_per_class):
        raise ValueError("max_support_set_size is too small to have at least one support example per class.")
    beta = rng.uniform()
    contrib = np.minimum(max_support_size_contrib_per_class, num_remaining_per_class)
    # floor(beta * c) + 1 == ceil of a draw in (0, 1]: the support set has at least one image per class.
    return int(np.minimum(np.floor(beta * contrib + 1).sum(), max_support_set_size))


def sample_num_support_per_class(images_per_class: np.ndarray, num_remaining_per_class: np.ndarray,
                                 support_set_size: int, min_log_weight: float, max_log_weight: float,
                                 rng: np.random.Generator) -> np.ndarray:
    if support_set_size < len(num_remaining_per_class):
        raise ValueError("Requesting smaller support set than the number of ways.")
    if np.min(num_remaining_per_class) < 1:
        raise ValueError("Some classes have no remaining examples.")
    remaining = support_set_size - len(num_remaining_per_class)
    unnormalized = images_per_class * np.exp(rng.uniform(min_log_weight, max_log_weight,
                                                         size=images_per_class.shape))
    proportions = unnormalized / unnormalized.sum()
    desired = np.floor(proportions * remaining).astype(np.int64) + 1
    return np.minimum(desired, num_remaining_per_class)


class EpisodeSampler:
    """Composition of episodes of one split of one source; ``describe(rng, index)`` draws one."""

    def __init__(self, spec: DatasetSpec, split: str, cfg: SamplerConfig):
        self.spec, self.split, self.cfg = spec, split, cfg
        self.labels = spec.split_labels(split)
        self.counts = {lab: spec.classes[lab].count for lab in self.labels}
        self.bilevel = self.dag = None
        onto = spec.ontology
        if cfg.mode == "variable" and onto is not None:
            if onto["type"] == "bilevel" and not cfg.ignore_bilevel_ontology:
                self.bilevel = bilevel_for_split(spec, split, cfg.min_ways)
            elif onto["type"] == "dag" and not cfg.ignore_dag_ontology:
                self.dag = dag_for_split(spec, split, cfg.min_ways)
        need = cfg.ways if cfg.mode == "fixed" else cfg.min_ways
        if len(self.labels) < need:
            what = f"ways={cfg.ways}" if cfg.mode == "fixed" else f"min_ways={cfg.min_ways}"
            raise ValueError(f"{spec.name}: split {split!r} has {len(self.labels)} classes, fewer than {what}")
        if cfg.mode == "fixed":
            per_class = cfg.shots + cfg.queries
            small = [lab for lab in self.labels if self.counts[lab] < per_class]
            if small:
                # Fail at startup, not on the episode that happens to draw the class.
                lab = small[0]
                raise ValueError(f"{spec.name}: class {spec.classes[lab].name!r} (label {lab}, split {split!r}) has "
                                 f"{self.counts[lab]} images, fewer than shots+queries={cfg.shots}+{cfg.queries}"
                                 f"{f' ({len(small)} such classes)' if len(small) > 1 else ''}")
        else:
            small = [lab for lab in self.labels if self.counts[lab] < 2]
            if small:
                lab = small[0]
                raise ValueError(f"{spec.name}: class {spec.classes[lab].name!r} (label {lab}, split {split!r}) has "
                                 f"{self.counts[lab]} image(s); Meta-Dataset episodes need at least 2 per class "
                                 f"(one support, one query)")

    def sample_class_ids(self, rng: np.random.Generator) -> list[int]:
        cfg = self.cfg
        if cfg.mode == "fixed":
            return [int(x) for x in sample_class_ids_uniformly(cfg.ways, self.labels, rng)]
        if self.dag is not None:
            leaves = self.dag.span[int(rng.integers(len(self.dag.span)))]
            if len(leaves) > cfg.max_ways_upper_bound:
                leaves = rng.choice(np.asarray(leaves), size=cfg.max_ways_upper_bound, replace=False)
            return [int(x) for x in leaves]
        if self.bilevel is not None:
            sup = self.bilevel.superclasses[int(rng.integers(len(self.bilevel.superclasses)))]
            members = self.bilevel.members[sup]
            ways = sample_num_ways_uniformly(len(members), cfg.min_ways, cfg.max_ways_upper_bound, rng)
            return [int(x) for x in sample_class_ids_uniformly(ways, members, rng)]
        ways = sample_num_ways_uniformly(len(self.labels), cfg.min_ways, cfg.max_ways_upper_bound, rng)
        return [int(x) for x in sample_class_ids_uniformly(ways, self.labels, rng)]

    def describe(self, rng: np.random.Generator, index: int) -> EpisodeDescription:
        cfg = self.cfg
        labels = self.sample_class_ids(rng)
        images = np.array([self.counts[lab] for lab in labels], dtype=np.int64)
        if cfg.mode == "fixed":
            shots = [cfg.shots] * len(labels)
            num_query = cfg.queries
        else:
            num_query = compute_num_query(images, cfg.max_num_query)
            remaining = images - num_query
            size = sample_support_set_size(remaining, cfg.max_support_size_contrib_per_class,
                                           cfg.max_support_set_size, rng)
            shots = [int(s) for s in sample_num_support_per_class(images, remaining, size, cfg.min_log_weight,
                                                                  cfg.max_log_weight, rng)]
        support_ids, query_ids = [], []
        for lab, s in zip(labels, shots):
            perm = rng.permutation(self.counts[lab])
            support_ids.append([int(i) for i in perm[:s]])
            query_ids.append([int(i) for i in perm[s:s + num_query]])
        return EpisodeDescription(source=self.spec.name, split=self.split, index=index, labels=labels,
                                  class_names=[self.spec.classes[lab].name for lab in labels], shots=shots,
                                  queries=[num_query] * len(labels), support_ids=support_ids, query_ids=query_ids)
