"""The device a rank computes on and the autocast context its precision setting asks for.

One rule for every launcher: a rank computes on the CUDA device its local rank names among the devices this
process can see. SLURM's per-task GPU binding (`--gpus-per-task=1`) or CUDA_VISIBLE_DEVICES narrowed by a site
wrapper shows each task exactly one device while LOCAL_RANK still counts the node's tasks: then the one visible
device is `cuda:0`. Any other mismatch (more local ranks than visible devices) is refused with the numbers,
before a process group or a CUDA context exists.
"""
from __future__ import annotations

import contextlib
import functools

import torch


class DeviceError(RuntimeError):
    """A rank cannot be mapped to a device (more local ranks than visible GPUs)."""


def rank_device(local_rank: int, visible: int | None = None) -> torch.device:
    """The compute device of the rank with this local rank, given `visible` CUDA devices (default: counted)."""
    visible = torch.cuda.device_count() if visible is None else visible
    if visible <= 0:
        return torch.device("cpu")
    if visible == 1:
        return torch.device("cuda", 0)
    if not 0 <= local_rank < visible:
        raise DeviceError(f"local rank {local_rank} has no GPU: this process sees {visible} CUDA devices "
                          f"(cuda:0..cuda:{visible - 1}); start at most {visible} ranks per node, or bind one "
                          "GPU per task (srun --gpus-per-task=1)")
    return torch.device("cuda", local_rank)


def check_local_ranks(nproc: int, visible: int | None = None) -> None:
    """Refuse `nproc` ranks on one node when there are GPUs but fewer than `nproc` (ranks would share or fail)."""
    visible = torch.cuda.device_count() if visible is None else visible
    if visible > 0 and nproc > visible:
        raise DeviceError(f"launcher.nproc={nproc} local ranks but this machine has {visible} visible CUDA "
                          f"device(s): use launcher.nproc={visible} (one rank per GPU), or dist.backend=gloo "
                          "with CUDA_VISIBLE_DEVICES= to train on the CPU")


def pick_device(name: str | None = None) -> torch.device:
    """`auto`/None: this process's current CUDA device if there is one, else the CPU."""
    if name and name != "auto":
        return torch.device(name)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def autocast_for(dev: torch.device, precision: str):
    """bf16 autocast on GPU by default (`auto`), fp32 on CPU; `bf16`/`fp32` force it."""
    precision = getattr(precision, "value", precision)
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(dev.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"precision {precision!r}: expected auto, fp32 or bf16")
    return contextlib.nullcontext()


def fp32_region():
    """Autocast off for the enclosed math (the pool's merge, gates, sparsity terms and collectives): their
    inputs are fp32 and must stay fp32 whatever autocast the step runs under."""
    dev_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    stack = contextlib.ExitStack()
    for t in dev_types:
        stack.enter_context(torch.autocast(t, enabled=False))
    return stack


def fp32_math(fn):
    """Decorator: `fn` runs in an fp32_region (the pool's entry points and its autograd functions' backward)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with fp32_region():
            return fn(*args, **kwargs)
    return wrapped
