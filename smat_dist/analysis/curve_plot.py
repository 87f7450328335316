"""The curve's outputs: curve.json, curve.md (one row per point) and curve.png (the paper's Figure 1 with the
paired differences and the masks' state beneath it)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {"smat": "SMAT", "pmf": "P>M>F"}
COLORS = {"smat": "tab:red", "pmf": "tab:blue"}


def _pct(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def _num(v, fmt: str = ".3f") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _diff(d: dict | None) -> str:
    if not d or d.get("diff") is None:
        return "–"
    sig = " *" if abs(d["diff"]) > d["ci95"] else ""
    return f"{100 * d['diff']:+.2f} ± {100 * d['ci95']:.2f}{sig}"


def markdown(data: dict) -> str:
    head = ["tasks", "SMAT ID", "P>M>F ID", "SMAT OOD", "P>M>F OOD", "SMAT − P>M>F ID", "SMAT − P>M>F OOD",
            "sparsity (train gate)", "kept from init", "penalty share", "clip scale", "logits at clamp (−/+)",
            "temperature"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in data["points"]:
        m = p.get("masks", {})
        d = p.get("smat_minus_pmf", {})
        sp = (f"{_num(m.get('sparsity'))} ({_num(m.get('sparsity_min'))}–{_num(m.get('sparsity_max'))})"
              if m else "–")
        clamp = f"{_num(m.get('mask/at_clamp_low'))} / {_num(m.get('mask/at_clamp_high'))}" if m else "–"
        lines.append("| " + " | ".join([
            str(p["tasks"]), _pct(p.get("smat", {}).get("id")), _pct(p.get("pmf", {}).get("id")),
            _pct(p.get("smat", {}).get("ood")), _pct(p.get("pmf", {}).get("ood")), _diff(d.get("id")),
            _diff(d.get("ood")), sp, _num(m.get("kept_from_init")), _num(m.get("mask/penalty_share")),
            _num(m.get("mask/clip_scale")), clamp, _num(m.get("temperature"))]) + " |")
    pre = data.get("pretrained")
    n = data["points"][0]["episodes"] if data["points"] else 0
    lines += ["", f"Zero-shot accuracy (%), ID / OOD averages over domains, {n} fixed test episodes per domain, the "
              "same at every point" + (f"; pre-trained (no meta-tuning): ID {_pct(pre['id'])}, OOD {_pct(pre['ood'])}"
                                       if pre else "") + ".",
              "SMAT − P>M>F: paired per-episode difference, mean ± 95% CI (averaged over domains); * the interval "
              "excludes 0.",
              "Masks at each point (the SMAT run): sparsity reached (mean over experts, range), kept from init (share "
              "of kept entries the initial draw already ranked on top; chance = the share kept, 1 − sparsity), "
              "and, averaged over the steps since the previous point, the penalty's share of the mask-logit "
              "gradient norm before the clip (‖pen‖ / (‖pen‖ + ‖task‖)), the clip's factor, the fractions of "
              "logits at −/+ clamp and the merge temperature."]
    return "\n".join(lines) + "\n"


def plot(data: dict, path) -> str:
    from smat_dist.analysis.figures import _save

    pts = data["points"]
    x = [p["tasks"] for p in pts]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, kind, title in ((axes[0][0], "id", "ID average"), (axes[0][1], "ood", "OOD average")):
        for m in ("smat", "pmf"):
            ys = [100 * p[m][kind] if m in p and p[m][kind] is not None else math.nan for p in pts]
            if any(not math.isnan(y) for y in ys):
                ax.plot(x, ys, "o-", color=COLORS[m], label=LABELS[m])
        pre = data.get("pretrained")
        if pre and pre[kind] is not None:
            ax.axhline(100 * pre[kind], color="k", ls="--", lw=1, label="pre-trained")
        ax.set_title(f"{title}: zero-shot accuracy (%)", fontsize=10)
        ax.set_xlabel("meta-training tasks")
        ax.legend(fontsize=8)
    ax = axes[0][2]
    for kind, off, c in (("id", -0.01, "tab:green"), ("ood", 0.01, "tab:purple")):
        ds = [p.get("smat_minus_pmf", {}).get(kind) for p in pts]
        xs = [t * (1 + off) for t, d in zip(x, ds) if d and d.get("diff") is not None]
        dd = [d for d in ds if d and d.get("diff") is not None]
        if dd:
            ax.errorbar(xs, [100 * d["diff"] for d in dd], yerr=[100 * d["ci95"] for d in dd], fmt="o-", color=c,
                        capsize=3, label=kind.upper())
    ax.axhline(0, color="k", lw=0.8)
    ax.set_title("SMAT − P>M>F, paired, 95% CI (points)", fontsize=10)
    ax.set_xlabel("meta-training tasks")
    ax.legend(fontsize=8)
    ax = axes[1][0]
    ms = [p.get("masks") for p in pts]
    if any(ms):
        ax.plot(x, [m["sparsity"] for m in ms], "o-", color="tab:red", label="sparsity reached (mean)")
        ax.fill_between(x, [m["sparsity_min"] for m in ms], [m["sparsity_max"] for m in ms], color="tab:red",
                        alpha=0.15)
        ax.axhline(ms[0]["target"], color="tab:red", ls="--", lw=1, label="τ")
        kfi = [m["kept_from_init"] if m["kept_from_init"] is not None else math.nan for m in ms]
        ax.plot(x, kfi, "s-", color="tab:orange", label="kept from init")
        chance = [m["kept"] if m["kept"] is not None else math.nan for m in ms]
        ax.plot(x, chance, ":", color="tab:orange", lw=1, label="chance (share kept)")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8)
    ax.set_title("SMAT masks at each point", fontsize=10)
    ax.set_xlabel("meta-training tasks")
    st = data.get("steps", {})
    ax = axes[1][1]
    for key, c in (("mask/penalty_share", "tab:brown"), ("mask/clip_scale", "tab:gray"),
                   ("mask/at_clamp_low", "tab:blue"), ("mask/at_clamp_high", "tab:cyan")):
        ys = [math.nan if v is None else v for v in st.get(key, [])]
        if any(not math.isnan(v) for v in ys):
            ax.plot(st["tasks"], ys, color=c, lw=1, label=key.split("/", 1)[1])
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("what limits mask learning (per step)", fontsize=10)
    ax.set_xlabel("meta-training tasks")
    if ax.lines:
        ax.legend(fontsize=8)
    ax = axes[1][2]
    ys = [math.nan if v is None else v for v in st.get("temperature", [])]
    if ys:
        ax.plot(st["tasks"], ys, color="k", lw=1)
        ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_title("merge temperature (per step)", fontsize=10)
    ax.set_xlabel("meta-training tasks")
    fig.suptitle("Accuracy over meta-training (the paper's Figure 1), same fixed episodes at every point", fontsize=11)
    return _save(fig, path)


def write(data: dict, out) -> dict[str, str]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "curve.json").write_text(json.dumps(data, indent=1))
    (out / "curve.md").write_text(markdown(data))
    return {"json": str(out / "curve.json"), "markdown": str(out / "curve.md"), "figure": plot(data, out / "curve.png")}
