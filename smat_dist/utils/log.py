"""Rank-aware structured logging.

Every record carries the rank; only rank 0 logs INFO to the console by default so a 2-rank run does not
print everything twice, while warnings and errors from any rank are always shown.
"""
from __future__ import annotations

import logging
import os
import sys

_CONFIGURED = False


def _rank() -> int:
    from smat_dist.utils.ranks import rank_world

    rank = rank_world()[0]
    if rank == 0 and "RANK" not in os.environ:
        # a SLURM task before the launcher exported RANK (its first lines): SLURM's own task id is its rank
        procid = os.environ.get("SLURM_PROCID", "")
        if procid.isdigit():
            return int(procid)
    return rank


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (pytest and CLIs swap it), not the one seen at set-up."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = _rank()
        return record.rank == 0 or record.levelno >= logging.WARNING or _ALL_RANKS


_ALL_RANKS = False


def setup_logging(level: int = logging.INFO, all_ranks: bool = False) -> None:
    """Configure the 'smat_dist' logger once (idempotent)."""
    global _CONFIGURED, _ALL_RANKS
    _ALL_RANKS = all_ranks
    if _CONFIGURED:
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s [r%(rank)s] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(_RankFilter())
    root = logging.getLogger("smat_dist")
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    for name in ("data_tools",):
        lg = logging.getLogger(name)
        lg.addHandler(handler)
        lg.setLevel(level)
        lg.propagate = False
    _CONFIGURED = True


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith(("smat_dist", "data_tools")) else f"smat_dist.{name}")
