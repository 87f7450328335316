"""The DeepSpeed engine as a checkpoint part, and the universal conversion that resumes it at another world size.

The engine's ZeRO-partitioned optimiser state is DeepSpeed's own format: it is written under ds/ by the engine
itself (collectively), and a resume at another world size first converts it into DeepSpeed's universal format.
Evaluation loads without DeepSpeed, so rank 0 also writes the module's full state as replicated.pt.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch

from smat_dist.checkpoint.errors import CheckpointError
from smat_dist.checkpoint.manifest import read_manifest, verify_file
from smat_dist.checkpoint.parts import EnginePart
from smat_dist.distributed.engine import DeepSpeedOptimizer
from smat_dist.utils.log import get_logger

log = get_logger(__name__)
TAG = "state"


class DeepSpeedPart(EnginePart):
    """The replicated module and its DeepSpeed engine: ds/ (ZeRO-partitioned optimiser state per rank) and,
    from rank 0, replicated.pt."""

    def __init__(self, opt: DeepSpeedOptimizer, rank: int):
        self.opt, self.rank = opt, rank

    def save_to(self, folder) -> None:
        folder = Path(folder)
        self.opt.engine.save_checkpoint(str(folder / "ds"), tag=TAG, save_latest=False)
        state = self.module_state()          # collective under ZeRO-3 (gathers the parameters)
        if self.rank == 0:
            torch.save(state, folder / "replicated.pt")

    def module_state(self) -> dict:
        """Full (unpartitioned) state of the replicated module on every rank."""
        out: dict = {}
        self.opt.with_full_params(lambda: out.update(
            {k: v.detach().clone() for k, v in self.opt.engine.module.state_dict().items()}))
        return out

    def own_files(self, folder, rank: int, reading: bool = False, universal: bool = False) -> list:
        folder = Path(folder)
        files = sorted(p for p in (folder / "ds").rglob("*") if p.is_file())
        mine = [p for p in files if f"zero_pp_rank_{rank}_" in p.name]
        shared = [p for p in files if "zero_pp_rank_" not in p.name]
        rep = [folder / "replicated.pt"] if (folder / "replicated.pt").exists() else []
        if reading:
            return rep if universal else mine + shared
        return mine + shared + rep if rank == 0 else mine

    def load_from(self, folder, universal=None) -> None:
        folder = Path(folder)
        if universal is None:
            self._load_engine(folder / "ds")
            return
        self._load_engine(Path(universal))
        # The universal format carries parameters and optimiser state, not buffers (task counter, spectral-norm
        # vectors): take those from the full replicated state.
        state = torch.load(folder / "replicated.pt", map_location="cpu", weights_only=True)
        with torch.no_grad():
            for name, buf in self.opt.engine.module.named_buffers():
                if name in state:
                    buf.copy_(state[name].to(buf))

    def _load_engine(self, folder: Path) -> None:
        path, _ = self.opt.engine.load_checkpoint(str(folder), tag=TAG, load_module_strict=True,
                                                  load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:  # DeepSpeed returns None instead of raising on a missing tag
            raise FileNotFoundError(f"DeepSpeed checkpoint {folder}/{TAG} could not be loaded")


def universal_checkpoint(ck, out, comm) -> Path:
    """DeepSpeed's universal checkpoint of `ck`'s ZeRO-partitioned state, for a resume at another world size:
    made once by rank 0 into `out` (outside `ck`, whose files are checksummed), after verifying the files
    the conversion reads."""
    ck, out = Path(ck), Path(out)
    if comm.rank == 0 and not (out / "done").exists():
        manifest = read_manifest(ck)
        for rel in manifest["files"]:
            if rel.startswith("ds/"):
                verify_file(ck, rel, manifest)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ck / "ds" / TAG),
               "--output_folder", str(out / TAG), "--inject_missing_state"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise CheckpointError(f"converting {ck}/ds to a universal checkpoint failed: {res.stderr[-800:]}")
        (out / "done").touch()
        log.info("universal checkpoint of %s written to %s", ck, out)
    comm.barrier()
    return out
