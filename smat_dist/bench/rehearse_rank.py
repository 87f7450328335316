"""Rank functions of `smat-bench rehearse`: the real trainer and the real sharded evaluation, run by the local
launcher (smat_dist.launch.local) as smat-train and smat-eval run them, each with its memory and checkpoint
times measured on this rank.

Memory is the rank's resident high-water mark (VmHWM) minus its resident size once the trainer's or the
evaluator's modules are imported and before anything is built: the same baseline as the other benches
(`peak_over_base_bytes`), so the interpreter, torch and DeepSpeed's import cost are not counted against the
planner, which predicts the tensors only.

Checkpoint times come from the real Checkpointer, timed around its own calls in this process: `block_s` is
how long training was held by a save (for an async save: the host copy and the small replicated part),
`written_s` until the save's files are durable (its writer thread has ended), and `load_s` how long a resume's
load took (the re-slicing read of every shard it needs, verified); after the load, the sha256 of each pool
tensor of the slice (what the re-slicing read, before a step changes it).
"""
from __future__ import annotations

import hashlib
import threading
import time

import torch

from smat_dist.utils.memory import peak_rss_bytes, rss_bytes


class CheckpointClock:
    """Times the Checkpointer's save and load in this process (the real methods run unchanged)."""

    def __init__(self):
        self.saves: list[dict] = []
        self.loads: list[dict] = []
        self._watchers: list[threading.Thread] = []

    def __enter__(self):
        from smat_dist.checkpoint.checkpointer import Checkpointer

        self._cls, self._save, self._load = Checkpointer, Checkpointer.save, Checkpointer.load
        clock = self

        def save(ck, tasks, *a, **k):
            t0 = time.perf_counter()
            path = clock._save(ck, tasks, *a, **k)
            rec = {"tasks": int(tasks), "async": ck._thread is not None, "block_s": time.perf_counter() - t0}
            writer = ck._thread
            if writer is None:
                rec["written_s"] = rec["block_s"]
            else:   # durable when the writer thread ends, which the training does not wait for
                def watch():
                    writer.join()
                    rec["written_s"] = time.perf_counter() - t0
                w = threading.Thread(target=watch, daemon=True)
                w.start()
                clock._watchers.append(w)
            clock.saves.append(rec)
            return path

        def load(ck, path, parts, *a, **k):
            t0 = time.perf_counter()
            out = clock._load(ck, path, parts, *a, **k)
            rec = {"checkpoint": str(path), "load_s": time.perf_counter() - t0}
            if "pool" in parts:     # what the load put into this rank's slice, before any step changes it
                rec["pool_slice_sha256"] = slice_digests(parts["pool"])
            clock.loads.append(rec)
            return out

        Checkpointer.save, Checkpointer.load = save, load
        return self

    def __exit__(self, *exc):
        for w in self._watchers:
            w.join()
        self._cls.save, self._cls.load = self._save, self._load
        return False


def slice_digests(pool) -> dict:
    """sha256 of each of the slice's tensors (its rows of the global pool, padding excluded) and its row range:
    on one rank, the digest of the whole tensor, to hold against the digest of another world size's shards."""
    out = {}
    for name, t in pool.sharded_tensors().items():
        index = pool.row_index(name)
        if index[0] != "range":
            continue
        rows = t[: max(0, min(index[2], index[3]) - index[1])].contiguous()
        out[name] = {"lo": int(index[1]), "rows": int(rows.shape[0]),
                     "sha256": hashlib.sha256(memoryview(rows.view(-1).view(torch.uint8).numpy())).hexdigest()}
    return out


def _memory(base: int) -> dict:
    peak = peak_rss_bytes()
    return {"base_rss_bytes": base, "peak_rss_bytes": peak, "peak_over_base_bytes": peak - base}


def train_measured(cfg, run_dir: str, should_stop) -> dict:
    """smat-train's rank function (smat_dist.train.trainer:train) with this rank's peak and checkpoint times."""
    from smat_dist.train import trainer

    base = rss_bytes()
    t0 = time.perf_counter()
    with CheckpointClock() as clock:
        out = trainer.train(cfg, run_dir, should_stop=should_stop)
    return {"out": out, "seconds": time.perf_counter() - t0, "memory": _memory(base), "saves": clock.saves,
            "loads": clock.loads}


def eval_measured(cfg, run_dir: str, should_stop) -> dict:
    """smat-eval's rank function (smat_dist.eval.cli:eval_rank: this rank's slice of the pool, its share of
    the episodes) with this rank's peak."""
    from smat_dist.eval import cli

    base = rss_bytes()
    t0 = time.perf_counter()
    summary = cli.eval_rank(cfg, run_dir, should_stop)
    return {"summary": summary, "seconds": time.perf_counter() - t0, "memory": _memory(base)}
