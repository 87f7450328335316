"""One flat parameter vector for a backbone: the coordinate system of the expert pool.

Every backbone parameter lives at [offset, offset+numel) of a vector of length P, padded to a multiple of
`pad_to` (the world size times a block) so that rank r can own the contiguous slice [r*P/R, (r+1)*P/R) of
delta and of every expert's mask logits. Resharding a checkpoint to another world size is re-slicing this
vector, and the merged task weights travel as one contiguous tensor.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    kind: str      # layer type for analysis: embed, query, key, value, attn_out, mlp_in, mlp_out, norm, conv, other
    depth: int     # block index, -1 outside blocks


_KIND_RULES = [
    (r"(patch_embed|pos_embed|cls_token|reg_token|conv_stem)", "embed"),
    (r"attn\.qkv", "qkv"),
    (r"attn\.q\b|query", "query"),
    (r"attn\.k\b|key", "key"),
    (r"attn\.v\b|value", "value"),
    (r"attn\.proj", "attn_out"),
    (r"mlp\.fc1", "mlp_in"),
    (r"mlp\.fc2", "mlp_out"),
    (r"norm|bn\d*\.|\.bn", "norm"),
    (r"conv", "conv"),
]


def _kind(name: str) -> str:
    for pat, kind in _KIND_RULES:
        if re.search(pat, name):
            return kind
    return "other"


def _depth(name: str) -> int:
    m = re.search(r"blocks\.(\d+)", name)
    return int(m.group(1)) if m else -1


class FlatSpace:
    def __init__(self, infos: list[ParamInfo], pad_to: int = 1):
        self.infos = infos
        self.numel = sum(i.numel for i in infos)
        self.pad_to = max(1, pad_to)
        self.padded = -(-self.numel // self.pad_to) * self.pad_to

    @classmethod
    def from_module(cls, module: nn.Module, pad_to: int = 1) -> "FlatSpace":
        infos, off = [], 0
        for name, p in module.named_parameters():
            infos.append(ParamInfo(name, tuple(p.shape), off, p.numel(), _kind(name), _depth(name)))
            off += p.numel()
        return cls(infos, pad_to)

    def with_padding(self, pad_to: int) -> "FlatSpace":
        return FlatSpace(self.infos, pad_to)

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        out = torch.zeros(self.padded, dtype=torch.float32)
        for i in self.infos:
            out[i.offset:i.offset + i.numel] = tensors[i.name].reshape(-1).float()
        return out

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views into `flat` (autograd flows back into the one vector).

        One split, not a slice per tensor: each slice's backward allocates and zero-fills a gradient as long as
        the whole vector and adds it up, i.e. O(#tensors x P) memory traffic per backward (5 of the 7 s of a
        CNN SMAT step on CPU); split's backward concatenates the pieces once.
        """
        pieces = self.pieces(flat)
        if pieces is None:
            return {i.name: flat[i.offset:i.offset + i.numel].view(i.shape) for i in self.infos}
        return {i.name: pieces[i.name].view(i.shape) for i in self.infos}

    def pieces(self, flat: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Each parameter's 1-D piece of `flat`, from one split (see `unflatten`); None where the layout is
        not one contiguous run from offset 0 (then only per-tensor slices can cut it)."""
        sizes = [i.numel for i in self.infos]
        starts = [0] + list(itertools.accumulate(sizes))[:-1]
        contiguous = all(i.offset == o for i, o in zip(self.infos, starts))
        if not contiguous or flat.shape[0] < self.numel:
            return None
        rest = flat.shape[0] - self.numel
        parts = flat.split(sizes + [rest] if rest else sizes)
        return {i.name: part for i, part in zip(self.infos, parts)}

    def shard_range(self, rank: int, world: int) -> tuple[int, int]:
        if self.padded % world:
            raise ValueError(f"flat space of {self.padded} is not padded to a multiple of world size {world}")
        n = self.padded // world
        return rank * n, (rank + 1) * n

    def valid_mask(self, lo: int, hi: int) -> torch.Tensor:
        """True for real parameter entries in [lo, hi), False for padding."""
        idx = torch.arange(lo, hi)
        return idx < self.numel

    def signature(self) -> str:
        """Identifies the backbone layout: checkpoints from another backbone are refused by comparing this."""
        import hashlib

        h = hashlib.sha256()
        for i in self.infos:
            h.update(f"{i.name}:{i.shape};".encode())
        return h.hexdigest()[:16]
