"""<out>/report.md of smat-demo: the table with 95% CIs, the verdict on the paper's claims, what was trained,
the wall time per phase and links to the figures. Only reads what the earlier phases wrote."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from smat_dist.analysis.pattern_origin import init_share
from smat_dist.analysis.sparsity import SPARSITY_TOL, read_metrics, sparsity_reached
from smat_dist.eval.report import markdown_table

# what the paper's recipe uses for the keys the demo shortens (configs/demo.yaml), to say so in the report
PAPER = {"train.tasks": "~50,000", "method.warmup_tasks": 400, "method.total_tasks": 50000, "method.delta_lr": 1e-4,
         "method.pmf_lr": 5e-4, "method.hypernet.t_decay": 4000.0, "method.hypernet.lr": 1e-4,
         "method.sparsity.lambda_lr": 0.002, "method.sparsity.lambda_lr_scale": "none",
         "method.sparsity.schedule_share": 0.0, "method.sparsity.eval_gate": "upstream",
         "method.sparsity.expert_weight": "merge"}

def _sparsity_verdict(sp: dict) -> str:
    tau = sp["target"]
    if not sp["train"]:
        return (f"**not checked as SMAT at τ={tau:.2f}**: the SMAT run's metrics.jsonl has no sparsity counts, "
                "so the comparisons below are of an expert pool of unknown sparsity")
    if sp["ok"]:
        return (f"SMAT at τ={tau:.2f}: every expert within {SPARSITY_TOL} of τ in both gates (largest gap "
                f"{sp['worst']:.3f}; per expert in \"What was trained\")")
    return (f"**not SMAT at τ={tau:.2f}**: an expert is {sp['worst']:.3f} from τ (more than {SPARSITY_TOL}; "
            f"training gate {min(sp['train']):.3f}-{max(sp['train']):.3f}, eval gate {min(sp['eval']):.3f}-"
            f"{max(sp['eval']):.3f}), so the comparisons below are of a less sparse (or sparser) expert pool than "
            "the one the paper's claims are about")


def _origin_line(run_dir: Path) -> list[str]:
    """What the learned masks owe to their initial draw (analysis/pattern_origin.py); nothing for other pools."""
    try:
        o = init_share(run_dir)
    except (OSError, ValueError, KeyError) as e:
        return [f"- Mask pattern's origin: not measured ({e})."]
    if o is None:
        return []
    fi, kept = o["from_init"], o["kept"]
    return [f"- Mask pattern's origin: of the entries each expert keeps, {min(fi):.2f}–{max(fi):.2f} were in the top "
            f"{min(kept):.2f}–{max(kept):.2f} of its initial logits (chance: that share; 1: the pattern is the "
            "initial random draw, shifted by the penalty). A short run's \"learned\" pattern near 1 is mostly its "
            "initialisation (docs/differences.md, \"Sparsity\")."]


def _get(cfg, dotted: str):
    for k in dotted.split("."):
        cfg = getattr(cfg, k)
    return cfg


def _mean(rows: list[dict], key: str, last: int = 20) -> float:
    vals = [r[key] for r in rows[-last:] if key in r]
    return sum(vals) / len(vals) if vals else float("nan")


def _avg_ci(res: dict, kind: str) -> float:
    """95% CI half-width of an average over domains (independent per-domain estimates)."""
    cis = [d["ci95"] for d in res["domains"].values() if d["kind"] == kind]
    return math.sqrt(sum(c * c for c in cis)) / len(cis) if cis else float("nan")


def _claim(a_name, a, b_name, b, kind, strict: bool, pair: dict | None = None) -> str:
    """The verdict from the paired per-episode differences (both methods ran on the same fixed episodes);
    the unpaired combined interval is reported beside it."""
    if a is None or b is None:
        return f"not checked ({a_name if a is None else b_name} was not evaluated)"
    ma, mb = a[f"{kind}_avg"], b[f"{kind}_avg"]
    diff = ma - mb
    unpaired = math.sqrt(_avg_ci(a, kind) ** 2 + _avg_ci(b, kind) ** 2)
    ci = pair["ci95"] if pair and pair.get("ci95") is not None else unpaired
    holds = diff > 0 if strict else diff >= 0
    sig = "outside" if abs(diff) > ci else "within"
    what = "paired 95% CI of the per-episode differences" if pair else "combined 95% CI"
    return (f"{a_name} {100 * ma:.2f}% vs {b_name} {100 * mb:.2f}% ({'+' if diff >= 0 else ''}{100 * diff:.2f} points, "
            f"{sig} the ±{100 * ci:.2f} {what}"
            + (f"; unpaired ±{100 * unpaired:.2f}" if pair else "") + f"): **{'holds' if holds else 'does not hold'}**"
            + ("" if sig == "outside"
               else " on the means, but the difference is not significant at this episode count"))


def _pairs(out: Path, results: dict) -> dict:
    """Paired comparisons of the zero-shot results (needs eval/episodes.json; {} without it)."""
    from smat_dist.eval.stats import paired_comparisons

    p = out / "eval" / "episodes.json"
    return paired_comparisons(results, json.loads(p.read_text()), "zeroshot") if p.is_file() else {}


def _z(res: dict, method: str):
    return res.get(method, {}).get("zeroshot")


def _data_rows(cfg) -> list[str]:
    rows = ["| domain | kind | classes train/val/test | images |", "|---|---|---|---|"]
    for kind, srcs in (("ID", cfg.data.sources), ("OOD", cfg.data.eval_sources)):
        for s in srcs:
            spec = json.loads((Path(s) / "spec.json").read_text())
            split = "/".join(str(len(spec["splits"].get(k, []))) for k in ("train", "val", "test"))
            rows.append(f"| {spec['name']} | {kind} | {split} | {spec['counts']['images']} |")
    return rows


def _sweep_section(out: Path, sweep: dict | None) -> list[str]:
    """The --sweep phase's table and figures (nothing without --sweep)."""
    if not sweep:
        return []
    rel = {k: Path(v).resolve().relative_to(out) if Path(v).resolve().is_relative_to(out) else Path(v)
           for k, v in sweep["files"].items()}
    return ["## Sparsity sweep (--sweep)", "",
            f"{sweep['points']} SMAT runs with the schedule above, each evaluated on the same test episodes as the "
            "table above. Hand-designed masks: `random` (each expert open on a random share 1 − τ of entries, "
            "fixed), `magnitude` (every expert open on the top 1 − τ entries by |δ| after a dense phase, fixed).",
            "", sweep["table"].rstrip(), "",
            f"- ID vs OOD (the paper's Figure 3): [{rel['tradeoff']}]({rel['tradeoff']})",
            f"- sparsity of every expert over training: [{rel['trajectories']}]({rel['trajectories']})",
            f"- numbers: [{rel['json']}]({rel['json']})", ""]


def _curve_section(out: Path) -> list[str]:
    """--curve's table (curve/curve.md), when the demo made one."""
    md = out / "curve" / "curve.md"
    if not md.is_file():
        return []
    return ["## Accuracy over meta-training (the paper's Figure 1)", "", md.read_text().rstrip(), "",
            "Figure: [curve/curve.png](curve/curve.png); per point: `curve/points/tasks-*/`.", ""]


def write_report(out: Path, eval_cfg, smat_cfg, pmf_cfg, results: dict, analysis: dict, timings: dict, quick: bool,
                 this_run_s: float, sweep: dict | None = None, exported: dict | None = None) -> Path:
    res = results["results"]
    pairs = _pairs(out, results)
    smat_m, pmf_m = read_metrics(out / "smat"), read_metrics(out / "pmf")
    last = smat_m[-1] if smat_m else {}
    M = smat_cfg.method.experts
    sp = sparsity_reached(smat_m, M, float(smat_cfg.method.sparsity.target))
    eval_sp = sp["eval"] or [float("nan")] * M
    train_sp = sp["train"] or [float("nan")] * M
    d, e = smat_cfg.data, results["meta"]["episode_config"]
    lines = [f"# smat-demo report{' (--quick smoke run: numbers mean nothing)' if quick else ''}", "",
             f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} in `{out}`. Settings: `configs/demo.yaml` "
             "(+ command-line overrides); each run folder holds its resolved `config.yaml`.", "",
             "## Verdict (the paper's claims, checked on this run)", "",
             "- Sparsity: " + _sparsity_verdict(sp),
             "- SMAT ≥ P>M>F on OOD: " + _claim("SMAT", _z(res, "smat"), "P>M>F", _z(res, "pmf"), "ood",
                                                 strict=False, pair=pairs.get("smat - pmf", {}).get("ood")),
             "- SMAT > pre-trained on ID: " + _claim("SMAT", _z(res, "smat"), "pre-trained",
                                                     _z(res, "pretrained"), "id", strict=True,
                                                     pair=pairs.get("smat - pretrained", {}).get("id")), "",
             "These are zero-shot (no test-time fine-tuning) results of a very short meta-training run on a CNN "
             "backbone and stylised offline domains, not a reproduction of the paper's ViT / Meta-Dataset numbers.", "",
             "## Results (zero-shot accuracy %, ± 95% CI)", "", markdown_table(results).rstrip(), "",
             "Averages' 95% CI (independent domains): " + ", ".join(
                 f"{m} ID ±{100 * _avg_ci(res[m]['zeroshot'], 'id'):.2f} / "
                 f"OOD ±{100 * _avg_ci(res[m]['zeroshot'], 'ood'):.2f}"
                 for m in res) + ". Per-episode accuracies: `eval/episodes.json`; raw numbers: "
             "`eval/results.json`.", "",
             "## What was trained", "",
             f"- Backbone: `{smat_cfg.model.name}` with ImageNet weights `{smat_cfg.model.pretrained}`, "
             f"{smat_cfg.model.image_size} px inputs.",
             f"- Episodes: {d.mode} {e['ways']}-way {e['shots']}-shot {e['queries']}-query, from the ID domains' train "
             f"classes (test episodes: their test classes and every OOD class).",
             f"- SMAT: {smat_cfg.train.tasks} tasks on {smat_cfg.launcher.nproc} ranks (DeepSpeed ZeRO "
             f"{smat_cfg.dist.zero_stage}, sharded expert pool), {M} experts, target sparsity "
             f"{smat_cfg.method.sparsity.target:.2f} (eval gate: {smat_cfg.method.sparsity.eval_gate}); sparsity "
             f"reached at the last logged step, per expert, training gate "
             f"{', '.join(f'{v:.3f}' for v in train_sp)} (mean {sum(train_sp) / M:.3f}), eval gate "
             f"{', '.join(f'{v:.3f}' for v in eval_sp)} (mean {sum(eval_sp) / M:.3f}); "
             f"final merge temperature {last.get('temperature', float('nan')):.2f}; "
             f"training query accuracy (last 20 logged steps) {100 * _mean(smat_m, 'acc/query'):.1f}%.",
             ] + _origin_line(out / "smat") + [
             f"- P>M>F: {pmf_cfg.train.tasks} tasks, the same episodes and schedule, dense SGD lr "
             f"{pmf_cfg.method.pmf_lr:g}; training query accuracy (last 20 steps) "
             f"{100 * _mean(pmf_m, 'acc/query'):.1f}%.",
             "- Short-run settings that differ from the paper's recipe (demo value / paper value): " + "; ".join(
                 f"`{k}` {_get(smat_cfg, k)} / {v}" for k, v in PAPER.items()) + ".", "",
             ] + _curve_section(out) + _sweep_section(out, sweep) + ["## Data", ""] + _data_rows(eval_cfg) + ["",
             "## Figures (SMAT expert pool)", ""]
    for name, p in analysis.get("figures", {}).items():
        rel = Path(p).resolve().relative_to(out) if Path(p).resolve().is_relative_to(out) else Path(p)
        lines.append(f"- {name}: [{rel}]({rel})")
    from smat_dist.demo.export import report_lines

    lines += [""] + report_lines(out, exported)
    lines += ["## Wall time per phase", "", "| phase | seconds | status |", "|---|---|---|"]
    for name, t in timings.items():
        lines.append(f"| {name} | {t.get('seconds', float('nan')):.0f} | {t.get('status', '')} |")
    lines += [f"| **total (phases that ran)** | **{sum(t.get('seconds', 0) for t in timings.values()):.0f}** | |",
              "", f"This invocation took {this_run_s:.0f} s (skipped phases were done by an earlier one)."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
