"""smat-demo's phases, each a function of its settings that skips itself when its output is already there
(data, smat, pmf, eval, figures, curve) and the per-phase timings; the command line (cli.py) runs them in order
and the sweep (sweep.py) reuses the training and evaluation phases for each of its points.
"""
from __future__ import annotations

import json
from pathlib import Path

from smat_dist.utils.log import get_logger

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
    from smat_dist.launch.relay import LineRelay
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
    with LineRelay(d / "logs" / "rank0.log", "eval", ("episodes on this rank", "loaded", "ERROR"), logger=log):
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
