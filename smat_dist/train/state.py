"""The trainer's own checkpoint parts: the run's progress (rank 0) and each rank's RNG streams."""
from __future__ import annotations

import ast
import random
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TrainState:
    """Global progress: tasks trained, the data stream's cursor, the wandb run id (one file, from rank 0)."""

    tasks: int = 0
    cursor: int = 0
    wandb_run_id: str | None = None

    def state_dict(self) -> dict:
        return {"tasks": self.tasks, "cursor": self.cursor, "wandb_run_id": self.wandb_run_id or ""}

    def load_state_dict(self, sd: dict) -> None:
        self.tasks, self.cursor = int(sd["tasks"]), int(sd["cursor"])
        self.wandb_run_id = sd.get("wandb_run_id") or None


class RngState:
    """This rank's torch (CPU, and its CUDA device's) / python / numpy generators (one file per rank; a rank
    that had no predecessor at another world size keeps its seeded state: episodes and task noise do not
    depend on these streams)."""

    per_rank = True

    def state_dict(self) -> dict:
        np_state = np.random.get_state()
        sd = {"torch": torch.get_rng_state(), "python": repr(random.getstate()),
              "numpy_key": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2])}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            sd["cuda"] = torch.cuda.get_rng_state()          # this rank's current device
        return sd

    def load_state_dict(self, sd: dict) -> None:
        torch.set_rng_state(sd["torch"])
        if "cuda" in sd and torch.cuda.is_available():     # a CPU checkpoint resumed on GPU keeps the seeded state
            torch.cuda.set_rng_state(sd["cuda"])
        random.setstate(ast.literal_eval(sd["python"]))
        np.random.set_state(("MT19937", sd["numpy_key"].numpy().astype(np.uint32), sd["numpy_pos"], 0, 0.0))
