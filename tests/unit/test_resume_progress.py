"""The console after a resume (issue 29, item 5): the first progress line shows the rate of the tasks run since
this attempt started, as the trainer measured them (the relay used to time lines by when it read them: a resume
line and the first steps read at once gave thousands of tasks/s and ETA 0s), and a SLURM task's log lines carry
its own rank from the first line on."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

from smat_dist.launch.relay import ProgressRelay
from smat_dist.train import progress_records


def test_first_progress_line_after_a_resume_has_the_trainers_rate(tmp_path, caplog):
    relay = ProgressRelay(tmp_path, 200, bar=False, every_s=0.0, poll_s=3600)
    rec = progress_records.write
    with caplog.at_level(logging.INFO):
        with relay:
            # written over ~20 s by the ranks, read in one poll
            rec(tmp_path, "resumed", resumed_at=72, checkpoint="x", ranks=2,
                text="resumed from x at 72 tasks (written by 2 ranks)")
            rec(tmp_path, "progress", tasks=74, total=200, rate=0.2, eta_s=630.0, shown="loss 1.2000 acc 0.500")
            rec(tmp_path, "progress", tasks=76, total=200, rate=0.2, eta_s=620.0, shown="loss 1.1000 acc 0.550")
            relay.poll()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train: ")]
    assert lines, [r.getMessage() for r in caplog.records]
    first = re.fullmatch(r"train: 74/200 tasks \(37%\), ([\d.e+]+) tasks/s, ETA (\S+) \| loss 1.2000 acc 0.500",
                         lines[0])
    assert first, lines
    assert float(first.group(1)) == 0.2 and first.group(2) == "10m30s", lines


def test_a_slurm_tasks_first_log_line_carries_its_rank():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["SLURM_PROCID"] = "1"
    code = ("from smat_dist.utils.log import get_logger, setup_logging; setup_logging(); "
            "get_logger('smat_dist.x').warning('first line')")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "[r1] WARNING smat_dist.x: first line" in p.stderr, p.stderr
