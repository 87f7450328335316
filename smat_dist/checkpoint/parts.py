"""What a checkpoint part is: three protocols, one per way the checkpointer writes and reads a part.

The checkpointer does not know the expert pool, DeepSpeed or the trainer's counters; it knows these three
shapes and asks `part_kind` which one a part has. The kind is recorded per part in the manifest ("parts"), so
the names below are part of the on-disk format.

  sharded  ShardedPart: every rank holds a slice of rows; one safetensors shard per rank, re-sliced to any
           world size by byte range (shard_file.py, reshard.py). The expert pool.
  engine   EnginePart: saves and loads itself collectively into the checkpoint folder and names the files it
           wrote or will read, so the checkpointer can hash and verify them. The DeepSpeed engine.
  state    StatePart: a small state dict, written as `<name>.pt` by rank 0, or `<name>-rank<r>.pt` by every
           rank when the part says `per_rank = True`. The run's counters, the RNG streams, a module's state.

An engine part subclasses EnginePart (it is written for the checkpointer); sharded and state parts are
recognised by their methods (the pool and the trainer's state know nothing of this package). A part with
both a sharded and a state interface (the pool's `state_dict` serves single-process use) is sharded.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import torch

Kind = Literal["sharded", "engine", "state"]


@runtime_checkable
class ShardedPart(Protocol):
    def sharded_tensors(self, loading: frozenset = frozenset()) -> dict[str, torch.Tensor]:
        """This rank's live tensors, each indexed along dim 0 by `row_index(name)`; the loader reads into them
        in place. `loading` names the tensors a checkpoint holds (so optional state is created first)."""

    def row_index(self, name: str) -> tuple:
        """("range", lo, hi, numel): rows [lo, hi) of `numel` global entries, or ("ids", ids, total): sorted
        global row ids out of `total`."""

    def replicated_state(self) -> dict:
        """State identical on every rank, saved in every shard (tensors and JSON-able values)."""

    def load_replicated(self, replicated: dict) -> None: ...


@runtime_checkable
class StatePart(Protocol):
    """`per_rank = True` (a class attribute, optional) writes one file per rank; a rank with no file of its
    own in a checkpoint of another world size keeps its state."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, sd: dict) -> None: ...


class EnginePart(ABC):
    """A part that writes its own files (collectively: every rank calls save_to and load_from)."""

    @abstractmethod
    def save_to(self, folder: Path) -> None: ...

    @abstractmethod
    def own_files(self, folder: Path, rank: int, reading: bool = False, universal: bool = False) -> list[Path]:
        """The files this rank wrote (reading=False: hashed into the manifest), or the files its load reads
        (reading=True: verified first; universal: the load reads a converted copy elsewhere)."""

    @abstractmethod
    def load_from(self, folder: Path, universal: Path | None = None) -> None: ...


def part_kind(part) -> Kind:
    if isinstance(part, EnginePart):
        return "engine"
    if isinstance(part, ShardedPart):
        return "sharded"
    if isinstance(part, StatePart):
        return "state"
    raise TypeError(f"{type(part).__name__} is not a checkpoint part: it must subclass EnginePart or have the "
                    "methods of ShardedPart or StatePart (smat_dist.checkpoint.parts)")


def per_rank(part: StatePart) -> bool:
    return bool(getattr(part, "per_rank", False))
