"""A debugging mode that makes CPU runs catch what would break on a GPU (`dist.check_devices=true`).

On a GPU machine a tensor made without `device=` lives on the host, and NCCL refuses it; on the CPU every
tensor is on the same device, so the mistake never shows. While this mode is active, the storage of every
tensor that a factory (`torch.zeros`, `torch.tensor`, ...) makes without a device is marked *host-born*; the
mark is the storage's, so views and the `nn.Parameter`s made from such a tensor carry it; it follows the
arithmetic as a device would (an op's result is host-born when all its non-scalar tensor inputs are), and an
explicit `.to(device)` (`Module.to` included) clears it by copying, as a move to a GPU does. An op that mixes
a host-born and a device tensor (but for copies and indexing, which CUDA allows) raises HostDeviceMix, and a
device-bound collective (`Comm(device_bound=True)`) refuses a host-born tensor: the CPU run fails exactly
where CUDA or NCCL would, e.g. on a model that was built and never moved to the rank's device.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

MARK = "_smat_host_born"

_FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
              torch.linspace, torch.logspace, torch.rand, torch.randn, torch.randint, torch.randperm, torch.eye,
              torch.empty_strided, torch.scalar_tensor, torch.from_numpy}
_LIKE = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like,
         torch.randint_like}
_MOVES = {torch.Tensor.to, torch.Tensor.cuda}
# ops that CUDA allows across host and device: copies, and indexing with host indices or values
_MIXABLE = {torch.Tensor.copy_, torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.index_put_,
            torch._has_compatible_shallow_copy_type}   # (Module.to comparing a tensor with its moved copy)


class HostDeviceMix(RuntimeError):
    """An op mixes a host-born tensor with a device tensor (CUDA's 'Expected all tensors to be on the same
    device')."""


def host_born(t) -> bool:
    if not isinstance(t, torch.Tensor) or t.device.type == "meta":
        return False
    try:
        return getattr(t.untyped_storage(), MARK, False)
    except (RuntimeError, NotImplementedError):   # no storage (sparse, nested): nothing to mark
        return False


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)


def _mark(out, value: bool):
    for t in _tensors(out):
        if t.device.type == "meta":
            continue
        try:
            setattr(t.untyped_storage(), MARK, value)
        except (AttributeError, RuntimeError):   # a tensor without a storage (sparse, nested): no mark
            pass
    return out


def _moves_device(args, kwargs) -> bool:
    if kwargs.get("device") is not None:
        return True
    return any(isinstance(a, (torch.device, str)) or (isinstance(a, torch.Tensor)) for a in args[1:2])


class HostBornMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _FACTORIES:
            return _mark(out, kwargs.get("device") is None)
        if func in _LIKE:
            return _mark(out, kwargs.get("device") is None and host_born(args[0]))
        if func in _MOVES:
            if func is torch.Tensor.cuda or _moves_device(args, kwargs):
                if out is args[0] and host_born(out):
                    out = out.clone()      # on a GPU this is a copy: the source stays where it was
                return _mark(out, False)
            return out
        ins = [t for t in _tensors(list(args) + list(kwargs.values())) if t.dim() > 0]
        if func not in _MIXABLE:
            born = [host_born(t) for t in ins]
            if any(born) and not all(born):
                raise HostDeviceMix(f"{getattr(func, '__name__', func)}: a tensor made without device= (on the host, "
                                    "on a GPU machine) meets a device tensor; CUDA refuses this mix. Shapes: "
                                    + ", ".join(f"{tuple(t.shape)}{' (host)' if b else ''}" for t, b in zip(ins, born)))
        outs = list(_tensors(out))
        if ins and outs:
            stores = {id(i.untyped_storage()) for i in ins if i.device.type != "meta"}
            # in place or a view: the result is the input's storage and keeps its mark
            fresh = [o for o in outs if o.device.type != "meta" and id(o.untyped_storage()) not in stores]
            _mark(fresh, all(host_born(t) for t in ins))
        return out
