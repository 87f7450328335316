"""smat-analyze RUN_DIR: the analysis figures of a run folder, or the trade-off plot of a sweep folder.

  smat-analyze runs/2026-01-01_12-00-00            # capacity, mask overlap, expert-selection dendrogram
  smat-analyze runs/sweep_2026-01-01_12-00-00      # ID vs OOD by sparsity and experts (runs with results.json)
  smat-analyze runs/demo/sweep --reference runs/demo/eval   # + paired differences against P>M>F, pre-trained
  smat-analyze runs/demo/smat --curve --against runs/demo/pmf data.eval_sources=[shards/ood] eval.episodes=150
                                                   # accuracy over meta-training (the paper's Figure 1)

A run folder (config.yaml + checkpoints) gives the mask figures; the dendrogram uses --episodes fixed
episodes of each domain in data.sources + data.eval_sources (split --split). A folder of run folders that
hold config.yaml and an evaluation (results.json + episodes.json, in the folder or its eval/) gives the
trade-off plot, the sweep table (sweep.md: reached sparsity, averages, paired differences against the
--reference evaluation) and every run's sparsity trajectories. PNGs and analysis.json go to --out
(default RUN_DIR/analysis); one JSON line with the figure paths is printed.

--curve evaluates every checkpoint task count that RUN_DIR (and --against, the other method's run) both hold
(or --points) on the same fixed episodes, zero-shot, and writes curve.json, curve.md and curve.png to --out
(default RUN_DIR/curve); trailing key=value arguments are smat-eval's (data.eval_sources for the OOD domains,
eval.episodes, eval.ranks); finished points are not evaluated again. Train with checkpoint.keep_every=K to
keep the checkpoints a curve needs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from smat_dist.utils.log import get_logger, setup_logging

log = get_logger(__name__)


def _episodes_by_domain(cfg, split: str, n: int) -> dict:
    from smat_dist.data.fixed_sets import fixed_episodes
    from smat_dist.data.spec import load_spec
    from smat_dist.eval.protocol import episode_config

    ep_cfg = episode_config(cfg)
    out = {}
    for src in list(cfg.data.sources) + list(cfg.data.eval_sources):
        out[load_spec(src).name] = list(fixed_episodes(src, split, n, cfg=ep_cfg))
    return out


def analyze_run(run_dir: Path, out: Path, split: str, episodes: int) -> dict:
    """The mask analyses of a run; on several ranks (torchrun, or --nproc) each holds one slice of the pool
    and the statistics are summed over ranks, so no process holds the whole pool."""
    from smat_dist.analysis.figures import analyze_pool
    from smat_dist.config.hydra import load_yaml
    from smat_dist.distributed.comm import Comm
    from smat_dist.distributed.process_group import control_group
    from smat_dist.eval.loading import load_method

    cfg = load_yaml(run_dir / "config.yaml")
    comm = Comm(device_bound=True)
    setup = load_method(str(run_dir), comm=comm, control=Comm(group=control_group()))
    eps = _episodes_by_domain(cfg, split, episodes) if episodes > 0 else None
    if eps is not None and len(eps) < 2:
        log.warning("only %d domain(s) in data.sources + data.eval_sources: no dendrogram", len(eps))
        eps = None
    return analyze_pool(setup, out, eps, plot=comm.rank == 0)


def _analyze_rank(rank: int, world: int, run_dir: Path, out: Path, split: str, episodes: int) -> dict:
    return analyze_run(run_dir, out, split, episodes)


def _init_from_env() -> None:
    """Under torchrun (WORLD_SIZE > 1) join the process group before loading the sliced pool."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        from smat_dist.config.schema import DistConfig
        from smat_dist.distributed.process_group import init_distributed

        init_distributed(DistConfig())   # the rank's device first, then NCCL (or gloo) and the control group


def analyze_sweep(sweep_dir: Path, out: Path, method: str, mode: str, reference: Path | None = None) -> dict:
    """The sweep's table, trade-off figure and sparsity trajectories; with `reference` (an evaluation of
    P>M>F / the pre-trained model on the same episodes) every run's paired differences against them."""
    from smat_dist.analysis import sweep

    res = sweep.collect(sweep.scan(sweep_dir), reference=reference, method=method, mode=mode)
    files = sweep.write(res, out)
    return {"sweep": res, "figures": {k: files[k] for k in ("tradeoff", "trajectories")}}


def _is_sweep(d: Path) -> bool:
    from smat_dist.analysis.sweep import results_dir

    return any((c / "config.yaml").is_file() and results_dir(c) is not None for c in d.iterdir() if c.is_dir())


def _log_to_wandb(run_dir: Path, figures: dict) -> None:
    """Add the figures to the run's own wandb run (its id is in the checkpoint), offline unless configured."""
    from smat_dist.checkpoint import find_latest, read_manifest
    from smat_dist.config.hydra import load_yaml
    from smat_dist.train import wandb_run

    cfg = load_yaml(run_dir / "config.yaml")
    ck = find_latest(run_dir)
    run_id = read_manifest(ck).get("wandb_run_id") if ck is not None else None
    if cfg.logging.wandb_mode == "disabled" or run_id is None:
        return
    wandb_run.start(cfg, str(run_dir), run_id)
    try:
        wandb_run.log_images({f"analysis/{k}": str(v) for k, v in figures.items() if str(v).endswith(".png")})
        log.info("figures logged to wandb run %s", run_id)
    finally:
        wandb_run.finish()


def _evaluate_point(cfg) -> None:
    from smat_dist.eval.cli import launch, run

    launch(cfg) if cfg.eval.ranks > 1 else run(cfg)


def curve_command(run_dir: Path, against: Path | None, out: Path, points: str | None, overrides: list[str]) -> dict:
    """smat-analyze --curve: the smat-eval config from `overrides` and the runs' own settings, then the curve."""
    from smat_dist.analysis.curve import curve, parse_points, runs_by_kind
    from smat_dist.config.hydra import compose
    from smat_dist.eval.run_settings import adopt_run_settings, override_keys, run_config_of

    runs = [run_dir] + ([against] if against is not None else [])
    kinds = runs_by_kind(runs)
    base = compose("eval", overrides)
    keys = override_keys(overrides)
    if not ({"data", "data.sources"} & keys):    # the ID domains: the run's own training sources
        base.data.sources = list(run_config_of(str(run_dir))[0].data.sources)
    base.eval.checkpoint = str(kinds["smat"]) if "smat" in kinds else None
    base.eval.pmf_checkpoint = str(kinds["pmf"]) if "pmf" in kinds else None
    base = adopt_run_settings(base, overrides)   # the runs' model and, unless given, their episode settings
    return curve(base, runs, out, _evaluate_point, parse_points(points))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="smat-analyze", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("run_dir", type=Path, help="a run folder, or a sweep folder of run folders")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/analysis)")
    ap.add_argument("--episodes", type=int, default=20, help="episodes per domain for expert selection (0: skip)")
    ap.add_argument("--split", default="test", help="split of the expert-selection episodes")
    ap.add_argument("--method", default="smat", help="sweep: which method's results to plot")
    ap.add_argument("--mode", default="zeroshot", help="sweep: which eval mode's results to plot")
    ap.add_argument("--reference", type=Path, default=None,
                    help="sweep: an evaluation folder of P>M>F / pre-trained on the same episodes (paired differences)")
    ap.add_argument("--nproc", type=int, default=1,
                    help="local CPU ranks that each hold 1/N of the pool (for pools larger than one process)")
    cv = ap.add_argument_group("accuracy over meta-training (smat_dist/analysis/curve.py)")
    cv.add_argument("--curve", action="store_true", help="evaluate RUN_DIR's checkpoints (and --against's) point by "
                    "point -> curve.json, curve.md, curve.png")
    cv.add_argument("--against", type=Path, default=None, help="the other method's run folder (SMAT vs P>M>F)")
    cv.add_argument("--points", default=None, metavar="T,T,..",
                    help="task counts to evaluate (default: every checkpoint the runs share)")
    ap.add_argument("overrides", nargs="*", help="--curve: smat-eval key=value overrides (data.eval_sources, "
                    "eval.episodes, eval.ranks, ...)")
    args = ap.parse_intermixed_args(argv)
    setup_logging()
    from smat_dist.checkpoint import CheckpointError
    from smat_dist.config.hydra import ConfigError

    d: Path = args.run_dir
    out = args.out or d / ("curve" if args.curve else "analysis")
    try:
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: no such folder")
        if args.overrides and not args.curve:
            raise ValueError(f"key=value arguments {args.overrides} are for --curve only")
        if args.curve:
            res = curve_command(d, args.against, out, args.points, args.overrides)
            print(json.dumps({"out": str(out), "files": res["files"]}))
            return 0
        res = {}
        if _is_sweep(d):
            res.update(analyze_sweep(d, out, args.method, args.mode, args.reference))
        if (d / "config.yaml").is_file():
            if args.nproc < 1:
                raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
            if args.nproc > 1:
                from smat_dist.bench.spawn import run_ranks

                r = run_ranks(_analyze_rank, args.nproc, d, out, args.split, args.episodes)[0]
            else:
                _init_from_env()
                r = analyze_run(d, out, args.split, args.episodes)
            res = {**r, "figures": {**res.get("figures", {}), **r["figures"]},
                   **({"sweep": res["sweep"]} if "sweep" in res else {})}
        if not res:
            raise FileNotFoundError(f"{d}: neither a run folder (config.yaml + checkpoints) nor a sweep folder "
                                    "(run folders with results.json + config.yaml)")
    except (ValueError, FileNotFoundError, OSError, CheckpointError, ConfigError) as e:
        print(f"smat-analyze: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 2
    from smat_dist.utils.ranks import rank_world

    if rank_world()[0] != 0:     # under torchrun every rank computed its slice; rank 0 writes
        return 0
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(res, indent=1))
    if (d / "config.yaml").is_file():
        _log_to_wandb(d, res["figures"])
    print(json.dumps({"out": str(out), "figures": res["figures"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
