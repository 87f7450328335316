"""Counter-based randomness: every random choice of an episode is a pure function of its identity.

The key of a stream is SHA-256 of (seed, split, source, index, purpose); it seeds numpy's Philox
counter-based generator. There is no sequential state to carry, so any rank, data worker or resumed run
that asks for episode ``index`` gets exactly the same composition, images and augmentation, and distinct
indices get independent streams by construction (no stream splitting, no seed arithmetic collisions).
"""
from __future__ import annotations

import hashlib

import numpy as np


def _key(seed: int, split: str, source: str, index: int, purpose: str) -> bytes:
    if index < 0:
        raise ValueError(f"episode index must be >= 0, got {index}")
    msg = f"smat-episode\x00{int(seed)}\x00{split}\x00{source}\x00{int(index)}\x00{purpose}".encode()
    return hashlib.sha256(msg).digest()


def episode_rng(seed: int, split: str, source: str, index: int, purpose: str = "sample") -> np.random.Generator:
    """A fresh Philox generator for one purpose of one episode.

    ``purpose`` separates independent uses ("source" choice, "sample" composition, "aug" augmentation) so
    that e.g. switching augmentation on or off never changes which images an episode holds.
    """
    digest = _key(seed, split, source, index, purpose)
    key = np.frombuffer(digest[:16], dtype=np.uint64).copy()
    return np.random.Generator(np.random.Philox(key=key))


def episode_int_seed(seed: int, split: str, source: str, index: int, purpose: str) -> int:
    """A 63-bit integer seed for code that wants one (e.g. a torch.Generator), derived the same way."""
    return int.from_bytes(_key(seed, split, source, index, purpose)[:8], "little") & ((1 << 63) - 1)
