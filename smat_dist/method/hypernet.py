"""The hypernetwork: support-set prototypes (frozen features) -> merging weights over the M experts.

Differences from the official code, on purpose:
- the expert keys and skill tokens are registered, trained and saved (upstream HEAD makes them plain tensors);
- the task embedding is the mean of the class tokens' outputs, not token 0, so w does not depend on the order
  of the labels (a transformer block without positional encoding is permutation-equivariant, and a mean over
  the class tokens is invariant);
- the relaxed-Bernoulli noise comes from a generator keyed by the task's global index, so a task gets the same
  w on any rank, at any world size, and after a resume.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from smat_dist.config.schema import HypernetConfig
from smat_dist.utils.device import fp32_region


class _Block(nn.Module):
    """Pre-LN transformer block (no qkv bias), as upstream's DINO block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, sn: bool):
        super().__init__()
        wrap = spectral_norm if sn else (lambda m: m)
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.qkv = wrap(nn.Linear(dim, 3 * dim, bias=False))
        self.proj = wrap(nn.Linear(dim, dim))
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        hidden = int(dim * mlp_ratio)
        self.fc1 = wrap(nn.Linear(dim, hidden))
        self.fc2 = wrap(nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, 3, self.heads, d // self.heads).permute(1, 2, 0, 3)
        a = F.scaled_dot_product_attention(q, k, v)  # [H, n, d/H]
        x = x + self.proj(a.permute(1, 0, 2).reshape(n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class HyperNetwork(nn.Module):
    def __init__(self, dim: int, experts: int, cfg: HypernetConfig):
        super().__init__()
        if dim % cfg.heads:
            raise ValueError(f"method.hypernet.heads={cfg.heads} must divide the backbone feature size {dim}")
        self.cfg = cfg
        self.experts = experts
        self.tokens = nn.Parameter(torch.randn(cfg.tokens, dim) * 1e-3)
        self.block = _Block(dim, cfg.heads, cfg.mlp_ratio, cfg.spectral_norm)
        self.keys = nn.Parameter(torch.empty(experts, dim))
        nn.init.kaiming_normal_(self.keys)
        # Global count of training tasks seen: drives the temperature and is saved with the model.
        self.register_buffer("tasks_seen", torch.zeros((), dtype=torch.long))
        self._seen_host: int | None = None
        self.register_load_state_dict_pre_hook(self._host_count_from_state)
        self.block.eval()

    def train(self, mode: bool = True) -> "HyperNetwork":
        # Spectral norm's power iteration runs once per optimiser step (power_iteration_), not once per
        # forward: per-forward updates would make the estimate depend on how many tasks a rank runs per step,
        # i.e. on the world size. The block therefore stays in eval mode, where the parametrisation only reads u, v.
        super().train(mode)
        self.block.eval()
        return self

    @torch.no_grad()
    def power_iteration_(self) -> None:
        for mod in self.block.modules():
            plist = getattr(mod, "parametrizations", None)
            if plist is None:
                continue
            for p in plist["weight"]:
                if hasattr(p, "_power_method"):
                    p._power_method(p._reshape_weight_to_matrix(plist["weight"].original), p.n_power_iterations)

    def temperature(self, tasks: int | None = None) -> float:
        n = self.seen() if tasks is None else tasks
        return max(self.cfg.t_min, self.cfg.t_start - n / self.cfg.t_decay)

    def seen(self) -> int:
        """Tasks seen, from a host mirror of the `tasks_seen` buffer: reading the buffer itself is a device sync,
        and the temperature is needed in every task. The mirror is read from the buffer once after a load."""
        if self._seen_host is None:
            self._seen_host = int(self.tasks_seen)
        return self._seen_host

    @torch.no_grad()
    def advance(self, tasks: int) -> None:
        """Count `tasks` more tasks (the buffer, which the checkpoint holds, and its host mirror)."""
        seen = self.seen()
        self.tasks_seen += tasks
        self._seen_host = seen + tasks

    def _host_count_from_state(self, _module, state_dict, prefix, *_) -> None:
        """A load sets the host mirror from the incoming (host) state: no read of the device buffer at all."""
        value = state_dict.get(prefix + "tasks_seen")
        self._seen_host = int(value) if isinstance(value, torch.Tensor) and value.device.type == "cpu" else None

    def logits(self, protos: torch.Tensor) -> torch.Tensor:
        c = protos.shape[0]
        h = self.block(torch.cat([protos, self.tokens], 0))[:c].mean(0)
        return self.keys @ h

    def forward(self, protos: torch.Tensor, train: bool, task_seed: int | None = None,
                temperature: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (w [M], logits a [M])."""
        a = self.logits(protos)
        t = self.temperature() if temperature is None else temperature
        with fp32_region():   # u near 1 rounds to 1 in bf16 and log1p(-u) is -inf: the noise and w stay fp32
            a = a.float()
            if train:
                # the task's noise from its own generator on the logits' device: no host copy inside a task
                g = torch.Generator(device=a.device).manual_seed(int(task_seed or 0) & 0x7FFFFFFFFFFF)
                u = torch.rand(a.shape, generator=g, device=a.device).clamp(1e-6, 1 - 1e-6)
                s = torch.sigmoid((a + torch.log(u) - torch.log1p(-u)) / t)  # RelaxedBernoulli(t, a).rsample()
            else:
                s = torch.sigmoid(a / t)
            w = s / (s.sum() + 1e-8) if self.experts > 1 else torch.ones_like(s)
        return w, a

    def regulariser(self, a: torch.Tensor) -> torch.Tensor:
        return self.cfg.logit_reg * a.pow(2).mean()


def task_seed(seed: int, index: int) -> int:
    """Stable seed for a global task index (independent of rank, world size and Python's hash salt)."""
    return (seed * 1_000_003 + index * 2_654_435_761 + 12345) % (1 << 47)


__all__ = ["HyperNetwork", "task_seed"]
