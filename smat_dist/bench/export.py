"""Export benchmark: smat-export's seconds and bytes against the checkpoint's, and the pool memory of a
one-process evaluation from the export against one from the checkpoint.

A SMAT pool over a real backbone layout is saved by `ranks` gloo ranks without training (`save_synthetic`:
delta ~ N(0, 0.05^2); each mask logit +-6, or, for a share `fractional`, in [-2, 2], which leaves the eval
gate fractional there), exported in a fresh process (its peak against the largest pool shard: the streaming's
memory), then each load runs in a fresh process that merges one task. Peaks are resident high-water marks
above the process's resident size before the export or load.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from smat_dist.config.schema import Config, ModelConfig


def synthetic_config(model: ModelConfig, experts: int, method: str = "smat", eval_gate: str = "upstream") -> Config:
    cfg = Config()
    cfg.model = model
    cfg.method.name = method
    cfg.method.experts = experts
    cfg.method.sparsity.eval_gate = eval_gate
    cfg.logging.wandb_mode = "disabled"
    return cfg


def save_synthetic(rank: int, world: int, cfg: Config, root: str, fractional: float = 0.4) -> str:
    """This rank's part of a checkpoint of an untrained pool filled from one global generator (the same pool
    at any world size), written by the Checkpointer as training writes it; returns the checkpoint folder."""
    from smat_dist.build import build
    from smat_dist.checkpoint import Checkpointer
    from smat_dist.config.hydra import to_yaml
    from smat_dist.distributed.comm import Comm
    from smat_dist.eval.loading import ModuleState

    comm = Comm()
    setup = build(cfg.model, cfg.method, seed=cfg.train.seed, comm=comm,
                  merge="sharded" if world > 1 else "local", hyper=None)
    g = torch.Generator().manual_seed(7)
    parts = {"replicated": ModuleState(setup.method, cfg.method.name)}
    if setup.pool is not None:
        shard = setup.pool.shard
        hi = min(shard.hi, shard.numel)
        delta = torch.randn(shard.numel, generator=g) * 0.05
        with torch.no_grad():
            shard.delta[: hi - shard.lo].copy_(delta[shard.lo:hi])
        del delta
        shape = (shard.numel, cfg.method.experts)
        # drawn in row blocks, so a large pool never holds three [P, M] temporaries at once
        for a in range(0, shard.numel, 1 << 18):
            b = min(shard.numel, a + (1 << 18))
            s = (b - a, shape[1])
            la = torch.where(torch.rand(s, generator=g) < 0.5, 6.0, -6.0)
            la = torch.where(torch.rand(s, generator=g) < fractional, torch.rand(s, generator=g) * 4 - 2, la)
            lo, up = max(a, shard.lo), min(b, hi)
            if lo < up:
                with torch.no_grad():
                    shard.log_alpha[lo - shard.lo:up - shard.lo].copy_(la[lo - a:up - a])
        parts["pool"] = setup.pool
    else:
        with torch.no_grad():
            setup.method.delta.copy_(torch.randn(setup.method.delta.shape, generator=g) * 0.01)
    with torch.no_grad():   # a hypernetwork that is not at its init
        for p in setup.method.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    meta = {"method": cfg.method.name, "backbone": cfg.model.name, "backbone_signature": setup.fb.space.signature(),
            "experts": cfg.method.experts if setup.pool is not None else 0}
    return str(Checkpointer(root, comm).save(3, parts, meta, texts={"config.yaml": to_yaml(cfg)}))


def _eval_peak(rank: int, world: int, path: str, exported: bool) -> dict:
    """One process: load (checkpoint or export), one eval-mode merge; peak RSS above the pre-load RSS."""
    from smat_dist.utils.memory import peak_rss_bytes, rss_bytes

    import smat_dist.build  # noqa: F401 (imports are the baseline, not the pool)
    import smat_dist.export.loader  # noqa: F401
    base = rss_bytes()
    t0 = time.perf_counter()
    if exported:
        from smat_dist.export.loader import load_export

        setup = load_export(path)
        pool_bytes = setup.pool.nbytes()
    else:
        from smat_dist.distributed.comm import Comm
        from smat_dist.eval.loading import load_method

        setup = load_method(path, comm=Comm(local=True))
        pool_bytes = sum(t.numel() * t.element_size() for t in setup.pool.sharded_tensors().values())
    load_s = time.perf_counter() - t0
    setup.pool.begin_step(train=False)
    with torch.no_grad():
        m = setup.pool.merge(torch.full((setup.method.cfg.experts,), 1.0 / setup.method.cfg.experts))
    setup.pool.end_eval()
    return {"peak_above_base": peak_rss_bytes() - base, "pool_state_bytes": pool_bytes, "load_s": round(load_s, 3),
            "merged_abs_sum": float(m.abs().sum())}


def _export_peak(rank: int, world: int, run_dir: str, out: str) -> dict:
    """One process: smat-export; its record and peak RSS above the pre-export RSS (the streaming's memory)."""
    from smat_dist.export.writer import export_run
    from smat_dist.utils.memory import peak_rss_bytes, rss_bytes

    import smat_dist.model.backbone  # noqa: F401 (imports are the baseline, not the export)
    base = rss_bytes()
    rec = export_run(run_dir, out)
    return dict(rec, peak_above_base=peak_rss_bytes() - base)


def run(model: ModelConfig, experts: int, ranks: int, fractional: float, root: str | None = None, emit=None) -> dict:
    from smat_dist.bench.spawn import run_ranks

    tmp = Path(root or tempfile.mkdtemp(prefix="smat_bench_export_"))
    cfg = synthetic_config(model, experts)
    t0 = time.perf_counter()
    run_ranks(save_synthetic, ranks, cfg, str(tmp / "run" / "checkpoints"), fractional)
    save_s = time.perf_counter() - t0
    rec = run_ranks(_export_peak, 1, str(tmp / "run"), str(tmp / "export"))[0]
    ck = run_ranks(_eval_peak, 1, str(tmp / "run"), False)[0]
    ex = run_ranks(_eval_peak, 1, str(tmp / "export"), True)[0]
    b = rec["bytes"]
    out = {"bench": "export", "model": model.name, "depth": model.kwargs.get("depth"), "numel": rec["numel"],
           "experts": experts, "saved_by_ranks": ranks, "fractional_share": rec["pool"]["fractional"] /
           rec["pool"]["entries"], "save_s": round(save_s, 2), "export_s": rec["export_seconds"],
           "checkpoint_bytes": b["checkpoint"], "export_bytes": b["export"], "formula_bytes": b["formula"],
           "fractional_bytes": b["fractional_bytes"], "export_over_formula_plus_fractional":
           round(b["export"] / (b["formula"] + b["fractional_bytes"]), 4),
           "checkpoint_over_export": round(b["checkpoint"] / b["export"], 2),
           "export_peak": rec["peak_above_base"], "pool_shard_bytes": b["pool_shard_bytes"],
           "eval_peak_checkpoint": ck["peak_above_base"], "eval_peak_export": ex["peak_above_base"],
           "pool_state_checkpoint": ck["pool_state_bytes"], "pool_state_export": ex["pool_state_bytes"],
           "same_merge": ck["merged_abs_sum"] == ex["merged_abs_sum"]}
    (emit or (lambda row: print(json.dumps(row), flush=True)))(out)
    return out
