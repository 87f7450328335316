"""smat-demo --sweep: the sparsity trade-off (the paper's Figure 3) on the demo's data and schedule.

Trains SMAT at every (tau, M) of the grid and, at the demo's own (tau, M), with hand-designed masks (random
at tau; top-(1 - tau) by |delta|), each on 2 local ranks with the demo's episodes and schedule; evaluates each
SMAT model zero-shot on the demo's fixed test episodes; pairs its per-episode accuracies with the demo's
P>M>F and pre-trained results on those same episodes. The demo's own SMAT run is the grid point it matches,
so it is not trained twice. Every point is a run folder <out>/sweep/<tau..._M..>/ (its eval in eval/), so an
interrupted sweep resumes where it stopped, a rerun skips what is done, and a later --sweep with other points
adds them to the same table and figure (e.g. all tau at M=8, then M=4,16 at one tau).

Writes <out>/sweep/: sweep.md (the table), sweep.json, tradeoff.png (ID vs OOD, tau as colour, M as marker),
sparsity_trajectories.png (every expert's sparsity over training, per run).
"""
from __future__ import annotations

from pathlib import Path

from smat_dist.analysis.sweep import Point, collect, grid, scan, write
from smat_dist.demo.phases import evaluate, train_method
from smat_dist.utils.log import get_logger

log = get_logger("smat_dist.demo")

TAUS = (0.5, 0.8, 0.9, 0.95, 0.99)
EXPERTS = (4, 8, 16)
BASELINES = ("random", "magnitude")
# --quick --sweep: two targets at the quick run's 2 experts, one hand-designed baseline
QUICK = {"taus": (0.5, 0.9), "experts": (2,), "baselines": ("random",)}


def _numbers(text: str | None, default, kind: type, flag: str, example: str) -> tuple:
    """A comma-separated list of `kind` from the command line (`default` when the flag is not given)."""
    if text is None:
        return tuple(default)
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{flag} {text}: expected comma-separated {kind.__name__} values, e.g. {example}") from None


def sweep_grid(args, main: Point) -> list[Point]:
    """The points from --sweep-taus / --sweep-experts / --sweep-baselines (defaults: the paper's grid)."""
    d = QUICK if args.quick else {"taus": TAUS, "experts": EXPERTS, "baselines": BASELINES}
    taus = _numbers(args.sweep_taus, d["taus"], float, "--sweep-taus", "0.5,0.9")
    experts = _numbers(args.sweep_experts, d["experts"], int, "--sweep-experts", "4,8,16")
    base = tuple(b for b in (args.sweep_baselines.split(",") if args.sweep_baselines is not None
                             else d["baselines"]) if b.strip())
    return grid(taus, experts, base, baseline_tau=main.tau, baseline_experts=main.experts)


def main_point(cfg) -> Point:
    return Point(float(cfg.method.sparsity.target), int(cfg.method.experts),
                 str(cfg.method.sparsity.pattern))


def check_points(points: list[Point], base: list[str]) -> None:
    """Compose every point's config before the first trains, so a bad point fails in a second, not after an hour."""
    from smat_dist.config.hydra import compose

    for p in points:
        compose("demo", base + p.overrides())  # the schema's checks (config/checks.py) run here


def run_sweep(out: Path, base: list[str], data: list[str], eval_extra: list[str], points: list[Point],
              main: Point) -> tuple[dict, bool]:
    """Train and evaluate every point not done yet; returns ({"files": ..., "points": n}, whether anything ran)."""
    from smat_dist.config.hydra import compose

    ran = False
    for k, p in enumerate(points):
        if p == main:
            log.info("sweep %d/%d: %s is the demo's SMAT run (%s)", k + 1, len(points), p.name, out / "smat")
            continue
        d = out / "sweep" / p.name
        log.info("sweep %d/%d: %s", k + 1, len(points), p.name)
        cfg = compose("demo", base + data + p.overrides())
        trained = train_method(cfg, d)
        ecfg = compose("demo", base + data + p.overrides() + eval_extra
                       + [f"run_dir={d / 'eval'}", f"eval.checkpoint={d}", "eval.methods=[smat]"])
        _, evaluated = evaluate(ecfg, d / "eval", trained)
        ran = ran or trained or evaluated
    # the table holds every evaluated run of the folder: a later --sweep with other points extends it
    entries = [(out / "smat", out / "eval")] + scan(out / "sweep")
    sweep = collect(entries, reference=out / "eval")
    files = write(sweep, out / "sweep")
    log.info("sweep: %d runs; table %s, figure %s", len(entries), files["table"], files["tradeoff"])
    return {"files": files, "points": len(entries), "table": (out / "sweep" / "sweep.md").read_text()}, ran
