"""What sparsity a run reached, and how it got there, from its metrics.jsonl (one row per training step).

Every training step logs, per expert m, the hard fraction of zeros of its training-gate mask
(`sparsity/expert<m>`) and of its eval-gate mask (`sparsity_eval/expert<m>`), counted at the start of the step,
and the controller's current target (`sparsity/target`, the ramp when method.sparsity.schedule_share > 0). Both
the demo's report and the sweep read those rows here, so "reached" means the same thing everywhere.
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# an expert further than this from tau (in either gate) means the run is not "SMAT at tau"
SPARSITY_TOL = 0.05


def read_metrics(run_dir) -> list[dict]:
    """The rows of RUN_DIR/metrics.jsonl ([] without one); a torn last line (a killed run) is skipped."""
    p = Path(run_dir) / "metrics.jsonl"
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def sparsity_reached(rows: list[dict], experts: int, target: float, tol: float = SPARSITY_TOL) -> dict:
    """Target vs reached sparsity per expert (training and eval gates): the last logged training step that has
    the counts. `ok` is False when any expert is more than `tol` from target in either gate, or when no step
    logged them."""
    last = next((r for r in reversed(rows) if "sparsity/expert0" in r), None)
    if last is None:
        return {"ok": False, "train": [], "eval": [], "step": None, "worst": float("nan"), "target": target}
    train = [float(last.get(f"sparsity/expert{i}", float("nan"))) for i in range(experts)]
    ev = [float(last.get(f"sparsity_eval/expert{i}", float("nan"))) for i in range(experts)]
    gaps = [abs(v - target) for v in train + ev]
    worst = max(gaps) if all(g == g for g in gaps) else float("nan")   # nan (a missing count) fails
    return {"ok": worst <= tol, "train": train, "eval": ev, "worst": worst, "target": target,
            "step": last.get("step", last.get("tasks"))}


def trajectory(rows: list[dict], experts: int) -> dict:
    """Per-expert sparsity over training: {"tasks": [...], "target": [...], "train": [[...] per expert],
    "eval": [[...] per expert]}, one point per logged step that has the counts."""
    rows = [r for r in rows if "sparsity/expert0" in r]
    return {"tasks": [r.get("tasks", r.get("step")) for r in rows],
            "target": [r.get("sparsity/target", float("nan")) for r in rows],
            "train": [[r.get(f"sparsity/expert{i}", float("nan")) for r in rows] for i in range(experts)],
            "eval": [[r.get(f"sparsity_eval/expert{i}", float("nan")) for r in rows] for i in range(experts)]}


def plot_trajectories(runs: dict[str, dict], path, cols: int = 4) -> str:
    """One panel per run ({label: trajectory}): each expert's training-gate sparsity (solid) and eval-gate
    sparsity (dotted) against tasks seen, with the controller's target (dashed black)."""
    from smat_dist.analysis.figures import _save

    n = max(1, len(runs))
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, (label, t) in zip(axes.flat, runs.items()):
        colors = plt.get_cmap("tab10" if len(t["train"]) <= 10 else "tab20")
        for i, (tr, ev) in enumerate(zip(t["train"], t["eval"])):
            c = colors(i % colors.N)
            ax.plot(t["tasks"], tr, color=c, lw=1.0)
            ax.plot(t["tasks"], ev, color=c, lw=0.8, ls=":")
        ax.plot(t["tasks"], t["target"], color="k", lw=1.0, ls="--")
        ax.set_title(label, fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("tasks", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("fraction of zeros per expert", fontsize=8)
    fig.suptitle("sparsity per expert (solid: training gate, dotted: eval gate, dashed: target)", fontsize=9)
    return _save(fig, path)
