"""smat-export's work: a trained run's checkpoint -> one self-contained export folder (layout.py).

The pool is streamed from the sharded checkpoint of any world size in chunks of rows: each chunk's logits
and delta are read from the shards that overlap it (byte ranges, block digests verified as they are read),
turned into eval masks, packed, written, and dropped, so the whole fp32 pool is never in memory.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from smat_dist.checkpoint import find_latest, read_manifest, verify_file
from smat_dist.checkpoint.errors import CheckpointError
from smat_dist.checkpoint.reshard import _read_range  # the resharder's range reader, reused as is
from smat_dist.checkpoint.shard_file import ShardReader
from smat_dist.export import layout as L
from smat_dist.export.masks import CHUNK_ROWS, eval_gate, fit_chunk_rows
from smat_dist.export.pool_file import PoolFileWriter
from smat_dist.pool import gates as hc
from smat_dist.utils.log import get_logger

log = get_logger(__name__)


def find_checkpoint(run: str, step: int | None) -> Path:
    """The checkpoint of `run` (a run folder, its checkpoints folder, or a checkpoint folder) at `step` tasks,
    or its newest complete one."""
    if step is None:
        ck = find_latest(run)
        if ck is None:
            raise L.ExportError(f"{run}: no complete checkpoint (no 'latest' file or manifest.json)")
        return ck
    name = f"step-{step:09d}"
    for root in (Path(run) / "checkpoints", Path(run)):
        if (root / name / "manifest.json").is_file():
            return root / name
    have = sorted(p.name for root in (Path(run) / "checkpoints", Path(run)) if root.is_dir()
                  for p in root.glob("step-*") if (p / "manifest.json").is_file())
    raise L.ExportError(f"{run}: no complete checkpoint at --step {step} (have {have or 'none'})")


def _backbone(cfg, manifest: dict, ck: Path):
    """The run's backbone as training built it (same seed), checked against the checkpoint's layout."""
    from smat_dist.model.backbone import build_backbone
    from smat_dist.model.flat import FlatSpace

    torch.manual_seed(cfg.train.seed)      # as smat_dist.build: a random-init backbone is the seed's
    model = build_backbone(cfg.model)
    sig = FlatSpace.from_module(model).signature()
    if manifest.get("backbone_signature") not in (None, sig):
        raise L.ExportError(f"checkpoint {ck} was trained on backbone layout {manifest['backbone_signature']}, "
                            f"its config.yaml builds {sig}")
    return model


def _backbone_identity(cfg, model, include: bool) -> dict:
    src = cfg.model.pretrained
    rec = {"name": cfg.model.name, "pretrained": src, "weights_sha256": L.state_digest(model.state_dict()),
           "included": include}
    if src and not str(src).startswith("package:") and Path(src).is_file():
        rec["file_sha256"] = L.file_sha256(Path(src))
    return rec


def _stream_pool(ck: Path, manifest: dict, out: Path, numel: int, cfg) -> dict:
    entries = manifest.get("shards", {}).get("pool")
    if not entries:
        raise L.ExportError(f"checkpoint {ck} holds no shards of the expert pool")
    if entries[0]["tensors"]["log_alpha"]["index"] != "range":
        raise L.ExportError(f"checkpoint {ck} has structured masks (method.sparsity.structured=true): "
                            "smat-export packs per-entry masks only")
    readers: dict[str, ShardReader] = {}

    def reader(entry) -> ShardReader:
        rel = entry["file"]
        if rel not in readers:
            if rel not in manifest["files"] or not (ck / rel).is_file():
                raise L.ExportError(f"checkpoint {ck} is missing shard {rel}")
            readers[rel] = ShardReader(ck / rel, manifest["files"][rel])
        return readers[rel]

    first = reader(entries[0])
    experts = int(first.shape("log_alpha")[1])
    beta, clamp = hc.eval_beta(cfg.method.sparsity), float(cfg.method.sparsity.clamp)
    rows = fit_chunk_rows(CHUNK_ROWS, experts)    # CHUNK_ROWS up to 32768 experts
    w = PoolFileWriter(out, numel, experts, rows, {"experts": str(experts), "numel": str(numel)})
    binary_ones = 0
    try:
        for c, a in enumerate(range(0, numel, rows)):
            b = min(numel, a + rows)
            la, delta = torch.empty(b - a, experts), torch.empty(b - a)
            _read_range(ck, entries, "log_alpha", ("range", a, b, numel), la, reader)
            _read_range(ck, entries, "delta", ("range", a, b, numel), delta, reader)
            z = eval_gate(la, clamp, beta)
            binary_ones += int((z == 1).sum())
            w.write(c, delta, z)
        counts = w.close()
    finally:
        for r in readers.values():
            r.close()
    return dict(counts, experts=experts, ones=binary_ones, entries=numel * experts, eval_beta=beta,
                chunk_rows=rows)


def export_run(run: str, output: str, step: int | None = None, include_backbone: bool = False,
               baseline: bool = False) -> dict:
    """Export the run's checkpoint (or, baseline=True, the pre-trained baseline on its backbone) to the
    folder `output` (must not exist); returns the manifest written."""
    from safetensors.torch import save_file

    from smat_dist.train.run_folder import checkpoint_config

    t0 = time.perf_counter()
    out = Path(output)
    if out.exists():
        raise L.ExportError(f"--output {out} already exists: choose a new folder (an export is never overwritten)")
    ck = find_checkpoint(run, step)
    try:
        manifest = read_manifest(ck)
    except CheckpointError as e:
        raise L.ExportError(str(e)) from e
    try:
        cfg = checkpoint_config(ck)
    except FileNotFoundError as e:
        raise L.ExportError(str(e)) from e
    kind = "pretrained" if baseline else str(manifest.get("method", cfg.method.name))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model = _backbone(cfg, manifest, ck)
        numel = sum(p.numel() for p in model.parameters())
        if include_backbone:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / L.BACKBONE)
        identity = _backbone_identity(cfg, model, include_backbone)
        del model
        if baseline:
            cfg.method.name = "pretrained"
        (tmp / L.CONFIG).write_text(_config_text(cfg))
        record: dict = {"format": L.FORMAT, "version": L.VERSION, "kind": kind, "numel": numel,
                        "backbone": identity, "source": {"checkpoint": str(ck.resolve()),
                                                         "tasks": manifest.get("tasks"),
                                                         "world_size": manifest.get("world_size")}}
        if kind != "pretrained":
            try:
                rep = torch.load(verify_file(ck, "replicated.pt", manifest), map_location="cpu", weights_only=True)
            except CheckpointError as e:
                raise L.ExportError(str(e)) from e
            if kind == "pmf":   # dense delta: drop the training world size's padding
                rep["delta"] = rep["delta"][:numel]
            save_file({k: v.detach().contiguous() for k, v in rep.items()}, tmp / L.MODEL)
        if kind == "smat":
            record["pool"] = _stream_pool(ck, manifest, tmp / L.POOL, numel, cfg)
        record["files"] = {p.name: {"size": p.stat().st_size, "sha256": L.file_sha256(p)}
                           for p in sorted(tmp.iterdir())}
        record["bytes"] = _bytes(record, ck, manifest)
        record["export_seconds"] = round(time.perf_counter() - t0, 3)
        (tmp / L.MANIFEST).write_text(json.dumps(record, indent=1, sort_keys=True))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s model from %s to %s in %.1f s (%d bytes; checkpoint %d bytes)", kind, ck, out,
             record["export_seconds"], record["bytes"]["export"], record["bytes"]["checkpoint"])
    return record


def _config_text(cfg) -> str:
    from smat_dist.config.hydra import to_yaml

    return to_yaml(cfg)


def _bytes(record: dict, ck: Path, manifest: dict) -> dict:
    """The export's bytes against the checkpoint's and the size formula (M/8 + 4) bytes per backbone weight
    plus the hypernetwork, plus the fractional entries' bytes (8 each: int32 position and float32 value, or
    4 per entry of a chunk stored dense)."""
    files = record["files"]
    total = sum(f["size"] for f in files.values())
    out = {"export": total, "checkpoint": sum(int(f["size"]) for f in manifest["files"].values()),
           "pool_shard_bytes": max([int(manifest["files"][e["file"]]["size"])
                                    for e in manifest.get("shards", {}).get("pool", [])] or [0])}
    if "pool" in record:
        m, n = record["pool"]["experts"], record["numel"]
        formula = n * (m / 8 + 4) + files[L.MODEL]["size"]
        out.update(formula=int(formula), fractional_bytes=record["pool"]["fractional_bytes"],
                   without_backbone=total - files.get(L.BACKBONE, {"size": 0})["size"])
    return out
