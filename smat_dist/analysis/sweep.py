"""A sparsity sweep as numbers, a table and the paper's Figure 3: SMAT at several (tau, M), and SMAT with
hand-designed masks, each compared with P>M>F and the pre-trained model on the same fixed test episodes.

A sweep entry is a trained run folder (config.yaml, metrics.jsonl) plus the evaluation of its SMAT model
(results.json + episodes.json, in the run folder or its eval/ sub-folder). The reference is one evaluation of
the baselines (P>M>F, pre-trained) on the same episodes: every entry's per-episode accuracies are paired with
it, so each difference comes with the interval of the per-episode differences, not of two independent means.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from smat_dist.analysis.pattern_origin import init_share
from smat_dist.analysis.sparsity import SPARSITY_TOL, read_metrics, sparsity_reached, trajectory
from smat_dist.utils.log import get_logger

log = get_logger(__name__)

REFERENCES = ("pmf", "pretrained")
PATTERN_CONFIG = {"learned": None, "random": "smat_random_masks", "magnitude": "smat_magnitude_masks"}


@dataclass(frozen=True)
class Point:
    """One SMAT run of a sweep: target sparsity, number of experts, mask pattern (learned or hand-designed)."""
    tau: float
    experts: int
    pattern: str = "learned"

    @property
    def name(self) -> str:
        return f"tau{self.tau:g}_M{self.experts}" + ("" if self.pattern == "learned" else f"_{self.pattern}")

    def overrides(self) -> list[str]:
        group = PATTERN_CONFIG[self.pattern]
        return ([f"method={group}"] if group else []) + [f"method.sparsity.target={self.tau}",
                                                         f"method.experts={self.experts}"]


def grid(taus, experts, patterns=(), baseline_tau: float = 0.9, baseline_experts: int = 8) -> list[Point]:
    """Learned masks at every (tau, M); each hand-designed pattern once, at (baseline_tau, baseline_experts)."""
    for t in taus:
        if not 0.0 < float(t) < 1.0:
            raise ValueError(f"sweep tau={t}: must be > 0 and < 1")
    for m in experts:
        if int(m) < 1:
            raise ValueError(f"sweep experts={m}: need at least 1 expert")
    bad = [p for p in patterns if p not in PATTERN_CONFIG or p == "learned"]
    if bad:
        raise ValueError(f"sweep baselines {bad}: expected some of {[p for p in PATTERN_CONFIG if p != 'learned']}")
    pts = [Point(float(t), int(m)) for m in experts for t in taus]
    pts += [Point(float(baseline_tau), int(baseline_experts), p) for p in patterns]
    return list(dict.fromkeys(pts))


def results_dir(run_dir: Path) -> Path | None:
    """Where a run folder's evaluation is: the folder itself or its eval/ sub-folder (None: not evaluated)."""
    for d in (run_dir, run_dir / "eval"):
        if (d / "results.json").is_file() and (d / "episodes.json").is_file():
            return d
    return None


def scan(sweep_dir) -> list[tuple[Path, Path]]:
    """(run folder, results folder) of every evaluated run folder under `sweep_dir` (others are skipped)."""
    out = []
    if not Path(sweep_dir).is_dir():
        return out
    for d in sorted(Path(sweep_dir).iterdir()):
        if not d.is_dir() or d.name in ("analysis",):
            continue
        r = results_dir(d)
        if r is None or not (d / "config.yaml").is_file():
            log.warning("sweep: skipping %s (needs config.yaml and results.json + episodes.json)", d)
            continue
        out.append((d, r))
    return out


def _load_eval(d: Path) -> tuple[dict, dict]:
    try:
        return json.loads((d / "results.json").read_text()), json.loads((d / "episodes.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{d}: unreadable results.json / episodes.json ({e})") from None


def _same_episodes(a: dict, a_path: Path, b: dict, b_path: Path) -> None:
    """Pairing is only valid on the same fixed episodes: same episode settings, count, seed and domains."""
    for key in ("episode_config", "episodes", "eval_seed"):
        if a["meta"].get(key) != b["meta"].get(key):
            raise ValueError(f"{a_path} and {b_path} were evaluated on different episodes ({key}: "
                             f"{a['meta'].get(key)} vs {b['meta'].get(key)}); evaluate both with the same eval.* "
                             "and data.* settings to compare them")
    da = {d["name"]: d["kind"] for d in a["meta"]["domains"]}
    db = {d["name"]: d["kind"] for d in b["meta"]["domains"]}
    if da != db:
        raise ValueError(f"{a_path} and {b_path} cover different domains ({sorted(da)} vs {sorted(db)})")


def paired_against(per_a: dict, per_b: dict, kinds: dict) -> dict:
    """Per domain paired(a, b) and their ID / OOD averages ({"id": ..., "ood": ..., "domains": ...})."""
    from smat_dist.eval.stats import paired, paired_average

    doms = {n: paired(per_a[n], per_b[n]) for n in kinds if n in per_a and n in per_b}
    return {"domains": doms, **{k: paired_average([p for n, p in doms.items() if kinds[n] == k])
                                for k in ("id", "ood")}}


def _from_init(run_dir: Path) -> list[float] | None:
    """Per expert, the share of kept entries its initial draw ranked on top (None: not a learned pool, or no
    checkpoint to read)."""
    try:
        o = init_share(run_dir)
    except (OSError, ValueError):
        return None
    return None if o is None else o["from_init"]


def collect(entries: list[tuple[Path, Path]], reference: Path | None = None, method: str = "smat",
            mode: str = "zeroshot") -> dict:
    """{"points": [...], "reference": {...}} for the (run folder, results folder) entries.

    Each point: run, tau, experts, pattern, id/ood averages, the sparsity reached (both gates, per expert, from
    metrics.jsonl), its trajectory, and paired differences against every reference method evaluated in
    `reference` (a results folder holding P>M>F and/or the pre-trained model)."""
    from smat_dist.config.hydra import load_yaml

    ref = ref_per = None
    refs: dict = {}
    if reference is not None:
        ref, ref_per = _load_eval(Path(reference))
        refs = {m: ref["results"][m][mode] for m in REFERENCES if m in ref["results"] and mode in ref["results"][m]}
    pts, pers = [], []
    for run_dir, res_dir in entries:
        cfg = load_yaml(run_dir / "config.yaml")
        res, per = _load_eval(res_dir)
        try:
            r = res["results"][method][mode]
        except KeyError:
            raise ValueError(f"{res_dir / 'results.json'}: no results for {method}/{mode}") from None
        tau, M = float(cfg.method.sparsity.target), int(cfg.method.experts)
        rows = read_metrics(run_dir)
        reached = sparsity_reached(rows, M, tau)
        p = {"run": run_dir.name, "run_dir": str(run_dir), "tau": tau, "experts": M,
             "pattern": str(getattr(cfg.method.sparsity, "pattern", "learned")),
             "tasks": int(cfg.train.tasks), "id_avg": r["id_avg"], "ood_avg": r["ood_avg"],
             "reached": reached, "trajectory": trajectory(rows, M), "paired": {},
             "from_init": _from_init(run_dir)}
        kinds = {d["name"]: d["kind"] for d in res["meta"]["domains"]}
        if ref is not None:
            _same_episodes(res, res_dir, ref, Path(reference))
            for m in refs:
                p["paired"][m] = paired_against(per[method][mode], ref_per[m][mode], kinds)
        pts.append(p)
        pers.append((per[method][mode], kinds, res, res_dir))
    if not pts:
        raise ValueError("no evaluated run in the sweep")
    # the paper's comparison: learned masks against hand-designed ones at the same tau and M, paired
    for p, (per, kinds, res, res_dir) in zip(pts, pers):
        if p["pattern"] == "learned":
            continue
        for q, (qper, _, qres, qdir) in zip(pts, pers):
            if q["pattern"] == "learned" and (q["tau"], q["experts"]) == (p["tau"], p["experts"]):
                _same_episodes(qres, qdir, res, res_dir)
                p["learned_minus_this"] = {"run": q["run"], **paired_against(qper, per, kinds)}
                break
    return {"points": pts, "reference": {m: {"id_avg": v["id_avg"], "ood_avg": v["ood_avg"]}
                                         for m, v in refs.items()}}


def _pm(c: dict | None) -> str:
    if not c or c.get("diff") is None:
        return "–"
    return f"{100 * c['diff']:+.2f} ± {100 * c['ci95']:.2f}"


def _range(vals) -> str:
    vals = [v for v in vals if v == v]
    return f"{min(vals):.3f}–{max(vals):.3f}" if vals else "–"


def markdown(sweep: dict) -> str:
    """The sweep table: (tau, M, pattern) -> reached sparsity (range over experts, both gates), ID / OOD
    averages and the paired differences against the references (points, mean ± 95% CI)."""
    refs = list(sweep["reference"])
    head = ["τ", "M", "masks", "reached (train gate)", "reached (eval gate)", "at τ?", "kept from init", "ID avg",
            "OOD avg"]
    for m in refs:
        head += [f"ID − {m}", f"OOD − {m}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(sweep["points"], key=lambda p: (p["pattern"] != "learned", p["experts"], p["tau"], p["pattern"]))
    for p in order:
        sp = p["reached"]
        row = [f"{p['tau']:g}", str(p["experts"]), p["pattern"], _range(sp["train"]), _range(sp["eval"]),
               "yes" if sp["ok"] else f"**no** (gap {sp['worst']:.3f})",
               _range(p["from_init"]) if p.get("from_init") else "–",
               f"{100 * p['id_avg']:.2f}" if p["id_avg"] is not None else "–",
               f"{100 * p['ood_avg']:.2f}" if p["ood_avg"] is not None else "–"]
        for m in refs:
            row += [_pm(p["paired"].get(m, {}).get("id")), _pm(p["paired"].get(m, {}).get("ood"))]
        lines.append("| " + " | ".join(row) + " |")
    ref_txt = "; ".join(f"{m}: ID {100 * v['id_avg']:.2f}" + (f", OOD {100 * v['ood_avg']:.2f}" if v["ood_avg"]
                                                              is not None else "")
                        for m, v in sweep["reference"].items())
    lines += ["", f"Accuracy in %, zero-shot. \"reached\": the range over experts of the fraction of zeros at the last "
              f"logged step; \"at τ?\": every expert within {SPARSITY_TOL} of τ in both gates; \"kept from init\": "
              "of the entries each expert keeps, the share its initial logits ranked on top (chance: 1 − τ; near 1: "
              "the pattern is the initial random draw). Differences: paired "
              "per-episode differences on the same fixed test episodes, averaged over domains, ± their 95% CI."
              + (f" References: {ref_txt}." if ref_txt else "")]
    base = [p for p in order if "learned_minus_this" in p]
    if base:
        lines += ["", "Learned masks against hand-designed ones at the same τ and M (learned − hand-designed, "
                  "paired, points ± 95% CI):", "",
                  "| τ | M | masks | learned run | ID | OOD |", "|---|---|---|---|---|---|"]
        for p in base:
            c = p["learned_minus_this"]
            lines.append(f"| {p['tau']:g} | {p['experts']} | {p['pattern']} | {c['run']} | {_pm(c['id'])} | "
                         f"{_pm(c['ood'])} |")
    return "\n".join(lines) + "\n"


MARKERS = ["o", "s", "^", "D", "v", "h", "<", ">"]
PATTERN_MARKERS = {"random": "X", "magnitude": "P"}


def plot_tradeoff(sweep: dict, path) -> str:
    """Figure 3: ID vs OOD average accuracy, target sparsity as colour, number of experts as marker; the
    hand-designed masks as their own markers, the references as labelled stars."""
    from smat_dist.analysis.figures import _save, plt

    pts = sweep["points"]
    fig, ax = plt.subplots(figsize=(6.2, 4.6))
    experts = sorted({p["experts"] for p in pts if p["pattern"] == "learned"})
    sc = None
    for k, m in enumerate(experts):
        ps = sorted((p for p in pts if p["experts"] == m and p["pattern"] == "learned"), key=lambda p: p["tau"])
        xs, ys = [100 * p["id_avg"] for p in ps], [100 * (p["ood_avg"] or 0) for p in ps]
        ax.plot(xs, ys, color="0.7", lw=0.8, zorder=1)
        sc = ax.scatter(xs, ys, c=[p["tau"] for p in ps], cmap="viridis", vmin=0, vmax=1,
                        marker=MARKERS[k % len(MARKERS)], s=70, edgecolors="k", zorder=2, label=f"M={m} (learned)")
    for pat, mk in PATTERN_MARKERS.items():
        ps = [p for p in pts if p["pattern"] == pat]
        if ps:
            sc = ax.scatter([100 * p["id_avg"] for p in ps], [100 * (p["ood_avg"] or 0) for p in ps],
                            c=[p["tau"] for p in ps], cmap="viridis", vmin=0, vmax=1, marker=mk, s=110,
                            edgecolors="r", linewidths=1.2, zorder=3,
                            label=f"{pat} masks (M={','.join(str(p['experts']) for p in ps)})")
    for name, v in sweep["reference"].items():
        if v["ood_avg"] is not None:
            ax.scatter([100 * v["id_avg"]], [100 * v["ood_avg"]], marker="*", s=160, color="k" if name == "pmf"
                       else "0.5", zorder=3, label={"pmf": "P>M>F", "pretrained": "pre-trained"}.get(name, name))
    ax.set_xlabel("ID average accuracy (%)")
    ax.set_ylabel("OOD average accuracy (%)")
    ax.set_title("ID vs OOD by target sparsity (colour) and experts (marker)", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    if sc is not None:
        fig.colorbar(sc, ax=ax, label="target sparsity τ")
    return _save(fig, path)


def plot_sweep_trajectories(sweep: dict, path) -> str:
    from smat_dist.analysis.sparsity import plot_trajectories

    order = sorted(sweep["points"], key=lambda p: (p["pattern"] != "learned", p["experts"], p["tau"]))
    return plot_trajectories({p["run"]: p["trajectory"] for p in order}, path)


def write(sweep: dict, out) -> dict[str, str]:
    """sweep.json, sweep.md, tradeoff.png and sparsity_trajectories.png into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"tradeoff": plot_tradeoff(sweep, out / "tradeoff.png"),
             "trajectories": plot_sweep_trajectories(sweep, out / "sparsity_trajectories.png")}
    (out / "sweep.md").write_text(markdown(sweep))
    (out / "sweep.json").write_text(json.dumps(sweep, indent=1))
    files.update(table=str(out / "sweep.md"), json=str(out / "sweep.json"))
    return files

