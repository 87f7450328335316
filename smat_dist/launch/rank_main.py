"""One rank from the environment, for sbatch templates and plain torchrun / deepspeed launchers:

    torchrun --nproc-per-node=2 -m smat_dist.launch.rank_main data.sources=[shards/a] run_dir=runs/x

RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* come from the outer launcher (torchrun, deepspeed); under a plain
`srun` (one task per rank) they are derived from SLURM's variables as the submitit path does (MASTER_ADDR the
job's first node, MASTER_PORT from the job id). USR2/TERM/INT only set the stop flag; the trainer checkpoints
at the next step. Errors: one rank-prefixed log line `rank_main: error: ...` on stderr, exit code 2.
"""
from __future__ import annotations

import json
import os
import sys

from smat_dist.config.hydra import ConfigError, compose
from smat_dist.launch.env import DEFAULT_RANK_FN, StopFlag, apply_rank_math, export_slurm_env, run_rank_fn
from smat_dist.train.run_folder import prepare_run_dir
from smat_dist.utils.log import get_logger, setup_logging

log = get_logger(__name__)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:   # plain srun, one task per rank
        export_slurm_env()
    try:
        cfg = compose("train", args)
    except ConfigError as e:
        log.error("rank_main: error: %s", e)
        return 2
    if not cfg.run_dir:
        log.error("rank_main: error: run_dir=... is required (all ranks and requeued attempts must share it)")
        return 2
    # launcher.threads / launcher.portable_math before torch runs anything (threads=0: this node's share)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    log.info("%s", apply_rank_math(cfg.launcher, (os.cpu_count() or 1) // max(1, local_world)))
    if int(os.environ.get("RANK", "0")) == 0:
        prepare_run_dir(cfg, cfg.run_dir, resuming=True)
    flag = StopFlag().install()
    result = run_rank_fn(DEFAULT_RANK_FN, cfg, cfg.run_dir, flag)
    if int(os.environ.get("RANK", "0")) == 0:
        log.info("finished: %s", json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
