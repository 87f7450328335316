"""The dense teacher (`DenseTeacher`): in place (default), block by block (`method.teacher.blockwise=true`) or
top blocks only (`method.teacher.top_fraction` < 1).

The teacher is one SGD step on the task's query loss: theta_t = theta' - lr * g_t, with g_t the gradient of
CE(Q) at theta'. The default path takes g_t per parameter tensor (the views the student's query pass ran with,
kept by a `Tap(None)`: no concatenated P-vector at the step's peak; each unit's views made just before the
unit ran, so the backward hands each unit's gradients over as soon as it is through that unit) and writes
theta_t over those gradient tensors, so the teacher costs one P-vector on the compute device. The blockwise
path never holds theta_t whole on the device:

  * `park(g_t)` moves the teacher gradient to host memory when the backbone runs on an accelerator (pinned
    and copied asynchronously on CUDA); on CPU it stays where it is, as the host is the compute device;
  * `teacher_features` runs the backbone with the non-block tensors (embeddings, stem, final norm...) formed
    up front and each block formed just before it runs, from theta' (on the device) and the parked
    gradient's slice (copied to the device), then released when it returns. A block is an element of
    `model.blocks` (ViT), or of a stage in it (timm's EfficientNet keeps nn.Sequential stages there).

On an accelerator the device then holds at most one block of teacher weights plus the non-block tensors,
and the gradient's P numbers live on the host.

The top teacher (`method.teacher.top_fraction` < 1) is a deliberate, opt-in departure from upstream: the SGD
step adapts only the top blocks (a share of `block_units`, rounded up), the layers after the blocks and the
head. Its gradient is a backward through the student's query graph that stops at the first adapted block
(autograd runs only the nodes that lead to the requested tensors), and its evaluation re-runs the query pass
from that block's input, which the student's pass kept (`Tap`). The teacher then costs 3 x fraction query
passes instead of 3, which is what brings a SMAT task under 2x a P>M>F step (figures in docs/differences.md).
Pure torch: no DeepSpeed or torch.distributed here.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from smat_dist.config.schema import TeacherConfig
from smat_dist.method.protonet import cosine_logits
from smat_dist.model.backbone import FunctionalBackbone, Tap, block_units, input_hw
from smat_dist.model.flat import ParamInfo

CONFIG_KEY = "method.teacher.blockwise"
TOP_KEY = "method.teacher.top_fraction"


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
    members, rest = fb.units
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


# ---------------------------------------------------------------- the top teacher

@dataclass(frozen=True)
class TopLayout:
    """What the top teacher adapts: from unit `unit` (a key of `block_units`) on, plus the layers after the
    blocks (`names`: every adapted parameter, in flat order); `share`: the fraction of units it runs."""
    unit: str
    names: tuple[str, ...]
    share: float


def after_blocks(model: torch.nn.Module) -> set[str]:
    """Parameters of the modules that run after the last block (final norm, CNN head conv...), found by
    watching one dummy forward. The root module's own tensors (a ViT's cls token and position embedding)
    feed the blocks, so they are not among them."""
    done, after, handles = [False], set(), []
    in_blocks = {id(m) for m in model.blocks.modules()}
    for name, mod in model.named_modules():
        if not name or id(mod) in in_blocks or not list(mod.parameters(recurse=False)):
            continue

        def seen(_m, _a, _o, _name=name, _mod=mod):
            if done[0]:
                after.update(f"{_name}.{p}" for p, _ in _mod.named_parameters(recurse=False))
        handles.append(mod.register_forward_hook(seen))
    handles.append(model.blocks.register_forward_hook(lambda *_: done.__setitem__(0, True)))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, *input_hw(model), device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return after


def top_units(n_units: int, fraction: float) -> int:
    """How many units, from the top, a share `fraction` of `n_units` adapts: rounded up, at least one."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"{TOP_KEY}={fraction}: expected a share of the blocks in (0, 1]")
    return min(n_units, max(1, math.ceil(fraction * n_units - 1e-9)))


def top_layout(fb: FunctionalBackbone, fraction: float) -> TopLayout:
    units = block_units(fb.model, f"{TOP_KEY}={fraction}")
    k = top_units(len(units), fraction)
    start = len(units) - k
    prefixes = tuple(f"blocks.{key}." for key, _ in units[start:])
    after = after_blocks(fb.model)
    names = tuple(i.name for i in fb.space.infos if i.name.startswith(prefixes) or i.name in after)
    return TopLayout(units[start][0], names, k / len(units))


class DenseTeacher:
    """The dense teacher: one plain SGD step (lr `cfg.lr`) on the query cross-entropy from the student's
    stepped weights theta' and head p', then its query logits. Three forms, the same teacher where they
    overlap: in place (default: theta_t overwrites its own gradient buffer), blockwise (never whole on the
    device) and top (only the top blocks adapted and re-run, `top_fraction` < 1)."""

    def __init__(self, fb: FunctionalBackbone, cfg: TeacherConfig, logit_scale: float):
        self.fb, self.cfg, self.logit_scale = fb, cfg, logit_scale
        self.layout = None
        if cfg.enabled and cfg.top_fraction != 1.0:
            if cfg.blockwise:
                raise ValueError(f"{CONFIG_KEY}=true and {TOP_KEY}={cfg.top_fraction}: choose one (the top "
                                 f"teacher already forms and runs only its top blocks)")
            self.layout = top_layout(fb, cfg.top_fraction)

    def tap(self) -> Tap | None:
        """What the student's query pass must keep for this teacher: the top teacher's unit input and views;
        the in-place teacher's views (its gradient is taken per tensor); the blockwise teacher nothing."""
        if self.layout is not None:
            return Tap(self.layout.unit)
        return None if self.cfg.blockwise else Tap(None)

    def gradient(self, ce_q: torch.Tensor, theta1: torch.Tensor, p1: torch.Tensor, tap: Tap | None):
        """The teacher's step direction: (gradient of CE(Q) w.r.t. theta' or the top tensors, w.r.t. p').
        A backward through the student's query graph, which is kept for the outer backward."""
        if self.layout is None and tap is None:     # blockwise: one flat gradient, parked on the host
            return tuple(torch.autograd.grad(ce_q, [theta1, p1], retain_graph=True))
        if tap is None or tap.params is None:
            raise RuntimeError(f"{TOP_KEY}: the student's query pass ran without the teacher's tap")
        # Per tensor, not w.r.t. theta': the flat gradient would be formed by concatenating the per-tensor ones,
        # P numbers more at the step's peak (the whole student graph is alive here). The in-place teacher's
        # Tap(None) made each unit's views just before the unit ran, so the engine hands each unit's gradients
        # over right after that unit's backward instead of holding them all to the end (backbone._call_by_unit).
        names = self.layout.names if self.layout is not None else [i.name for i in self.fb.space.infos]
        views = [tap.params[n] for n in names]
        *g, g_head = torch.autograd.grad(ce_q, views + [p1], retain_graph=True)
        return g, g_head

    @torch.no_grad()
    def logits(self, grads, theta1: torch.Tensor, p1: torch.Tensor, xq: torch.Tensor,
               tap: Tap | None) -> torch.Tensor:
        """The teacher's query logits; consumes (overwrites) the gradient buffers."""
        g, g_head = grads
        lr, fb = self.cfg.lr, self.fb
        if tap is not None:
            # The teacher's tensors overwrite their own gradients (the in-place teacher: the same elementwise
            # g * -lr + theta' as on the flat vector, so the same bits; the top teacher: its top tensors).
            params = {n: t.detach() for n, t in tap.params.items()}
            names = self.layout.names if self.layout is not None else [i.name for i in fb.space.infos]
            for name, gi in zip(names, g):
                params[name] = gi.mul_(-lr).add_(params[name])
            if self.layout is not None:
                feats = fb.run_from(params, xq, self.layout.unit, tap.activation.detach())
            else:
                feats = fb(params, xq)
        else:
            # The blockwise teacher, never whole on the device: g waits on the host (on an accelerator; on CPU
            # it stays put), each block's teacher weights are formed just before it runs (the same bits).
            feats = teacher_features(fb, theta1, park(g), lr, xq)
        return cosine_logits(feats, p1.detach() - lr * g_head, self.logit_scale)
