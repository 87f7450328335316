"""results.json (summary), episodes.json (every per-episode accuracy, for audits and paired tests) and
results.md (one Markdown table: domains as rows, method+mode as columns, accuracy % +- 95% CI)."""
from __future__ import annotations

import json
import os
from pathlib import Path

NAMES = {"smat": "SMAT", "pretrained": "Pre", "pmf": "PMF"}
SUFFIX = {"zeroshot": "", "full": "+full", "lora": "+LoRA"}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def column_name(method: str, mode: str) -> str:
    return NAMES.get(method, method) + SUFFIX.get(mode, f"+{mode}")


def markdown_table(results: dict) -> str:
    meta, res = results["meta"], results["results"]
    cols = [(m, mode) for mode in meta["modes"] for m in meta["methods"]]
    lines = ["| Domain | " + " | ".join(column_name(m, mode) for m, mode in cols) + " |",
             "|---|" + "---|" * len(cols)]

    def cell(m, mode, dom):
        s = res[m][mode]["domains"][dom]
        lr = f" (lr {s['lr']:g})" if "lr" in s else ""
        return f"{100 * s['mean']:.2f} ± {100 * s['ci95']:.2f}{lr}"

    for kind, label in (("id", "ID avg"), ("ood", "OOD avg")):
        doms = [d["name"] for d in meta["domains"] if d["kind"] == kind]
        if not doms:
            continue
        for dom in doms:
            lines.append(f"| {dom} | " + " | ".join(cell(m, mode, dom) for m, mode in cols) + " |")
        avgs = [res[m][mode][f"{kind}_avg"] for m, mode in cols]
        lines.append(f"| **{label}** | " + " | ".join(f"**{100 * a:.2f}**" for a in avgs) + " |")
    n = meta["episodes"]
    lines += ["", f"Accuracy (%) over {n} fixed test episodes per domain, ± 1.96·std/√n. Learning rates (fine-tuning "
              f"modes) chosen per domain on {meta['val_episodes']} validation episodes from {meta['lr_grid']}; "
              f"{meta['finetune_steps']} steps."]
    return "\n".join(lines) + "\n"


def paired_table(results: dict, per_episode: dict) -> str:
    """Markdown of the paired per-episode differences between methods (zero-shot and every mode evaluated):
    the same fixed episodes serve every method, so these intervals are the ones to read a comparison by."""
    from smat_dist.eval.stats import paired_comparisons

    lines = []
    for mode in results["meta"]["modes"]:
        comps = paired_comparisons(results, per_episode, mode)
        if not comps:
            continue
        lines += ["", f"### Paired differences, {mode} (accuracy points, mean ± 95% CI over the same episodes; "
                  "p: paired t-test)", "", "| comparison | domain | difference | p |", "|---|---|---|---|"]
        for name, c in comps.items():
            for dom, p in c["domains"].items():
                lines.append(f"| {name} | {dom} | {100 * p['diff']:+.2f} ± {100 * p['ci95']:.2f} | {p['p']:.3g} |")
            for kind in ("id", "ood"):
                if c[kind]["diff"] is not None:
                    lines.append(f"| {name} | {kind.upper()} average | {100 * c[kind]['diff']:+.2f} ± "
                                 f"{100 * c[kind]['ci95']:.2f} | |")
    return "\n".join(lines) + ("\n" if lines else "")


def write_results(out_dir, results: dict, per_episode: dict) -> dict[str, str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "episodes": out / "episodes.json", "markdown": out / "results.md"}
    _atomic_write(paths["json"], json.dumps(results, indent=1, sort_keys=False))
    _atomic_write(paths["episodes"], json.dumps(per_episode))
    _atomic_write(paths["markdown"], markdown_table(results) + paired_table(results, per_episode))
    return {k: str(v) for k, v in paths.items()}
