"""Hard-concrete gates (Louizos et al. 2018) with SMAT's constants.

Train gate: s = sigmoid((logit(u) + log_alpha) / beta), z = clamp(s * (zeta - gamma) + gamma, 0, 1) with
u ~ U(0.5 - eps, 0.5 + eps); upstream uses eps = 1e-6, which makes the train gate a deterministic
stretched sigmoid, so eps = 0 skips the noise draw entirely. Eval gate: beta = 1, no noise.
"""
from __future__ import annotations

import math

import torch

BETA = 2.0 / 3.0
GAMMA = -0.1
ZETA = 1.1
# P(z != 0) = sigmoid(log_alpha - beta * ln(-gamma / zeta))
L0_SHIFT = -BETA * math.log(-GAMMA / ZETA)  # = +1.5986


def gate(log_alpha: torch.Tensor, train: bool = True, eps: float = 0.0,
         generator: torch.Generator | None = None) -> torch.Tensor:
    if train:
        x = log_alpha
        if eps > 0:
            u = torch.empty_like(log_alpha).uniform_(0.5 - eps, 0.5 + eps, generator=generator)
            x = x + torch.log(u) - torch.log1p(-u)
        s = torch.sigmoid(x / BETA)
    else:
        s = torch.sigmoid(log_alpha)
    return torch.clamp(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def prob_nonzero(log_alpha: torch.Tensor) -> torch.Tensor:
    """Per entry P(z != 0); its mean over an expert's entries is the expected L0 density E_m."""
    return torch.sigmoid(log_alpha + L0_SHIFT)


def threshold(train: bool = True) -> float:
    """|log_alpha| beyond which the deterministic gate is exactly 0 or 1 (1.599 train, 2.398 eval)."""
    beta = BETA if train else 1.0
    # z = 1 when s >= (1 - gamma) / (zeta - gamma); by symmetry z = 0 at the negative value.
    s1 = (1.0 - GAMMA) / (ZETA - GAMMA)
    return beta * math.log(s1 / (1.0 - s1))
