"""The process group: torch.distributed initialised through DeepSpeed, this rank's device, and a gloo group for
host-side control traffic (stop flags, metrics, checkpoint agreement, objects).

Everything that talks across ranks starts here; the timeouts are in timeouts.py and the counted collectives
in comm.py.
"""
from __future__ import annotations

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


def init_distributed(cfg: DistConfig) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed from the launcher's env vars; returns (rank, world)."""
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RuntimeError(f"environment variable {key} is not set: start ranks through smat-train "
                               "(launcher=local|slurm), torchrun, the deepspeed launcher or submitit")
    import deepspeed

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


def control_group():
    """The process group for host-side control traffic (None: the default group, already on the CPU)."""
    return _control_group


def device() -> torch.device:
    """This rank's compute device (init_distributed chose it; the current CUDA device or the CPU otherwise)."""
    if _device is not None:
        return _device
    from smat_dist.utils.device import pick_device

    return pick_device()
