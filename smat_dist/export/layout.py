"""The export folder's layout, manifest and integrity checks (shared by the writer and the loader).

  PATH/manifest.json      format name and version, the model kind, the source checkpoint, the backbone's
                          identity, the mask counts and byte figures, every file's size and sha256
  PATH/config.yaml        the run's resolved config (what rebuilds the model)
  PATH/model.safetensors  the replicated module: SMAT's hypernetwork, P>M>F's dense delta and head
  PATH/pool.safetensors   SMAT only: delta, the eval masks bit-packed (masks.py), the fractional entries
  PATH/backbone.safetensors  only with --include-backbone: the backbone's parameters and buffers
No file holds pickle: every tensor file is safetensors, the rest is JSON / YAML.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

FORMAT = "smat-export"
VERSION = 1
MANIFEST = "manifest.json"
CONFIG = "config.yaml"
MODEL = "model.safetensors"
POOL = "pool.safetensors"
BACKBONE = "backbone.safetensors"


class ExportError(ValueError):
    """An export folder (or the checkpoint it is made from) is missing, corrupt, or does not match."""


def state_digest(sd: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes, in name order: the backbone's identity,
    independent of the file format its weights came in."""
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)};".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_export_manifest(root: str | Path) -> dict:
    """The manifest of an export folder, refused (naming the file) if absent, unreadable or of another format
    or version."""
    root = Path(root)
    mf = root / MANIFEST
    if not root.is_dir():
        raise ExportError(f"{root}: no such export folder (make one with smat-export RUN --output {root})")
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{mf}: cannot read the export manifest ({e})") from e
    if manifest.get("format") != FORMAT:
        raise ExportError(f"{mf}: not an smat-export manifest (format {manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise ExportError(f"{mf}: export format version {manifest.get('version')}, this code reads version "
                          f"{VERSION}: export the run again with this release, or load it with the release that "
                          "wrote it")
    return manifest


def verify_files(root: Path, manifest: dict) -> None:
    """Every file the manifest lists is present with its recorded size and sha256."""
    for rel, rec in manifest["files"].items():
        p = root / rel
        if not p.is_file():
            raise ExportError(f"export {root} is missing {rel}")
        if p.stat().st_size != rec["size"] or file_sha256(p) != rec["sha256"]:
            raise ExportError(f"export file {p} is corrupt (size or sha256 differs from {root / MANIFEST})")
