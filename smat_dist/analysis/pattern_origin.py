"""How much of a learned mask pattern was learned: the share of each expert's kept entries that its initial
draw already ranked on top.

The learned masks start as logits drawn N(mean, std^2) per entry and expert (smat_dist/pool/draws.py); the penalty
lowers every logit, the task gradient reorders them. If training only shifts the draw, the entries an expert
keeps at the end (training gate open, log alpha above -1.599) are the ones whose initial logits were highest,
so the share of kept entries whose initial logit lies in the top `kept` fraction of N(mean, std^2) is ~1; for
a pattern the task chose regardless of the draw it is ~`kept` (chance). The demo's 160-task runs give ~0.92
at tau 0.9 (docs/differences.md, "Sparsity").

The initial logits are regenerated from the run's seed with the pool's own chunked generators, and the
checkpoint's pool shards are streamed a block of rows at a time (ShardReader, digests verified), so no rank's
slice is held whole. Only unstructured learned pools qualify: structured gates draw per gate group, and the
hand-designed patterns have no initial draw.
"""
from __future__ import annotations

import json
from pathlib import Path
from statistics import NormalDist

import torch

from smat_dist import checkpoint as ckpt
from smat_dist.checkpoint.shard_file import TORCH_DTYPE, ShardReader
from smat_dist.pool import gates as hc
from smat_dist.pool.draws import chunked_normal

ROWS = 1 << 18   # rows per read: one init chunk, [ROWS, M] float32 at a time


def _pool_files(ck: Path, manifest: dict) -> list[tuple[Path, dict | None]]:
    files = sorted(n for n in manifest.get("files", {}) if n.startswith("pool-rank") and n.endswith(".safetensors"))
    if not files:
        raise ValueError(f"{ck}: the manifest lists no pool shard (pool-rank*.safetensors)")
    return [(ck / n, manifest["files"][n]) for n in files]


def _blocks(path: Path, digest: dict | None, numel: int):
    """(global row offset, log alpha rows [ROWS, M] float32) of one shard's valid rows."""
    with ShardReader(path, digest) as r:
        meta = json.loads(r.metadata.get("tensors", "{}")).get("log_alpha", {})
        if meta.get("index") != "range":
            raise ValueError(f"{path}: log_alpha is not indexed by a row range ({meta}); a structured pool?")
        lo, hi = int(meta["lo"]), int(meta["hi"])
        n, m = r.shape("log_alpha")
        if n != hi - lo:
            raise ValueError(f"{path}: log_alpha has {n} rows, its range [{lo}, {hi}) {hi - lo}")
        dtype = TORCH_DTYPE[r.info("log_alpha")["dtype"]]
        for a in range(0, min(hi, numel) - lo, ROWS):
            b = min(a + ROWS, min(hi, numel) - lo)
            out = torch.empty(b - a, m, dtype=dtype)
            r.read_rows_into("log_alpha", a, b, out)
            yield lo + a, out.float()


def init_share(run_dir: str | Path) -> dict | None:
    """{"kept": [...], "from_init": [...], "experts": M} of the newest checkpoint of `run_dir` (a run folder or a
    checkpoint folder), or None when the pool is not an unstructured learned one (the reason is not an error:
    there is nothing to measure)."""
    from smat_dist.config.hydra import load_yaml

    ck = ckpt.find_latest(run_dir)
    if ck is None:
        raise ValueError(f"{run_dir}: no checkpoint (no manifest.json, no checkpoints/latest)")
    cfg = load_yaml(ck / "config.yaml")
    sp = cfg.method.sparsity
    if str(cfg.method.name) != "smat" or bool(sp.structured) or str(getattr(sp, "pattern", "learned")) != "learned":
        return None
    manifest = ckpt.read_manifest(ck)
    files = _pool_files(ck, manifest)
    with ShardReader(*files[0]) as r:
        rep = json.loads(r.metadata.get("replicated", "{}"))
    numel, M = int(rep["numel"]), int(rep["experts"])
    seed, mean, std = int(cfg.train.seed), hc.init_mean(sp), float(sp.init_std)
    if std <= 0:
        return None
    zero_below = -hc.threshold(train=True)
    kept = torch.zeros(M, dtype=torch.float64)
    for path, digest in files:                       # pass 1: how many entries each expert keeps
        for _, la in _blocks(path, digest, numel):
            kept += (la > zero_below).sum(0, dtype=torch.float64)
    share = (kept / numel).tolist()
    # the initial logit above which lies the top `share` of N(mean, std^2): the draw's own top at that size
    # (millions of entries: the empirical quantile is this one to ~1e-3)
    cut = torch.tensor([mean + std * NormalDist().inv_cdf(min(max(1.0 - s, 1e-12), 1 - 1e-12)) for s in share])
    both = torch.zeros(M, dtype=torch.float64)
    for path, digest in files:                       # pass 2: of those, how many the initial draw ranked on top
        for g0, la in _blocks(path, digest, numel):
            init = chunked_normal(seed, g0, g0 + la.shape[0], M, mean, std)
            both += ((la > zero_below) & (init > cut)).sum(0, dtype=torch.float64)
    from_init = [float(b / k) if k > 0 else float("nan") for b, k in zip(both.tolist(), kept.tolist())]
    return {"experts": M, "kept": share, "from_init": from_init, "checkpoint": str(ck)}
