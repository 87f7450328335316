"""The checkpointer: sharded, atomic, versioned checkpoints of a dict of parts, written and read at
O(pool / ranks) per rank.

Each part saves and loads itself by its kind (parts.py); the checkpointer owns the folder, atomicity, the
manifest (manifest.py), checksums, keep-last-K, asynchronous writing and re-slicing (reshard.py).
Everything is written into `step-<tasks>.tmp/` and renamed when complete; `latest` is replaced atomically, so a
crash or kill -9 at any moment leaves the previous `latest` complete and loadable. Every rank hashes the files
it writes while writing them; a loading rank verifies only the bytes it reads. `.pt` files load with
torch.load(weights_only=True); shard files hold no pickle at all.

Asynchronous saving (`async_save=True`): the caller blocks for the collective engine save and a host copy of
its pool slice; a writer thread writes and hashes the shard, then drops a `done-rank<r>.json` receipt. Rank 0's
writer waits for every rank's receipt, then writes the manifest and renames: no collective runs off the main
thread. At most one save is in flight; `wait()` (called before the next save and at the end of a run, so
a USR2/SIGTERM stop waits for it too) returns when this rank's part is durable.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import torch

from smat_dist.checkpoint.errors import CheckpointError, ShardError
from smat_dist.checkpoint.files import fsync_dir, fsync_write, save_pt, save_text, write_receipt
from smat_dist.checkpoint.manifest import FORMAT_VERSION, check_compatible, checkpoint_tasks, read_manifest, verify_file
from smat_dist.checkpoint.parts import EnginePart, ShardedPart, StatePart, part_kind, per_rank
from smat_dist.checkpoint.reshard import load_sharded
from smat_dist.checkpoint.shard_file import hash_file, write_shard
from smat_dist.utils.log import get_logger

log = get_logger(__name__)


def _index_record(index) -> dict:
    if index[0] == "range":
        lo, hi, numel = index[1:]
        return {"index": "range", "lo": lo, "hi": min(hi, numel)}
    ids = index[1]
    return {"index": "ids", "first": int(ids[0]) if ids.numel() else 0,
            "last": int(ids[-1]) if ids.numel() else -1, "rows": int(ids.numel())}


def _host_copy(t: torch.Tensor, copy: bool, buffers: dict | None = None, key=None) -> torch.Tensor:
    """t on the host: itself (sync save of a CPU tensor), or a copy into a host buffer kept across saves
    (async saves: no fresh allocation and its page faults each time; pinned when the source is on a GPU)."""
    t = t.detach()
    if not copy and t.device.type == "cpu":
        return t
    buf = None if buffers is None else buffers.get(key)
    if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
        if buffers is not None:
            buffers[key] = buf
    buf.copy_(t)
    return buf


class Checkpointer:
    """Saves and loads a dict of parts under `root` (collective: every rank calls save / load / wait)."""

    def __init__(self, root: str | os.PathLike, comm, keep: int = 3, async_save: bool = False,
                 receipt_timeout_s: float = 3600.0, keep_every: int = 0):
        self.root, self.comm, self.keep, self.async_save = Path(root), comm, keep, async_save
        self.keep_every = int(keep_every)
        self.receipt_timeout_s = receipt_timeout_s
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_saved: Path | None = None
        self.stats: dict = {}
        self._host: dict = {}       # async saves' host buffers, reused (the writer is done with them by then)

    # ---------------------------------------------------------------- saving
    def save(self, tasks: int, parts: dict, meta: dict, texts: dict[str, str] | None = None) -> Path:
        """Write a checkpoint of `parts` at `tasks`; returns its final folder (complete once `wait()` returns,
        or at return in sync mode)."""
        self.wait()
        comm, rank = self.comm, self.comm.rank
        name = f"step-{tasks:09d}"
        tmp, final = self.root / f"{name}.tmp", self.root / name
        t0 = time.perf_counter()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        comm.barrier()
        jobs: list = []           # (relative path, writer) run by the writer
        own: list[str] = []       # files an engine wrote for this rank, hashed by the writer
        shards: dict = {}
        kinds = {}
        for pname, part in parts.items():
            kind = kinds[pname] = part_kind(part)
            if kind == "engine":
                part.save_to(tmp)                                   # collective, in the foreground
                own += [str(p.relative_to(tmp)) for p in part.own_files(tmp, rank, reading=False)]
            elif kind == "sharded":
                rel, data, metadata, shards[pname] = self._shard_of(pname, part)
                jobs.append((rel, lambda p, d=data, m=metadata: write_shard(p, d, m)))
            elif per_rank(part) or rank == 0:
                sd = part.state_dict()
                rel = f"{pname}-rank{rank:05d}.pt" if per_rank(part) else f"{pname}.pt"
                jobs.append((rel, lambda p, s=sd: save_pt(p, s)))
        if rank == 0:
            for fname, text in (texts or {}).items():
                jobs.append((fname, lambda p, t=text: save_text(p, t)))
        receipt = {"rank": rank, "shards": shards}
        header = {"version": FORMAT_VERSION, "tasks": tasks, "world_size": comm.world, "parts": kinds, **meta}
        self.stats = {"block_s": None, "hashed": 0, "written": 0}

        def work():
            try:
                files = {}
                for rel, fn in jobs:
                    rec = fn(tmp / rel)
                    files[rel] = rec
                    self.stats["written"] += rec["size"]
                    self.stats["hashed"] += rec["size"]
                for rel in own:
                    rec = hash_file(tmp / rel)
                    files[rel] = rec
                    self.stats["hashed"] += rec["size"]
                receipt["files"] = files
                write_receipt(tmp / f"done-rank{rank:05d}.json", receipt)
                if rank == 0:
                    self._finalize(tmp, final, name, header)
            except BaseException as e:  # surfaced by wait() on the main thread
                self._error = e

        if self.async_save:
            self.stats["block_s"] = time.perf_counter() - t0
            self._thread = threading.Thread(target=work, name=f"ckpt-{name}", daemon=True)
            self._thread.start()
        else:
            work()
            self._raise()
            comm.barrier()
            self.stats["block_s"] = time.perf_counter() - t0
        self.last_saved = final
        return final

    def _shard_of(self, pname: str, part: ShardedPart) -> tuple[str, dict, dict, dict]:
        """A sharded part's file name, tensors on the host, string metadata, and its manifest entry."""
        rank, world = self.comm.rank, self.comm.world
        tensors = part.sharded_tensors()
        rep = part.replicated_state()
        data, recs = {}, {}
        for k, v in rep.items():
            if isinstance(v, torch.Tensor):
                data[f"_replicated.{k}"] = _host_copy(v, True)
        for tname, t in tensors.items():
            index = part.row_index(tname)
            rows = t
            if index[0] == "range":
                rows = t[: max(0, min(index[2], index[3]) - index[1])]   # padding is not saved
            else:
                data[f"{tname}.ids"] = _host_copy(index[1], True)
            data[tname] = _host_copy(rows, self.async_save, self._host, (pname, tname))
            recs[tname] = _index_record(index)
        metadata = {"part": pname, "rank": str(rank), "world": str(world),
                    "replicated": json.dumps({k: v for k, v in rep.items() if not isinstance(v, torch.Tensor)}),
                    "tensors": json.dumps(recs)}
        rel = f"{pname}-rank{rank:05d}.safetensors"
        return rel, data, metadata, {"file": rel, "rank": rank, "tensors": recs}

    def _finalize(self, tmp: Path, final: Path, name: str, header: dict) -> None:
        """Rank 0's writer: every rank's receipt, then the manifest, the rename, `latest`, the purge."""
        world = header["world_size"]
        deadline = time.monotonic() + self.receipt_timeout_s
        receipts = {}
        while len(receipts) < world:
            for r in range(world):
                p = tmp / f"done-rank{r:05d}.json"
                if r not in receipts and p.is_file():
                    receipts[r] = json.loads(p.read_text())
            if len(receipts) < world:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world)) - set(receipts))
                    raise CheckpointError(f"{tmp}: ranks {missing} did not finish writing within "
                                          f"{self.receipt_timeout_s:.0f} s; {tmp.name} stays incomplete")
                time.sleep(0.01)
        files, shards = {}, {}
        for r in range(world):
            files.update(receipts[r]["files"])
            for pname, entry in receipts[r]["shards"].items():
                shards.setdefault(pname, []).append(entry)
        for r in range(world):
            (tmp / f"done-rank{r:05d}.json").unlink()
        manifest = dict(header, files=files, shards=shards)
        fsync_write(tmp / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True))
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_write(self.root / "latest.tmp", name)
        os.replace(self.root / "latest.tmp", self.root / "latest")
        fsync_dir(self.root)
        ckpts = sorted(p for p in self.root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in ckpts[:-self.keep] if self.keep > 0 else []:
            if not self.kept_for_good(old):
                shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint %s written (%d files, %d ranks)", final, len(files), world)

    def kept_for_good(self, ck: Path) -> bool:
        """checkpoint.keep_every: a checkpoint at a multiple of it is never purged (a curve's points)."""
        return self.keep_every > 0 and checkpoint_tasks(ck) % self.keep_every == 0

    def _raise(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise CheckpointError(f"writing checkpoint under {self.root} failed on rank {self.comm.rank}: "
                                  f"{e}") from e

    def wait(self) -> Path | None:
        """Block until this rank's save in flight is durable (rank 0: until it is `latest`)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self._raise()
        return self.last_saved

    def close(self) -> None:
        self.wait()
        self.comm.barrier()

    # ---------------------------------------------------------------- loading
    def load(self, ck: Path, parts: dict, expect: dict | None = None, universal: Path | None = None) -> dict:
        """Load `parts` from checkpoint folder `ck` (written at any world size); returns the manifest.

        Every rank reads only what its parts need and verifies only those bytes; a missing or corrupt file is
        reported by the rank that read it, and every rank raises the same error (no rank is left waiting)."""
        ck = Path(ck)
        manifest = read_manifest(ck)
        check_compatible(manifest, expect or {}, ck)
        counter = {"hashed": 0}
        self.stats = counter

        def agree(fn):
            err = None
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - every rank must reach the all-gather, whatever failed
                err = f"rank {self.comm.rank}: {type(e).__name__}: {e}" if not isinstance(
                    e, (CheckpointError, ShardError)) else f"rank {self.comm.rank}: {e}"
            errs = [e for e in self.comm.all_gather_object(err) if e]
            if errs:
                raise CheckpointError("; ".join(errs))

        def local_parts():
            for pname, part in parts.items():
                kind = part_kind(part)
                if kind == "sharded":
                    load_sharded(ck, manifest, pname, part, counter)
                elif kind == "state":
                    self._load_state(ck, manifest, pname, part, counter)
                else:
                    for p in part.own_files(ck, self.comm.rank, reading=True, universal=universal is not None):
                        verify_file(ck, str(p.relative_to(ck)), manifest, counter)

        agree(local_parts)
        for part in parts.values():
            if isinstance(part, EnginePart):
                agree(lambda part=part: part.load_from(ck, universal))
        log.info("loaded %s from %s (%d tasks, written by %d ranks; %d bytes verified)", sorted(parts), ck,
                 manifest["tasks"], manifest["world_size"], counter["hashed"])
        return manifest

    def _load_state(self, ck: Path, manifest: dict, pname: str, part: StatePart, counter: dict) -> None:
        rel = f"{pname}-rank{self.comm.rank:05d}.pt" if per_rank(part) else f"{pname}.pt"
        if rel not in manifest["files"]:
            if per_rank(part):   # another world size: this rank had no predecessor
                return
            raise CheckpointError(f"checkpoint {ck} has no {rel} (part {pname!r})")
        p = verify_file(ck, rel, manifest, counter)
        part.load_state_dict(torch.load(p, map_location="cpu", weights_only=True))
