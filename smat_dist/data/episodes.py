"""The episode API the trainer and evaluator use.

An episode is a pure function of (seed, split, source, index): the source is drawn uniformly from
(seed, split, index), then the composition, the images and the augmentation from keyed counter-based
streams (rng.py). The trainer's checkpointed *cursor* is the global index of the next step's first episode;
step s of rank r takes the ``per_rank`` indices ``start + s*world*per_rank + r*per_rank + j``. The stream of
indices consumed per step is therefore the same at every world size with the same global batch, and a run
resumed at any world size from a cursor continues the same sequence of episodes.

Faults: every shard's size is checked against spec.json when the stream is built (a truncated or replaced
shard is refused in seconds, before any training step). A corrupt image found when an episode draws it ends
the run (``on_corrupt="error"``, naming member and shard) or, with ``on_corrupt="skip"``, is replaced by another
member of the same class chosen by a pure function of (seed, split, source, index, slot) - the same on
every rank, data worker and after resume - and logged as a warning naming member and shard.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Iterator

import torch
from PIL import UnidentifiedImageError

from smat_dist.utils.log import get_logger

from .reader import CorruptImageError, ShardReader, check_byte_ranges, check_shard_sizes, member_key
from .remote import RemotePolicy
from .worker_errors import guarded
from .rng import episode_rng
from .sampler import EpisodeDescription, EpisodeSampler, SamplerConfig
from .spec import DatasetSpec, load_spec
from .transforms import decode, eval_transform, normalize_batch, train_transform

log = get_logger("data.episodes")

ON_CORRUPT = ("error", "skip")
# PIL raises OSError/UnidentifiedImageError for bad bytes, SyntaxError/ValueError for some broken headers
_DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError)
# how many other members of the class a corrupt image's replacement may try (each one that is corrupt too
# is skipped deterministically); a class with no readable image among them ends the run
_MAX_REPLACEMENT_TRIES = 32


@dataclass(frozen=True)
class EpisodeConfig(SamplerConfig):
    """Meta-Dataset sampler settings (SamplerConfig: mode, ways, shots, queries and the MD bounds) + image size."""
    image_size: int = 128
    on_corrupt: str = "error"      # error | skip (see the module docstring)
    remote_timeout_s: float = 30.0  # http(s) sources: per socket operation (smat_dist/data/remote.py)
    remote_retries: int = 3

    def __post_init__(self):
        super().__post_init__()
        v = str(getattr(self.on_corrupt, "value", self.on_corrupt))   # a config Enum or its value
        if v not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {', '.join(ON_CORRUPT)}, got {self.on_corrupt!r}")
        object.__setattr__(self, "on_corrupt", v)

    @classmethod
    def from_config(cls, cfg, **overrides) -> "EpisodeConfig":
        """The episode settings of a run config (its ``data`` group and ``model.image_size``)."""
        d = cfg.data
        kw = dict(mode=getattr(d.mode, "value", d.mode), ways=d.ways, shots=d.shots, queries=d.queries,
                  max_ways_upper_bound=d.max_ways, max_support_set_size=d.max_support,
                  image_size=cfg.model.image_size, on_corrupt=getattr(d, "on_corrupt", "error"),
                  remote_timeout_s=getattr(d, "remote_timeout_s", 30.0), remote_retries=getattr(d, "remote_retries", 3))
        kw.update(overrides)
        return cls(**kw)

    def sampler_config(self) -> SamplerConfig:
        return SamplerConfig(**{f.name: getattr(self, f.name) for f in fields(SamplerConfig)})


@dataclass
class Episode:
    support: torch.Tensor          # [Ns, 3, H, W] float32, ImageNet-normalised
    support_labels: torch.Tensor   # [Ns] int64 in [0, ways)
    query: torch.Tensor            # [Nq, 3, H, W]
    query_labels: torch.Tensor     # [Nq]
    source: str
    split: str
    index: int
    ways: int
    class_names: list[str]

    @property
    def num_images(self) -> int:
        return int(self.support.shape[0] + self.query.shape[0])


class EpisodeStream:
    def __init__(self, sources: list[str] | str, split: str, cfg: EpisodeConfig | None = None, seed: int = 0,
                 train_aug: bool = False, max_handles: int = 4):
        if isinstance(sources, str):
            sources = [sources]
        if not sources:
            raise ValueError("EpisodeStream needs at least one source")
        self.cfg = cfg or EpisodeConfig()
        self.split, self.seed, self.train_aug = split, int(seed), bool(train_aug)
        policy = RemotePolicy.of(self.cfg)
        self.specs: list[DatasetSpec] = [load_spec(s, policy) for s in sources]
        names = [s.name for s in self.specs]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"sources {list(sources)} contain dataset name(s) {sorted(dup)} more than once; an "
                             f"episode is identified by its source name, so each must be unique")
        scfg = self.cfg.sampler_config()
        self.samplers = [EpisodeSampler(spec, split, scfg) for spec in self.specs]
        for spec in self.specs:
            check_shard_sizes(spec, policy)   # a truncated shard is refused now, not when an episode first reads it
            check_byte_ranges(spec, policy)   # so is a server that cannot serve one image of a shard
        self.reader = ShardReader(max_handles=max_handles, policy=policy)
        self.replaced = 0                      # corrupt images replaced (on_corrupt=skip) in this process
        self._warned: set[tuple[str, int, int]] = set()
        log.info("episodes: split %s, %s mode, seed %d, aug %s, sources %s", split, self.cfg.mode, self.seed,
                 self.train_aug, ", ".join(f"{s.name} ({len(sm.labels)} classes)" for s, sm in
                                           zip(self.specs, self.samplers)))

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.specs]

    def _source_idx(self, index: int) -> int:
        if len(self.specs) == 1:
            return 0
        # Uniform over sources, as Meta-Dataset's (and SMAT's) training pipeline; source "" keys the choice.
        return int(episode_rng(self.seed, self.split, "", index, "source").integers(len(self.specs)))

    def describe(self, index: int) -> EpisodeDescription:
        """The composition of episode ``index`` (source, classes, shots, queries, member ids); no shard I/O."""
        k = self._source_idx(index)
        rng = episode_rng(self.seed, self.split, self.specs[k].name, index, "sample")
        return self.samplers[k].describe(rng, index)

    def _images(self, spec: DatasetSpec, requests: list[tuple[int, list[int]]], index: int | None = None) -> list[list]:
        """Decoded PIL images for each (label, member ids) request; one pass per shard for pipe: sources.
        ``index``: the episode they are for (needed to replace a corrupt image under on_corrupt=skip)."""
        out = []
        for j, ((label, ids), datas) in enumerate(zip(requests, self.reader.read_classes(spec, requests))):
            imgs = []
            for pos, (i, data) in enumerate(zip(ids, datas)):
                try:
                    imgs.append(decode(data))
                except _DECODE_ERRORS as e:
                    if self.cfg.on_corrupt != "skip" or index is None:
                        raise CorruptImageError(f"corrupt image {self._where(spec, label, i)}: {e}; check the "
                                                f"dataset with `smat-convert --verify`, or set data.on_corrupt=skip "
                                                f"to replace such images") from e
                    imgs.append(self._replacement(spec, label, i, ids, index, (j, pos), e))
            out.append(imgs)
        return out

    @staticmethod
    def _where(spec: DatasetSpec, label: int, i: int) -> str:
        cls = spec.classes[label]
        return (f"{member_key(label, i)} in shard {spec.shard_url(cls.shard)} (dataset {spec.name}, "
                f"class {cls.name!r})")

    def _replacement(self, spec: DatasetSpec, label: int, bad: int, ids: list[int], index: int,
                     slot: tuple[int, int], err: Exception):
        """The image that stands for corrupt member ``bad`` at ``slot`` (class position, image position) of
        episode ``index``: the first readable member, in an order drawn from (seed, split, source, index,
        slot), among the class's members the episode does not use already (so support and query stay
        disjoint). Depends only on the episode's identity and the data, never on the rank or the history."""
        cls = spec.classes[label]
        used = set(ids)
        others = [m for m in range(cls.count) if m not in used]
        rng = episode_rng(self.seed, self.split, spec.name, index, f"corrupt:{slot[0]}:{slot[1]}")
        order = [others[k] for k in rng.permutation(len(others))[:_MAX_REPLACEMENT_TRIES]]
        for cand in order:
            data = self.reader.read(spec, label, [cand])[0]   # a ShardError (bad shard) ends the run
            try:
                img = decode(data)
            except _DECODE_ERRORS:
                continue   # corrupt too: the next one in the drawn order
            self.replaced += 1
            key = (spec.name, label, bad)
            level = 30 if key not in self._warned else 10   # WARNING once per image and process, then DEBUG
            self._warned.add(key)
            log.log(level, "corrupt image %s: %s; data.on_corrupt=skip: episode %d uses member %s of the same "
                    "class instead", self._where(spec, label, bad), err, index, member_key(label, cand))
            return img
        raise CorruptImageError(f"corrupt image {self._where(spec, label, bad)}: {err}; data.on_corrupt=skip found "
                                f"no readable replacement among {len(order)} other member(s) of the class")

    def episode(self, index: int) -> Episode:
        d = self.describe(index)
        spec = self.specs[self.source_names.index(d.source)]
        size = self.cfg.image_size
        aug_rng = episode_rng(self.seed, self.split, d.source, index, "aug") if self.train_aug else None
        sup_imgs, qry_imgs, sup_lab, qry_lab = [], [], [], []
        per_class = self._images(spec, [(lab, s + q) for lab, s, q in zip(d.labels, d.support_ids, d.query_ids)],
                                 index=index)
        for j, (imgs, s_ids, q_ids) in enumerate(zip(per_class, d.support_ids, d.query_ids)):
            sup_imgs += imgs[:len(s_ids)]
            qry_imgs += imgs[len(s_ids):]
            sup_lab += [j] * len(s_ids)
            qry_lab += [j] * len(q_ids)

        def tf(img):
            return train_transform(img, size, aug_rng) if aug_rng is not None else eval_transform(img, size)

        support = normalize_batch([tf(im) for im in sup_imgs], size)
        query = normalize_batch([tf(im) for im in qry_imgs], size)
        return Episode(support=support, support_labels=torch.tensor(sup_lab, dtype=torch.long),
                       query=query, query_labels=torch.tensor(qry_lab, dtype=torch.long),
                       source=d.source, split=d.split, index=index, ways=d.ways, class_names=d.class_names)

    def close(self) -> None:
        self.reader.close()

    def loader(self, start: int, rank: int = 0, world: int = 1, per_rank: int = 1, workers: int = 0,
               prefetch: int = 2) -> Iterator[list[Episode]]:
        """Infinite iterator: step s yields this rank's ``per_rank`` episodes, global indices
        ``start + s*world*per_rank + rank*per_rank + j`` (j < per_rank), decoded in ``workers`` DataLoader
        processes (0: in this process). ``prefetch``: steps of episodes kept in flight per rank."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside world size {world}")
        if per_rank < 1 or start < 0 or workers < 0 or prefetch < 1:
            raise ValueError(f"need per_rank>=1, start>=0, workers>=0, prefetch>=1; got {per_rank}, {start}, "
                             f"{workers}, {prefetch}")
        indices = _RankIndices(start, rank, world, per_rank)
        if workers == 0:
            return _group((self.episode(i) for i in indices), per_rank)
        dl = torch.utils.data.DataLoader(
            _EpisodeDataset(self), batch_size=None, sampler=indices, num_workers=workers,
            prefetch_factor=max(1, math.ceil(prefetch * per_rank / workers)), persistent_workers=True,
            worker_init_fn=_worker_init)
        return _group(guarded(iter(dl)), per_rank)


def global_indices(start: int, step: int, rank: int, world: int, per_rank: int) -> list[int]:
    """The episode indices rank ``rank`` consumes at step ``step`` of a stream that began at cursor ``start``."""
    base = start + step * world * per_rank + rank * per_rank
    return list(range(base, base + per_rank))


def next_cursor(start: int, steps: int, world: int, per_rank: int) -> int:
    """The cursor to checkpoint after ``steps`` completed steps from ``start``."""
    return start + steps * world * per_rank


class _RankIndices(torch.utils.data.Sampler):
    def __init__(self, start, rank, world, per_rank):
        self.start, self.rank, self.world, self.per_rank = start, rank, world, per_rank

    def __iter__(self):
        step = 0
        while True:
            yield from global_indices(self.start, step, self.rank, self.world, self.per_rank)
            step += 1


class _EpisodeDataset(torch.utils.data.Dataset):
    def __init__(self, stream: EpisodeStream):
        self.stream = stream

    def __getitem__(self, index: int) -> Episode:
        return self.stream.episode(int(index))


def _worker_init(_worker_id: int) -> None:
    # SLURM signals every process of a job step on preemption/requeue; only the rank itself must react
    # (it sets a stop flag and checkpoints at the next step boundary), so workers ignore those signals.
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    # Close this worker's shard handles when it exits (multiprocessing runs Finalize callbacks on exit).
    from multiprocessing.util import Finalize

    info = torch.utils.data.get_worker_info()
    Finalize(info.dataset.stream, info.dataset.stream.close, exitpriority=10)


def _group(it, n: int) -> Iterator[list[Episode]]:
    while True:
        yield [next(it) for _ in range(n)]


def episode_config(cfg) -> EpisodeConfig:
    """The episode settings of a run config: the one definition training, evaluation and analysis use."""
    return EpisodeConfig.from_config(cfg)
