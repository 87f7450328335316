"""sbatch's refusals as one line: what submitit raises when `sbatch` fails carries SLURM's whole stderr
(retries, DNS lookups, then the fatal line), and submitit also echoes it on our stderr. The line that says
why is the last `fatal:` or `error:` line; a missing configuration gets the hint that fixes it."""
from __future__ import annotations

import os

CONFIG_SIGNS = ("configuration source", "Unable to process configuration", "slurm.conf")


def reason_line(text: str) -> str:
    """The most telling line of sbatch's stderr: the last `fatal:` line, else the last `error:` line."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    for mark in ("fatal:", "error:"):
        hits = [ln for ln in lines if mark in ln]
        if hits:
            return hits[-1]
    return lines[-1] if lines else "sbatch failed without a message"


def submission_error(err: BaseException) -> str:
    """One line for a failed submission, naming the cause and, for a missing configuration, SLURM_CONF."""
    text = str(err) or type(err).__name__
    why = reason_line(text)
    msg = f"SLURM did not accept the job: {why}"
    if any(s in text for s in CONFIG_SIGNS):
        conf = os.environ.get("SLURM_CONF")
        msg += (f" (SLURM_CONF={conf})" if conf else
                " (SLURM_CONF is not set: export SLURM_CONF=/path/to/slurm.conf, e.g. the line "
                "`slurm/devcluster.sh start` prints)")
    return msg
