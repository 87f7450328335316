"""DeepSpeed behind one door: process-group set-up and the engine for the replicated trainables.

The replicated trainables (the hypernetwork and multipliers for SMAT; the dense weights, scale and bias
for P>M>F) are an ordinary DeepSpeed engine with ZeRO stage `dist.zero_stage`. The expert pool is not in
the engine: its slices must never be averaged across ranks (each rank's slice already holds the gradient
of every task after the merge's all-to-all), so its optimiser state stays local and is saved per rank.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from smat_dist.config.schema import DistConfig
from smat_dist.utils.log import get_logger

log = get_logger(__name__)


def _skip_shm_build() -> None:
    """DeepSpeed JIT-builds a shared-memory comm op (~70 s) on its first CPU init; gloo alone gives the
    same results (checked in shared/reference/environment.md), so we do not pay for it."""
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def init_distributed(cfg: DistConfig) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed from the launcher's env vars; returns (rank, world)."""
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RuntimeError(f"environment variable {key} is not set: start ranks through smat-train "
                               "(launcher=local|slurm), torchrun, the deepspeed launcher or submitit")
    import deepspeed

    backend = cfg.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _skip_shm_build()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class DeepSpeedOptimizer:
    """HyperOptimizer protocol (see train/step.py) over a DeepSpeed engine."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: DistConfig,
                 tasks_per_rank: int, world: int, clip: float | None, universal: bool = False):
        import deepspeed

        self.tasks_per_rank = tasks_per_rank
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": tasks_per_rank,
            "train_batch_size": tasks_per_rank * world,
            "zero_optimization": {"stage": cfg.zero_stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        if clip:
            ds_config["gradient_clipping"] = clip
        if universal:  # resuming another world size's ZeRO-partitioned state
            ds_config["checkpoint"] = {"load_universal": True}
        want = [(g.get("name"), g["lr"], type(optimizer).__name__) for g in optimizer.param_groups]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
        got = [(g.get("name"), g["lr"], type(optimizer).__name__) for g in self.optimizer.param_groups]
        # DeepSpeed has lost per-group learning rates before: refuse to train if it did.
        if [(n, lr) for n, lr, _ in got] != [(n, lr) for n, lr, _ in want]:
            raise RuntimeError(f"DeepSpeed changed the parameter groups: wanted {want}, got {got}")
        self.base_lrs = [g.get("base_lr", g["lr"]) for g in self.optimizer.param_groups]

    def backward(self, loss: torch.Tensor, tasks_per_step: int) -> None:
        self.engine.backward(loss)  # the engine divides by gradient_accumulation_steps itself
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()      # advances DeepSpeed's micro-step counter; no update before the boundary

    def step(self, factor: float) -> dict[str, float]:
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * factor
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return {"grad_norm/replicated": float(norm)} if norm is not None else {}

    def with_full_params(self, fn) -> None:
        if self.engine.zero_optimization_partition_weights():
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None):
                fn()
        else:
            fn()

    def module_state(self) -> dict:
        """Full (unpartitioned) state of the replicated module on every rank."""
        if self.engine.zero_optimization_partition_weights():
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None):
                return {k: v.detach().clone() for k, v in self.engine.module.state_dict().items()}
        return {k: v.detach().clone() for k, v in self.engine.module.state_dict().items()}

    def save(self, folder: str, tag: str) -> None:
        self.engine.save_checkpoint(folder, tag=tag, save_latest=False)

    def load(self, folder: str, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(folder, tag=tag, load_module_strict=True,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:  # DeepSpeed returns None instead of raising on a missing tag
            raise FileNotFoundError(f"DeepSpeed checkpoint {folder}/{tag} could not be loaded")
