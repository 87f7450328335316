"""Sums over the pool's rows that give the same bits whatever the world size.

A sum over the rows of the pool, taken per rank slice and then added across ranks, rounds differently when
the slices change (2 ranks -> 1 on resume). Instead, every such sum is cut at FIXED global chunks (the pool
passes' chunks, `PoolPasses.chunk_rows`, a function of M only; build.py pads the flat space so that every
slice starts on a chunk boundary): each rank computes the partial sums of its own chunks, places them at the
chunks' global indices in a [G, ...] zero tensor (G: the chunks that hold real entries, independent of the
world size), one all-reduce fills in the other ranks' (x + 0 = x: exact), and every rank adds the G partials
in global order. Traffic: G x (the summed values) per sum, G = P x M / 2^21 (about 1000 at ViT-S x 100).
"""
from __future__ import annotations

import torch


def ordered_sum(parts: torch.Tensor) -> torch.Tensor:
    """parts.sum(0) one add at a time in index order: the same bits for the same partials, however many
    threads or ranks produced them (torch's own reduction may pair them differently with the shape)."""
    acc = parts[0].clone()
    for p in parts[1:]:
        acc.add_(p)
    return acc
