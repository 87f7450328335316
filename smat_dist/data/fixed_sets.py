"""Fixed validation / test episode sets shared by every method and run.

A fixed set is indices 0..n-1 of an EpisodeStream with ``train_aug=False`` and the evaluation seed, so the
same (sources, split, n, seed, config) gives the same episodes on every machine, world size and run; the
manifest records each episode's source, classes and shots so results can be audited and compared.
"""
from __future__ import annotations

import json
import os
from typing import Iterator

from .episodes import Episode, EpisodeConfig, EpisodeStream
from .sampler import EpisodeDescription

EVAL_SEED = 20240613  # one constant for all methods and runs: change it and every comparison is invalid


class FixedEpisodes:
    def __init__(self, sources: list[str] | str, split: str, n: int, seed: int = EVAL_SEED,
                 cfg: EpisodeConfig | None = None):
        if n < 1:
            raise ValueError(f"a fixed episode set needs n >= 1, got {n}")
        self.n, self.seed = n, seed
        self.stream = EpisodeStream(sources, split, cfg, seed=seed, train_aug=False)
        self._descriptions: list[EpisodeDescription] | None = None

    def __len__(self) -> int:
        return self.n

    @property
    def descriptions(self) -> list[EpisodeDescription]:
        if self._descriptions is None:
            self._descriptions = [self.stream.describe(i) for i in range(self.n)]
        return self._descriptions

    def __getitem__(self, i: int) -> Episode:
        if not 0 <= i < self.n:
            raise IndexError(f"fixed set has {self.n} episodes, no episode {i}")
        return self.stream.episode(i)

    def __iter__(self) -> Iterator[Episode]:
        return (self.stream.episode(i) for i in range(self.n))

    def loader(self, workers: int = 0, rank: int = 0, world: int = 1) -> Iterator[Episode]:
        """The set's episodes, split across ``world`` ranks (rank r gets indices r, r+world, ...), decoded in
        ``workers`` processes. Each episode carries its ``index`` so results can be gathered in order."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside world size {world}")
        mine = list(range(rank, self.n, world))
        if not mine:
            return iter(())
        return _indexed(self.stream, mine, workers)

    def manifest(self) -> dict:
        cfg = self.stream.cfg
        return {"seed": self.seed, "split": self.stream.split, "n": self.n, "sources": self.stream.source_names,
                "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
                "episodes": [d.to_json() | {"support_ids": d.support_ids, "query_ids": d.query_ids}
                             for d in self.descriptions]}

    def write_manifest(self, path) -> None:
        """Write the manifest as JSON, atomically (tmp file then rename)."""
        path = os.fspath(path)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.manifest(), f, indent=1)
        os.replace(tmp, path)


def _indexed(stream: EpisodeStream, indices: list[int], workers: int) -> Iterator[Episode]:
    import torch

    if workers == 0:
        return (stream.episode(i) for i in indices)
    from .episodes import _EpisodeDataset, _worker_init
    from .worker_errors import guarded

    dl = torch.utils.data.DataLoader(_EpisodeDataset(stream), batch_size=None, sampler=indices, num_workers=workers,
                                     worker_init_fn=_worker_init)
    return guarded(iter(dl))


def fixed_episodes(sources: list[str] | str, split: str, n: int, seed: int = EVAL_SEED,
                   cfg: EpisodeConfig | None = None) -> FixedEpisodes:
    """Episodes 0..n-1 of ``EpisodeStream(sources, split, cfg, seed, train_aug=False)``."""
    return FixedEpisodes(sources, split, n, seed, cfg)
