"""Process-group timeouts: a long one for start-up and the first step, a short one after it.

Without an explicit timeout DeepSpeed waits 10 minutes (gloo 30) in a collective whose peer died or hung, and
NCCL's watchdog then aborts the survivors with no Python traceback. Start-up (rendezvous, checkpoint load, a
universal-checkpoint conversion on rank 0) and the first step (compile, allocator warm-up) legitimately take
long, so the group starts with `dist.timeout_s`; once every rank has finished the first step,
`shorten_after_first_step` sets `dist.step_timeout_s` behind a barrier (as torchtitan does with
`train_timeout_seconds`), so a hung rank fails every other rank's next collective within that time.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist

from smat_dist.config.schema import DistConfig
from smat_dist.utils.log import get_logger

log = get_logger(__name__)


def pg_timeouts(cfg: DistConfig) -> timedelta:
    """The start-up timeout for init_process_group, and NCCL's error handling set before the group exists:
    on an NCCL error or timeout the watchdog tears the process down (1), so a rank cannot go on computing on
    a communicator that failed; an explicit setting in the environment is kept."""
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    return timedelta(seconds=float(cfg.timeout_s))


def shorten_after_first_step(cfg: DistConfig, *groups) -> None:
    """Every rank, once, after the first step: agree (barrier, under the long timeout) and switch the default
    group and `groups` (e.g. a separate control group) to `dist.step_timeout_s`. The barrier makes the switch
    happen at the same point on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    dist.barrier()
    short = timedelta(seconds=float(cfg.step_timeout_s))
    for g in (None, *groups):
        dist.set_timeout(short, g)
    log.info("process-group timeout after the first step: %.0f s (dist.step_timeout_s; start-up had %.0f s)",
             cfg.step_timeout_s, cfg.timeout_s)
