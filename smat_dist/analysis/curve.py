"""Accuracy over meta-training (the paper's Figure 1): a run's saved checkpoints evaluated on the same fixed
episodes, point by point.

A point is a task count at which every compared run (SMAT and/or P>M>F) holds a complete checkpoint
(checkpoint.keep_every keeps them). Each point is one evaluation (smat_dist.eval, zero-shot) of those
checkpoints together, so SMAT - P>M>F is paired over the same episodes at every point; the pre-trained
model does not change with training and is evaluated once, at the first point. Beside the accuracies each
point carries what the SMAT run's masks were doing then: the sparsity reached (training gate, from
metrics.jsonl up to that point), the share of kept entries its initial draw already ranked on top
(pattern_origin.init_share of that checkpoint), and the mask-learning diagnostics averaged over the steps
since the previous point (method/mask_diagnostics.py).

Points are evaluated into OUT/points/tasks-<n>/ (results.json, episodes.json) and skipped on a rerun when
their evaluation settings are unchanged, so a curve grows as a long run writes more checkpoints.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Callable

from smat_dist.analysis.sparsity import read_metrics, sparsity_reached
from smat_dist.checkpoint import CheckpointError, checkpoint_tasks
from smat_dist.utils.log import get_logger

log = get_logger(__name__)

STAMP = "curve_point.yaml"
# per-step metrics summarised at each point (means over the steps since the previous point)
DIAGNOSTICS = ("mask/penalty_share", "mask/clip_scale", "mask/at_clamp_low", "mask/at_clamp_high",
               "mask/penalty_grad_norm", "mask/task_grad_norm", "temperature")


def checkpoints(run: Path) -> dict[int, Path]:
    """{tasks: folder} of the complete checkpoints of a run folder (checkpoints/step-*/manifest.json)."""
    root = Path(run) / "checkpoints"
    if not root.is_dir():
        raise FileNotFoundError(f"{run}: no checkpoints/ folder (not a training run folder)")
    return {checkpoint_tasks(p): p for p in sorted(root.glob("step-*"))
            if p.is_dir() and not p.name.endswith(".tmp") and (p / "manifest.json").is_file()}


def run_kind(run: Path) -> str:
    """The method a run folder trained (its config.yaml): smat or pmf."""
    from smat_dist.config.hydra import load_yaml

    cfg_file = Path(run) / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{run}: no config.yaml (not a training run folder)")
    kind = str(load_yaml(cfg_file).method.name)
    if kind not in ("smat", "pmf"):
        raise ValueError(f"{run}: method.name={kind!r}; a curve compares meta-trained runs (smat, pmf)")
    return kind


def runs_by_kind(runs: list[Path]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for r in runs:
        kind = run_kind(r)
        if kind in out:
            raise ValueError(f"{out[kind]} and {r} both hold a {kind} run: a curve compares one SMAT and one "
                             "P>M>F run")
        out[kind] = Path(r)
    return out


def parse_points(text: str | None, flag: str = "--points") -> list[int] | None:
    """'160,320' -> [160, 320]; None or '' -> None (every shared checkpoint)."""
    if not text:
        return None
    try:
        pts = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected task counts separated by commas, e.g. 160,320") from None
    if any(t < 1 for t in pts):
        raise ValueError(f"{flag} {text!r}: task counts must be >= 1")
    return pts


def common_points(runs: dict[str, Path], wanted: list[int] | None = None) -> list[int]:
    """Task counts at which every run has a checkpoint (restricted to `wanted` when given; each of those
    must exist)."""
    have = {kind: checkpoints(r) for kind, r in runs.items()}
    common = sorted(set.intersection(*(set(h) for h in have.values())))
    if wanted:
        missing = {kind: [t for t in wanted if t not in have[kind]] for kind in runs}
        missing = {k: v for k, v in missing.items() if v}
        if missing:
            raise CheckpointError(f"no checkpoint at {missing} (have {({k: sorted(v) for k, v in have.items()})}); "
                                  "train with checkpoint.keep_every=K to keep every K tasks' checkpoint")
        return sorted(set(wanted))
    if not common:
        raise CheckpointError(f"the runs share no checkpoint task count ({({k: sorted(v) for k, v in have.items()})})")
    return common


def point_config(base, runs: dict[str, Path], tasks: int, first: bool, out: Path):
    """The evaluation of one point: the runs' checkpoints at `tasks`, zero-shot; the pre-trained model at the
    first point only."""
    cfg = copy.deepcopy(base)
    cks = {kind: checkpoints(r)[tasks] for kind, r in runs.items()}
    cfg.eval.checkpoint = str(cks["smat"]) if "smat" in cks else None
    cfg.eval.pmf_checkpoint = str(cks["pmf"]) if "pmf" in cks else None
    cfg.eval.methods = [k for k in ("smat", "pmf") if k in cks] + (["pretrained"] if first else [])
    cfg.eval.modes = ["zeroshot"]
    cfg.run_dir = str(out / "points" / f"tasks-{tasks:09d}")
    return cfg


def evaluate_points(base, runs: dict[str, Path], points: list[int], out: Path,
                    evaluate: Callable) -> list[Path]:
    """Evaluate each point (evaluate(cfg) writes results.json + episodes.json into cfg.run_dir); a point whose
    folder holds results made with the same settings is kept as is."""
    from smat_dist.config.hydra import to_yaml
    from smat_dist.train.run_folder import same_config

    dirs = []
    for i, tasks in enumerate(points):
        cfg = point_config(base, runs, tasks, i == 0, out)
        d = Path(cfg.run_dir)
        stamp, text = d / STAMP, to_yaml(cfg)
        if (d / "results.json").is_file() and stamp.is_file() and same_config(stamp, text):
            log.info("curve: point %d tasks already evaluated (%s)", tasks, d)
        else:
            d.mkdir(parents=True, exist_ok=True)
            stamp.unlink(missing_ok=True)
            log.info("curve: evaluating %s at %d tasks (%d/%d)", "/".join(cfg.eval.methods), tasks, i + 1,
                     len(points))
            evaluate(cfg)
            stamp.write_text(text)
        dirs.append(d)
    return dirs


def _mean(rows: list[dict], key: str) -> float:
    vals = [float(r[key]) for r in rows if key in r and r[key] is not None and math.isfinite(float(r[key]))]
    return sum(vals) / len(vals) if vals else float("nan")


def _mask_state(smat_run: Path, tasks: int, prev: int, rows: list[dict]) -> dict:
    """The SMAT run's masks at a point: sparsity reached, kept-from-init, diagnostics since `prev`."""
    from smat_dist.analysis.pattern_origin import init_share
    from smat_dist.config.hydra import load_yaml

    cfg = load_yaml(smat_run / "config.yaml")
    M, tau = int(cfg.method.experts), float(cfg.method.sparsity.target)
    upto = [r for r in rows if r.get("tasks", 0) <= tasks]
    reached = sparsity_reached(upto, M, tau)
    share = init_share(checkpoints(smat_run)[tasks])
    window = [r for r in upto if r.get("tasks", 0) > prev]
    out = {"target": tau, "sparsity": _mean([{"v": v} for v in reached["train"]], "v"),
           "sparsity_min": min(reached["train"], default=float("nan")),
           "sparsity_max": max(reached["train"], default=float("nan")),
           "kept_from_init": (sum(share["from_init"]) / len(share["from_init"])) if share else None,
           "kept": (sum(share["kept"]) / len(share["kept"])) if share else None}
    out.update({k: _mean(window, k) for k in DIAGNOSTICS})
    return out


def collect(runs: dict[str, Path], points: list[int], dirs: list[Path]) -> dict:
    """The curve: per point the methods' ID/OOD averages, the paired SMAT - P>M>F differences, the SMAT masks'
    state; plus the pre-trained line and the SMAT run's per-step diagnostics."""
    from smat_dist.eval.stats import paired_comparisons

    smat_rows = read_metrics(runs["smat"]) if "smat" in runs else []
    out = {"runs": {k: str(v) for k, v in runs.items()}, "points": [], "pretrained": None,
           "steps": {"tasks": [r.get("tasks") for r in smat_rows if "mask/penalty_share" in r or "temperature" in r],
                     **{k: [r.get(k) for r in smat_rows if "mask/penalty_share" in r or "temperature" in r]
                        for k in DIAGNOSTICS}}}
    prev = 0
    for tasks, d in zip(points, dirs):
        results = json.loads((d / "results.json").read_text())
        per_episode = json.loads((d / "episodes.json").read_text())
        res = results["results"]
        p = {"tasks": tasks, "episodes": results["meta"]["episodes"],
             **{m: {"id": res[m]["zeroshot"]["id_avg"], "ood": res[m]["zeroshot"]["ood_avg"]}
                for m in ("smat", "pmf") if m in res}}
        if "pretrained" in res:
            out["pretrained"] = {"id": res["pretrained"]["zeroshot"]["id_avg"],
                                 "ood": res["pretrained"]["zeroshot"]["ood_avg"]}
        comps = paired_comparisons(results, per_episode, "zeroshot")
        if "smat - pmf" in comps:
            c = comps["smat - pmf"]
            p["smat_minus_pmf"] = {kind: c[kind] for kind in ("id", "ood")}
        if "smat" in runs:
            p["masks"] = _mask_state(runs["smat"], tasks, prev, smat_rows)
        out["points"].append(p)
        prev = tasks
    return out


def curve(base, runs: list[Path], out: Path, evaluate: Callable, wanted: list[int] | None = None) -> dict:
    """Evaluate and collect the curve of `runs` (one SMAT and/or one P>M>F run folder) into `out`; writes
    curve.json, curve.md and curve.png there and returns {"curve": ..., "files": ...}."""
    from smat_dist.analysis.curve_plot import write

    kinds = runs_by_kind(runs)
    points = common_points(kinds, wanted)
    dirs = evaluate_points(base, kinds, points, out, evaluate)
    data = collect(kinds, points, dirs)
    return {"curve": data, "files": write(data, out)}
