"""The DeepSpeed engine for the replicated trainables: its config and the optimiser that drives it.

The replicated trainables (the hypernetwork and multipliers for SMAT; the dense weights, scale and bias
for P>M>F) are an ordinary DeepSpeed engine with ZeRO stage `dist.zero_stage`. The expert pool is not in
the engine: its slices must never be averaged across ranks (each rank's slice already holds the gradient
of every task after the merge's all-to-all), so its optimiser state stays local and is saved per rank.
Saving and loading the engine is the checkpoint's (smat_dist.checkpoint.deepspeed_part).
"""
from __future__ import annotations

import argparse

import torch

from smat_dist.config.schema import DistConfig
from smat_dist.distributed.process_group import device


def ds_config_for(cfg: DistConfig, tasks_per_rank: int, world: int, clip: float | None,
                  universal: bool = False) -> dict:
    """The engine's config with every key that changes the arithmetic set by us, so a DeepSpeed release that
    changes a default (0.19 made gradient clipping 1.0 by default) changes nothing: the replicated step equals
    the plain torch step (tests/distributed/test_ds_equivalence.py)."""
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": tasks_per_rank,
        "train_batch_size": tasks_per_rank * world,
        "gradient_clipping": float(clip or 0.0),   # 0.0: no clipping (None would take DeepSpeed's default)
        "prescale_gradients": False,               # average after the reduction, as the torch path does
        "gradient_predivide_factor": 1.0,
        "communication_data_type": "fp32",         # gradients reduced in fp32 whatever the autocast dtype
        "fp16": {"enabled": False},                # the engine's parameters and optimiser state stay fp32;
        "bf16": {"enabled": False},                # bf16 is autocast of the forward only (dist.precision)
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if universal:  # resuming another world size's ZeRO-partitioned state
        ds_config["checkpoint"] = {"load_universal": True}
    return ds_config


class DeepSpeedOptimizer:
    """HyperOptimizer protocol (see train/step.py) over a DeepSpeed engine."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: DistConfig,
                 tasks_per_rank: int, world: int, clip: float | None, universal: bool = False):
        import deepspeed

        self.tasks_per_rank = tasks_per_rank
        ds_config = ds_config_for(cfg, tasks_per_rank, world, clip, universal)
        want = [(g.get("name"), g["lr"], type(optimizer).__name__) for g in optimizer.param_groups]
        dev = device()
        # DeepSpeed binds the engine to cuda:LOCAL_RANK unless told the device: one visible GPU per task is cuda:0.
        args = argparse.Namespace(device_rank=dev.index) if dev.type == "cuda" else None
        self.engine, self.optimizer, _, _ = deepspeed.initialize(args=args, model=module, optimizer=optimizer,
                                                                 config=ds_config)
        got = [(g.get("name"), g["lr"], type(optimizer).__name__) for g in self.optimizer.param_groups]
        # DeepSpeed has lost per-group learning rates before: refuse to train if it did.
        if [(n, lr) for n, lr, _ in got] != [(n, lr) for n, lr, _ in want]:
            raise RuntimeError(f"DeepSpeed changed the parameter groups: wanted {want}, got {got}")
        self.base_lrs = [g.get("base_lr", g["lr"]) for g in self.optimizer.param_groups]

    def backward(self, loss: torch.Tensor, tasks_per_step: int, prescaled: bool = False) -> None:
        # ZeRO optimisers count micro-steps at the start of the engine's forward (DeepSpeed 0.19: ZeRO-3 adds a
        # backward's gradient partitions to the earlier ones only from micro-step 1 on, and copies them over at
        # micro-step 0). The method calls the module, never engine.forward, so without this every task's
        # backward of a step counted as micro-step 0 and ZeRO-3 kept only the last task's gradient. Before each
        # backward is where the engine's forward would have run in its own fwd/bwd loop (the step's first
        # backward follows a zero_grad, where it does nothing).
        opt = self.engine.optimizer
        if hasattr(opt, "clear_backward_seen_flag"):
            opt.clear_backward_seen_flag()
        # the engine divides by gradient_accumulation_steps itself (= tasks_per_step), unless told not to
        self.engine.backward(loss, scale_wrt_gas=not prescaled)
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
