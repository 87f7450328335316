"""The pool passes' elementwise chains as single fused kernels (method.sparsity.compile=true).

torch.compile turns each chain into one loop (C++/OpenMP on CPU, Triton on GPU) that reads its inputs once
and writes its output once, instead of one pass per elementwise op (same values; `smat-bench scale --compile`
measures the gain); compiling costs a few seconds per kernel and process (cached by inductor across runs).
Only full chunks without padding rows use these; the rest keep the eager path, so each kernel compiles for
one shape.
"""
from __future__ import annotations

import torch

from smat_dist.pool import gates as hc

_G, _Z, _S = hc.GAMMA, hc.ZETA, hc.L0_SHIFT


def gate_grad_outer(out, zc, la, u, wc, coef):
    """out = dz/dla * (u wc) + p(1-p) coef, u [c, 1], wc [1, M] (one task's factor, already scaled)."""
    d = (zc - _G) * (_Z - zc) * ((zc > 0) & (zc < 1))
    p = torch.sigmoid(la + _S)
    out.copy_(d * (u * wc) + p * (1 - p) * coef)


def gate_grad_mm(out, zc, la, u, wc, coef):
    """The same with K > 1 factors: u [c, K] @ wc [K, M]."""
    d = (zc - _G) * (_Z - zc) * ((zc > 0) & (zc < 1))
    p = torch.sigmoid(la + _S)
    out.copy_(d * (u @ wc) + p * (1 - p) * coef)


def gate_grad_dense(out, zc, la, g, c, coef):
    d = (zc - _G) * (_Z - zc) * ((zc > 0) & (zc < 1))
    p = torch.sigmoid(la + _S)
    out.copy_(d * g * c + p * (1 - p) * coef)


def masks_stats(z_out, la, inv_beta, limit, thr):
    """Clamp the logits in place, write the deterministic gate, return the chunk's three column sums."""
    la.clamp_(-limit, limit)
    z = torch.clamp(torch.sigmoid(la * inv_beta) * (_Z - _G) + _G, 0.0, 1.0)
    z_out.copy_(z)
    return (z == 0).float().sum(0), torch.sigmoid(la + _S).sum(0), (la <= thr).float().sum(0)


_KERNELS = {f.__name__: f for f in (gate_grad_outer, gate_grad_mm, gate_grad_dense, masks_stats)}
_COMPILED: dict[str, object] = {}


def kernel(name: str):
    fn = _COMPILED.get(name)
    if fn is None:
        fn = _COMPILED[name] = torch.compile(_KERNELS[name], dynamic=False)
    return fn
