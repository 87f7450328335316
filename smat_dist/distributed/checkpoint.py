"""Sharded, atomic, versioned checkpoints holding all state, loadable at another world size.

Layout of one checkpoint `CKPT = run_dir/checkpoints/step-<tasks>/`:
  pool-rank<r>.pt   this rank's slice [lo, hi) of delta and mask logits, its optimiser state, RNG states
  replicated.pt     full state of the replicated module (hypernetwork, multipliers, task counter, or P>M>F weights)
  ds/               DeepSpeed's own checkpoint of the replicated module and its (possibly ZeRO-partitioned) optimiser
  config.yaml       the resolved config of the run (a checkpoint folder is self-contained for evaluation)
  manifest.json     written last: format version, tasks, data cursor, world size, config hash, backbone signature,
                    experts, method, wandb run id, and the sha256 of every file
Everything is written into `step-<tasks>.tmp/`, then renamed; `latest` names the newest complete one and is
replaced atomically, so a crash during a write leaves the previous checkpoint as `latest`. Every file loads
with torch.load(weights_only=True).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from smat_dist.utils.log import get_logger

log = get_logger(__name__)
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": repr(random.getstate()),
            "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])}}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    import ast

    random.setstate(ast.literal_eval(s["python"]))
    np.random.set_state(("MT19937", s["numpy"]["key"].numpy().astype(np.uint32), s["numpy"]["pos"], 0, 0.0))


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


def save(root: str | os.PathLike, comm, *, tasks: int, meta: dict, pool=None, pool_opt=None,
         replicated: dict | None = None, ds_opt=None, keep: int = 3, texts: dict[str, str] | None = None) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    root = Path(root)
    name = f"step-{tasks:09d}"
    tmp, final = root / f"{name}.tmp", root / name
    if comm.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    comm.barrier()
    if pool is not None:
        torch.save({"lo": pool.lo, "hi": pool.hi, "numel": pool.numel, "experts": pool.experts,
                    "delta": pool.delta.detach().cpu(), "log_alpha": pool.log_alpha.detach().cpu(),
                    "group_ids": None if pool.group_ids is None else pool.group_ids.cpu(),
                    "optimizer": pool_opt.state_dict() if pool_opt is not None else {},
                    "rng": _rng_state()}, tmp / f"pool-rank{comm.rank:05d}.pt")
    else:
        torch.save({"rng": _rng_state()}, tmp / f"rng-rank{comm.rank:05d}.pt")
    if ds_opt is not None:
        ds_opt.save(str(tmp / "ds"), tag="state")
    if comm.rank == 0 and replicated is not None:
        torch.save(replicated, tmp / "replicated.pt")
    if comm.rank == 0:
        for fname, text in (texts or {}).items():
            (tmp / fname).write_text(text)
    comm.barrier()
    if comm.rank == 0:
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = dict(meta, version=FORMAT_VERSION, tasks=tasks, world_size=comm.world,
                        files={str(p.relative_to(tmp)): _sha256(p) for p in files})
        with open(tmp / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        with open(root / "latest.tmp", "w") as f:
            f.write(name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(root / "latest.tmp", root / "latest")
        ckpts = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in ckpts[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint %s written (%d files)", final, len(files))
    comm.barrier()
    return final


def read_manifest(ck: Path, verify: bool = True) -> dict:
    mf = ck / "manifest.json"
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {mf}: {e}") from e
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{mf}: format version {manifest.get('version')}, this code reads {FORMAT_VERSION}")
    if verify:
        for rel, digest in manifest["files"].items():
            p = ck / rel
            if not p.is_file():
                raise CheckpointError(f"checkpoint {ck} is missing {rel}")
            if _sha256(p) != digest:
                raise CheckpointError(f"checkpoint file {p} is corrupt (sha256 mismatch)")
    return manifest


def check_compatible(manifest: dict, expect: dict, ck: Path) -> None:
    """Refuse a checkpoint from another method, backbone or number of experts, naming the difference."""
    for key in ("method", "backbone", "backbone_signature", "experts"):
        if key in expect and manifest.get(key) != expect[key]:
            raise CheckpointError(f"checkpoint {ck} was trained with {key}={manifest.get(key)!r}, "
                                  f"this run has {key}={expect[key]!r}")


def load_pool_slice(ck: Path, manifest: dict, lo: int, hi: int, numel: int, clamp: float,
                    group_ids: torch.Tensor | None = None) -> dict:
    """Re-slice the saved pool (any world size) to [lo, hi): delta, log_alpha and delta's momentum.

    Structured pools (`group_ids`: the global gate-group ids of the new slice's rows) take each row from
    any saved shard that holds that group (shards touching the same group hold identical rows)."""
    files = sorted(ck.glob("pool-rank*.pt"))
    if len(files) != manifest["world_size"]:
        raise CheckpointError(f"checkpoint {ck} has {len(files)} pool shards for world size {manifest['world_size']}")
    parts, every = [], []
    for f in files:
        sd = torch.load(f, map_location="cpu", weights_only=True)
        saved_structured = sd.get("group_ids") is not None
        if saved_structured != (group_ids is not None):
            raise CheckpointError(
                f"checkpoint {ck} ({f.name}) has {'structured' if saved_structured else 'unstructured'} masks, "
                f"this run has method.sparsity.structured={group_ids is not None}")
        every.append(sd)
        if sd["lo"] >= hi or sd["hi"] <= lo:
            continue
        parts.append(sd)
    parts.sort(key=lambda s: s["lo"])
    n = hi - lo
    experts = every[0]["log_alpha"].shape[1] if every else manifest["experts"]
    delta = torch.zeros(n)
    rows = n if group_ids is None else group_ids.numel()
    log_alpha = torch.full((rows, experts), -clamp)
    momentum = torch.zeros(n)
    have_mom = False
    for sd in parts:
        a, b = max(lo, sd["lo"]), min(hi, sd["hi"], numel)  # padding beyond numel keeps its init values
        if a >= b:
            continue
        src = slice(a - sd["lo"], b - sd["lo"])
        delta[a - lo:b - lo] = sd["delta"][src]
        if group_ids is None:
            log_alpha[a - lo:b - lo] = sd["log_alpha"][src]
        st = sd["optimizer"].get("state", {})
        if 0 in st and st[0].get("momentum_buffer") is not None:
            momentum[a - lo:b - lo] = st[0]["momentum_buffer"][src]
            have_mom = True
    if group_ids is not None:
        found = torch.zeros(rows, dtype=torch.bool)
        for sd in every:
            ids = sd["group_ids"]
            if ids.numel() == 0:
                continue
            pos = torch.searchsorted(ids, group_ids).clamp_max(ids.numel() - 1)
            hit = (ids[pos] == group_ids) & ~found
            log_alpha[hit] = sd["log_alpha"][pos[hit]]
            found |= hit
        pad = group_ids.max() if rows else None
        missing = (~found) & (group_ids != pad) if hi > numel else ~found
        if bool(missing.any()):
            raise CheckpointError(f"checkpoint {ck} holds no mask row for gate group "
                                  f"{int(group_ids[missing][0])} (a different backbone layout?)")
    return {"delta": delta, "log_alpha": log_alpha, "momentum": momentum if have_mom else None,
            "same_layout": len(parts) == 1 and parts[0]["lo"] == lo and parts[0]["hi"] == hi,
            "optimizer": parts[0]["optimizer"] if len(parts) == 1 else None,
            "rng": parts[0].get("rng") if len(parts) == 1 else None}


def restore_rng(ck: Path, rank: int) -> None:
    for name in (f"pool-rank{rank:05d}.pt", f"rng-rank{rank:05d}.pt"):
        p = ck / name
        if p.is_file():
            sd = torch.load(p, map_location="cpu", weights_only=True)
            if "rng" in sd:
                _set_rng_state(sd["rng"])
            return
