"""Durable writes of the checkpoint's small files: written, flushed and fsync'd before anything names them,
so a crash leaves either the previous file or the complete new one (the checkpointer's atomicity rests on it).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from smat_dist.checkpoint.shard_file import hash_file


def fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_receipt(path: Path, receipt: dict) -> None:
    """A rank's `done-rank<r>.json`, written beside and renamed into place: rank 0's writer polls for the name and
    reads it at once, so it must never see the file before its content (an empty receipt fails the save)."""
    part = path.with_name(path.name + ".part")
    fsync_write(part, json.dumps(receipt))
    os.replace(part, path)


def save_pt(path: Path, sd) -> dict:
    """torch.save, fsync'd; returns the file's digest record."""
    torch.save(sd, path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return hash_file(path)


def save_text(path: Path, text: str) -> dict:
    fsync_write(path, text)
    return hash_file(path)
