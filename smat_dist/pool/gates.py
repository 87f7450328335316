"""Hard-concrete gates (Louizos et al. 2018) with SMAT's constants.

Train gate: s = sigmoid((logit(u) + log_alpha) / beta), z = clamp(s * (zeta - gamma) + gamma, 0, 1) with
u ~ U(0.5 - eps, 0.5 + eps); upstream uses eps = 1e-6, which makes the train gate a deterministic
stretched sigmoid, so eps = 0 skips the noise draw entirely. Eval gate: no noise and beta = 1 (upstream's),
or beta = 2/3 (method.sparsity.eval_gate=train: the eval masks equal the deterministic training masks). At
beta 1 a logit between -2.398 and -1.599 is zero in training but not at test, so eval sparsity is lower.

Initial logits: N(init_mean, init_std^2) (upstream: N(0, 0.5^2), every mask ~0.5, sparsity ~0), or a mean
chosen from the target (`init_mean`): `hard` puts a share tau of the logits below the training gate's
zero threshold, `l0` makes the expected L0 density start at 1 - tau.
"""
from __future__ import annotations

import math
from statistics import NormalDist

import torch

BETA = 2.0 / 3.0
GAMMA = -0.1
ZETA = 1.1
# P(z != 0) = sigmoid(log_alpha - beta * ln(-gamma / zeta))
L0_SHIFT = -BETA * math.log(-GAMMA / ZETA)  # = +1.5986


def eval_beta(cfg) -> float:
    """The eval gate's temperature for a SparsityConfig: 1 (upstream) or the training gate's 2/3."""
    return BETA if str(cfg.eval_gate) == "train" else 1.0


def gate(log_alpha: torch.Tensor, train: bool = True, eps: float = 0.0,
         generator: torch.Generator | None = None, eval_beta: float = 1.0) -> torch.Tensor:
    if train:
        x = log_alpha
        if eps > 0:
            u = torch.empty_like(log_alpha).uniform_(0.5 - eps, 0.5 + eps, generator=generator)
            x = x + torch.log(u) - torch.log1p(-u)
        s = torch.sigmoid(x / BETA)
    else:
        s = torch.sigmoid(log_alpha if eval_beta == 1.0 else log_alpha / eval_beta)
    return torch.clamp(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def prob_nonzero(log_alpha: torch.Tensor) -> torch.Tensor:
    """Per entry P(z != 0); its mean over an expert's entries is the expected L0 density E_m."""
    return torch.sigmoid(log_alpha + L0_SHIFT)


def threshold(train: bool = True, eval_beta: float = 1.0) -> float:
    """|log_alpha| beyond which the deterministic gate is exactly 0 or 1 (1.599 train, 2.398 eval at beta 1)."""
    beta = BETA if train else eval_beta
    # z = 1 when s >= (1 - gamma) / (zeta - gamma); by symmetry z = 0 at the negative value.
    s1 = (1.0 - GAMMA) / (ZETA - GAMMA)
    return beta * math.log(s1 / (1.0 - s1))


def init_mean(cfg) -> float:
    """Mean of the initial logits for a SparsityConfig (method.sparsity.init):
    normal: init_mean as given (upstream: 0);
    hard:   a share tau of N(mean, init_std^2) lies below the training gate's zero threshold, so the training
            gate's hard sparsity starts at tau (needs init_std > 0);
    l0:     the expected L0 density E[P(z != 0)] starts at 1 - tau (probit approximation of the logistic-normal
            mean); with init_std 0.5 nearly every logit is then below the threshold (hard sparsity ~1)."""
    kind = str(cfg.init)
    tau, std = float(cfg.target), float(cfg.init_std)
    if kind == "normal":
        return float(cfg.init_mean)
    if kind == "hard":
        if std <= 0:
            raise ValueError("method.sparsity.init=hard needs method.sparsity.init_std > 0")
        return -threshold(train=True) - std * NormalDist().inv_cdf(tau)
    if kind == "l0":
        logit = math.log((1.0 - tau) / tau)
        return logit * math.sqrt(1.0 + math.pi * std * std / 8.0) - L0_SHIFT
    raise ValueError(f"method.sparsity.init={kind}: expected one of normal, hard, l0")
