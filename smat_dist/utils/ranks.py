"""This process's rank and world size: from the process group if one is up, else the launcher's variables.

Never imports torch: a command that does not need it (smat-convert, a config error) must not pay for it.
"""
from __future__ import annotations

import os
import sys


def rank_world() -> tuple[int, int]:
    dist = sys.modules.get("torch.distributed")   # not imported yet: no process group can exist
    if dist is not None:
        try:
            if dist.is_available() and dist.is_initialized():
                return dist.get_rank(), dist.get_world_size()
        except Exception:  # half-initialised: fall back to the launcher's variables
            pass
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1
