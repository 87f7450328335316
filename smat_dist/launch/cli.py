"""smat-train [hydra overrides]: meta-train SMAT (or P>M>F) locally or on SLURM.

    smat-train data.sources=[shards/a] method.experts=16             # local, launcher.nproc ranks
    smat-train launcher=slurm launcher.partition=gpu launcher.nodes=2 ...
    smat-train resume=runs/2026-01-01_12-00-00 [overrides]            # continue a run folder
    smat-train -m launcher=slurm method.sparsity.target=0.8,0.9 method.experts=8,16   # one job per point
    smat-train --cfg job [overrides]                                  # print the composed config and exit

Every override (each point of a -m sweep) is checked against the schema, and every training source against
the episodes it must give, before a run folder, a rank or a wandb run exists. Rank 0's progress (done/total,
rate, ETA) is shown on the console. Prints one JSON object on stdout: the result (local, or slurm without
-m) or the submitted job (slurm -m). Errors: one line `smat-train: error: ...` on stderr; exit code 2 for a
bad config or data, 1 for a run that failed (a rank or the SLURM job).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from omegaconf import DictConfig

from smat_dist.config.hydra import ConfigError, compose, config_dir, hydra_message, to_config
from smat_dist.config.schema import Config, LauncherName
from smat_dist.launch.sense import run_warnings
from smat_dist.launch.env import DEFAULT_RANK_FN, LaunchError, RankFnSpec
from smat_dist.train.resume_check import check_resume
from smat_dist.train.run_folder import check, prepare_run_dir, resumed_config, unused
from smat_dist.utils.log import get_logger, setup_logging

log = get_logger(__name__)
PROG = "smat-train"
# Hydra flags that take a value, and those that stop before any run (help, printing the config, completion)
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                "--config-dir", "-cd", "--experimental-rerun", "--info", "-i"}
_NO_RUN = {"--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc"}


def final_config(composed: Config, overrides: list[str]) -> tuple[Config, bool]:
    """(the config this run trains with, resuming?) from a composed config and its command-line overrides."""
    if composed.resume:
        run_dir = str(Path(composed.resume).resolve())
        cfg = resumed_config(run_dir, composed, overrides)
        check_resume(run_dir, cfg)   # on this host, before the run folder changes or any rank/job starts
        cfg.run_dir = run_dir
        return cfg, True
    return composed, False


def run(dcfg: DictConfig, rank_fn: RankFnSpec = DEFAULT_RANK_FN) -> dict:
    """The Hydra task: one call per run (per sweep point with -m)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    sweep = hc.mode == RunMode.MULTIRUN
    cfg, resuming = final_config(to_config(dcfg), list(hc.overrides.task))
    run_dir = cfg.run_dir if resuming else str(Path(hc.runtime.output_dir).resolve())  # run_dir, sweep folder or new
    cfg.run_dir = run_dir
    check(cfg, data=rank_fn == DEFAULT_RANK_FN)   # another rank function (a test's) may read no data
    fresh = not resuming and unused(run_dir)
    prepare_run_dir(cfg, run_dir, resuming)
    log.info("run folder %s (%s launcher)", run_dir, cfg.launcher.name)
    if cfg.launcher.name == LauncherName.local:
        from smat_dist.launch.local import launch_local

        out = launch_local(cfg, run_dir, rank_fn, progress=True, restarts=cfg.launcher.max_failures)
    else:
        from smat_dist.launch import slurm

        try:
            job = slurm.submit(cfg, run_dir, rank_fn)
        except LaunchError:
            if fresh:   # nothing ran: leave no run folder that holds only this command's config
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        if sweep:   # one job per point: submit them all, do not wait for each in turn
            out = {"status": "submitted", "job_id": job.job_id, "log": str(job.paths.stderr).replace("%t", "0")}
        else:
            out = slurm.wait(job, total=cfg.train.tasks, run_dir=run_dir)
    out = {"run_dir": run_dir, **{k: v for k, v in out.items() if k != "ranks"}}
    print(json.dumps(out, default=str), flush=True)
    return out


def split_argv(argv: list[str]) -> tuple[list[str], bool, bool]:
    """(config overrides, multirun?, runs at all?) from smat-train's command line (Hydra's flags left out)."""
    overrides, multirun, runs = [], False, True
    i = 0
    while i < len(argv):
        a = argv[i]
        flag = a.split("=", 1)[0]
        if a in ("-m", "--multirun"):
            multirun = True
        elif flag in _NO_RUN:
            runs = False
            i += 1 if (a in _VALUE_FLAGS and "=" not in a) else 0
        elif a in _VALUE_FLAGS:
            i += 1
        elif a.startswith("-"):
            pass
        else:
            overrides.append(a)
        i += 1
    return overrides, multirun, runs


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """Every point of a -m sweep (`a=1,2 b=x,y` -> 4 override lists), as Hydra's basic sweeper expands it."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [list(p) for batch in BasicSweeper.split_arguments(parsed, None) for p in batch]


def preflight(argv: list[str], data: bool = True) -> None:
    """Compose and check what Hydra is about to run, before it creates any folder (ConfigError if it is bad)."""
    overrides, multirun, runs = split_argv(argv)
    if not runs:
        return
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        points = sweep_points(overrides) if multirun else [overrides]
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(hydra_message(e)) from None
    for point in points:
        task = [o for o in point if not o.lstrip("+~").startswith("hydra.") and not o.startswith("hydra/")]
        cfg, _ = final_config(compose("train", task), task)
        try:
            check(cfg, data=data)
        except ConfigError as e:
            raise ConfigError(f"{e} (sweep point {' '.join(point)})" if multirun else str(e)) from None
        for warning in run_warnings(cfg, data=data):   # after the checks: a refusal stays one line
            log.warning("%s%s", warning, f" (sweep point {' '.join(point)})" if multirun else "")


def fail(message: str, code: int = 2) -> None:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(code)


def main(rank_fn: RankFnSpec = DEFAULT_RANK_FN, argv: list[str] | None = None) -> None:
    """Console entry point (`rank_fn` lets tests run the CLI with another rank function)."""
    import hydra

    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        preflight(argv, data=rank_fn == DEFAULT_RANK_FN)
    except ConfigError as e:
        fail(str(e))

    def task(dcfg: DictConfig) -> None:
        try:
            run(dcfg, rank_fn)
        except ConfigError as e:
            fail(str(e))
        except LaunchError as e:
            fail(str(e), 1)

    sys.argv = [PROG, *argv]
    hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")(task)()


if __name__ == "__main__":
    main()
