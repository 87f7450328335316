"""The analyses of a trained expert pool, as numbers and as PNG figures (matplotlib, Agg backend).

- capacity: fraction of non-zero entries of the experts' eval-mode masks, by layer type and by block depth;
- expert selection: mean merging weights w per domain, clustered into a dendrogram (scipy, average linkage);
- overlap: pairwise IoU of the experts' non-zero sets;
Masks are computed one parameter tensor at a time, so an [n, M] mask of the whole pool is never held.
The statistics are per slice and summed over ranks, so no process holds the whole pool (smat-analyze --nproc).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from smat_dist.pool import gates as hc  # noqa: E402
from smat_dist.method.protonet import prototypes  # noqa: E402
from smat_dist.utils.log import get_logger  # noqa: E402

log = get_logger(__name__)


def _chunks(space, pool):
    """(info, eval-mode non-zero mask [k, M] bool) for each parameter tensor (or its part) inside the pool slice."""
    with torch.no_grad():
        for info in space.infos:
            a, b = max(info.offset, pool.lo), min(info.offset + info.numel, pool.hi)
            if a >= b:
                continue
            la = pool.entry_log_alpha(a - pool.lo, b - pool.lo).clamp(-pool.cfg.clamp, pool.cfg.clamp)
            yield info, hc.gate(la, train=False, eval_beta=hc.eval_beta(pool.cfg)) > 0


def _sum(t: torch.Tensor, reduce) -> torch.Tensor:
    return t if reduce is None else reduce(t)


def capacity(space, pool, reduce=None) -> dict:
    """Non-zero fraction of the eval-mode masks: overall per expert, by layer kind and by depth (means over
    experts, plus per expert). `pool` may be one rank's slice: the counts are summed with `reduce` (a sum
    over ranks), so no process holds the whole pool."""
    kinds = sorted({str(i.kind) for i in space.infos})
    depths = sorted({i.depth for i in space.infos})
    m = pool.experts
    # rows: one per kind, one per depth, then the total; columns: per-expert counts, then the entry count
    dev = pool.log_alpha.device    # counted where the slice lives; only the small totals come to the host
    acc = torch.zeros(len(kinds) + len(depths) + 1, m + 1, dtype=torch.float64, device=dev)
    for info, nz in _chunks(space, pool):
        row = torch.cat([nz.sum(0).double(), torch.tensor([float(nz.shape[0])], dtype=torch.float64, device=dev)])
        acc[kinds.index(str(info.kind))] += row
        acc[len(kinds) + depths.index(info.depth)] += row
        acc[-1] += row
    acc = _sum(acc, reduce).cpu().numpy()
    if acc[-1, m] == 0:
        raise ValueError("the pool covers no backbone parameter: nothing to analyse")

    def frac(keys, offset):
        out = {}
        for j, k in enumerate(keys):
            cnt, n = acc[offset + j, :m], acc[offset + j, m]
            if n > 0:
                out[str(k)] = {"mean": float(cnt.mean() / n), "per_expert": (cnt / n).tolist(), "numel": int(n)}
        return out

    return {"overall": (acc[-1, :m] / acc[-1, m]).tolist(), "by_kind": frac(kinds, 0),
            "by_depth": frac(depths, len(kinds))}


def mask_overlap(space, pool, reduce=None) -> np.ndarray:
    """[M, M] intersection-over-union of the experts' non-zero sets (diagonal 1; 0 when both are empty);
    from one rank's slice, the counts are summed with `reduce`."""
    m = pool.experts
    acc = torch.zeros(m + 1, m, dtype=torch.float64, device=pool.log_alpha.device)  # intersections, counts
    for _, nz in _chunks(space, pool):
        f = nz.double()
        acc[:m] += f.t() @ f
        acc[m] += f.sum(0)
    acc = _sum(acc, reduce).cpu()
    inter, count = acc[:m], acc[m]
    union = count[:, None] + count[None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))
    iou.fill_diagonal_(1.0)
    return iou.numpy()


@torch.no_grad()
def selection_by_domain(setup, episodes_by_domain: dict) -> dict[str, np.ndarray]:
    """Mean eval-mode merging weights w [M] of each domain's episodes (frozen-feature prototypes -> hypernet)."""
    fb, method = setup.fb, setup.method
    out = {}
    for name, episodes in episodes_by_domain.items():
        ws = []
        dev = fb.theta_pre.device
        for ep in episodes:
            protos = prototypes(fb(fb.theta_pre, ep.support.to(dev)), ep.support_labels.to(dev), int(ep.ways))
            w, _ = method(protos, False)
            ws.append(w.double().cpu().numpy())
        if not ws:
            raise ValueError(f"domain {name}: no episodes to measure expert selection on")
        out[name] = np.mean(ws, 0)
    return out


# ---------------------------------------------------------------- figures

def _save(fig, path) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def plot_capacity(cap: dict, path) -> str:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    kinds = list(cap["by_kind"])
    a1.bar(kinds, [cap["by_kind"][k]["mean"] for k in kinds], color="tab:blue")
    a1.set_ylabel("non-zero fraction (mean over experts)")
    a1.set_title("capacity by layer type")
    a1.tick_params(axis="x", rotation=45)
    depths = [k for k in cap["by_depth"] if int(k) >= 0]
    a2.plot([int(k) + 1 for k in depths], [cap["by_depth"][k]["mean"] for k in depths], "o-", color="tab:orange")
    if "-1" in cap["by_depth"]:
        a2.axhline(cap["by_depth"]["-1"]["mean"], ls="--", color="gray", label="outside blocks")
        a2.legend()
    a2.xaxis.get_major_locator().set_params(integer=True)
    a2.set_xlabel("block")
    a2.set_title("capacity by depth")
    return _save(fig, path)


def plot_dendrogram(w_by_domain: dict[str, np.ndarray], path) -> str:
    from scipy.cluster.hierarchy import dendrogram, linkage

    names = list(w_by_domain)
    if len(names) < 2:
        raise ValueError(f"a dendrogram needs at least two domains, got {names}")
    W = np.stack([w_by_domain[n] for n in names])
    z = linkage(W, method="average", metric="euclidean")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, max(3.0, 0.4 * len(names) + 1)),
                                 gridspec_kw={"width_ratios": [1, 1.4]})
    dn = dendrogram(z, labels=names, orientation="left", ax=a1)
    a1.set_title("domains clustered by expert selection")
    order = dn["ivl"][::-1]
    im = a2.imshow(np.stack([w_by_domain[n] for n in order]), aspect="auto", cmap="viridis")
    a2.set_yticks(range(len(order)), order)
    a2.set_xticks(range(W.shape[1]))
    a2.set_xlabel("expert")
    a2.set_title("mean merging weight w")
    fig.colorbar(im, ax=a2)
    return _save(fig, path)


def plot_overlap(iou: np.ndarray, path) -> str:
    fig, ax = plt.subplots(figsize=(4.6, 4))
    im = ax.imshow(iou, vmin=0, vmax=1, cmap="magma")
    m = iou.shape[0]
    if m <= 16:
        for i in range(m):
            for j in range(m):
                ax.text(j, i, f"{iou[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if iou[i, j] < 0.6 else "black")
    ax.set_xlabel("expert")
    ax.set_ylabel("expert")
    ax.set_title("mask overlap (IoU of non-zeros)")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def analyze_pool(setup, out_dir, episodes_by_domain: dict | None = None, plot: bool = True) -> dict:
    """Capacity, overlap and (given episodes per domain) expert-selection figures + analysis.json numbers.

    On several ranks every rank passes its own slice (setup.pool) and the statistics are summed over ranks;
    `plot=False` on all but one rank."""
    if setup.pool is None:
        raise ValueError("the mask analyses need a SMAT model with an expert pool")
    out = Path(out_dir)
    shard, reduce = setup.pool.shard, (setup.pool.reduce if setup.pool.world > 1 else None)
    cap = capacity(setup.fb.space, shard, reduce)
    iou = mask_overlap(setup.fb.space, shard, reduce)
    res = {"capacity": cap, "overlap": iou.tolist(), "figures": {}}
    if plot:
        res["figures"] = {"capacity": plot_capacity(cap, out / "capacity.png"),
                          "overlap": plot_overlap(iou, out / "mask_overlap.png")}
    if episodes_by_domain:
        w = selection_by_domain(setup, episodes_by_domain)
        res["selection"] = {k: v.tolist() for k, v in w.items()}
        if plot:
            res["figures"]["dendrogram"] = plot_dendrogram(w, out / "expert_dendrogram.png")
    return res
