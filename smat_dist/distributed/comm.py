"""Collectives over torch.distributed that count the bytes each rank sends.

The counts are the per-rank send volume of the standard algorithms (ring all-gather / all-reduce /
reduce-scatter, pairwise all-to-all), so the sharded and gather-all merges can be compared on the same
footing on any backend: all_gather sends (R-1) x local, all_to_all (R-1)/R x buffer, all_reduce 2(R-1)/R x
buffer, reduce_scatter (R-1)/R x buffer. With one rank nothing is sent.

Every tensor collective checks its tensor before it reaches the backend: on the group's device (NCCL: the
rank's CUDA device; gloo: the CPU), and, for a device-bound Comm (the pool's traffic), in fp32/fp64/integers
(never bf16/fp16: the pool's sums stay exact to fp32) and not host-born (see smat_dist.utils.devcheck). The
checks cost a few attribute reads and turn NCCL's "No backend type associated with device type cpu" into an
error that names the collective, its tensor and the device it needed.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from smat_dist.utils.devcheck import host_born

_LOW_PRECISION = (torch.bfloat16, torch.float16)


class CollectiveError(RuntimeError):
    """A tensor that the group's backend cannot carry (wrong device) or that a pool collective must not see."""


def group_device(group=None) -> torch.device:
    """The device a group's collectives take tensors on: NCCL works on the current CUDA device only."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Comm:
    def __init__(self, group=None, local: bool = False, device_bound: bool = False):
        """local=True: this process alone (world 1), even inside an initialised process group.
        device_bound=True: the traffic is compute-device data (the pool's merge): full precision only, and
        never a host-born tensor."""
        self.group = group
        self.on = not local and dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size(group) if self.on else 1
        self.rank = dist.get_rank(group) if self.on else 0
        self.device = group_device(group) if self.on else None
        self.device_bound = device_bound
        self.sent_bytes = 0
        self.calls = 0

    def check(self, t: torch.Tensor, op: str) -> None:
        if self.device is None:
            return
        if t.device != self.device:
            raise CollectiveError(f"{op}: a {tuple(t.shape)} {t.dtype} tensor on {t.device} given to a collective "
                                  f"over {dist.get_backend(self.group)}, which needs it on {self.device}")
        if self.device_bound and t.dtype in _LOW_PRECISION:
            raise CollectiveError(f"{op}: the pool's collectives run in full precision, got a {tuple(t.shape)} "
                                  f"{t.dtype} tensor (autocast reached the pool's math)")
        if self.device_bound and host_born(t):
            raise CollectiveError(f"{op}: a {tuple(t.shape)} {t.dtype} tensor made without device= (it would be on "
                                  "the host on a GPU machine) given to a device collective")

    def _count(self, nbytes: float) -> None:
        self.sent_bytes += int(nbytes)
        self.calls += 1

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[*s] on each rank -> [R, *s]."""
        self.check(t, "all_gather")
        t = t.contiguous()
        if self.world == 1:
            return t.unsqueeze(0)
        out = torch.empty(self.world * t.numel(), dtype=t.dtype, device=t.device)
        dist.all_gather_into_tensor(out, t.reshape(-1), group=self.group)
        out = out.view(self.world, *t.shape)
        self._count((self.world - 1) * t.numel() * t.element_size())
        return out

    def all_to_all(self, t: torch.Tensor) -> torch.Tensor:
        """[R, *s]: row j goes to rank j; returns [R, *s] whose row j came from rank j."""
        self.check(t, "all_to_all")
        t = t.contiguous()
        if self.world == 1:
            return t
        out = torch.empty_like(t)
        dist.all_to_all_single(out, t, group=self.group)
        self._count(t.numel() * t.element_size() * (self.world - 1) / self.world)
        return out

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (returns a new tensor)."""
        self.check(t, "all_reduce")
        t = t.clone().contiguous()
        if self.world == 1:
            return t
        dist.all_reduce(t, group=self.group)
        self._count(2 * (self.world - 1) / self.world * t.numel() * t.element_size())
        return t

    def reduce_scatter(self, t: torch.Tensor) -> torch.Tensor:
        """[R*n, *s] summed over ranks; returns this rank's [n, *s] block."""
        self.check(t, "reduce_scatter")
        t = t.contiguous()
        if self.world == 1:
            return t
        out = torch.empty((t.shape[0] // self.world, *t.shape[1:]), dtype=t.dtype, device=t.device)
        dist.reduce_scatter_tensor(out, t, group=self.group)
        self._count((self.world - 1) / self.world * t.numel() * t.element_size())
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.group)

    def broadcast_object(self, obj, src: int = 0):
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def all_gather_object(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out
