"""Launcher pieces: how a dead process is described, plain-srun environment, the console relay of rank 0's
progress, the progress line, and the one-way package dependencies (launch -> train, never the reverse)."""
from __future__ import annotations

import ast
import logging
import os
import re
import signal
from pathlib import Path

import pytest

from smat_dist.launch.env import describe_exit, export_slurm_env, job_master_port
from smat_dist.launch.relay import ProgressRelay
from smat_dist.train import progress_records
from smat_dist.utils.progress import Progress, fmt_duration

PKG = Path(__file__).resolve().parents[2] / "smat_dist"


def test_describe_exit():
    assert describe_exit(-signal.SIGKILL) == ("was killed by SIGKILL (signal 9: possibly the out-of-memory killer, "
                                              "or kill -9)")
    assert describe_exit(-signal.SIGSEGV).startswith("was killed by SIGSEGV (signal 11: a crash in native code")
    assert describe_exit(3) == "exited with code 3"


@pytest.fixture
def restored_environ():
    """export_slurm_env writes os.environ itself: the whole environment is restored after the test
    (monkeypatch.delenv of a key it did not set would restore the exported value and leak RANK=3 onwards)."""
    from unittest import mock

    with mock.patch.dict(os.environ):
        yield


def test_plain_srun_gets_master_addr_and_port(restored_environ, monkeypatch):   # restored last
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    env = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[07-08]",
           "SLURM_STEP_NODELIST": "node[07-08]", "SLURM_TASKS_PER_NODE": "2(x2)"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    added = export_slurm_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("3", "4", "1")
    assert os.environ["LOCAL_WORLD_SIZE"] == "2" and os.environ["MASTER_ADDR"] == "node07"
    port = int(os.environ["MASTER_PORT"])
    # below Linux's default ephemeral ports (32768-60999), where a rank's own connection attempts can take it
    assert port == job_master_port("4242") and 20000 <= port < 32768
    assert set(added) == {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    for k in added:   # the same job gives every task the same port
        monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_PROCID", "0")
    export_slurm_env()
    assert int(os.environ["MASTER_PORT"]) == port and os.environ["RANK"] == "0"


def test_job_master_port_stays_below_the_ephemeral_range():
    ports = [job_master_port(str(j)) for j in range(1_000_000, 1_030_000)]
    assert min(ports) == 20000 and max(ports) == 32767    # the whole range, nothing in the ephemeral one above
    assert job_master_port("4242") == 4242 + 20000 and job_master_port(12768 + 7) == 20007   # the sbatch formula


def test_progress_lines_and_durations(caplog):
    assert (fmt_duration(4.2), fmt_duration(91), fmt_duration(3725), fmt_duration(float("nan"))) == (
        "4s", "1m31s", "1h02m05s", "?")
    lg = logging.getLogger("smat_dist.test_progress")
    with caplog.at_level(logging.INFO, logger="smat_dist.test_progress"):
        with Progress(10, "train", unit="task", every_s=3600, bar=False, logger=lg) as p:
            for i in range(1, 11):
                p.update_to(i, extra=f"loss {i}")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2   # the first step and the last (every_s is an hour)
    assert re.fullmatch(r"train: 1/10 tasks \(10%\), [\d.e+]+ tasks/s, ETA \w+ \| loss 1", lines[0]), lines
    assert re.fullmatch(r"train: 10/10 tasks \(100%\), [\d.e+]+ tasks/s, ETA 0s \| loss 10", lines[1]), lines


def test_relay_follows_rank0_log(tmp_path, caplog):
    rec = progress_records.write
    rec(tmp_path, "progress", tasks=2, total=8, rate=1.0, shown="loss 9 acc 0")   # an old attempt's record
    relay = ProgressRelay(tmp_path, 8, bar=False, every_s=0.0)
    with caplog.at_level(logging.INFO):
        with relay:
            rec(tmp_path, "resumed", resumed_at=2, checkpoint="x", ranks=2,
                text="resumed from x at 2 tasks (written by 2 ranks)")
            rec(tmp_path, "progress", tasks=4, total=8, rate=2.0, eta_s=2.0, shown="loss 1.5000 acc 0.500")
            with open(tmp_path / progress_records.FILE, "a") as f:   # the last record read in two halves
                f.write('{"kind": "progress", "tasks": 8, "total": 8, "rate": 2.0, ')
                relay.poll()
                f.write('"shown": "loss 1.2500 acc 0.750"}\n')
            relay.poll()
    msgs = [r.getMessage() for r in caplog.records]
    assert relay.seen == 2, msgs      # the old attempt's line before the relay started is not read
    assert any(m.startswith("rank 0: resumed from x at 2 tasks") for m in msgs), msgs
    assert any(re.fullmatch(r"train: 8/8 tasks \(100%\), [\d.e+]+ tasks/s, ETA 0s \| loss 1.2500 acc 0.750", m)
               for m in msgs), msgs


def test_relay_polled_from_two_threads_reads_each_line_once(tmp_path):
    """The owner's last poll() races the relay's own thread; each appended line is still relayed once."""
    n = 400
    relay = ProgressRelay(tmp_path, n, bar=False, every_s=3600.0, poll_s=0.0)
    with relay:
        for i in range(1, n + 1):
            progress_records.write(tmp_path, "progress", tasks=i, total=n, rate=1.0, shown="loss 1 acc 0")
            relay.poll()
        relay.poll()
    assert relay.seen == n


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


@pytest.mark.parametrize("files,forbidden", [("train/*.py", "smat_dist.launch"), ("config/*.py", "smat_dist.launch"),
                                             ("config/*.py", "smat_dist.train"), ("utils/log.py", "torch"),
                                             ("utils/progress.py", "torch")])
def test_dependencies_are_one_way(files, forbidden):
    for f in PKG.glob(files):
        bad = sorted(m for m in _imports(f) if m == forbidden or m.startswith(forbidden + "."))
        assert not bad, f"{f.relative_to(PKG)} imports {bad}"


def test_slurm_launcher_does_not_import_the_local_one():
    assert not {m for m in _imports(PKG / "launch" / "slurm.py") if m.startswith("smat_dist.launch.local")}


def test_slurm_wait_relays_task0_progress(tmp_path, caplog):
    """slurm.wait follows rank 0's progress records in the run folder while the job runs (a stand-in job
    object; the real one is exercised by tests/slurm)."""
    from smat_dist.launch import slurm

    class FakeJob:
        job_id, num_tasks = "77", 2
        paths = type("P", (), {"folder": str(tmp_path)})()

        def __init__(self):
            self.polls = 0

        @property
        def state(self):
            return "RUNNING"

        def done(self):
            self.polls += 1
            if self.polls == 2:
                for done, shown in ((3, "loss 1.0 acc 0.5"), (6, "loss 0.9 acc 0.6")):
                    progress_records.write(tmp_path, "progress", tasks=done, total=6, rate=1.0, shown=shown)
            return self.polls > 3

        def results(self):
            return [{"status": "done", "tasks": 6}, {"status": "done", "tasks": 6}]

        class watcher:   # sacct's state once every task's result is there (wait checks it is not requeued)
            @staticmethod
            def get_state(job_id, mode="standard"):
                return "COMPLETED"

    with caplog.at_level(logging.INFO):
        out = slurm.wait(FakeJob(), poll_s=0.05, total=6, run_dir=str(tmp_path))
    assert out["status"] == "done" and out["job_id"] == "77"
    msgs = [r.getMessage() for r in caplog.records]
    assert "job 77: RUNNING" in msgs
    assert any(m.startswith("train: 6/6 tasks (100%)") and m.endswith("| loss 0.9 acc 0.6") for m in msgs), msgs
