"""Frozen timm backbones that run functionally on a flat parameter vector."""
from __future__ import annotations

import contextlib
import types
from typing import Callable

import timm
import torch
from torch import nn

from smat_dist.config.schema import ModelConfig
from smat_dist.model.flat import FlatSpace
from smat_dist.model.weights import load_pretrained

# timm families whose models take img_size / patch_size (a fixed token grid): ViT and its relatives
VIT_FAMILIES = {"vision_transformer", "eva", "deit", "beit", "vision_transformer_relpos", "cait", "xcit",
                "vision_transformer_sam", "vision_transformer_hybrid"}


def _family(name: str) -> str:
    try:
        return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]
    except Exception:  # unknown name: timm.create_model below says so
        return ""


def build_backbone(cfg: ModelConfig) -> nn.Module:
    """A timm feature extractor (no classifier), frozen, in eval mode, returning one pooled feature per image.

    Eval mode is deliberate: BatchNorm in CNN backbones then uses its running statistics, so a task's
    features do not depend on which other images share its batch and the functional forward is pure.
    The feature is timm's pre-logits output (`num_classes=0`): the class token for ViT / DeiT / DINO /
    DINOv2 (registers are skipped), SigLIP's attention-pooling head (`global_pool='map'`, its weights are
    part of the backbone), EVA-02's mean of the patch tokens, and, for DINOv3, the class token as upstream
    (timm's default for DINOv3 would average the patches: `global_pool='token'` is set unless
    `model.kwargs.global_pool` says otherwise).
    """
    kwargs = dict(cfg.kwargs)
    kwargs.setdefault("num_classes", 0)
    family = _family(cfg.name)
    is_vit = family in VIT_FAMILIES or (not family and ("vit" in cfg.name or "deit" in cfg.name))
    if is_vit:
        kwargs.setdefault("img_size", cfg.image_size)
        if cfg.patch_size:
            kwargs.setdefault("patch_size", cfg.patch_size)
        kwargs.setdefault("dynamic_img_size", False)
    if "dinov3" in cfg.name:
        kwargs.setdefault("global_pool", "token")
    try:
        model = timm.create_model(cfg.name, pretrained=False, **kwargs)
    except Exception as e:
        raise ValueError(f"model.name={cfg.name!r}: timm cannot build it ({e})") from e
    pe = getattr(model, "patch_embed", None)
    patch = getattr(pe, "patch_size", None)
    if is_vit and patch is not None:
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
        if cfg.image_size % ph or cfg.image_size % pw:
            raise ValueError(f"model.image_size={cfg.image_size} is not a multiple of {cfg.name}'s patch size "
                             f"{ph}: the last {cfg.image_size % ph} pixels of each row would be dropped; use "
                             f"{cfg.image_size - cfg.image_size % ph} or {cfg.image_size + ph - cfg.image_size % ph}"
                             f" (or set model.patch_size)")
    if cfg.pretrained:
        load_pretrained(model, cfg.pretrained)
    if cfg.checkpoint_blocks:
        checkpoint_blocks(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def checkpoint_blocks(model: nn.Module) -> int:
    """Activation checkpointing of each backbone block, compatible with the functional forward.

    timm's own checkpointing re-runs a block in the backward with the module's *registered* (frozen)
    parameters, not the task weights that torch.func.functional_call had swapped in for the forward, so the
    recomputation differs. Here a block's tensors are passed to torch.utils.checkpoint explicitly, and the
    recomputation re-binds exactly those. Parameter names are unchanged (the block's forward is wrapped, not
    the module), so weights and checkpoints are unaffected. Returns the number of blocks wrapped.
    """
    from torch.utils.checkpoint import checkpoint

    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"model.checkpoint_blocks=true: {type(model).__name__} has no 'blocks' to checkpoint")
    n = 0
    for blk in blocks:
        orig = blk.forward
        state = {"inside": False}

        def fwd(self, x, *args, _orig=orig, _state=state, **kwargs):
            # extra arguments (EVA / DINOv3 blocks get rope=, attn_mask=) are passed on to the block as given
            if _state["inside"] or not torch.is_grad_enabled():
                return _orig(x, *args, **kwargs)
            named = list(self.named_parameters()) + list(self.named_buffers())
            keys = [k for k, _ in named]

            def run(inp, *tensors):
                _state["inside"] = True
                try:
                    return torch.func.functional_call(self, dict(zip(keys, tensors)), (inp, *args), kwargs)
                finally:
                    _state["inside"] = False

            return checkpoint(run, x, *[t for _, t in named], use_reentrant=False)

        blk.forward = types.MethodType(fwd, blk)
        n += 1
    return n


def block_units(model: nn.Module, what: str = "blockwise forward") -> list[tuple[str, nn.Module]]:
    """The units a blockwise forward forms weights for, as (path under `model.blocks`, module), in order.

    Each element of `model.blocks` (a ViT block), or, where that element is itself an nn.Sequential (the
    stages of timm's EfficientNet / MobileNet), each element of it: a CNN stage can hold half the
    network's parameters, one of its blocks much less.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Module):
        raise ValueError(f"{what}: {type(model).__name__} has no 'blocks' to run block by block")
    units = []
    for key, child in blocks.named_children():
        if isinstance(child, nn.Sequential):
            units.extend((f"{key}.{k}", c) for k, c in child.named_children())
        else:
            units.append((key, child))
    return units


def input_hw(model: nn.Module) -> tuple[int, int]:
    """An input size the model accepts for a probing forward: a ViT's fixed size, else 64 x 64."""
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None):
        return tuple(pe.img_size)
    return (64, 64)


@contextlib.contextmanager
def _forwards_replaced(units: list[tuple[str, nn.Module]], make: Callable):
    """Each unit's forward replaced by `make(key, module)` (bound to the module) for the duration of the
    block, and restored after, also on error: the instance's own override (checkpoint_blocks') or none."""
    installed = []
    try:
        for key, blk in units:
            installed.append((blk, "forward" in blk.__dict__, blk.__dict__.get("forward")))
            blk.forward = types.MethodType(make(key, blk), blk)
        yield
    finally:
        for blk, had, prev in installed:
            if had:
                blk.forward = prev
            else:
                del blk.forward


def unit_members(model: nn.Module, infos) -> tuple[dict[str, list], list]:
    """The flat space's parameters by unit of `block_units`: ({key: [(name local to the unit, info)]}, the
    infos of the parameters outside every unit), a clear error if the model has no `blocks`."""
    by_prefix = {f"blocks.{key}.": key for key, _ in block_units(model)}
    members: dict[str, list] = {key: [] for key in by_prefix.values()}
    rest = []
    for info in infos:
        parts = info.name.split(".")
        prefix = next((p for p in (".".join(parts[:k]) + "." for k in range(2, len(parts)))
                       if p in by_prefix), None)
        if prefix is not None:
            members[by_prefix[prefix]].append((info.name[len(prefix):], info))
        else:
            rest.append(info)
    return members, rest


class Tap:
    """Asks `FunctionalBackbone.__call__` to keep what a later partial re-run of the same forward needs:
    the parameter views it ran with (`params`, full names, buffers included) and the input of one unit
    of `block_units` (`activation`, with its graph). See `FunctionalBackbone.run_from`. With `unit=None`
    only the views are kept, for a gradient taken per tensor (never gathered into one vector): on a flat
    theta and a model with `blocks`, each unit's views are then made just before the unit runs
    (`FunctionalBackbone._call_by_unit`; `by_unit=False`: all up front, the same bits, the tests' reference)."""

    def __init__(self, unit: str | None, by_unit: bool = True):
        self.unit = unit
        self.by_unit = by_unit
        self.params: dict[str, torch.Tensor] | None = None
        self.activation: torch.Tensor | None = None


class FunctionalBackbone:
    """Runs `model` with its parameters replaced by views into a flat vector theta (length space.padded)."""

    def __init__(self, model: nn.Module, pad_to: int = 1):
        self.model = model
        self.space = FlatSpace.from_module(model, pad_to=pad_to)
        self.buffers = dict(model.named_buffers())
        self.theta_pre = self.space.flatten({n: p.detach() for n, p in model.named_parameters()})
        self._tie()
        with torch.no_grad():
            dummy = torch.zeros(1, 3, *input_hw(self.model))
            out = self.model(dummy)
        if out.ndim != 2:
            raise ValueError(f"backbone {type(model).__name__} returns features of shape {tuple(out.shape)} per "
                             f"batch, not one pooled vector per image: set a pooling (model.kwargs.global_pool: "
                             f"token, avg or map)")
        self.feature_dim = int(out.shape[-1])
        # the parameters by unit of `block_units` (`unit_members`), None for a model without `blocks`
        self.units = (unit_members(model, self.space.infos)
                      if isinstance(getattr(model, "blocks", None), nn.Module) else None)

    def _tie(self) -> None:
        """The module's frozen weights become views into theta_pre, so the backbone is held once, not twice
        (the module's own tensors and the flat copy: 1.2 GB per rank at ViT-L). The functional forward never
        reads them; the module's own forward (probes, LoRA's deep copy) sees the same values."""
        views = self.space.unflatten(self.theta_pre)
        for name, p in self.model.named_parameters():
            v = views[name]
            if p.dtype == v.dtype and p.device == v.device:
                p.data = v

    def to(self, device: torch.device) -> "FunctionalBackbone":
        self.theta_pre = self.theta_pre.to(device)
        self.model.to(device)
        self._tie()
        self.buffers = dict(self.model.named_buffers())
        return self


    def __call__(self, theta: torch.Tensor | dict[str, torch.Tensor], x: torch.Tensor, tap: "Tap | None" = None
                 ) -> torch.Tensor:
        """Features of `x` under theta: the flat vector, or one tensor per parameter name (buffers added here)."""
        if tap is not None and tap.unit is None and tap.by_unit and not isinstance(theta, dict) \
                and self.units is not None:
            pieces = self.space.pieces(theta)
            if pieces is not None:
                tap.activation = None
                return self._call_by_unit(pieces, x, tap)
        params = dict(theta) if isinstance(theta, dict) else self.space.unflatten(theta)
        params.update(self.buffers)
        if tap is None:
            return torch.func.functional_call(self.model, params, (x,))
        tap.params, tap.activation = params, None
        if tap.unit is None:
            return torch.func.functional_call(self.model, params, (x,))

        def keep_input(_module, args):
            if tap.activation is None:    # checkpoint_blocks re-enters the unit: keep the outer call's input
                tap.activation = args[0]

        handle = self.model.blocks.get_submodule(tap.unit).register_forward_pre_hook(keep_input)
        try:
            return torch.func.functional_call(self.model, params, (x,))
        finally:
            handle.remove()

    def _call_by_unit(self, pieces: dict[str, torch.Tensor], x: torch.Tensor, tap: Tap) -> torch.Tensor:
        """The forward of `__call__`, each unit's parameter views made from theta's pieces just before the
        unit runs (kept in `tap.params` as they are made).

        Why: a gradient taken per tensor (autograd.grad w.r.t. the views) is handed over when the engine
        reaches each view's node, and the engine runs ready nodes latest-made first. Views made before the
        forward are the oldest nodes of the graph, so every per-tensor gradient would wait in memory until the
        backward's very end, and on the CPU one block's freed temporaries were not reused by the next block's
        (glibc's heap grew by 0.9 GB in SMAT's teacher backward at ViT-S 128 px, for 87 MB of gradients). Made just
        before its unit, a view's node is reached right after that unit's backward. The values and the
        operations are those of the up-front views: the same bits."""
        members, rest = self.units
        params = {i.name: pieces[i.name].view(i.shape) for i in rest}
        tap.params = dict(params)

        def unit_params(key: str) -> dict[str, torch.Tensor]:
            out = {}
            for local, info in members[key]:
                out[local] = tap.params[info.name] = pieces[info.name].view(info.shape)
            return out

        out = self.blockwise(params, unit_params, x, what="Tap(None)")
        tap.params.update(self.buffers)
        return out

    def run_from(self, params: dict[str, torch.Tensor], x: torch.Tensor, unit: str,
                 activation: torch.Tensor) -> torch.Tensor:
        """Features of the forward whose unit `unit` (a key of `block_units`) receives `activation` as its
        input, with `params` (full names, buffers included) bound: the units before it are skipped (they
        pass their input through) and only the layers ahead of the blocks (stem, embeddings: a small share
        of the work) still run on `x`. With `activation` kept by a `Tap` on the same input, and the same
        parameters from `unit` on, this equals the whole forward, at the cost of the units from `unit` on."""
        units = block_units(self.model, "run_from")
        keys = [k for k, _ in units]
        if unit not in keys:
            raise ValueError(f"run_from: no unit {unit!r} in model.blocks (units: {keys})")
        start = keys.index(unit)

        def fwd_for(key, blk):
            if key == unit:
                def fwd(self_, x_, *args, _orig=blk.forward, **kwargs):
                    return _orig(activation, *args, **kwargs)
            else:
                def fwd(self_, x_, *args, **kwargs):
                    return x_
            return fwd

        with _forwards_replaced(units[:start + 1], fwd_for):
            return torch.func.functional_call(self.model, params, (x,))

    def blockwise(self, rest: dict[str, torch.Tensor],
                  block_params: Callable[[str], dict[str, torch.Tensor]], x: torch.Tensor,
                  what: str = "blockwise forward") -> torch.Tensor:
        """Forward `x` with the non-block parameters `rest` (full names) and each unit of `block_units`
        running on the tensors `block_params(key)` (names local to the unit; `key` is its path under
        `blocks`), asked for just before that unit runs and released as soon as it returns.

        Each unit's forward is wrapped only for the duration of this call (and restored after, also on
        error), so the plain `__call__` path is untouched. The wrapper composes with `checkpoint_blocks`:
        it binds the unit's tensors with functional_call, whose call re-enters the wrapper, which then
        hands over to the forward it found (the checkpointing one, or the class's). Under no_grad nothing
        keeps a unit's tensors after it returns; with a graph, autograd would keep them for its backward.
        """
        def fwd_for(key, blk):
            state = {"inside": False}

            def fwd(self_, *args, _orig=blk.forward, **kwargs):
                if state["inside"]:
                    return _orig(*args, **kwargs)
                tensors = block_params(key)
                state["inside"] = True
                try:
                    return torch.func.functional_call(self_, tensors, args, kwargs)
                finally:
                    state["inside"] = False
                    del tensors
            return fwd

        with _forwards_replaced(block_units(self.model, what), fwd_for):
            params = dict(rest)
            params.update(self.buffers)
            return torch.func.functional_call(self.model, params, (x,))
