"""The prediction's files: predictions.json, predictions.csv and a contact sheet PNG (the support set per
class, each query with its predicted label and top probabilities, and the task's expert weights)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from smat_dist.predict.api import Prediction

MAX_SUPPORT_SHOWN = 8      # support images drawn per class row
QUERY_COLS = 6


def write_tables(pred: Prediction, out: Path, meta: dict) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    js, cs = out / "predictions.json", out / "predictions.csv"
    js.write_text(json.dumps(dict(meta, classes=pred.classes, expert_weights=pred.expert_weights,
                                  predictions=pred.records,
                                  skipped=[{"file": f, "reason": r} for f, r in pred.skipped]), indent=1))
    with open(cs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "class", "probability"] + [f"p[{c}]" for c in pred.classes])
        for i, rec in enumerate(pred.records):
            w.writerow([rec["file"], rec["class"], f"{rec['probability']:.6f}"]
                       + [f"{v:.6f}" for v in pred.probs[i].tolist()])
    return {"json": str(js), "csv": str(cs)}


def _short(name: str, n: int = 16) -> str:
    """Head and tail of a long name (class names often differ only at the end: ..._U+11216, ..._U+11210)."""
    if len(name) <= n:
        return name
    tail = n // 2 - 1
    return name[: n - tail - 1] + "…" + name[-tail:]


def contact_sheet(pred: Prediction, support: list[list], path: Path, title: str = "") -> str:
    """support: the task's LoadedImages per class (Task.support). Labels sit in fixed cells (no tight_layout:
    a long class name would otherwise shrink every image to make room for it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ways, nq = len(pred.classes), len(pred.files)
    qrows = -(-nq // QUERY_COLS)
    cols = max(MAX_SUPPORT_SHOWN, QUERY_COLS) + 1
    has_w = bool(pred.expert_weights)
    rows = ways + qrows + (1 if has_w else 0)
    heights = [1.0] * ways + [1.6] * qrows + ([1.0] if has_w else [])
    fig = plt.figure(figsize=(1.3 * cols, 1.3 * sum(heights) + 0.8))
    grid = fig.add_gridspec(rows, cols, height_ratios=heights, left=0.02, right=0.98, top=1 - 0.5 / fig.get_figheight(),
                            bottom=0.03, wspace=0.15, hspace=0.35)
    for c, (name, imgs) in enumerate(zip(pred.classes, support)):
        ax = fig.add_subplot(grid[c, 0])
        ax.axis("off")
        ax.text(0.0, 0.5, f"support\n{_short(name)}\n({len(imgs)} images)", fontsize=7, va="center")
        for j, im in enumerate(imgs[:MAX_SUPPORT_SHOWN]):
            ax = fig.add_subplot(grid[c, j + 1])
            ax.imshow(im.pixels)
            ax.axis("off")
    for r in range(qrows):
        ax = fig.add_subplot(grid[ways + r, 0])
        ax.axis("off")
        ax.text(0.0, 0.6, "queries:\npredicted class\nand top-3\nprobabilities" if r == 0 else "", fontsize=7,
                va="center")
    for i in range(nq):
        ax = fig.add_subplot(grid[ways + i // QUERY_COLS, 1 + i % QUERY_COLS])
        ax.imshow(pred.queries[i].pixels)
        ax.axis("off")
        lines = [_short(Path(pred.files[i]).name, 20)] + [f"{_short(c, 14)} {p:.2f}" for c, p in pred.top(i)]
        ax.text(0.0, -0.04, "\n".join(lines), transform=ax.transAxes, fontsize=5.5, va="top", clip_on=False)
    if has_w:
        ax = fig.add_subplot(grid[rows - 1, 1:])
        m = len(pred.expert_weights)
        ax.bar(range(m), pred.expert_weights, color="tab:blue")
        ax.set_xticks(range(m) if m <= 32 else range(0, m, max(1, m // 16)))
        ax.set_xlabel("expert", fontsize=7)
        ax.set_ylabel("merge weight", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)
