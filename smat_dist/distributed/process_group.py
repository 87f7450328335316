"""The process group: torch.distributed initialised through DeepSpeed, this rank's device, and a gloo group for
host-side control traffic (stop flags, metrics, checkpoint agreement, objects).

Everything that talks across ranks starts here; the timeouts are in timeouts.py and the counted collectives
in comm.py.
"""
from __future__ import annotations

import gc
import os
import sys

import torch
import torch.distributed as dist

from smat_dist.config.schema import DistConfig
from smat_dist.distributed.timeouts import pg_timeouts
from smat_dist.utils.device import rank_device

_control_group = None
_device: torch.device | None = None
_check_mode = None


def _skip_shm_build() -> None:
    """DeepSpeed JIT-builds a shared-memory comm op (~70 s) on its first CPU init; gloo alone gives the
    same results on the CPU, so we do not pay for it."""
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def _import_group_defaults() -> None:
    """Import, before any group exists, the modules whose functions take `group=GroupMember.WORLD` as a default
    evaluated at import (DeepSpeed's comm backend, torch.distributed.nn): imported later, those defaults hold
    the default group for the life of the process, so `shutdown_distributed` could not free it and its gloo
    threads would live on into interpreter exit."""
    import deepspeed.comm.torch  # noqa: F401
    import torch.distributed.nn  # noqa: F401


def init_distributed(cfg: DistConfig) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed from the launcher's env vars; returns (rank, world)."""
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RuntimeError(f"environment variable {key} is not set: start ranks through smat-train "
                               "(launcher=local|slurm), torchrun, the deepspeed launcher or submitit")
    import deepspeed

    _import_group_defaults()
    global _control_group, _device, _check_mode
    if cfg.check_devices and _check_mode is None:
        from smat_dist.utils.devcheck import HostBornMode

        _check_mode = HostBornMode()
        _check_mode.__enter__()     # for the life of this rank's process (its main thread)
    backend = str(getattr(cfg.backend, "value", cfg.backend) or ("nccl" if torch.cuda.is_available() else "gloo"))
    # The device first: NCCL binds its communicator to the current device when the group is made.
    _device = rank_device(int(os.environ.get("LOCAL_RANK", "0"))) if backend == "nccl" else torch.device("cpu")
    if _device.type == "cuda":
        torch.cuda.set_device(_device)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _skip_shm_build()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=pg_timeouts(cfg))
    # Host-side control traffic (stop flags, metrics, checkpoint agreement, objects) is CPU data: under NCCL it
    # gets its own gloo group instead of a round trip through the GPU (and NCCL's refusal of CPU tensors).
    _control_group = None
    if "nccl" in str(dist.get_backend()).lower():
        _control_group = dist.new_group(backend="gloo", timeout=pg_timeouts(cfg))
    return dist.get_rank(), dist.get_world_size()


def init_gloo(rank: int, world: int) -> None:
    """A CPU gloo group for local harnesses (smat_dist.bench.spawn) from MASTER_ADDR/MASTER_PORT.

    The modules that hold the default group in their defaults are imported first (`_import_group_defaults`)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _import_group_defaults()
    _skip_shm_build()
    dist.init_process_group("gloo", rank=rank, world_size=world)


def shutdown_distributed() -> None:
    """Destroy every process group of this rank and free them while the interpreter is fully alive.

    torch's destroy_process_group only forgets the groups; a gloo group's worker and transport threads stop
    when its last reference goes. DeepSpeed keeps its own references (a clone of the world group, the engine's
    groups; the engine of a refused resume sits in a reference cycle, and DeepSpeed turns automatic GC off
    while an engine lives), so without this the threads outlive the run into interpreter finalization, where a
    worker releasing its last work races the teardown: `terminate called without an active exception`
    (SIGABRT) on a rank that had finished cleanly. Every exit path of a rank calls this; a rank's collectives
    are synchronous, so none of its work is pending here and the joins return at once (nothing is sent)."""
    global _control_group
    if not (dist.is_available() and dist.is_initialized()):
        return
    _control_group = None
    ds_comm = sys.modules.get("deepspeed.comm.comm")
    if ds_comm is not None and ds_comm.cdb is not None and ds_comm.cdb.is_initialized():
        ds_comm.destroy_process_group()     # also drops DeepSpeed's cached groups
    else:
        dist.destroy_process_group()
    gc.collect()    # the engine cycle above: its groups go with it, and with them the threads (joined here)


def control_group():
    """The process group for host-side control traffic (None: the default group, already on the CPU)."""
    return _control_group


def device() -> torch.device:
    """This rank's compute device (init_distributed chose it; the current CUDA device or the CPU otherwise)."""
    if _device is not None:
        return _device
    from smat_dist.utils.device import pick_device

    return pick_device()
