"""Finding a checkpoint and reading its manifest: what a reader needs before it loads anything.

Layout of `CKPT = root/step-<tasks>/`: the parts' files, config.yaml, and manifest.json (written last: format
version, tasks, world size, the run's identity, each part's kind, each file's size and block digests, each
shard's row range). `root/latest` names the newest complete checkpoint. A folder without a manifest is not a
checkpoint, so every reader here starts from the manifest and checks only what it will read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from smat_dist.checkpoint.errors import CheckpointError
from smat_dist.checkpoint.shard_file import hash_file

FORMAT_VERSION = 2


def find_latest(path: str | os.PathLike) -> Path | None:
    """A checkpoint folder, or the newest complete one under a run folder / checkpoints folder."""
    p = Path(path)
    if (p / "manifest.json").is_file():
        return p
    for root in (p / "checkpoints", p):
        latest = root / "latest"
        if latest.is_file():
            ck = root / latest.read_text().strip()
            if not (ck / "manifest.json").is_file():
                raise CheckpointError(f"{latest} names {ck.name}, which has no manifest.json (incomplete or deleted)")
            return ck
    return None


def checkpoint_tasks(ck: Path) -> int:
    """The task count in a checkpoint folder's name (step-000000160 -> 160)."""
    try:
        return int(Path(ck).name.split("-", 1)[1])
    except (IndexError, ValueError):
        raise CheckpointError(f"{ck}: not a checkpoint folder name (step-<tasks>)") from None


def read_manifest(ck: Path) -> dict:
    mf = Path(ck) / "manifest.json"
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {mf}: {e}") from e
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{mf}: format version {manifest.get('version')}, this code reads {FORMAT_VERSION} "
                              "(checkpoints of version 1 predate the sharded format: retrain or use that release)")
    return manifest


def check_compatible(manifest: dict, expect: dict, ck: Path) -> None:
    """Refuse a checkpoint from another method, backbone or number of experts, naming the difference."""
    for key in ("method", "backbone", "backbone_signature", "experts"):
        if key in expect and manifest.get(key) != expect[key]:
            raise CheckpointError(f"checkpoint {ck} was trained with {key}={manifest.get(key)!r}, "
                                  f"this run has {key}={expect[key]!r}")


def verify_file(ck: Path, rel: str, manifest: dict, counter: dict | None = None) -> Path:
    """Check one whole (small) file against its manifest digest; names it if missing or corrupt."""
    p = ck / rel
    rec = manifest["files"].get(rel)
    if rec is None:
        raise CheckpointError(f"checkpoint {ck}: {rel} is not in its manifest")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {ck} is missing {rel}")
    got = hash_file(p, rec["block"])
    if counter is not None:
        counter["hashed"] = counter.get("hashed", 0) + got["size"]
    if got["sha256"] != rec["sha256"]:
        raise CheckpointError(f"checkpoint file {p} is corrupt (sha256 mismatch)")
    return p
