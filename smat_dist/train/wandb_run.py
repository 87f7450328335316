"""wandb on rank 0 only, offline by default, one wandb run per training run across requeues.

`start` takes the run id the trainer kept in its checkpoint (None on a fresh run) so a requeued or
resumed job continues the same wandb run; the mode comes from `logging.wandb_mode` and is set here, at
start, never read from the environment at import time. Offline runs are written under
`<run_dir>/wandb/offline-run-*` and uploaded later with `wandb sync` (docs/launching.md).
"""
from __future__ import annotations

import dataclasses
import os
import secrets
import string
from typing import Any

from smat_dist.config.schema import Config
from smat_dist.utils.log import get_logger

_log = get_logger(__name__)
MODES = ("offline", "online", "disabled")
_run = None


def _is_rank0() -> bool:
    from smat_dist.utils.ranks import rank_world

    return rank_world()[0] == 0


def new_run_id() -> str:
    # wandb's own id format (8 lowercase alphanumerics); its generator is not public API
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def start(cfg: Config, run_dir: str, run_id: str | None = None) -> tuple[Any, str | None]:
    """Start (or continue, given `run_id`) the wandb run on rank 0. Returns (run, run_id); (None, run_id)
    on other ranks and (None, None) when wandb_mode=disabled. Store the id in the checkpoint."""
    global _run
    mode = cfg.logging.wandb_mode
    if mode not in MODES:
        raise ValueError(f"logging.wandb_mode={mode!r}: expected one of {', '.join(MODES)}")
    if not _is_rank0() or mode == "disabled":
        return None, run_id
    os.environ["WANDB_MODE"] = mode          # the config decides, whatever the shell had
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    run_id = run_id or new_run_id()
    os.makedirs(run_dir, exist_ok=True)
    _run = wandb.init(project=cfg.logging.project, id=run_id, resume="allow", dir=run_dir, mode=mode,
                      name=os.path.basename(os.path.normpath(run_dir)), config=dataclasses.asdict(cfg),
                      settings=wandb.Settings(console="off"))
    _log.info("wandb %s run %s in %s", mode, run_id, run_dir)
    return _run, run_id


def log(metrics: dict[str, Any], step: int | None = None) -> None:
    """Log scalars (or wandb.Image objects) at `step` (the task counter); no-op off rank 0 / without a run."""
    if _run is not None:
        _run.log(metrics, step=step)


def log_images(images: dict[str, str], step: int | None = None) -> None:
    """Log analysis images given as {name: path to a PNG}."""
    if _run is not None:
        import wandb

        _run.log({k: wandb.Image(v) for k, v in images.items()}, step=step)


def finish() -> None:
    global _run
    if _run is not None:
        _run.finish()
        _run = None
