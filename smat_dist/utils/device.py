"""The device a rank computes on and the autocast context its precision setting asks for."""
from __future__ import annotations

import contextlib

import torch


def pick_device(name: str | None = None) -> torch.device:
    """`auto`/None: this process's current CUDA device if there is one, else the CPU."""
    if name and name != "auto":
        return torch.device(name)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def autocast_for(dev: torch.device, precision: str):
    """bf16 autocast on GPU by default (`auto`), fp32 on CPU; `bf16`/`fp32` force it."""
    precision = getattr(precision, "value", precision)
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(dev.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"precision {precision!r}: expected auto, fp32 or bf16")
    return contextlib.nullcontext()
