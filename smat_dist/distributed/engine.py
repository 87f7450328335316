"""DeepSpeed behind one door: process-group set-up and the engine for the replicated trainables.

The replicated trainables (the hypernetwork and multipliers for SMAT; the dense weights, scale and bias
for P>M>F) are an ordinary DeepSpeed engine with ZeRO stage `dist.zero_stage`. The expert pool is not in
the engine: its slices must never be averaged across ranks (each rank's slice already holds the gradient
of every task after the merge's all-to-all), so its optimiser state stays local and is saved per rank.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

from smat_dist.config.schema import DistConfig
from smat_dist.distributed.timeouts import pg_timeouts
from smat_dist.utils.device import rank_device
from smat_dist.utils.log import get_logger

log = get_logger(__name__)
_control_group = None
_device: torch.device | None = None
_check_mode = None


def _skip_shm_build() -> None:
    """DeepSpeed JIT-builds a shared-memory comm op (~70 s) on its first CPU init; gloo alone gives the
    same results on the CPU, so we do not pay for it."""
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def init_distributed(cfg: DistConfig) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed from the launcher's env vars; returns (rank, world)."""
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RuntimeError(f"environment variable {key} is not set: start ranks through smat-train "
                               "(launcher=local|slurm), torchrun, the deepspeed launcher or submitit")
    import deepspeed

    global _control_group, _device, _check_mode
    if cfg.check_devices and _check_mode is None:
        from smat_dist.utils.devcheck import HostBornMode

        _check_mode = HostBornMode()
        _check_mode.__enter__()     # for the life of this rank's process (its main thread)
    backend = str(getattr(cfg.backend, "value", cfg.backend) or ("nccl" if torch.cuda.is_available() else "gloo"))
    # The device first: NCCL binds its communicator to the current device when the group is made.
    _device = rank_device(int(os.environ.get("LOCAL_RANK", "0"))) if backend == "nccl" else torch.device("cpu")
    if _device.type == "cuda":
        torch.cuda.set_device(_device)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _skip_shm_build()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=pg_timeouts(cfg))
    # Host-side control traffic (stop flags, metrics, checkpoint agreement, objects) is CPU data: under NCCL it
    # gets its own gloo group instead of a round trip through the GPU (and NCCL's refusal of CPU tensors).
    _control_group = None
    if "nccl" in str(dist.get_backend()).lower():
        _control_group = dist.new_group(backend="gloo", timeout=pg_timeouts(cfg))
    return dist.get_rank(), dist.get_world_size()


def control_group():
    """The process group for host-side control traffic (None: the default group, already on the CPU)."""
    return _control_group


def device() -> torch.device:
    """This rank's compute device (init_distributed chose it; the current CUDA device or the CPU otherwise)."""
    if _device is not None:
        return _device
    from smat_dist.utils.device import pick_device

    return pick_device()


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


class DeepSpeedPart:
    """The replicated module and its DeepSpeed engine as one checkpoint part (checkpoint.py's "engine" kind).

    Writes DeepSpeed's own checkpoint under ds/ (collective; ZeRO-partitioned optimiser state per rank) and,
    from rank 0, the module's full state as replicated.pt, which evaluation loads without DeepSpeed."""

    def __init__(self, opt: DeepSpeedOptimizer, rank: int):
        self.opt, self.rank = opt, rank

    def save_to(self, folder) -> None:
        from pathlib import Path

        folder = Path(folder)
        self.opt.save(str(folder / "ds"), tag="state")
        state = self.opt.module_state()          # collective under ZeRO-3 (gathers the parameters)
        if self.rank == 0:
            torch.save(state, folder / "replicated.pt")

    def own_files(self, folder, rank: int, reading: bool = False, universal: bool = False) -> list:
        """Files this rank wrote (to hash them), or, reading, the files its load reads (to verify them)."""
        from pathlib import Path

        folder = Path(folder)
        files = sorted(p for p in (folder / "ds").rglob("*") if p.is_file())
        mine = [p for p in files if f"zero_pp_rank_{rank}_" in p.name]
        shared = [p for p in files if "zero_pp_rank_" not in p.name]
        rep = [folder / "replicated.pt"] if (folder / "replicated.pt").exists() else []
        if reading:
            return rep if universal else mine + shared
        return mine + shared + rep if rank == 0 else mine

    def load_from(self, folder, universal=None) -> None:
        from pathlib import Path

        folder = Path(folder)
        if universal is None:
            self.opt.load(str(folder / "ds"), tag="state")
            return
        self.opt.load(str(universal), tag="state")
        # The universal format carries parameters and optimiser state, not buffers (task counter, spectral-norm
        # vectors): take those from the full replicated state.
        state = torch.load(folder / "replicated.pt", map_location="cpu", weights_only=True)
        with torch.no_grad():
            for name, buf in self.opt.engine.module.named_buffers():
                if name in state:
                    buf.copy_(state[name].to(buf))


def universal_checkpoint(ck, out, comm) -> "object":
    """DeepSpeed's universal checkpoint of `ck`'s ZeRO-partitioned state, for a resume at another world size:
    made once by rank 0 into `out` (outside `ck`, whose files are checksummed), after verifying the files
    the conversion reads."""
    import shutil
    import subprocess
    from pathlib import Path

    from smat_dist.distributed.checkpoint import CheckpointError, read_manifest, verify_file

    ck, out = Path(ck), Path(out)
    if comm.rank == 0 and not (out / "done").exists():
        manifest = read_manifest(ck)
        for rel in manifest["files"]:
            if rel.startswith("ds/"):
                verify_file(ck, rel, manifest)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ck / "ds" / "state"),
               "--output_folder", str(out / "state"), "--inject_missing_state"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise CheckpointError(f"converting {ck}/ds to a universal checkpoint failed: {res.stderr[-800:]}")
        (out / "done").touch()
        log.info("universal checkpoint of %s written to %s", ck, out)
    comm.barrier()
    return out
