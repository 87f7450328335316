"""ProtoNet head with cosine logits at a fixed scale (SMAT's head; no learnable scale or bias)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def prototypes(feats: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    onehot = F.one_hot(labels, ways).to(feats.dtype)  # [N, C]
    counts = onehot.sum(0).clamp_min(1.0)
    return (onehot.t() @ feats) / counts.unsqueeze(1)


def cosine_logits(feats: torch.Tensor, protos: torch.Tensor, scale: float = 10.0) -> torch.Tensor:
    return scale * F.normalize(feats, dim=-1) @ F.normalize(protos, dim=-1).t()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float(accuracy_t(logits, labels))


def accuracy_t(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Accuracy as a 0-dim tensor on the logits' device (no host sync; the step syncs its metrics once)."""
    return (logits.argmax(-1) == labels).float().mean().detach()
