"""smat-eval [hydra overrides]: meta-test a checkpoint and the baselines on every ID and OOD domain.

  smat-eval eval.checkpoint=runs/2026-01-01_12-00-00 data.sources=[shards/a] data.eval_sources=[shards/b]
            eval.modes=[zeroshot,full,lora] run_dir=runs/eval_a
  smat-eval eval.model=runs/smat.export ...   (an smat-export folder instead of a checkpoint: one process)

Writes results.json, results.md and episodes.json into run_dir (default runs/eval_<date>_<time>) and prints
one JSON line with the paths and the ID/OOD averages. eval.ranks=N (launcher=local or slurm) or torchrun
(WORLD_SIZE > 1) runs N ranks: each loads only its 1/N of the SMAT pool and merges through the sharded merger,
and the episodes are split over the ranks; the results are the same at any world size. One rank (the
default) evaluates in this process.
"""
from __future__ import annotations

import json
import os
import sys
import time

from smat_dist.utils.log import get_logger, setup_logging

log = get_logger(__name__)


def load_setups(cfg, comm=None, control=None) -> dict:
    """{method name: MethodSetup} for cfg.eval.methods. SMAT and P>M>F come from checkpoints (through
    smat_dist.eval.loading.load_method; on several ranks each holds its slice of the pool); the pre-trained
    baseline is the frozen backbone of the same config."""
    from smat_dist.build import build_local
    from smat_dist.config.schema import MethodConfig
    from smat_dist.distributed.process_group import device as rank_device

    paths = {}
    if cfg.eval.checkpoint:
        paths["main"] = cfg.eval.checkpoint
    pmf_path = getattr(cfg.eval, "pmf_checkpoint", None)
    if pmf_path:
        paths["pmf"] = pmf_path
    if getattr(cfg.eval, "model", None):
        paths["export"] = cfg.eval.model
    setups: dict = {}
    for key, path in paths.items():
        from smat_dist.eval.loading import load_method  # the checkpoint format's one door (smat_dist.checkpoint)

        if key == "export":   # an smat-export folder: the whole packed pool in this process, on any rank
            from smat_dist.export.loader import load_export

            setup = load_export(path, device=rank_device())
        else:
            setup = load_method(path, comm=comm, control=control)
        kind = setup.kind
        if key == "pmf" and kind != "pmf":
            raise ValueError(f"eval.pmf_checkpoint={path} holds a {kind} model, not P>M>F")
        if kind in setups:
            raise ValueError(f"two checkpoints hold a {kind} model ({paths})")
        setups[kind] = setup
    fb = next(iter(setups.values())).fb if setups else None
    out = {}
    for name in cfg.eval.methods:
        if name == "pretrained":
            mcfg = MethodConfig(name="pretrained", logit_scale=cfg.method.logit_scale)
            out[name] = build_local(cfg.model, mcfg, seed=cfg.train.seed, fb=fb, device=rank_device())
        elif name in setups:
            out[name] = setups[name]
        else:
            hint = "eval.checkpoint=RUN_DIR" if name == "smat" else "eval.pmf_checkpoint=RUN_DIR (a P>M>F run)"
            raise ValueError(f"eval.methods includes {name!r} but no checkpoint holds it: set {hint}, or drop "
                             f"{name!r} from eval.methods")
    return out


def eval_rank(cfg, run_dir: str, should_stop) -> dict:
    """Rank function for the launchers (eval.ranks > 1): this rank's slice of the pool, its share of episodes."""
    return run(cfg)


def launch(cfg) -> dict:
    """smat-eval on eval.ranks ranks through the configured launcher; returns rank 0's summary."""
    name = str(getattr(cfg.launcher.name, "value", cfg.launcher.name))
    out_dir = cfg.run_dir = cfg.run_dir or os.path.join("runs", time.strftime("eval_%Y-%m-%d_%H-%M-%S"))
    if name == "slurm":
        from smat_dist.launch import slurm

        cfg.launcher.nodes = 1
        cfg.launcher.tasks_per_node = cfg.eval.ranks
        return slurm.wait(slurm.submit(cfg, out_dir, rank_fn="smat_dist.eval.cli:eval_rank"))
    from smat_dist.launch.local import launch_local

    return launch_local(cfg, out_dir, rank_fn="smat_dist.eval.cli:eval_rank", nproc=cfg.eval.ranks)


def run(cfg) -> dict:
    """Evaluate under an already composed Config; returns the summary printed by the CLI."""
    import torch.distributed as dist

    from smat_dist.eval.protocol import domains_from_config, episode_config, evaluate
    from smat_dist.eval.report import write_results

    rank, world = 0, 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        from smat_dist.distributed.process_group import init_distributed

        rank, world = init_distributed(cfg.dist)
    elif dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    from smat_dist.distributed.comm import Comm
    from smat_dist.distributed.process_group import control_group

    domains = domains_from_config(cfg)
    setups = load_setups(cfg, Comm(device_bound=True), Comm(group=control_group()))
    out_dir = cfg.run_dir or os.path.join("runs", time.strftime("eval_%Y-%m-%d_%H-%M-%S"))
    log.info("evaluating %s in modes %s on %d domains (%d test episodes each, world size %d) -> %s",
             list(setups), cfg.eval.modes, len(domains), cfg.eval.episodes, world, out_dir)
    results, per_episode = evaluate(setups, domains, cfg.eval, episode_config(cfg), workers=cfg.data.workers)
    summary = {"run_dir": out_dir, "averages": {
        f"{m}/{mode}": {"id_avg": r["id_avg"], "ood_avg": r["ood_avg"]}
        for m, modes in results["results"].items() for mode, r in modes.items()}}
    if rank == 0:
        summary["files"] = write_results(out_dir, results, per_episode)
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        print("\nKeys: every field of smat_dist/config/schema.py (eval.*, data.*, model.*, ...); "
              "configs/eval.yaml holds the defaults.")
        return 0
    setup_logging()
    from smat_dist.config.hydra import ConfigError, compose, to_yaml

    def fail(e: BaseException) -> int:  # one convention for every command: one line on stderr, exit code 2
        print(f"smat-eval: error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr, flush=True)
        return 2

    show = None   # --cfg job (as smat-train, a Hydra app): print the composed config and exit
    for flag in ("--cfg", "-c"):
        if flag in argv:
            i = argv.index(flag)
            show = argv[i + 1] if i + 1 < len(argv) else ""
            del argv[i:i + 2]
    if show is not None and show not in ("job", "all"):
        return fail(f"--cfg {show}: expected job or all (smat-eval has no Hydra config of its own)")
    from smat_dist.checkpoint import CheckpointError
    from smat_dist.eval.run_settings import adopt_run_settings

    try:
        # the run's model and episode settings, on this host before any rank starts
        cfg = adopt_run_settings(compose("eval", argv), argv)
    except (ConfigError, CheckpointError) as e:
        return fail(e)
    if show is not None:
        print(to_yaml(cfg), end="")
        return 0
    from smat_dist.launch.env import LaunchError

    if cfg.eval.ranks < 1:
        return fail(f"eval.ranks={cfg.eval.ranks}: need at least 1 rank")
    try:
        summary = launch(cfg) if cfg.eval.ranks > 1 and "WORLD_SIZE" not in os.environ else run(cfg)
    except (ConfigError, CheckpointError, LaunchError, ValueError, FileNotFoundError, OSError) as e:
        return fail(e)
    summary = {k: v for k, v in summary.items() if k != "ranks"}
    if "files" in summary:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
