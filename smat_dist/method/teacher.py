"""The dense teacher formed block by block (`method.teacher.blockwise=true`).

The teacher is one SGD step on the task's query loss: theta_t = theta' - lr * g_t, with g_t the gradient of
CE(Q) at theta'. The default path (SMAT.task) writes theta_t over g_t's own buffer, so the teacher costs one
P-vector on the compute device. Here theta_t is never held whole on the device:

  * `park(g_t)` moves the teacher gradient to host memory when the backbone runs on an accelerator (pinned
    and copied asynchronously on CUDA); on CPU it stays where it is, as the host is the compute device;
  * `teacher_features` runs the backbone with the non-block tensors (embeddings, stem, final norm...) formed
    up front and each block formed just before it runs, from theta' (on the device) and the parked
    gradient's slice (copied to the device), then released when it returns. A block is an element of
    `model.blocks` (ViT), or of a stage in it (timm's EfficientNet keeps nn.Sequential stages there).

On an accelerator the device then holds at most one block of teacher weights plus the non-block tensors,
and the gradient's P numbers live on the host. Pure torch: no DeepSpeed or torch.distributed here.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from smat_dist.model.backbone import FunctionalBackbone, block_units
from smat_dist.model.flat import ParamInfo

CONFIG_KEY = "method.teacher.blockwise"


@dataclass(frozen=True)
class BlockLayout:
    """Where each unit's parameters lie in the flat vector (units: `block_units`, an element of `blocks` or
    of a CNN stage in it): key -> (lo, hi, [(local name, info)]); lo = hi = -1 where not contiguous."""
    blocks: dict[str, tuple[int, int, list[tuple[str, ParamInfo]]]]
    rest: list[ParamInfo]

    @property
    def largest_block(self) -> int:
        return max((sum(i.numel for _, i in items) for _, _, items in self.blocks.values()), default=0)


_LAYOUTS: "weakref.WeakKeyDictionary[object, BlockLayout]" = weakref.WeakKeyDictionary()


def block_layout(fb: FunctionalBackbone) -> BlockLayout:
    """The flat space split by unit of `model.blocks` (a clear error if the model has none)."""
    cached = _LAYOUTS.get(fb.space)
    if cached is not None:
        return cached
    if not isinstance(getattr(fb.model, "blocks", None), torch.nn.Module):
        raise ValueError(f"{CONFIG_KEY}=true: {type(fb.model).__name__} has no 'blocks' to form the teacher's "
                         f"weights block by block; set {CONFIG_KEY}=false for this model")
    by_prefix = {f"blocks.{key}.": key for key, _ in block_units(fb.model)}
    members: dict[str, list[tuple[str, ParamInfo]]] = {key: [] for key in by_prefix.values()}
    rest = []
    for info in fb.space.infos:
        parts = info.name.split(".")
        prefix = next((p for p in (".".join(parts[:k]) + "." for k in range(2, len(parts)))
                       if p in by_prefix), None)
        if prefix is not None:
            members[by_prefix[prefix]].append((info.name[len(prefix):], info))
        else:
            rest.append(info)
    spans = {}
    for key, items in members.items():
        if not items:
            spans[key] = (0, 0, items)
            continue
        lo = min(i.offset for _, i in items)
        hi = max(i.offset + i.numel for _, i in items)
        if hi - lo != sum(i.numel for _, i in items):   # not one contiguous run: per-tensor form below
            lo, hi = -1, -1
        spans[key] = (lo, hi, items)
    layout = BlockLayout(spans, rest)
    _LAYOUTS[fb.space] = layout
    return layout


def park(g: torch.Tensor) -> torch.Tensor:
    """Where the teacher gradient waits while the teacher runs: host memory when `g` is on an accelerator.

    On CPU there is no other memory to park it in (the host is the compute device), so it is returned as is
    and the blockwise teacher saves nothing there. On CUDA the copy goes to pinned memory without blocking:
    every later use is a host-to-device copy queued on the same stream, so it is ordered after this one.
    """
    if g.device.type == "cpu":
        return g
    pinned = g.device.type == "cuda"
    host = torch.empty(g.shape, dtype=g.dtype, device="cpu", pin_memory=pinned)
    host.copy_(g, non_blocking=pinned)
    return host


class TeacherWeights:
    """Provider of the teacher's tensors theta' - lr * g, formed on theta's device on demand.

    `rest()`: the non-block tensors by full name; `block(key)`: one block's tensors by name local to it,
    formed in one buffer of the block's size. Nothing is cached: a block's buffer lives as long as the
    caller holds the returned tensors. The arithmetic is the default path's (g * -lr, then + theta'),
    elementwise, so the weights are bitwise the same.
    """

    def __init__(self, fb: FunctionalBackbone, theta: torch.Tensor, g: torch.Tensor, lr: float):
        self.layout = block_layout(fb)
        self.theta = theta.detach()
        self.g = g
        self.lr = lr

    def _form(self, lo: int, hi: int) -> torch.Tensor:
        g = self.g[lo:hi]
        if g.device == self.theta.device:
            buf = g.mul(-self.lr)                     # a new tensor: g itself is left as it is
        else:
            buf = g.to(self.theta.device, non_blocking=True)
            buf.mul_(-self.lr)
        return buf.add_(self.theta[lo:hi])

    def rest(self) -> dict[str, torch.Tensor]:
        return {i.name: self._form(i.offset, i.offset + i.numel).view(i.shape) for i in self.layout.rest}

    def block(self, key: str) -> dict[str, torch.Tensor]:
        lo, hi, items = self.layout.blocks[key]
        if lo < 0:
            return {name: self._form(i.offset, i.offset + i.numel).view(i.shape) for name, i in items}
        buf = self._form(lo, hi)
        return {name: buf[i.offset - lo:i.offset - lo + i.numel].view(i.shape) for name, i in items}


@torch.no_grad()
def teacher_features(fb: FunctionalBackbone, theta: torch.Tensor, g: torch.Tensor, lr: float, x: torch.Tensor,
                     weights: TeacherWeights | None = None) -> torch.Tensor:
    """Features of `x` under theta - lr * g without forming that vector: `g` may be parked on the host
    (see `park`); theta is on the compute device. `weights` replaces the provider (tests instrument it)."""
    weights = weights or TeacherWeights(fb, theta, g, lr)
    return fb.blockwise(weights.rest(), weights.block, x, what=f"{CONFIG_KEY}=true")
