"""`smat-train [hydra overrides]`: parse the config, write the run folder's config.yaml, call the launcher.

    smat-train data.sources=[shards/a] method.experts=16             # local, launcher.nproc ranks
    smat-train launcher=slurm launcher.partition=gpu launcher.nodes=2 ...
    smat-train resume=runs/2026-01-01_12-00-00 [overrides]            # continue a run folder
    smat-train -m launcher=slurm method.sparsity.target=0.8,0.9 method.experts=8,16   # one job per point

Prints one JSON object on stdout: the result (local, or slurm without -m) or the submitted job (slurm -m).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from smat_dist.config.hydra import ConfigError, config_dir, load_yaml, to_config, to_yaml
from smat_dist.config.schema import Config
from smat_dist.launch.env import DEFAULT_RANK_FN, LaunchError, RankFnSpec
from smat_dist.utils.log import get_logger, setup_logging

log = get_logger(__name__)
CONFIG_FILE = "config.yaml"
LAUNCHERS = ("local", "slurm")


def resumed_config(run_dir: str, composed: Config, overrides: list[str]) -> Config:
    """The saved config of `run_dir`, with the launcher group and the explicit `key=value` overrides of
    this command line applied on top (so a run can go on elsewhere, e.g. locally after SLURM, or longer)."""
    saved_path = Path(run_dir) / CONFIG_FILE
    if not saved_path.is_file():
        raise ConfigError(f"resume={run_dir}: no {CONFIG_FILE} there (not a smat-train run folder)")
    base = OmegaConf.structured(load_yaml(saved_path))
    new = OmegaConf.structured(composed)
    for ov in overrides:
        key = ov.split("=", 1)[0].lstrip("+~")
        if key in ("resume", "run_dir") or key.startswith("hydra"):
            continue
        # a group choice (launcher=slurm) replaces the whole section; a dotted key one value
        OmegaConf.update(base, key, OmegaConf.select(new, key), merge=False)
    cfg = to_config(base)
    cfg.resume = None
    return cfg


def prepare_run_dir(cfg: Config, run_dir: str, resuming: bool) -> None:
    """Create the run folder and save the resolved config. A fresh run may not reuse a folder that holds a
    different run (it would silently resume someone else's checkpoint); resuming keeps the previous
    config as config.<time>.yaml when it changed."""
    d = Path(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / CONFIG_FILE
    text = to_yaml(cfg)
    if path.is_file() and path.read_text() != text:
        if not resuming:
            raise ConfigError(f"run_dir={run_dir} already holds a run with a different {CONFIG_FILE}: "
                              f"continue it with resume={run_dir}, or choose another run_dir")
        path.rename(d / f"config.{time.strftime('%Y%m%d-%H%M%S')}.yaml")
    path.write_text(text)


def check(cfg: Config) -> None:
    if cfg.launcher.name not in LAUNCHERS:
        raise ConfigError(f"launcher.name={cfg.launcher.name!r}: expected one of {', '.join(LAUNCHERS)}")
    if not cfg.data.sources:
        raise ConfigError("data.sources is empty: name the converted dataset folders, "
                          "e.g. smat-train data.sources=[shards/ilsvrc_2012,shards/omniglot]")


def run(dcfg: DictConfig, rank_fn: RankFnSpec = DEFAULT_RANK_FN) -> dict:
    """The Hydra task: one call per run (per sweep point with -m)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    sweep = hc.mode == RunMode.MULTIRUN
    overrides = list(hc.overrides.task)
    cfg = to_config(dcfg)
    resuming = bool(cfg.resume)
    if resuming:
        run_dir = str(Path(cfg.resume).resolve())
        cfg = resumed_config(run_dir, cfg, overrides)
    else:
        run_dir = str(Path(hc.runtime.output_dir).resolve())  # = run_dir, its sweep sub-folder, or a new one
    cfg.run_dir = run_dir
    check(cfg)
    prepare_run_dir(cfg, run_dir, resuming)
    log.info("run folder %s (%s launcher)", run_dir, cfg.launcher.name)
    if cfg.launcher.name == "local":
        from smat_dist.launch.local import launch_local

        out = launch_local(cfg, run_dir, rank_fn)
    else:
        from smat_dist.launch import slurm

        job = slurm.submit(cfg, run_dir, rank_fn)
        if sweep:   # one job per point: submit them all, do not wait for each in turn
            out = {"status": "submitted", "job_id": job.job_id, "log": str(job.paths.stderr).replace("%t", "0")}
        else:
            out = slurm.wait(job)
    out = {"run_dir": run_dir, **{k: v for k, v in out.items() if k != "ranks"}}
    print(json.dumps(out, default=str), flush=True)
    return out


def main(rank_fn: RankFnSpec = DEFAULT_RANK_FN) -> None:
    """Console entry point (`rank_fn` lets tests run the CLI with another rank function)."""
    import hydra

    import smat_dist.config.hydra  # noqa: F401 - registers the schema and resolvers

    setup_logging()

    def task(dcfg: DictConfig) -> None:
        try:
            run(dcfg, rank_fn)
        except (ConfigError, LaunchError) as e:
            log.error("%s", e)
            sys.exit(2 if isinstance(e, ConfigError) else 1)

    hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")(task)()


if __name__ == "__main__":
    main()
